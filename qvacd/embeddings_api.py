"""Embedding routes: OpenAI `POST /v1/embeddings`, Ollama `POST /api/embed` and its older
`POST /api/embeddings`.

All three parse their body here (every field honoured or refused: qvacd/api_params.py)
and go through `embed_routed`: this node's engine (models/engine.py: its own embedding
context per model, pooled as the GGUF says, L2-normalized) when it holds the model and
it fits, else a trusted peer over /qvac/embed/1.0.0 (qvacd/remote_embed.py), as
generation is delegated: `--delegate always` sends every request to a peer, `never`,
`--no-p2p` and the `x-qvac-local-only` header keep it here. `X-Qvac-Served-By` names the
node whose vectors these are.

Errors are EngineErrors, which api.py's `wrap` turns into the route's own error shape
(OpenAI or Ollama); this module takes `wrap` and `read_json` as arguments instead of
importing qvacd.api, which imports it (no import circle).
"""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from models.embedding import EmbeddingResult
from models.engine import BAD_REQUEST, EngineError
from models.store import ModelEntry

from . import api_params
from .models_api import KeepAliveError, apply_keep_alive, parse_keep_alive, unload_model

if TYPE_CHECKING:
    from .remote_embed import RemoteEmbedder
    from .served_node import ServedNode

MAX_INPUTS = 2048  # OpenAI's own limit of inputs per request
MAX_INPUT_BYTES = 4 << 20  # all inputs together (the body limit is 8 MiB)


SERVED_BY = "X-Qvac-Served-By"
LOCAL_ONLY = "x-qvac-local-only"  # the same header as generation's (qvacd/api.py)


class EmbeddingEngine(Protocol):
    """What these routes need of models.engine.Engine."""

    def resolve(self, name: str) -> ModelEntry: ...

    def check_embed_fits(self, entry: ModelEntry) -> None: ...

    async def embed(self, model: str, inputs: list[str], *,
                    truncate: bool = True) -> EmbeddingResult: ...


async def embed_routed(node: ServedNode, model: str, inputs: list[str], *, truncate: bool,
                       local_only: bool) -> tuple[EmbeddingResult, str]:
    """The vectors and the node that made them: here when this node holds the model and
    it fits (and delegation is not forced), else a trusted peer."""
    engine = cast(EmbeddingEngine, node.engine)
    remote: RemoteEmbedder | None = node.remote_embed
    delegate = node.config.delegate
    why: EngineError | None = None
    try:
        engine.check_embed_fits(engine.resolve(model))
    except EngineError as e:
        why = e
    stay = local_only or remote is None or delegate == "never"
    if why is None and (stay or delegate != "always"):
        return await engine.embed(model, inputs, truncate=truncate), node.node_id
    if stay or remote is None:
        assert why is not None
        raise why
    return await remote.embed(model, inputs, truncate=truncate, local_reason=why)


def _local_only(request: Request, body: dict[str, Any]) -> bool:
    if request.headers.get(LOCAL_ONLY, "").strip().lower() in ("1", "true", "yes"):
        return True
    options = body.get("options")
    opts = options if isinstance(options, dict) else {}
    return bool(body.get("local_only") is True or opts.get("local_only") is True)


def _refuse_fields(refusal: api_params.Refusal | None) -> None:
    if refusal is not None:
        raise _bad(refusal.message)


def _keep_alive(body: dict[str, Any]) -> float | None:
    try:
        return parse_keep_alive(body.get("keep_alive"))
    except KeepAliveError as e:
        raise _bad(str(e)) from e


def _dimensions(body: dict[str, Any]) -> None:
    if body.get("dimensions") is not None:
        raise _bad("'dimensions' is not supported: vectors have the model's own size;"
                   " leave it out")


def _bad(message: str) -> EngineError:
    return EngineError(BAD_REQUEST, message)


def _model(body: dict[str, Any]) -> str:
    name = body.get("model")
    if not isinstance(name, str) or not name.strip():
        raise _bad("'model' is required: the name of a model on this node (see /v1/models)")
    return name


def parse_inputs(value: Any, field: str) -> list[str]:
    """A string or a list of strings, bounded; token arrays are refused in one line."""
    if isinstance(value, str):
        inputs = [value]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        inputs = list(value)
    elif isinstance(value, list) and value and all(
            isinstance(v, int) or isinstance(v, list) for v in value):
        raise _bad(f"'{field}' as token arrays is not supported; send the text as a string"
                   " or a list of strings")
    else:
        raise _bad(f"'{field}' must be a string or a list of strings")
    if not inputs:
        raise _bad(f"'{field}' must not be an empty list")
    if len(inputs) > MAX_INPUTS:
        raise _bad(f"'{field}' has {len(inputs)} inputs; at most {MAX_INPUTS} per request")
    size = sum(len(s.encode("utf-8")) for s in inputs)
    if size > MAX_INPUT_BYTES:
        raise _bad(f"'{field}' is {size} bytes; at most {MAX_INPUT_BYTES} per request")
    return inputs


def _base64_floats(vector: list[float]) -> str:
    """OpenAI's base64 encoding: little-endian float32, as the client decodes it."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def embedding_routes(node: ServedNode, *, openai_wrap: Callable[[str], Any],
                     ollama_wrap: Callable[[str], Any],
                     read_json: Callable[[Request], Awaitable[dict[str, Any]]]) -> list[Route]:
    """The three routes; `*_wrap(endpoint)` is api.py's error handling in that shape."""
    engine = cast(EmbeddingEngine, node.engine)

    @openai_wrap("/v1/embeddings")
    async def v1_embeddings(request: Request) -> Response:
        body = await read_json(request)
        _refuse_fields(api_params.openai_embeddings(body))
        model = _model(body)
        _dimensions(body)
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise _bad("'encoding_format' must be 'float' or 'base64'")
        inputs = parse_inputs(body.get("input"), "input")
        result, served_by = await embed_routed(node, model, inputs, truncate=True,
                                               local_only=_local_only(request, body))
        data = [{"object": "embedding", "index": i,
                 "embedding": _base64_floats(v) if encoding == "base64" else v}
                for i, v in enumerate(result.vectors)]
        return JSONResponse({
            "object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": result.prompt_tokens,
                      "total_tokens": result.prompt_tokens},
        }, headers={SERVED_BY: served_by})

    @ollama_wrap("/api/embed")
    async def api_embed(request: Request) -> Response:
        t0 = time.monotonic()
        body = await read_json(request)
        _refuse_fields(api_params.ollama_embed(body))
        model = _model(body)
        _dimensions(body)
        truncate = body.get("truncate", True)
        if not isinstance(truncate, bool):
            raise _bad("'truncate' must be true or false")
        keep_alive = _keep_alive(body)
        raw = body.get("input")
        if raw is None or raw == [] or raw == "":
            # Ollama's load / unload call: no text, only keep_alive (0 unloads now).
            if keep_alive == 0:
                unload_model(node, model)
            else:
                await engine.embed(model, [], truncate=truncate)  # loads it here
                apply_keep_alive(node, model, keep_alive)
            return JSONResponse({"model": model, "embeddings": [],
                                 "total_duration": int((time.monotonic() - t0) * 1e9),
                                 "load_duration": 0, "prompt_eval_count": 0},
                                headers={SERVED_BY: node.node_id})
        inputs = parse_inputs(raw, "input")
        apply_keep_alive(node, model, keep_alive)
        result, served_by = await embed_routed(node, model, inputs, truncate=truncate,
                                               local_only=_local_only(request, body))
        return JSONResponse({
            "model": model, "embeddings": result.vectors,
            "total_duration": int((time.monotonic() - t0) * 1e9), "load_duration": 0,
            "prompt_eval_count": result.prompt_tokens,
        }, headers={SERVED_BY: served_by})

    @ollama_wrap("/api/embeddings")
    async def api_embeddings(request: Request) -> Response:
        body = await read_json(request)
        _refuse_fields(api_params.ollama_embed(body, text_field="prompt"))
        model = _model(body)
        _dimensions(body)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise _bad("'prompt' must be a string (this older route embeds one text; use"
                       " /api/embed for several)")
        apply_keep_alive(node, model, _keep_alive(body))
        result, served_by = await embed_routed(node, model, parse_inputs(prompt, "prompt"),
                                               truncate=True,
                                               local_only=_local_only(request, body))
        return JSONResponse({"embedding": result.vectors[0]}, headers={SERVED_BY: served_by})

    return [
        Route("/v1/embeddings", v1_embeddings, methods=["POST"]),
        Route("/api/embed", api_embed, methods=["POST"]),
        Route("/api/embeddings", api_embeddings, methods=["POST"]),
    ]
