"""Ollama's model management routes: /api/ps, /api/delete, /api/copy, /api/blobs, /api/create,
and the `keep_alive` field of /api/generate and /api/chat.

Kept out of qvacd/api.py (which only registers them) so the inference routes stay
readable. The store does the writing (models/store.py: temp file + rename under a lock),
so an upload that fails, is cut short or hashes to another digest leaves nothing behind.
keep_alive is a local matter: it sets how long *this* node keeps a model loaded; a
request delegated to a peer leaves the peer's keep_alive to the peer.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import tempfile
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import trio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from models.engine import EngineError
from models.store import ModelEntry, StoreError

if TYPE_CHECKING:
    from .served_node import ServedNode

MAX_BLOB_BYTES = 256 << 30  # an upload larger than any GGUF we could run is refused
FOREVER = "2318-11-26T00:00:00Z"  # what Ollama answers for a model kept loaded "forever"
_DURATION_RE = re.compile(r"^(-?)((?:\d+(?:\.\d+)?(?:h|ms|m|s))+)$")
_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_DIGEST_RE = re.compile(r"^sha256[:-]([0-9a-f]{64})$")


class ManagedEngine(Protocol):
    """What these routes need of models.engine.Engine beyond qvacd.local_engine."""

    gpu_layers: int

    def resolve(self, name: str) -> ModelEntry: ...

    def loaded(self) -> set[str]: ...

    def memory_needed(self, entry: ModelEntry) -> int: ...

    def fits(self, entry: ModelEntry) -> bool: ...

    def set_keep_alive(self, entry: ModelEntry, seconds: float | None) -> None: ...

    def expires_at(self, entry: ModelEntry) -> float | None: ...

    def unload(self, entry: ModelEntry) -> bool: ...


class KeepAliveError(ValueError):
    """keep_alive is neither a number nor a duration; the message names the field."""


def parse_keep_alive(value: Any) -> float | None:
    """Seconds to keep a model loaded after a request; None: until the memory budget needs
    the room (absent, or negative, as Ollama's -1). "5m", "1h30m", "30s", 300, "300"."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise KeepAliveError("'keep_alive' must be a duration like \"5m\" or a number of seconds")
    if isinstance(value, (int, float)):
        secs = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            secs = float(text)
        except ValueError:
            m = _DURATION_RE.match(text)
            if m is None:
                raise KeepAliveError(
                    f"'keep_alive' {value!r} is not a duration; use e.g. \"30s\", \"5m\","
                    " \"1h30m\", a number of seconds, 0 (unload now) or -1 (keep loaded)"
                ) from None
            secs = sum(float(n) * _UNIT_S[u] for n, u in _PART_RE.findall(m.group(2)))
            if m.group(1):
                secs = -secs
    else:
        raise KeepAliveError("'keep_alive' must be a duration like \"5m\" or a number of seconds")
    if not math.isfinite(secs):
        raise KeepAliveError("'keep_alive' must be finite")
    return None if secs < 0 else secs


def apply_keep_alive(node: ServedNode, model: str, seconds: float | None) -> None:
    """Set keep_alive on the local copy of `model`, if this node has one (a delegated
    request's keep_alive is its provider's business)."""
    entry = node.store.resolve(model)
    if entry is None:
        return
    engine = cast(ManagedEngine, node.engine)
    with contextlib.suppress(EngineError, OSError, ValueError):
        # A model too large for this node is served by a peer: nothing here to keep.
        if engine.fits(entry):
            engine.set_keep_alive(entry, seconds)


def unload_model(node: ServedNode, model: str) -> ModelEntry:
    """Ollama's `{"model": X, "keep_alive": 0}` with nothing to generate: unload X now (or
    when its last request ends)."""
    engine = cast(ManagedEngine, node.engine)
    entry = engine.resolve(model)
    engine.unload(entry)
    return entry


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def model_routes(node: ServedNode, *, details: Callable[[ModelEntry], dict[str, Any]],
                 wrap: Callable[[str], Any], error_cls: type[Exception],
                 read_json: Callable[[Request], Awaitable[dict[str, Any]]]) -> list[Route]:
    """The routes. api.py hands over its own pieces (this module never imports it):
    `wrap(endpoint)` its Ollama-shaped error handling, `error_cls` its ApiError,
    `read_json` its bounded JSON body reader, `details` its Ollama model details."""
    store = node.store
    engine = cast(ManagedEngine, node.engine)
    ApiError: Any = error_cls
    read_body = read_json

    def models_here() -> str:
        return ", ".join(store.names()) or "none"

    def name_field(body: dict[str, Any], *keys: str) -> str:
        for k in keys:
            v = body.get(k)
            if v is not None:
                if not isinstance(v, str) or not v.strip():
                    raise ApiError(400, f"'{k}' must be a non-empty string", param=k)
                return v
        raise ApiError(400, f"'{keys[0]}' is required", param=keys[0])

    @wrap("/api/ps")
    async def api_ps(request: Request) -> Response:
        on_gpu = engine.gpu_layers != 0
        out = []
        for sha in sorted(engine.loaded()):
            entry = store.resolve(sha)
            if entry is None:
                continue  # deleted while loaded (it unloads once idle)
            size = engine.memory_needed(entry)
            exp = engine.expires_at(entry)
            out.append({"name": f"{entry.name}:latest", "model": f"{entry.name}:latest",
                        "size": size, "digest": entry.sha256, "details": details(entry),
                        "expires_at": FOREVER if exp is None else _iso(exp),
                        "size_vram": size if on_gpu else 0})
        return JSONResponse({"models": out})

    @wrap("/api/delete")
    async def api_delete(request: Request) -> Response:
        body = await read_body(request)
        name = name_field(body, "model", "name")
        entry = store.resolve(name)
        if entry is None:
            raise ApiError(404, f"model {name!r} not found; models here: {models_here()}")
        last_name = sum(1 for e in store.list() if e.sha256 == entry.sha256) == 1
        if last_name and entry.sha256 in engine.loaded() and not engine.unload(entry):
            raise ApiError(409, f"model {entry.name} is answering a request; it unloads when"
                           " that ends: retry the delete then", retry_after=1)
        try:
            store.remove(entry.name)
        except StoreError as e:
            raise ApiError(404, str(e)) from e
        return JSONResponse({"status": "success"})  # Ollama sends no body; clients ignore it

    @wrap("/api/copy")
    async def api_copy(request: Request) -> Response:
        body = await read_body(request)
        source = name_field(body, "source")
        destination = name_field(body, "destination")
        if store.resolve(source) is None:
            raise ApiError(404, f"model {source!r} not found; models here: {models_here()}")
        try:
            store.copy(source, destination)
        except StoreError as e:
            raise ApiError(400, str(e), param="destination") from e
        return JSONResponse({"status": "success"})

    def digest_of(request: Request) -> str:
        m = _DIGEST_RE.match(request.path_params["digest"])
        if m is None:
            raise ApiError(400, "the blob's digest must be 'sha256:' and 64 lowercase hex"
                           " digits", param="digest")
        return m.group(1)

    @wrap("/api/blobs")
    async def api_blob_head(request: Request) -> Response:
        return Response(status_code=200 if store.has_blob(digest_of(request)) else 404)

    @wrap("/api/blobs")
    async def api_blob_upload(request: Request) -> Response:
        want = digest_of(request)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BLOB_BYTES:
            raise ApiError(413, f"the blob is over {MAX_BLOB_BYTES} bytes")
        if store.has_blob(want):
            async for _ in request.stream():  # the client sends it anyway; drain it
                pass
            return Response(status_code=201)
        fd, tmp_name = tempfile.mkstemp(dir=store.tmp, prefix="import-blob-")
        tmp = Path(tmp_name)
        try:
            h = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as out:
                try:
                    async for block in request.stream():
                        size += len(block)
                        if size > MAX_BLOB_BYTES:
                            raise ApiError(413, f"the blob is over {MAX_BLOB_BYTES} bytes")
                        h.update(block)
                        out.write(block)
                except ClientDisconnect:
                    raise ApiError(400, "the upload ended before the whole blob came") from None
                out.flush()
                os.fsync(out.fileno())
            got = h.hexdigest()
            if got != want:
                raise ApiError(400, f"the blob's bytes hash to sha256:{got}, not the"
                               f" sha256:{want} in the URL; nothing was stored", param="digest")
            try:
                await trio.to_thread.run_sync(store.commit_blob, tmp, want)
            except StoreError as e:
                raise ApiError(400, str(e)) from e
            return Response(status_code=201)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    @wrap("/api/create")
    async def api_create(request: Request) -> Response:
        body = await read_body(request)
        name = name_field(body, "model", "name")
        if body.get("modelfile") is not None or body.get("from") is not None:
            raise ApiError(400, "only the 'files' form is supported: upload the GGUF with"
                           " POST /api/blobs/sha256:<digest>, then send {\"model\": NAME,"
                           " \"files\": {\"model.gguf\": \"sha256:<digest>\"}}", param="files")
        files = body.get("files")
        if not isinstance(files, dict) or len(files) != 1:
            raise ApiError(400, "'files' must be an object with one GGUF file:"
                           " {\"model.gguf\": \"sha256:<digest>\"}", param="files")
        (fname, digest), = files.items()
        m = _DIGEST_RE.match(digest) if isinstance(digest, str) else None
        if m is None or not str(fname).endswith(".gguf"):
            raise ApiError(400, "'files' must map a name ending in .gguf to"
                           " \"sha256:<64 hex digits>\"", param="files")
        if store.resolve(name) is not None:
            raise ApiError(400, f"a model named {name!r} exists already; delete it first",
                           param="model")
        if not store.has_blob(m.group(1)):
            raise ApiError(400, f"no blob {digest} here; upload it first with"
                           f" POST /api/blobs/{digest}", param="files")
        try:
            await trio.to_thread.run_sync(store.create_from_blob, name, m.group(1))
        except StoreError as e:
            raise ApiError(400, str(e), param="files") from e
        if body.get("stream", True) is False:
            return JSONResponse({"status": "success"})
        return Response(b'{"status":"using existing layer"}\n{"status":"success"}\n',
                        media_type="application/x-ndjson")

    return [
        Route("/api/ps", api_ps, methods=["GET"]),
        Route("/api/delete", api_delete, methods=["DELETE"]),
        Route("/api/copy", api_copy, methods=["POST"]),
        Route("/api/blobs/{digest}", api_blob_head, methods=["HEAD"]),
        Route("/api/blobs/{digest}", api_blob_upload, methods=["POST"]),
        Route("/api/create", api_create, methods=["POST"]),
    ]
