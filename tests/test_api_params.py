"""No silent ignoring (issue 14, item 5): every request field is honoured, accepted as
harmless, or refused with a 400 naming it, in the route's own error shape.

One real daemon with the real default model; the official openai and ollama clients
where they can send the field, raw httpx for the shapes and for fields they cannot send.
"""

from __future__ import annotations

import httpx
import ollama
import openai
import pytest

MODEL = "gemma3-270m"
TOOL = {"type": "function", "function": {"name": "get_time", "description": "the time",
                                         "parameters": {"type": "object", "properties": {}}}}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.fixture(scope="module")
def oai(shared_daemon):
    return openai.OpenAI(base_url=shared_daemon.api + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def oll(shared_daemon):
    return ollama.Client(host=shared_daemon.api)


def _openai_refused(call, field: str) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        call()
    e = ei.value
    assert e.status_code == 400
    assert isinstance(e.body, dict) and e.body.get("param") == field, e.body
    assert e.body.get("type") == "invalid_request_error"
    assert f"'{field}'" in e.body["message"], e.body["message"]


def _ollama_refused(call, field: str) -> str:
    with pytest.raises(ollama.ResponseError) as ei:
        call()
    assert ei.value.status_code == 400
    assert f"'{field}'" in ei.value.error, ei.value.error
    return ei.value.error


# ---- OpenAI: refused -----------------------------------------------------------------


@pytest.mark.parametrize("kwargs,field", [
    ({"n": 2}, "n"),
    ({"best_of": 3}, "best_of"),
    ({"echo": True}, "echo"),
    ({"suffix": "and then"}, "suffix"),
    ({"logprobs": 2}, "logprobs"),
    ({"logprobs": 0}, "logprobs"),
    ({"logit_bias": {"100": -100}}, "logit_bias"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1.0}, "frequency_penalty"),
    ({"extra_body": {"frobnicate": True}}, "frobnicate"),
    # llama.cpp divides positive logits by it: 0 would make them infinite
    ({"extra_body": {"repeat_penalty": 0}}, "repeat_penalty"),
])
def test_openai_completions_refuses(oai, kwargs, field):
    _openai_refused(lambda: oai.completions.create(model=MODEL, prompt="Hi", max_tokens=2,
                                                   **kwargs), field)


def test_openai_completions_n_says_what_to_do(oai):
    with pytest.raises(openai.BadRequestError) as ei:
        oai.completions.create(model=MODEL, prompt="Hi", max_tokens=2, n=2)
    assert "send n=1 and make several requests" in ei.value.body["message"]


@pytest.mark.parametrize("kwargs,field", [
    ({"n": 3}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    # tools are honoured (tests/test_tool_calls.py); without tools, nothing to require
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"functions": [TOOL["function"]]}, "functions"),
    ({"function_call": {"name": "get_time"}}, "function_call"),
    # structured output is honoured (tests/test_structured_output.py); what stays refused:
    # a schema keyword the grammar would not enforce, an unknown type
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "integer", "minimum": 1}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"verbosity": "low"}, "verbosity"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"logit_bias": {"100": 5}}, "logit_bias"),
    ({"presence_penalty": 1.0}, "presence_penalty"),
    ({"extra_body": {"num_predict": 4}}, "num_predict"),
])
def test_openai_chat_refuses(oai, kwargs, field):
    msgs = [{"role": "user", "content": "Hi"}]
    _openai_refused(lambda: oai.chat.completions.create(model=MODEL, messages=msgs,
                                                        max_tokens=2, **kwargs), field)


def test_openai_structured_output_is_honoured(oai):
    r = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                    max_tokens=2, response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith("{")  # sampled under the JSON grammar
    with pytest.raises(openai.BadRequestError) as ei:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                    max_tokens=2, response_format={
                                        "type": "json_schema",
                                        "json_schema": {"name": "x", "schema": {
                                            "type": "string", "pattern": "^a+$"}}})
    assert "'pattern' at the root is not supported" in ei.value.body["message"]


@pytest.mark.parametrize("message,field", [
    ({"role": "user", "content": "Hi", "name": "bob"}, "messages[0].name"),
    ({"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
     "messages[0].function_call"),
    ({"role": "tool", "content": "42", "tool_call_id": "c1"}, "messages[0].tool_call_id"),
    ({"role": "user", "content": "Hi", "colour": "red"}, "messages[0].colour"),
])
def test_openai_chat_refuses_message_fields(oai, message, field):
    _openai_refused(lambda: oai.chat.completions.create(model=MODEL, messages=[message],
                                                        max_tokens=2), field)


def test_openai_refusal_before_a_stream_is_a_400(oai):
    _openai_refused(lambda: list(oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, stream=True,
        n=2)), "n")


def test_openai_error_shape_raw(shared_daemon):
    r = httpx.post(shared_daemon.api + "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "logit_bias": {"1": 1}})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "logit_bias" and err["type"] == "invalid_request_error"
    assert err["message"].startswith("'logit_bias'")


# ---- OpenAI: accepted --------------------------------------------------------------


def test_openai_chat_accepts_defaults_and_harmless_fields(oai):
    r = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=3,
        n=1, logprobs=False, response_format={"type": "text"}, tool_choice="none", tools=[],
        presence_penalty=0, frequency_penalty=0.0, logit_bias={}, user="u-1", store=False,
        metadata={"k": "v"}, service_tier="auto", parallel_tool_calls=False,
        modalities=["text"], prediction={"type": "content", "content": "Hello"},
        prompt_cache_key="k", safety_identifier="s", seed=1, temperature=0.5, top_p=0.9,
        stop=["\n\n"], stream_options=None)
    assert r.choices[0].message.role == "assistant"
    # max_completion_tokens is honoured: 3 tokens unless a stop or the end came first
    reason = r.choices[0].finish_reason
    assert reason in ("length", "stop"), reason
    assert r.usage.completion_tokens == 3 if reason == "length" else r.usage.completion_tokens <= 3


def test_openai_completions_accepts_defaults(oai):
    r = oai.completions.create(model=MODEL, prompt="Hi", max_tokens=3, n=1, best_of=1,
                               echo=False, user="u-1", presence_penalty=0,
                               frequency_penalty=0, logit_bias={})
    reason = r.choices[0].finish_reason
    assert reason in ("length", "stop"), reason
    assert r.usage.completion_tokens == 3 if reason == "length" else r.usage.completion_tokens <= 3


def test_openai_top_k_extension_is_honoured(oai):
    # top_k=1 leaves one candidate, so at temperature 1.5 every seed gives the same text;
    # ignored (the default is 40), the three seeds wander apart, as the control shows.
    # (Not compared with temperature=0: a cached prefix can flip a near-tie of logits.)
    prompt = "List of fruits: apple, banana,"
    outs = {oai.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=1.5,
                                   seed=s, extra_body={"top_k": 1, "min_p": 0}).choices[0].text
            for s in (1, 2, 3)}
    assert len(outs) == 1, outs
    free = {oai.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=1.5,
                                   seed=s, extra_body={"top_k": 0, "min_p": 0}).choices[0].text
            for s in (1, 2, 3)}
    assert len(free) > 1, "sampling without top_k gave the same text for three seeds"


# ---- Ollama: refused ---------------------------------------------------------------


@pytest.mark.parametrize("kwargs,field", [
    # "json" and schemas are honoured; the client itself refuses other strings
    ({"format": {"type": "nothing"}}, "format"),  # not JSON Schema
    ({"format": {"type": "integer", "maximum": 3}}, "format"),  # not enforceable: refused
    ({"images": [b"\x89PNG\r\n\x1a\nnot-really"]}, "images"),
    ({"template": "{{ .Prompt }}"}, "template"),
    ({"suffix": "return x"}, "suffix"),
    ({"context": [1, 2, 3]}, "context"),
    ({"think": True}, "think"),
    ({"options": {"mirostat": 2}}, "options.mirostat"),
    ({"options": {"tfs_z": 0.5}}, "options.tfs_z"),
    ({"options": {"typical_p": 0.7}}, "options.typical_p"),
    ({"options": {"presence_penalty": 0.5}}, "options.presence_penalty"),
    ({"options": {"frequency_penalty": 0.5}}, "options.frequency_penalty"),
    ({"options": {"repeat_last_n": 128}}, "options.repeat_last_n"),
    ({"options": {"repeat_penalty": 0}}, "options.repeat_penalty"),
    ({"options": {"temprature": 0.2}}, "options.temprature"),
])
def test_ollama_generate_refuses(oll, kwargs, field):
    _ollama_refused(lambda: oll.generate(model=MODEL, prompt="Hi", stream=False, **kwargs),
                    field)


def test_ollama_format_is_honoured(oll):
    r = oll.generate(model=MODEL, prompt="Hi", format="json", options={"num_predict": 2})
    assert r.response.startswith("{")  # sampled under the JSON grammar
    # at worst one token per character of {"a": with a space after each
    r = oll.generate(model=MODEL, prompt="Hi", format=SCHEMA, options={"num_predict": 10})
    assert r.response.replace(" ", "").startswith('{"a":')  # the schema's one key
    msg = _ollama_refused(lambda: oll.generate(model=MODEL, prompt="Hi", format={
        "type": "object", "properties": {"a": {"not": {}}}}), "format")
    assert "'not' at /properties/a" in msg


@pytest.mark.parametrize("kwargs,field", [
    ({"tools": [{"type": "function", "function": {"name": "get time"}}]},
     "tools[0].function.name"),
    ({"format": {"type": "object", "properties": {"a": {"type": "nothing"}}}}, "format"),
    ({"think": "high"}, "think"),
    ({"options": {"mirostat": 1}}, "options.mirostat"),
])
def test_ollama_chat_refuses(oll, kwargs, field):
    _ollama_refused(lambda: oll.chat(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                     stream=False, **kwargs), field)


def test_ollama_chat_refuses_images_in_a_message(oll):
    msg = {"role": "user", "content": "What is this?", "images": [b"\x89PNG\r\n\x1a\nxx"]}
    _ollama_refused(lambda: oll.chat(model=MODEL, messages=[msg]), "messages[0].images")


def test_ollama_streamed_refusal(oll):
    _ollama_refused(lambda: list(oll.generate(model=MODEL, prompt="Hi", stream=True,
                                              format={"type": "nothing"})), "format")


@pytest.mark.parametrize("path", ["/api/generate", "/api/chat"])
def test_ollama_top_level_option_names_where_it_belongs(shared_daemon, path):
    body = {"model": MODEL, "stream": False, "temperature": 0}
    body.update({"prompt": "Hi"} if path == "/api/generate"
                else {"messages": [{"role": "user", "content": "Hi"}]})
    r = httpx.post(shared_daemon.api + path, json=body)
    assert r.status_code == 400
    assert r.json() == {"error": "unknown field 'temperature' ('temperature' belongs in "
                                 "'options'); leave it out"}


# ---- Ollama: accepted --------------------------------------------------------------


def test_ollama_generate_accepts_defaults_and_runtime_options(oll):
    r = oll.generate(model=MODEL, prompt="Hi", stream=False, format="", think=False,
                     images=[], context=[], raw=False, options={
                         "num_predict": 3, "num_ctx": 2048, "num_keep": 4, "num_thread": 2,
                         "num_batch": 64, "num_gpu": 0, "main_gpu": 0, "use_mmap": True,
                         "mirostat": 0, "mirostat_tau": 5.0, "mirostat_eta": 0.1,
                         "tfs_z": 1.0, "typical_p": 1.0, "repeat_last_n": 64,
                         "presence_penalty": 0, "frequency_penalty": 0.0,
                         "penalize_newline": False, "seed": 3, "top_k": 20, "min_p": 0.0})
    assert r.done and 1 <= r.eval_count <= 3


def test_ollama_chat_accepts_defaults(oll):
    r = oll.chat(model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=False,
                 tools=[], format="", think=False, options={"num_predict": 3, "num_ctx": 4096})
    assert r.done and 1 <= r.eval_count <= 3


def test_ollama_repeat_last_n_zero_turns_the_penalty_off(oll):
    prompt = "la la la la la la la la la la la la la la la la"

    def greedy(**opts):
        return oll.generate(model=MODEL, prompt=prompt, stream=False, options={
            "temperature": 0, "num_predict": 24, **opts}).response

    penalised = greedy(repeat_penalty=1.5)
    off = greedy(repeat_penalty=1.0)
    assert penalised != off, "precondition: the penalty changes this greedy answer"
    assert greedy(repeat_penalty=1.5, repeat_last_n=0) == off
    assert greedy(repeat_penalty=1.5, repeat_last_n=64) == penalised
