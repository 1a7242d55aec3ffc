"""`POST /api/pull` (Ollama-compatible, NDJSON progress) and `qvacd models pull`.

The route answers like Ollama: lines of {"status": "pulling manifest"}, then
{"status": "downloading", "digest": "sha256:...", "total": N, "completed": M} (plus our
extra fields: sources, rate, resumed, fetched, dropped), {"status": "verifying sha256
digest"} and {"status": "success"}. With "stream": false, one JSON object at the end.

Errors found before any byte was fetched (unknown model, nobody trusted has it, all
refused) get a real HTTP status with {"error": "..."}; a failure after the download
started is a final {"error": "..."} line, which the official ollama client raises as
ResponseError. The CLI talks to the running daemon through this route, like Ollama's.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .shards import PullError

_LINE_TIMEOUT_S = 300.0  # the daemon sends a line at least every progress interval


def _ndjson(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


class _PullResponse:
    """Raw ASGI response: the status line is chosen only once the pull got going."""

    def __init__(self, puller: Any, model: str, *, stream: bool, from_peer: str | None) -> None:
        self.puller = puller
        self.model = model
        self.stream = stream
        self.from_peer = from_peer

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        send_ch, recv_ch = trio.open_memory_channel[dict[str, Any]](1024)
        outcome: dict[str, Any] = {}

        def on_progress(ev: dict[str, Any]) -> None:
            try:
                send_ch.send_nowait(ev)
            except (trio.WouldBlock, trio.ClosedResourceError):
                pass  # why: a client that reads slowly just sees fewer progress lines

        async def run_pull() -> None:
            try:
                outcome["entry"] = await self.puller.pull(
                    self.model, from_peer=self.from_peer, progress=on_progress)
            except PullError as e:
                outcome["error"] = e
            finally:
                send_ch.close()

        async def watch_disconnect(cancel: trio.CancelScope) -> None:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    cancel.cancel()  # the last waiter gone cancels the download
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_pull)
            nursery.start_soon(watch_disconnect, nursery.cancel_scope)
            head: list[dict[str, Any]] = []
            async with recv_ch:
                # Hold the status line until the download starts, or the pull ends.
                async for ev in recv_ch:
                    if ev["status"] == "pulling manifest":
                        head = [ev]
                        continue
                    head.append(ev)
                    break
                error: PullError | None = None
                if not self.stream or not head or head[-1]["status"] == "pulling manifest":
                    async for _ in recv_ch:
                        pass
                    error = outcome.get("error")
                    if error is not None or not self.stream:
                        await self._send_json(send, error)
                        nursery.cancel_scope.cancel()
                        return
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"application/x-ndjson")]})
                for ev in head or [{"status": "pulling manifest"}]:
                    await send({"type": "http.response.body", "body": _ndjson(ev),
                                "more_body": True})
                async for ev in recv_ch:
                    await send({"type": "http.response.body", "body": _ndjson(ev),
                                "more_body": True})
            error = outcome.get("error")
            tail = _ndjson({"error": error.message}) if error is not None else b""
            await send({"type": "http.response.body", "body": tail, "more_body": False})
            nursery.cancel_scope.cancel()

    async def _send_json(self, send: Any, error: PullError | None) -> None:
        if error is None:
            status, body = 200, {"status": "success"}
        else:
            status, body = error.status, {"error": error.message}
            if status == 499:  # cancelled: nobody is listening anyway
                status = 503
        raw = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(raw)).encode())]})
        await send({"type": "http.response.body", "body": raw, "more_body": False})


async def api_pull(request: Request, node: Any) -> Response:
    """Starlette endpoint for `POST /api/pull`: {"model" (or "name"), "stream", "from"}."""
    try:
        body = json.loads(await request.body() or b"null")
    except (ValueError, UnicodeDecodeError):
        return JSONResponse({"error": "request body is not valid JSON"}, status_code=400)
    if not isinstance(body, dict):
        return JSONResponse({"error": "request body must be a JSON object"}, status_code=400)
    model = body.get("model") or body.get("name")
    if not isinstance(model, str) or not model.strip():
        return JSONResponse({"error": "'model' is required: a model name or sha256"},
                            status_code=400)
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        return JSONResponse({"error": "'stream' must be true or false"}, status_code=400)
    from_peer = body.get("from")
    if from_peer is not None and not isinstance(from_peer, str):
        return JSONResponse({"error": "'from' must be a peer id"}, status_code=400)
    puller = getattr(node, "puller", None)
    if puller is None:
        return JSONResponse({"error": "this node runs without the peer-to-peer side"
                             " (--no-p2p), so it cannot pull models"}, status_code=503)
    return _PullResponse(puller, model, stream=stream, from_peer=from_peer)  # type: ignore[return-value]


# ---- CLI -----------------------------------------------------------------------------------


def cmd_models_pull(args: argparse.Namespace) -> int:
    """`qvacd models pull NAME|SHA256 [--from PEERID]`: ask the running daemon, show a
    progress bar (bytes, rate, ETA, sources)."""
    import httpx
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    cli = _cli_module()
    CliError, _api_base, _client, _error_text = (
        cli.CliError, cli._api_base, cli._client, cli._error_text)

    body: dict[str, Any] = {"model": args.name, "stream": True}
    if getattr(args, "from_peer", None):
        body["from"] = args.from_peer
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
        TransferSpeedColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[sources]} source(s)"), console=console, transient=False)
    task = None
    final: dict[str, Any] = {}
    try:
        with _client(args, timeout=httpx.Timeout(10.0, read=_LINE_TIMEOUT_S)) as c, \
                c.stream("POST", "/api/pull", json=body) as r:
            if r.status_code != 200:
                r.read()
                raise CliError(_error_text(r))
            with progress:
                for line in r.iter_lines():
                    if not line.strip():
                        continue
                    ev = json.loads(line)
                    if "error" in ev:
                        raise CliError(f"pull failed: {ev['error']}")
                    status = ev.get("status", "")
                    if status == "success":
                        final = ev
                    if "total" in ev and (task is not None or status != "success"):
                        desc = {"downloading": "pulling", "success": "pulled"}.get(status, status)
                        if task is None:
                            task = progress.add_task(desc, total=ev["total"],
                                                     completed=ev.get("completed", 0),
                                                     sources=ev.get("sources", 0))
                        progress.update(task, description=desc, total=ev["total"],
                                        completed=ev.get("completed", 0),
                                        sources=ev.get("sources", 0))
                    elif task is None and status != "success":
                        console.print(status)
    except httpx.TransportError as e:
        raise CliError(f"no qvacd daemon answers at {_api_base(args)}; start one with"
                       " `qvacd start` (or pass --api HOST:PORT)") from e
    if not final:
        raise CliError("the daemon ended the pull without saying it succeeded; pull again")
    dropped = final.get("dropped") or {}
    for peer, why in dropped.items():
        console.print(f"dropped {peer}: {why}")
    if not final.get("fetched") and not final.get("resumed"):
        print(f"{final.get('model', args.name)} is already here ({final.get('digest', '')})")
        return 0
    print(f"pulled {final.get('model', args.name)} ({final.get('digest', '')}, "
          f"{final.get('total', 0)} bytes: {final.get('fetched', 0)} fetched from"
          f" {final.get('sources', 0)} peer(s), {final.get('resumed', 0)} resumed)")
    return 0


def _cli_module() -> Any:
    """The running qvacd.cli: under `python -m qvacd.cli` that is `__main__`, and
    importing qvacd.cli would load a second copy whose CliError `main` does not catch."""
    main_mod = sys.modules.get("__main__")
    spec = getattr(main_mod, "__spec__", None)
    if spec is not None and spec.name == "qvacd.cli" and hasattr(main_mod, "CliError"):
        return main_mod
    from . import cli

    return cli


def add_pull_command(models_sub: Any, client_args: Any) -> None:
    """Adds `qvacd models pull` to the `models` subparsers (for qvacd/cli.py)."""
    s = models_sub.add_parser("pull", help="fetch a model from trusted peers (resumable)")
    s.add_argument("name", help="model name, alias or sha256")
    s.add_argument("--from", dest="from_peer", default=None, metavar="PEERID",
                   help="fetch only from this peer")
    client_args(s)
    s.set_defaults(fn=cmd_models_pull)
