"""Embedding routes: OpenAI `POST /v1/embeddings`, Ollama `POST /api/embed` and its older
`POST /api/embeddings`.

All three parse their body here and call the engine's `embed` (models/engine.py: its own
embedding context per model, pooled as the GGUF says, L2-normalized). Errors are
EngineErrors, which api.py's `wrap` turns into the route's own error shape (OpenAI or
Ollama); this module takes `wrap` and `read_json` as arguments instead of importing
qvacd.api, which imports it (no import circle).

Served on this node only: delegating embeddings to a peer (a `/qvac/embed/1.0.0`
protocol) is not built yet, so a model this node lacks is a 404 and one too big for its
budget a 503, each saying so.
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

if TYPE_CHECKING:
    from .served_node import ServedNode

MAX_INPUTS = 2048  # OpenAI's own limit of inputs per request
MAX_INPUT_BYTES = 4 << 20  # all inputs together (the body limit is 8 MiB)


class EmbeddingEngine(Protocol):
    """What these routes need of models.engine.Engine."""

    async def embed(self, model: str, inputs: list[str], *,
                    truncate: bool = True) -> EmbeddingResult: ...


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
        model = _model(body)
        if body.get("dimensions") is not None:
            raise _bad("'dimensions' is not supported: vectors have the model's own size;"
                       " leave it out")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise _bad("'encoding_format' must be 'float' or 'base64'")
        inputs = parse_inputs(body.get("input"), "input")
        result = await engine.embed(model, inputs, truncate=True)
        data = [{"object": "embedding", "index": i,
                 "embedding": _base64_floats(v) if encoding == "base64" else v}
                for i, v in enumerate(result.vectors)]
        return JSONResponse({
            "object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": result.prompt_tokens,
                      "total_tokens": result.prompt_tokens},
        })

    @ollama_wrap("/api/embed")
    async def api_embed(request: Request) -> Response:
        t0 = time.monotonic()
        body = await read_json(request)
        model = _model(body)
        truncate = body.get("truncate", True)
        if not isinstance(truncate, bool):
            raise _bad("'truncate' must be true or false")
        inputs = parse_inputs(body.get("input"), "input")
        result = await engine.embed(model, inputs, truncate=truncate)
        return JSONResponse({
            "model": model, "embeddings": result.vectors,
            "total_duration": int((time.monotonic() - t0) * 1e9), "load_duration": 0,
            "prompt_eval_count": result.prompt_tokens,
        })

    @ollama_wrap("/api/embeddings")
    async def api_embeddings(request: Request) -> Response:
        body = await read_json(request)
        model = _model(body)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise _bad("'prompt' must be a string (this older route embeds one text; use"
                       " /api/embed for several)")
        result = await engine.embed(model, parse_inputs(prompt, "prompt"), truncate=True)
        return JSONResponse({"embedding": result.vectors[0]})

    return [
        Route("/v1/embeddings", v1_embeddings, methods=["POST"]),
        Route("/api/embed", api_embed, methods=["POST"]),
        Route("/api/embeddings", api_embeddings, methods=["POST"]),
    ]
