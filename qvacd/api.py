"""HTTP API: OpenAI- and Ollama-compatible routes plus /qvac/* and /metrics.

Inference responses are written by raw ASGI handlers rather than Starlette's
StreamingResponse: the generation is opened (admitted, queued, loaded) *before* the
status line goes out, so refusals get their real status (400/404/429/503), and a
watcher task on `receive()` cancels the generation the moment the client
disconnects, which frees the slot within one token.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from models.chat import ChatError, normalize_messages
from models.engine import EngineError, GenerationRequest, GenerationResult
from models.store import ModelEntry

from . import __version__, api_params, tool_calls
from .dashboard import PUBLIC_PATHS, dashboard_routes
from .metrics import CONTENT_TYPE
from .models_api import (KeepAliveError, apply_keep_alive, model_routes, parse_keep_alive,
                         unload_model)
from .embeddings_api import embedding_routes
from .pair_api import pair_routes
from .plan_api import plan_routes
from .served_node import ServedNode
from .structured_output import (StructuredOutputError, ollama_format_grammar,
                                openai_format_grammar)

if TYPE_CHECKING:
    from .dashboard import RequestRecord
    from .router import RoutedGeneration

SERVED_BY = "X-Qvac-Served-By"
LOCAL_ONLY = "x-qvac-local-only"
MAX_BODY = 8 << 20  # bytes of request JSON we accept

_STATUS_FOR = {
    "NOT_FOUND": 404, "TOO_LARGE": 503, "BUSY": 429, "BAD_REQUEST": 400,
    "UNAVAILABLE": 503, "INTERNAL": 500, "DEADLINE": 504, "UNAUTHORIZED": 403,
}
_OPENAI_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                429: "rate_limit_error", 503: "service_unavailable", 500: "server_error",
                502: "server_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.retry_after = retry_after

    @classmethod
    def from_engine(cls, e: EngineError) -> ApiError:
        return cls(_STATUS_FOR.get(e.code, 500), e.message, retry_after=e.retry_after)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


# ---- request parsing ----------------------------------------------------------------


async def read_json(request: Request) -> dict[str, Any]:
    body = await request.body()
    if len(body) > MAX_BODY:
        raise ApiError(413, f"request body over {MAX_BODY} bytes")
    try:
        data = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


_MISSING = object()


def field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = _MISSING,
          *, lo: float | None = None, hi: float | None = None, where: str = "") -> Any:
    """Typed, ranged access to a JSON field; a 400 that names the field otherwise."""
    label = f"{where}{name}"
    v: Any = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        if default is _MISSING:
            raise ApiError(400, f"'{label}' is required", param=label)
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        names = " or ".join(k.__name__.replace("str", "string").replace("float", "number")
                            .replace("int", "integer").replace("bool", "boolean")
                            .replace("list", "array").replace("dict", "object") for k in kinds)
        raise ApiError(400, f"'{label}' must be a {names}", param=label)
    if isinstance(v, float) and not math.isfinite(v):
        raise ApiError(400, f"'{label}' must be a finite number", param=label)
    if lo is not None and v < lo or hi is not None and v > hi:
        raise ApiError(400, f"'{label}' must be between {lo} and {hi}", param=label)
    return v


def stop_list(v: Any, label: str = "stop") -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list) and all(isinstance(s, str) for s in v) and len(v) <= 16:
        return tuple(v)
    raise ApiError(400, f"'{label}' must be a string or an array of up to 16 strings", param=label)


def format_grammar(parse: Callable[[Any], str | None], value: Any) -> str | None:
    """The grammar of a structured-output field (qvacd/structured_output.py), or a 400."""
    try:
        return parse(value)
    except StructuredOutputError as e:
        raise ApiError(400, e.message, param=e.param) from None


def tool_setup(parse: Callable[[dict[str, Any]], tool_calls.ToolSetup],
               body: dict[str, Any]) -> tool_calls.ToolSetup:
    """The request's tools and tool turns (qvacd/tool_calls.py), or a 400."""
    try:
        return parse(body)
    except tool_calls.ToolError as e:
        raise ApiError(400, e.message, param=e.param) from None


def refuse_unsupported(refusal: api_params.Refusal | None) -> None:
    """A field qvacd does not honour is a 400 naming it, never silently ignored."""
    if refusal is not None:
        raise ApiError(400, refusal.message, param=refusal.param)


# ---- response formats -----------------------------------------------------------------


@dataclass
class Format:
    """How one API family frames a generation (stream chunks and the whole answer)."""

    media_type: str
    chunk: Callable[[str], bytes]
    final: Callable[[GenerationResult, list[str]], bytes]
    whole: Callable[[str, GenerationResult, list[str]], dict[str, Any]]
    first: Callable[[], bytes] | None = None


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _ndjson(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _finish(result: GenerationResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def _usage(r: GenerationResult) -> dict[str, int]:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens}


def openai_completion_format(model: str, include_usage: bool) -> Format:
    cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def base(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": choices}

    def chunk(piece: str) -> bytes:
        return _sse(base([{"text": piece, "index": 0, "logprobs": None, "finish_reason": None}]))

    def final(r: GenerationResult, served_by: list[str]) -> bytes:
        return _sse_end(base, {"text": "", "index": 0, "logprobs": None,
                               "finish_reason": _finish(r)}, r, served_by, include_usage)

    def whole(text: str, r: GenerationResult, served_by: list[str]) -> dict[str, Any]:
        d = base([{"text": text, "index": 0, "logprobs": None, "finish_reason": _finish(r)}])
        d["usage"] = _usage(r)
        d["x_qvac_served_by"] = served_by
        return d

    return Format("text/event-stream", chunk, final, whole)


def _sse_end(base: Callable[[list[dict[str, Any]]], dict[str, Any]], last_choice: dict[str, Any],
             r: GenerationResult, served_by: list[str], include_usage: bool) -> bytes:
    """An OpenAI stream's end: the finishing chunk (naming who served it), the usage chunk
    when stream_options.include_usage asked for it, then [DONE]."""
    last = base([last_choice])
    last["x_qvac_served_by"] = served_by
    out = _sse(last)
    if include_usage:
        u = base([])
        u["usage"] = _usage(r)
        out += _sse(u)
    return out + b"data: [DONE]\n\n"


def openai_chat_format(model: str, include_usage: bool) -> Format:
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def base(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": cid, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": choices}

    def first() -> bytes:
        return _sse(base([{"index": 0, "delta": {"role": "assistant", "content": ""},
                           "logprobs": None, "finish_reason": None}]))

    def chunk(piece: str) -> bytes:
        return _sse(base([{"index": 0, "delta": {"content": piece}, "logprobs": None,
                           "finish_reason": None}]))

    def final(r: GenerationResult, served_by: list[str]) -> bytes:
        return _sse_end(base, {"index": 0, "delta": {}, "logprobs": None,
                               "finish_reason": _finish(r)}, r, served_by, include_usage)

    def whole(text: str, r: GenerationResult, served_by: list[str]) -> dict[str, Any]:
        return {"id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": _finish(r)}],
                "usage": _usage(r), "x_qvac_served_by": served_by}

    return Format("text/event-stream", chunk, final, whole, first)


def ollama_format(model: str, chat: bool, t0: float) -> Format:
    name = model if ":" in model else f"{model}:latest"

    def piece_obj(piece: str) -> dict[str, Any]:
        if chat:
            return {"message": {"role": "assistant", "content": piece}}
        return {"response": piece}

    def chunk(piece: str) -> bytes:
        return _ndjson({"model": name, "created_at": now_iso(), **piece_obj(piece), "done": False})

    def done_obj(r: GenerationResult, served_by: list[str], text: str) -> dict[str, Any]:
        total = int((time.monotonic() - t0) * 1e9)
        eval_ns = int(r.completion_tokens / r.tokens_per_s * 1e9) if r.tokens_per_s else total
        return {"model": name, "created_at": now_iso(), **piece_obj(text), "done": True,
                "done_reason": _finish(r), "total_duration": total, "load_duration": 0,
                "prompt_eval_count": r.prompt_tokens,
                "prompt_eval_duration": int((r.time_to_first_token or 0) * 1e9),
                "eval_count": r.completion_tokens, "eval_duration": eval_ns,
                "x_qvac_served_by": served_by}

    def final(r: GenerationResult, served_by: list[str]) -> bytes:
        return _ndjson(done_obj(r, served_by, ""))

    def whole(text: str, r: GenerationResult, served_by: list[str]) -> dict[str, Any]:
        return done_obj(r, served_by, text)

    return Format("application/x-ndjson", chunk, final, whole)


# ---- the inference handler -----------------------------------------------------------


ErrorBody = Callable[[ApiError], dict[str, Any]]


def openai_error(e: ApiError) -> dict[str, Any]:
    return {"error": {"message": e.message, "type": _OPENAI_TYPE.get(e.status, "error"),
                      "param": e.param, "code": None}}


def ollama_error(e: ApiError) -> dict[str, Any]:
    return {"error": e.message}


def error_response(e: ApiError, shape: ErrorBody) -> JSONResponse:
    headers = {"Retry-After": str(max(1, math.ceil(e.retry_after)))} if e.retry_after else None
    return JSONResponse(shape(e), status_code=e.status, headers=headers)


class InferenceResponse(Response):
    """Runs one routed generation and writes it as a stream or as one JSON body."""

    def __init__(self, node: ServedNode, req: GenerationRequest, fmt: Format, *, stream: bool,
                 local_only: bool, error_shape: ErrorBody, endpoint: str) -> None:
        self.node = node
        self.req = req
        self.fmt = fmt
        self.stream = stream
        self.local_only = local_only
        self.error_shape = error_shape
        self.endpoint = endpoint
        self.background = None
        self._started = False  # the 200 and its headers are out: errors go in the body
        self._completion_tokens: int | None = None  # set when the answer ended on its own
        self._error: str | None = None  # for the dashboard's recorder

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        metrics = self.node.metrics
        t0 = time.monotonic()
        status = 200
        rec = self.node.recorder.begin(self.endpoint, self.req.model, stream=self.stream)
        async with trio.open_nursery() as nursery:

            async def watch_disconnect() -> None:
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(watch_disconnect)
            try:
                async with self.node.router.generate(self.req, local_only=self.local_only) as gen:
                    status = await self._write(gen, send, t0, rec)
            except EngineError as e:
                status = await self._send_error(send, ApiError.from_engine(e))
            except ApiError as e:
                status = await self._send_error(send, e)
            finally:
                metrics.requests.labels(self.endpoint, str(status)).inc()
                self.node.recorder.end(rec, status, completed=self._completion_tokens is not None,
                                       completion_tokens=self._completion_tokens,
                                       error=self._error)
            nursery.cancel_scope.cancel()

    async def _send_error(self, send: Any, e: ApiError) -> int:
        self._error = e.message
        if self._started:
            # Mid-stream (e.g. the engine failed after some tokens): the status is sent,
            # so the error is the stream's last event, in the stream's own framing.
            line = json.dumps(self.error_shape(e)).encode()
            body = b"data: " + line + b"\n\n" if self.fmt.media_type == "text/event-stream" \
                else line + b"\n"
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return e.status
        await error_response(e, self.error_shape)(
            {"type": "http"}, _no_receive, send)
        return e.status

    async def _write(self, gen: RoutedGeneration, send: Any, t0: float,
                     rec: RequestRecord) -> int:
        metrics = self.node.metrics
        self.node.recorder.routed(rec, gen.served_by, gen.where)
        headers = [(b"content-type", self.fmt.media_type.encode() if self.stream
                    else b"application/json"),
                   (SERVED_BY.lower().encode(), ",".join(gen.served_by).encode())]
        if self.stream:
            headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            self._started = True
            if self.fmt.first:
                await send({"type": "http.response.body", "body": self.fmt.first(),
                            "more_body": True})
        first = True
        parts: list[str] = []
        async for piece in gen:
            self.node.recorder.token(rec)
            if first:
                metrics.ttft.labels(self.req.model, gen.where).observe(time.monotonic() - t0)
                first = False
            if self.stream:
                await send({"type": "http.response.body", "body": self.fmt.chunk(piece),
                            "more_body": True})
            else:
                parts.append(piece)
        metrics.tokens.labels(self.req.model, gen.served_by[-1]).inc(
            gen.result.completion_tokens)
        if gen.result.finish_reason == "error":
            # The answer was cut (the provider or a split's worker died, nobody could
            # resume): a client must not take it for a finished one. Sent from here, not
            # raised: the routers' nurseries would wrap it in an exception group.
            return await self._send_error(send, ApiError(
                502, gen.result.error or "the node serving this answer failed mid-answer;"
                " retry the request"))
        self._completion_tokens = gen.result.completion_tokens
        if self.stream:
            await send({"type": "http.response.body",
                        "body": self.fmt.final(gen.result, gen.served_by), "more_body": False})
        else:
            body = json.dumps(self.fmt.whole("".join(parts), gen.result, gen.served_by)).encode()
            headers.append((b"content-length", str(len(body)).encode()))
            # served_by may have grown during a failover: name every node that served.
            headers[1] = (SERVED_BY.lower().encode(), ",".join(gen.served_by).encode())
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
        return 200


async def _no_receive() -> dict[str, Any]:
    return {"type": "http.disconnect"}


# ---- routes ---------------------------------------------------------------------------


def _local_only(request: Request, body: dict[str, Any]) -> bool:
    if request.headers.get(LOCAL_ONLY, "").strip().lower() in ("1", "true", "yes"):
        return True
    options = body.get("options")
    opts = options if isinstance(options, dict) else {}
    return bool(body.get("local_only") is True or opts.get("local_only") is True)


def _model_name(body: dict[str, Any], key: str = "model") -> str:
    name = field(body, key, str)
    if not name.strip():
        raise ApiError(400, f"'{key}' must not be empty", param=key)
    return name


def _max_tokens(body: dict[str, Any], *names: str, default: int | None) -> int | None:
    for n in names:
        if body.get(n) is not None:
            v = field(body, n, int, lo=1, hi=1 << 20)
            return v
    return default


def build_app(node: ServedNode) -> Starlette:
    engine = node.engine
    store = node.store

    def wrap(shape: ErrorBody, endpoint: str):
        def deco(fn: Callable[[Request], Awaitable[Response]]):
            async def handler(request: Request) -> Response:
                try:
                    return await fn(request)
                except (ApiError, ChatError, EngineError) as e:
                    if isinstance(e, ChatError):
                        e = ApiError(400, str(e), param="messages")
                    elif isinstance(e, EngineError):
                        e = ApiError.from_engine(e)
                    node.metrics.requests.labels(endpoint, str(e.status)).inc()
                    return error_response(e, shape)

            return handler

        return deco

    # -- OpenAI --

    @wrap(openai_error, "/v1/models")
    async def v1_models(request: Request) -> Response:
        data = [{"id": e.name, "object": "model", "created": int(e.added), "owned_by": "qvacd"}
                for e in node.available_models()]
        return JSONResponse({"object": "list", "data": data})

    def sampling(body: dict[str, Any], *, temp_default: float, where: str = "") -> dict[str, Any]:
        return {
            "temperature": field(body, "temperature", float, temp_default, lo=0, hi=2, where=where),
            "top_p": field(body, "top_p", float, 1.0, lo=0, hi=1, where=where),
            "seed": field(body, "seed", int, None, where=where),
            # llama.cpp server's extensions to the OpenAI body (defaults: GenerationRequest's)
            "top_k": field(body, "top_k", int, 40, lo=0, hi=1000, where=where),
            "min_p": field(body, "min_p", float, 0.05, lo=0, hi=1, where=where),
            "repeat_penalty": field(body, "repeat_penalty", float, 1.0, lo=0.01, hi=10,
                                    where=where),
        }

    @wrap(openai_error, "/v1/completions")
    async def v1_completions(request: Request) -> Response:
        body = await read_json(request)
        refuse_unsupported(api_params.openai_completions(body))
        model = _model_name(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be a string (several prompts or token arrays are"
                           " not supported; make one request per prompt)", param="prompt")
        if field(body, "n", int, 1) != 1:
            raise ApiError(400, "'n' must be 1", param="n")
        stream = field(body, "stream", bool, False)
        opts = field(body, "stream_options", dict, {})
        req = GenerationRequest(
            model=model, prompt=prompt, max_tokens=_max_tokens(body, "max_tokens", default=16),
            stop=stop_list(body.get("stop")), **sampling(body, temp_default=1.0),
            grammar=format_grammar(openai_format_grammar, body.get("response_format")))
        fmt = openai_completion_format(model, bool(opts.get("include_usage")))
        return InferenceResponse(node, req, fmt, stream=stream,
                                 local_only=_local_only(request, body),
                                 error_shape=openai_error, endpoint="/v1/completions")

    @wrap(openai_error, "/v1/chat/completions")
    async def v1_chat(request: Request) -> Response:
        body = await read_json(request)
        refuse_unsupported(api_params.openai_chat(body))
        model = _model_name(body)
        tools = tool_setup(tool_calls.openai_setup, body)
        messages = normalize_messages(tools.messages)
        stream = field(body, "stream", bool, False)
        if field(body, "n", int, 1) != 1:
            raise ApiError(400, "'n' must be 1", param="n")
        opts = field(body, "stream_options", dict, {})
        req = GenerationRequest(
            model=model, prompt="", messages=tuple(messages),
            max_tokens=_max_tokens(body, "max_completion_tokens", "max_tokens", default=None),
            stop=stop_list(body.get("stop")), **sampling(body, temp_default=1.0),
            grammar=tools.grammar_with(
                format_grammar(openai_format_grammar, body.get("response_format"))))
        fmt = tools.openai_format(openai_chat_format(model, bool(opts.get("include_usage"))))
        return InferenceResponse(node, req, fmt, stream=stream,
                                 local_only=_local_only(request, body),
                                 error_shape=openai_error, endpoint="/v1/chat/completions")

    # -- Ollama --

    def ollama_request(body: dict[str, Any], model: str, prompt: str) -> GenerationRequest:
        opts = field(body, "options", dict, {})
        w = "options."
        num_predict = field(opts, "num_predict", int, None, where=w)
        # repeat_last_n 0 is Ollama's "no repeat penalty" (api_params allows only 0 or 64).
        no_repeat = field(opts, "repeat_last_n", int, 64, where=w) == 0
        return GenerationRequest(
            model=model, prompt=prompt,
            max_tokens=None if num_predict is None or num_predict < 0 else max(1, num_predict),
            temperature=field(opts, "temperature", float, 0.8, lo=0, hi=2, where=w),
            top_p=field(opts, "top_p", float, 0.9, lo=0, hi=1, where=w),
            top_k=field(opts, "top_k", int, 40, lo=0, hi=1000, where=w),
            min_p=field(opts, "min_p", float, 0.0, lo=0, hi=1, where=w),
            repeat_penalty=1.0 if no_repeat else field(opts, "repeat_penalty", float, 1.1, lo=0.01,
                                                       hi=10, where=w),
            seed=field(opts, "seed", int, None, where=w),
            stop=stop_list(opts.get("stop"), "options.stop"),
            grammar=format_grammar(ollama_format_grammar, body.get("format")),
        )

    def ollama_details(entry: ModelEntry) -> dict[str, Any]:
        info = entry.info
        return {"parent_model": "", "format": "gguf", "family": info.get("architecture", ""),
                "families": [info.get("architecture", "")],
                "parameter_size": _param_size(info.get("parameters", 0)),
                "quantization_level": info.get("quantization", "")}

    def keep_alive_of(body: dict[str, Any]) -> float | None:
        try:
            return parse_keep_alive(body.get("keep_alive"))
        except KeepAliveError as e:
            raise ApiError(400, str(e), param="keep_alive") from e

    @wrap(ollama_error, "/api/tags")
    async def api_tags(request: Request) -> Response:
        models = []
        for e in node.available_models():
            models.append({
                "name": f"{e.name}:latest", "model": f"{e.name}:latest",
                "modified_at": datetime.fromtimestamp(e.added, timezone.utc).isoformat(),
                "size": e.size, "digest": e.sha256, "details": ollama_details(e),
            })
        return JSONResponse({"models": models})

    @wrap(ollama_error, "/api/generate")
    async def api_generate(request: Request) -> Response:
        t0 = time.monotonic()
        body = await read_json(request)
        refuse_unsupported(api_params.ollama_generate(body))
        model = _model_name(body)
        prompt = field(body, "prompt", str, "")
        system = field(body, "system", str, "")
        stream = field(body, "stream", bool, True)
        keep_alive = keep_alive_of(body)
        if not prompt and not system:
            if keep_alive == 0:  # Ollama's "unload the model" call
                entry = unload_model(node, model)
                return JSONResponse({"model": f"{entry.name}:latest", "created_at": now_iso(),
                                     "response": "", "done": True, "done_reason": "unload"})
            # Ollama's "load the model" call: answer done without generating.
            entry = engine.resolve(model)
            if engine.fits(entry):
                await engine.preload(model)
                apply_keep_alive(node, model, keep_alive)
            return JSONResponse({"model": f"{entry.name}:latest", "created_at": now_iso(),
                                 "response": "", "done": True, "done_reason": "load"})
        apply_keep_alive(node, model, keep_alive)
        if system and not field(body, "raw", bool, False):
            prompt = f"{system}\n\n{prompt}"
        req = ollama_request(body, model, prompt)
        return InferenceResponse(node, req, ollama_format(model, False, t0), stream=stream,
                                 local_only=_local_only(request, body),
                                 error_shape=ollama_error, endpoint="/api/generate")

    @wrap(ollama_error, "/api/chat")
    async def api_chat(request: Request) -> Response:
        t0 = time.monotonic()
        body = await read_json(request)
        refuse_unsupported(api_params.ollama_chat(body))
        model = _model_name(body)
        keep_alive = keep_alive_of(body)
        if keep_alive == 0 and not body.get("messages"):  # Ollama's "unload the model" call
            entry = unload_model(node, model)
            return JSONResponse({"model": f"{entry.name}:latest", "created_at": now_iso(),
                                 "message": {"role": "assistant", "content": ""},
                                 "done": True, "done_reason": "unload"})
        tools = tool_setup(tool_calls.ollama_setup, body)
        messages = normalize_messages(tools.messages)
        stream = field(body, "stream", bool, True)
        apply_keep_alive(node, model, keep_alive)
        req = dataclasses.replace(ollama_request(body, model, ""), messages=tuple(messages))
        return InferenceResponse(node, req, tools.ollama_format(ollama_format(model, True, t0)),
                                 stream=stream,
                                 local_only=_local_only(request, body),
                                 error_shape=ollama_error, endpoint="/api/chat")

    @wrap(ollama_error, "/api/show")
    async def api_show(request: Request) -> Response:
        body = await read_json(request)
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "'model' is required", param="model")
        entry = engine.resolve(name)
        info = store.info(entry)
        template = info.metadata.get("tokenizer.chat_template")
        model_info = {k: v for k, v in info.metadata.items()
                      if isinstance(v, (str, int, float, bool)) and k != "tokenizer.chat_template"}
        return JSONResponse({
            "modelfile": f"FROM {entry.path}\n",
            "parameters": "",
            "template": template if isinstance(template, str) else "(qvacd fallback chat template)",
            "details": ollama_details(entry),
            "model_info": model_info,
            # tools: every model, through qvacd/tool_calls.py's rendering and grammar
            "capabilities": ["completion", "tools"],
            "modified_at": datetime.fromtimestamp(entry.added, timezone.utc).isoformat(),
        })

    async def api_pull_route(request: Request) -> Response:
        puller = node.puller
        if puller is None:
            return JSONResponse({"error": "model pulls need the P2P side; start without --no-p2p"},
                                status_code=503)
        from .pull_api import api_pull  # only nodes with a P2P side load the pull machinery

        return await api_pull(request, puller)

    async def api_version(request: Request) -> Response:
        return JSONResponse({"version": __version__})

    # -- qvac --

    async def qvac_status(request: Request) -> Response:
        return JSONResponse(node.status())

    async def qvac_peers(request: Request) -> Response:
        return JSONResponse({"peers": node.peers_snapshot()})

    async def metrics(request: Request) -> Response:
        return Response(node.metrics.render(), media_type=CONTENT_TYPE)

    routes = [
        *dashboard_routes(node),  # type: ignore[arg-type]  # "/" is the dashboard's page
        Route("/v1/models", v1_models, methods=["GET"]),
        Route("/v1/completions", v1_completions, methods=["POST"]),
        Route("/v1/chat/completions", v1_chat, methods=["POST"]),
        Route("/api/tags", api_tags, methods=["GET"]),
        Route("/api/generate", api_generate, methods=["POST"]),
        Route("/api/chat", api_chat, methods=["POST"]),
        Route("/api/show", api_show, methods=["POST"]),
        Route("/api/pull", api_pull_route, methods=["POST"]),
        Route("/api/version", api_version, methods=["GET"]),
        Route("/qvac/status", qvac_status, methods=["GET"]),
        Route("/qvac/peers", qvac_peers, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *pair_routes(node),  # type: ignore[arg-type]
        *plan_routes(node),  # type: ignore[arg-type]
        *embedding_routes(node, openai_wrap=lambda endpoint: wrap(openai_error, endpoint),
                          ollama_wrap=lambda endpoint: wrap(ollama_error, endpoint),
                          read_json=read_json),
        *model_routes(node, details=ollama_details, error_cls=ApiError, read_json=read_json,
                      wrap=lambda endpoint: wrap(ollama_error, endpoint)),
    ]
    app = Starlette(routes=routes)
    token = node.config.api_token
    if token:
        return _TokenGuard(app, token)  # type: ignore[return-value]
    return _LoopbackHostGuard(app)  # type: ignore[return-value]


def _param_size(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    if n >= 1e6:
        return f"{n / 1e6:.0f}M"
    return str(n)


def _is_loopback_host(host: str) -> bool:
    if host.startswith("["):  # [v6]:port
        name = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:  # name:port or v4:port
        name = host.rsplit(":", 1)[0]
    else:  # a name, a v4 address, or a bare v6 address
        name = host
    name = name.lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class _LoopbackHostGuard:
    """Without a token the API listens on loopback only, but a web page the user opens
    could still reach it by DNS rebinding (its own name pointed at 127.0.0.1). A request
    whose Host is not a loopback name is refused, as Ollama does with its allowed hosts."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if host and not _is_loopback_host(host):
                msg = (f"Host {host[:100]!r} is not a loopback name; call"
                       " http://127.0.0.1:PORT, or set --api-token to serve other names")
                # in the error shape of the route family asked (OpenAI's, else Ollama's)
                body: dict[str, Any] = {"error": msg}
                if str(scope.get("path", "")).startswith("/v1/"):
                    body = {"error": {"message": msg, "type": "permission_error",
                                      "param": None, "code": None}}
                await JSONResponse(body, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _TokenGuard:
    """Bearer-token check in front of every route (constant-time comparison)."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        import hmac

        # The dashboard's page and its static files hold no data and must load to ask for
        # the token; everything they fetch needs it.
        public = scope.get("path") in PUBLIC_PATHS and scope.get("method") in ("GET", "HEAD")
        if scope["type"] == "http" and not public:
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                body = {"error": {"message": "missing or wrong bearer token; send"
                                  " 'Authorization: Bearer <api_token>'",
                                  "type": "authentication_error", "param": None, "code": None}}
                await JSONResponse(body, status_code=401,
                                   headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)
