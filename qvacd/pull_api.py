"""`POST /api/pull`: Ollama-compatible model pulls with NDJSON progress.

The route answers like Ollama: lines of {"status": "pulling manifest"}, then
{"status": "downloading", "digest": "sha256:...", "total": N, "completed": M} (plus our
extra fields: sources, rate, resumed, fetched, dropped), {"status": "verifying sha256
digest"} and {"status": "success"}. With "stream": false, one JSON object at the end.

Errors found before any byte was fetched (unknown model, nobody trusted has it, all
refused) get a real HTTP status with {"error": "..."}; a failure after the download
started is a final {"error": "..."} line, which the official ollama client raises as
ResponseError. `qvacd models pull` (qvacd/cli/pull.py) talks to the running daemon
through this route, like Ollama's CLI; this module never imports the CLI.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .pull import PullError


class ModelPuller(Protocol):
    """What the route needs of the node's puller (qvacd's Puller)."""

    async def pull(self, name_or_sha: str, *, from_peer: str | None = None,
                   progress: Callable[[dict[str, Any]], None] | None = None) -> Any: ...


def _ndjson(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


class _PullResponse:
    """Raw ASGI response: the status line is chosen only once the pull got going."""

    def __init__(self, puller: ModelPuller, model: str, *, stream: bool,
                 from_peer: str | None) -> None:
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


async def api_pull(request: Request, puller: ModelPuller) -> Response:
    """Starlette endpoint for `POST /api/pull`: {"model" (or "name"), "stream", "from"}.

    Only for a node with a puller (the P2P side): qvacd.api answers 503 itself otherwise."""
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
    return _PullResponse(puller, model, stream=stream, from_peer=from_peer)  # type: ignore[return-value]
