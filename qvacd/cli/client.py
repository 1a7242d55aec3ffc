"""The CLI's one client of a running daemon's HTTP API (as Ollama's cmd/ uses its api/).

The one place that knows where the daemon is (--api, QVACD_API, the daemon.json the
daemon leaves in the data dir, the default port), the bearer token (QVACD_API_TOKEN),
the timeouts, and how an unreachable daemon or an error answer becomes one line for
the user (CliError). Command modules never build URLs or catch httpx errors themselves.

httpx is imported on first use, so commands that never ask the daemon (trust, mesh,
models list) do not pay for it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..daemon_file import running_daemon_api
from .common import CliError, data_dir_of

if TYPE_CHECKING:
    import httpx

DEFAULT_API = "127.0.0.1:11435"
REQUEST_TIMEOUT_S = 10.0  # a plain GET; also the connect timeout of a stream


class DaemonClient:
    """Requests to one daemon; every failure is a CliError with one line."""

    def __init__(self, base_url: str, token: str = "") -> None:
        self.base_url = base_url
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    @classmethod
    def for_args(cls, args: argparse.Namespace) -> DaemonClient:
        """The daemon named by --api, else QVACD_API, else the one running on the data dir,
        else the default address."""
        api = getattr(args, "api", None) or os.environ.get("QVACD_API") \
            or running_daemon_api(data_dir_of(args)) or DEFAULT_API
        return cls(api if api.startswith("http") else f"http://{api}",
                   os.environ.get("QVACD_API_TOKEN", ""))

    def get_json(self, path: str) -> Any:
        """GET `path` and return its JSON body (HTTP 200 only)."""
        import httpx

        try:
            with self._http(REQUEST_TIMEOUT_S) as c:
                r = c.get(path)
        except httpx.TransportError as e:
            raise self.unreachable() from e
        if r.status_code != 200:
            raise CliError(error_text(r))
        return r.json()

    def send_json(self, method: str, path: str, body: dict[str, Any] | None = None, *,
                  timeout_s: float = REQUEST_TIMEOUT_S) -> Any:
        """`method` `path` with a JSON body; the answer's JSON (HTTP 200 only)."""
        import httpx

        try:
            with self._http(httpx.Timeout(REQUEST_TIMEOUT_S, read=timeout_s)) as c:
                r = c.request(method, path, json=body)
        except httpx.TransportError as e:
            raise self.unreachable() from e
        if r.status_code != 200:
            raise CliError(error_text(r))
        return r.json()

    @contextlib.contextmanager
    def stream(self, method: str, path: str, *, body: dict[str, Any],
               headers: dict[str, str] | None = None, idle_timeout_s: float | None = None
               ) -> Iterator[httpx.Response]:
        """A streamed request whose answer is 200 (anything else: CliError with the
        daemon's own error message). `idle_timeout_s`: longest wait for the next bytes
        (None: wait forever, and no connect timeout either). A connection lost while
        reading the body is a CliError too."""
        import httpx

        timeout = None if idle_timeout_s is None \
            else httpx.Timeout(REQUEST_TIMEOUT_S, read=idle_timeout_s)
        try:
            with self._http(timeout) as c, c.stream(method, path, json=body,
                                                    headers=headers) as r:
                if r.status_code != 200:
                    r.read()
                    raise CliError(error_text(r))
                yield r
        except httpx.TransportError as e:
            raise self.unreachable() from e

    def unreachable(self) -> CliError:
        return CliError(f"no qvacd daemon answers at {self.base_url}; start one with"
                        " `qvacd start` (or pass --api HOST:PORT)")

    def _http(self, timeout: Any) -> httpx.Client:
        import httpx

        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout)


def error_text(r: httpx.Response) -> str:
    """The daemon's error answer as one line (OpenAI and Ollama error shapes both)."""
    try:
        err = r.json().get("error")
        if isinstance(err, dict):
            err = err.get("message")
        return f"daemon said ({r.status_code}): {err}"
    except ValueError:
        return f"daemon answered HTTP {r.status_code}"
