"""Which request fields each inference route honours, accepts as harmless, or refuses.

Why: a parameter that is silently ignored gives a program a wrong answer without telling
it (free text where it parses JSON, one choice where it asked for three). So every field
the official OpenAI and Ollama clients can send is in one of three tables per route:

- honoured: read by the parsing in qvacd/api.py (`v1_completions`, `v1_chat`,
  `ollama_request`, `api_generate`, `api_chat`) into the GenerationRequest or the
  response format;
- harmless: accepted and not acted on because it cannot change what is generated
  (an end-user id, billing or storage hints, how the node's operator runs the model);
- checked: accepted only at its default or no-op value; any other value is a 400 that
  names the field and says what to do instead.

Unknown fields are refused on every route, including Ollama's (whose own server ignores
them): a misspelt or misplaced field (`num_predict` at the top level instead of in
`options`) is exactly the silent mistake this module exists to catch, and OpenAI's own
API refuses unknown fields too, so no OpenAI client sends them.

The checks return a `Refusal` (message, field) rather than raising, so this module
needs nothing of qvacd.api (which imports it) and stays free of import circles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Refusal:
    message: str
    param: str


# A check returns None when the value is fine (a default or a no-op), else why not.
Check = Callable[[Any], str | None]

_LEGACY_FUNCTIONS = ("the legacy functions/function_call are not supported; send the same "
                     "functions as tools=[{\"type\": \"function\", \"function\": {...}}] and "
                     "tool_choice")


def _empty(v: Any) -> bool:
    return v is None or v == "" or v == [] or v == {}


def _only(*allowed: Any, why: str) -> Check:
    """Accept null and the listed values; refuse anything else with `why`."""

    def check(v: Any) -> str | None:
        if v is None or any(v == a and type(v) is type(a) for a in allowed):
            return None
        return why

    return check


def _absent(why: str) -> Check:
    """Accept null, "", [] and {}; refuse anything else with `why`."""
    return lambda v: None if _empty(v) else why


def _zero(why: str) -> Check:
    return lambda v: None if v is None or (isinstance(v, (int, float)) and not isinstance(
        v, bool) and v == 0) else why


def _function_call(v: Any) -> str | None:
    # Without functions (refused), "none" and "auto" both mean: answer in text.
    return None if v in (None, "none", "auto") else _LEGACY_FUNCTIONS


def _modalities(v: Any) -> str | None:
    return None if v is None or v == ["text"] else "only [\"text\"] is supported; audio is not"


def _repeat_last_n(v: Any) -> str | None:
    # 64 is qvacd's fixed penalty window (models.batch_runner.PENALTY_LAST_N, Ollama's
    # default too); 0 turns the repeat penalty off (ollama_request honours it).
    if v is None or v in (0, 64) and not isinstance(v, bool):
        return None
    return "only 64 (the default window) or 0 (no repeat penalty) is supported"


_N = _only(1, why="n > 1 is not supported; send n=1 and make several requests")
_LOGIT_BIAS = _absent("logit_bias is not supported; leave it out")
_PENALTY = _zero("is not supported (only 0); use repeat_penalty (an extension field) instead")
_HARMLESS: Check = lambda v: None  # noqa: E731
# Honoured: read and checked (a 400 naming the field) by qvacd/tool_calls.py, not here.
_TOOL_FIELD: Check = _HARMLESS
# Read and checked by qvacd/structured_output.py (api.py hands it the value): OpenAI
# response_format, Ollama format. A schema it cannot enforce is a 400 from there.
_STRUCTURED_HONOURED: Check = _HARMLESS

# ---- OpenAI ------------------------------------------------------------------------

# Honoured (read by qvacd/api.py): model, prompt/messages, max_tokens,
# max_completion_tokens, temperature, top_p, seed, stop, stream, stream_options
# (include_usage), and the llama.cpp-server extensions top_k, min_p, repeat_penalty,
# plus qvacd's local_only.
_OPENAI_HONOURED = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
                    "stream_options", "top_k", "min_p", "repeat_penalty", "local_only"}

_OPENAI_COMMON: dict[str, Check] = {
    "n": _N,
    "presence_penalty": _PENALTY,
    "frequency_penalty": _PENALTY,
    "logit_bias": _LOGIT_BIAS,
    # An end-user id for the provider's abuse monitoring: nothing to generate differently.
    "user": _HARMLESS,
}

OPENAI_COMPLETIONS: dict[str, Check] = {
    **_OPENAI_COMMON,
    # Legacy completions: logprobs is how many alternatives per token; 0 still asks for
    # the chosen token's logprob, so only null is a no-op.
    "logprobs": _only(why="logprobs are not supported; leave logprobs out"),
    "echo": _only(False, why="echo is not supported; prepend the prompt to the answer yourself"),
    "suffix": _absent("suffix (fill-in-the-middle) is not supported; leave it out"),
    "best_of": _only(1, why="best_of > 1 is not supported; send best_of=1 and make several "
                     "requests"),
    # Not in OpenAI's legacy completions; honoured as llama.cpp's server does.
    "response_format": _STRUCTURED_HONOURED,
}

OPENAI_CHAT: dict[str, Check] = {
    **_OPENAI_COMMON,
    "logprobs": _only(False, why="logprobs are not supported; send logprobs=false"),
    "top_logprobs": _only(0, why="top_logprobs are not supported; leave it out"),
    "tools": _TOOL_FIELD, "tool_choice": _TOOL_FIELD, "parallel_tool_calls": _TOOL_FIELD,
    "functions": _absent(_LEGACY_FUNCTIONS),
    "function_call": _function_call,
    "response_format": _STRUCTURED_HONOURED,
    "modalities": _modalities,
    "audio": _only(why="audio output is not supported; leave audio out"),
    "reasoning_effort": _only("none", why="the models qvacd serves have no reasoning mode; "
                              "leave reasoning_effort out"),
    "verbosity": _only("medium", why="only the default, \"medium\", is supported; say how "
                       "long an answer you want in the prompt"),
    "web_search_options": _only(why="web search is not supported; leave it out"),
    "moderation": _only(why="moderation is not run by qvacd; leave it out"),
    # A predicted output only makes the provider faster; the answer is the same.
    "prediction": _HARMLESS,
    # Billing and latency tiers: qvacd has one way to serve a request.
    "service_tier": _HARMLESS,
    # Stored completions and their tags: qvacd keeps nothing and has no API to read them
    # back (that API answers 404), so accepting these changes no answer.
    "store": _HARMLESS, "metadata": _HARMLESS,
    # Cache routing hints: qvacd reuses cached prompt prefixes on its own.
    "prompt_cache_key": _HARMLESS, "prompt_cache_retention": _HARMLESS,
    "prompt_cache_options": _HARMLESS,
    "safety_identifier": _HARMLESS,  # like `user`
}

_OPENAI_MESSAGE: dict[str, Check] = {
    "name": _absent("participant names are not supported; put the name in the content"),
    "tool_calls": _TOOL_FIELD, "tool_call_id": _TOOL_FIELD,
    "function_call": _absent(_LEGACY_FUNCTIONS),
    "audio": _absent("audio is not supported; leave it out"),
    "refusal": _absent("is not supported; put the text in content"),
}

# ---- Ollama ------------------------------------------------------------------------

_OLLAMA_HONOURED = {"model", "stream", "options", "local_only",
                    # Q1 (model management) passes keep_alive to the engine.
                    "keep_alive"}

_OLLAMA_COMMON: dict[str, Check] = {
    "format": _STRUCTURED_HONOURED,
    "think": _only(False, why="the models qvacd serves have no thinking mode; send think=false"),
    "logprobs": _only(False, why="logprobs are not supported; send logprobs=false"),
    "top_logprobs": _only(0, why="top_logprobs are not supported; leave it out"),
    # Ollama truncates or shifts a prompt that does not fit the context; qvacd never does:
    # such a request is a 400 with both lengths, so either value gives the same answer.
    "truncate": _HARMLESS, "shift": _HARMLESS,
}

OLLAMA_GENERATE: dict[str, Check] = {
    **_OLLAMA_COMMON,
    "prompt": _HARMLESS, "system": _HARMLESS, "raw": _HARMLESS,  # honoured (api_generate)
    "suffix": _absent("suffix (fill-in-the-middle) is not supported; leave it out"),
    "template": _absent("custom templates are not supported; format the prompt yourself and "
                        "send raw=true"),
    "context": _absent("context (the token list of an earlier answer) is not supported; send "
                       "the conversation as messages to /api/chat"),
    "images": _absent("images are not supported: the models qvacd serves are text-only"),
    "width": _absent("image generation is not supported"),
    "height": _absent("image generation is not supported"),
    "steps": _absent("image generation is not supported"),
}

OLLAMA_CHAT: dict[str, Check] = {
    **_OLLAMA_COMMON,
    "messages": _HARMLESS,  # honoured (api_chat)
    "tools": _TOOL_FIELD,
}

_OLLAMA_MESSAGE: dict[str, Check] = {
    "images": _absent("images are not supported: the models qvacd serves are text-only"),
    "tool_calls": _TOOL_FIELD, "tool_name": _TOOL_FIELD,
    # An earlier turn's reasoning text: Ollama's own templates drop it from the prompt.
    "thinking": _HARMLESS,
}

# Options honoured by ollama_request: num_predict, temperature, top_k, top_p, min_p, seed,
# stop, repeat_penalty, and repeat_last_n (0 or 64, see _repeat_last_n).
_OPTIONS_HONOURED = {"num_predict", "temperature", "top_k", "top_p", "min_p", "seed", "stop",
                     "repeat_penalty", "local_only"}

# How the node's operator runs the model (threads, GPU layers, batch, memory mapping):
# set once in qvacd's config, not per request, and none changes the tokens generated.
_RUNTIME_OPTIONS = ("numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv",
                    "logits_all", "vocab_only", "use_mmap", "use_mlock", "embedding_only",
                    "num_thread")

OLLAMA_OPTIONS: dict[str, Check] = {
    "repeat_last_n": _repeat_last_n,
    "presence_penalty": _zero("is not supported (only 0); use options.repeat_penalty instead"),
    "frequency_penalty": _zero("is not supported (only 0); use options.repeat_penalty "
                               "instead"),
    "mirostat": _only(0, why="mirostat sampling is not supported; send mirostat=0"),
    # Only used by mirostat, which must be off.
    "mirostat_tau": _HARMLESS, "mirostat_eta": _HARMLESS,
    "tfs_z": _only(1, 1.0, why="tail-free sampling is not supported; send tfs_z=1 (off)"),
    "typical_p": _only(1, 1.0, why="typical sampling is not supported; send typical_p=1 (off)"),
    # The context per sequence is the node's (config `context`); a prompt that does not
    # fit is a 400 with both lengths, never truncated, so num_ctx cannot change an answer,
    # and num_keep (what truncation keeps) has nothing to act on.
    "num_ctx": _HARMLESS, "num_keep": _HARMLESS,
    # Dropped by Ollama's own server as well: it changes nothing there either.
    "penalize_newline": _HARMLESS,
    **{name: _HARMLESS for name in _RUNTIME_OPTIONS},
}

# Sampling options that belong in `options`, for the hint when one is sent at the top level.
_OPTION_NAMES = _OPTIONS_HONOURED | set(OLLAMA_OPTIONS)


# ---- the checks --------------------------------------------------------------------


def _check_fields(body: dict[str, Any], honoured: set[str], table: dict[str, Check],
                  where: str = "", hint: Callable[[str], str] | None = None
                  ) -> Refusal | None:
    for name, value in body.items():
        label = f"{where}{name}"
        if name in honoured:
            continue
        check = table.get(name)
        if check is None:
            extra = hint(name) if hint else ""
            return Refusal(f"unknown field '{label}'{extra}; leave it out", label)
        why = check(value)
        if why is not None:
            return Refusal(f"'{label}' {why}" if why.startswith("is ") else
                           f"'{label}': {why}", label)
    return None


def _check_messages(messages: Any, table: dict[str, Check]) -> Refusal | None:
    if not isinstance(messages, list):
        return None  # normalize_messages says what is wrong with it
    for i, m in enumerate(messages):
        if isinstance(m, dict):
            r = _check_fields(m, {"role", "content"}, table, where=f"messages[{i}].")
            if r:
                return r
    return None


def _ollama_hint(name: str) -> str:
    return f" ('{name}' belongs in 'options')" if name in _OPTION_NAMES else ""


def openai_completions(body: dict[str, Any]) -> Refusal | None:
    return _check_fields(body, _OPENAI_HONOURED | {"prompt"}, OPENAI_COMPLETIONS)


def openai_chat(body: dict[str, Any]) -> Refusal | None:
    return (_check_fields(body, _OPENAI_HONOURED | {"messages", "max_completion_tokens"},
                         OPENAI_CHAT)
            or _check_messages(body.get("messages"), _OPENAI_MESSAGE))


def ollama_generate(body: dict[str, Any]) -> Refusal | None:
    return (_check_fields(body, _OLLAMA_HONOURED, OLLAMA_GENERATE, hint=_ollama_hint)
            or _check_options(body.get("options")))


def ollama_chat(body: dict[str, Any]) -> Refusal | None:
    return (_check_fields(body, _OLLAMA_HONOURED, OLLAMA_CHAT, hint=_ollama_hint)
            or _check_options(body.get("options"))
            or _check_messages(body.get("messages"), _OLLAMA_MESSAGE))


def _check_options(options: Any) -> Refusal | None:
    if not isinstance(options, dict):
        return None  # ollama_request says it must be an object
    return _check_fields(options, _OPTIONS_HONOURED, OLLAMA_OPTIONS, where="options.")


# ---- embeddings (qvacd/embeddings_api.py) ------------------------------------------

# Fields the embedding routes read; `dimensions` is read too, and refused unless null.
_EMBED_HONOURED = {"model", "input", "dimensions"}
OPENAI_EMBEDDINGS: dict[str, Check] = {
    "encoding_format": _HARMLESS,  # honoured (float or base64)
    "user": _HARMLESS,  # an end-user id, for the provider's abuse tracking
}
_OLLAMA_EMBED: dict[str, Check] = {
    "truncate": _HARMLESS, "keep_alive": _HARMLESS, "options": _HARMLESS,  # honoured
    "local_only": _HARMLESS,  # honoured
}
# An embedding samples nothing, so sampling options change no vector; the context size
# would (it decides where truncate cuts), and it is the node's --ctx-size.
_EMBED_OPTIONS: dict[str, Check] = {
    **{name: _HARMLESS for name in _RUNTIME_OPTIONS},
    **{name: _HARMLESS for name in ("temperature", "top_k", "top_p", "min_p", "seed", "stop",
                                    "num_predict", "repeat_penalty", "repeat_last_n",
                                    "presence_penalty", "frequency_penalty", "typical_p",
                                    "mirostat", "mirostat_eta", "mirostat_tau", "tfs_z",
                                    "num_keep", "penalize_newline")},
    "num_ctx": _absent("the embedding context is this node's --ctx-size; leave num_ctx out"),
}


def openai_embeddings(body: dict[str, Any]) -> Refusal | None:
    return _check_fields(body, _EMBED_HONOURED, OPENAI_EMBEDDINGS)


def ollama_embed(body: dict[str, Any], *, text_field: str = "input") -> Refusal | None:
    """/api/embed (`input`) and the older /api/embeddings (`prompt`)."""
    honoured = {"model", "dimensions", text_field}
    options = body.get("options")
    return (_check_fields(body, honoured, _OLLAMA_EMBED, hint=_ollama_hint)
            or (_check_fields(options, {"local_only"}, _EMBED_OPTIONS, where="options.")
                if isinstance(options, dict) else None))
