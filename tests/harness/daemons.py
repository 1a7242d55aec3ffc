"""A `qvacd start` subprocess as a test or a bench sees it, and the small things around it.

`Daemon` is the one handle: start with options, a data dir and an environment; wait
until the API answers and the default model is loaded (or cannot be); stop with SIGTERM,
then SIGKILL; the tail of its log in every failure it raises. Where it runs and how its
API is reached are a few class attributes and two methods (`command`, `probe`), so a
subclass for a test launcher (tests/test_pull.py) or a network namespace
(bench/lab/nat.py) changes only those.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from models.store import ModelEntry

REPO = Path(__file__).resolve().parent.parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90, interval: float = 0.1) -> None:
    """Until `url` answers with anything below 500; TimeoutError(url) after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(interval)
    raise TimeoutError(url)


def install_model_template(dest: Path) -> ModelEntry | None:
    """Register the default model in a data dir at `dest` (the template the others are
    cloned from); None when the model package is not installed."""
    from models.store import ModelStore, install_default_model

    return install_default_model(ModelStore(dest), log=lambda m: None)


def clone_data_dir(template: Path, dest: Path) -> Path:
    """A data dir holding the template's models (hard links: no 253 MB copy per daemon),
    and nothing else."""
    (dest / "models" / "blobs").mkdir(parents=True, exist_ok=True)
    for blob in (template / "models" / "blobs").iterdir():
        target = dest / "models" / "blobs" / blob.name
        if not target.exists():
            os.link(blob, target)
    shutil.copy(template / "models" / "index.json", dest / "models" / "index.json")
    return dest


def preload_settled(status: dict, args: Sequence[str]) -> bool:
    """Whether a daemon started with `args` is done loading, by its /qvac/status: the
    default model is loaded, or preload is off, or no model fits its memory budget."""
    models = status.get("models") or []
    if "--no-preload" in args or not models:
        return True
    return any(m["loaded"] for m in models) or not any(m["fits_budget"] for m in models)


class Daemon:
    """One `qvacd start` subprocess, its API and its log."""

    #: the command before the options, and the options every start of this kind passes
    launcher: tuple[str, ...] = (sys.executable, "-m", "qvacd.cli", "start")
    base_args: tuple[str, ...] = ("--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0")
    #: True: the daemon gets its own session, and signals go to its whole process group
    own_session = False
    poll_interval = 0.1
    log_tail_chars = 6000

    def __init__(self, data_dir: Path, *args: str, port: int | None = None,
                 env: dict[str, str] | None = None, log_path: Path | None = None,
                 name: str = "daemon") -> None:
        self.data_dir = data_dir
        self.name = name
        self.port = port or free_port()
        self.api = f"http://127.0.0.1:{self.port}"
        self.args = ["--api", f"127.0.0.1:{self.port}", *args]
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path or data_dir.parent / f"daemon-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [*self.launcher, "--data-dir", str(self.data_dir), *self.base_args, *self.args]

    def start(self, wait: bool = True, timeout: float = 60) -> Daemon:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=REPO, start_new_session=self.own_session)
        if wait:
            self.wait_ready(timeout)
        return self

    def probe(self) -> httpx.Response:
        """One GET of /qvac/status, quick to fail while the daemon is starting."""
        return httpx.get(self.api + "/qvac/status", timeout=1, headers=self.auth())

    def ready(self, r: httpx.Response) -> bool:
        # A 401 is an API up behind a token this caller does not hold: as ready as it sees.
        if r.status_code == 401:
            return True
        return r.status_code == 200 and preload_settled(r.json(), self.args)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.ready(self.probe()):
                    return
            except httpx.TransportError:
                pass
            time.sleep(self.poll_interval)
        raise TimeoutError(f"{self.name} not ready in {timeout}s:\n{self.log()}")

    def auth(self) -> dict[str, str]:
        tok = self.env.get("QVACD_API_TOKEN")
        return {"Authorization": f"Bearer {tok}"} if tok else {}

    def status(self) -> dict:
        return httpx.get(self.api + "/qvac/status", timeout=30, headers=self.auth()).json()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-self.log_tail_chars:]
        except OSError:
            return ""

    def _signal(self, sig: int) -> None:
        assert self.proc is not None
        if self.own_session:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        """Send `sig` and wait `timeout` s for the exit status. A daemon still running
        then is SIGKILLed and TimeoutExpired raised: not exiting on SIGTERM is a bug."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self._signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._signal(signal.SIGKILL)
            self.proc.wait()


def stop_all(daemons: Iterable[Any]) -> None:
    """Teardown: stop each daemon; one that will not stop is killed, and the rest still
    stopped."""
    for d in daemons:
        try:
            d.stop()
        except Exception:  # noqa: BLE001 - teardown: kill whatever would not stop
            d.kill()
