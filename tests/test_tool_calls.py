"""Tool calls (issue 14 item 3): OpenAI tools/tool_choice and Ollama tools.

Unit tests of qvacd/tool_calls.py's logic first (parsing, rendering, the grammar text, the
answer split into content and calls, fed our own Format objects); then real daemons with
the real default model and the official openai and ollama clients: a named function and
"required" always give a call whose arguments validate (streamed and not), "none" and
"auto" answer as documented, a tool turn reaches the prompt and is answered, bad tools
are 400s naming the field, and a delegated request still comes back as tool_calls.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import ollama
import openai
import pytest

from models.chat import render_chat
from models.engine import GenerationResult
from models.grammar import grammar_for_schema
from qvacd import tool_calls
from qvacd.api import ollama_format, openai_chat_format
from qvacd.tool_calls import ToolError
from tests.harness import ALL_ROLES

MODEL = "gemma3-270m"
WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
                   "days": {"type": "integer"},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "days"],
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather forecast for a city.",
    "parameters": WEATHER_PARAMS}}
TIME_PARAMS = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}},
               "required": ["zone"]}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time.",
                                         "parameters": TIME_PARAMS}}
SCHEMAS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
ASK = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]


# ---- unit: the request --------------------------------------------------------------


def _setup(**body):
    return tool_calls.openai_setup({"messages": ASK, **body})


def test_tool_choice_modes():
    assert _setup().choice == "none" and not _setup().active
    s = _setup(tools=[WEATHER])
    assert (s.choice, s.grammar) == ("auto", None) and s.active
    assert _setup(tools=[WEATHER], tool_choice="none").active is False
    assert _setup(tools=[WEATHER], tool_choice="required").grammar
    named = _setup(tools=[WEATHER, TIME],
                   tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert (named.choice, named.function) == ("function", "get_time")
    assert '"{\\"name\\": \\"get_time\\", \\"arguments\\": "' in named.grammar
    assert "get_weather" not in named.grammar


def test_a_forced_call_and_a_response_format_do_not_mix():
    forced = _setup(tools=[WEATHER], tool_choice="required")
    assert forced.grammar_with(None) == forced.grammar
    assert _setup(tools=[WEATHER]).grammar_with("root ::= x") == "root ::= x"
    with pytest.raises(ToolError) as ei:
        forced.grammar_with("root ::= x")
    assert ei.value.param == "tool_choice" and "response_format" in ei.value.message


@pytest.mark.parametrize("body,param,words", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "not in tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "must be"),
    ({"tools": {"get_weather": {}}}, "tools", "must be an array"),
    ({"tools": [{"type": "function"}]}, "tools[0]", "must be an object"),
    ({"tools": [{"type": "custom", "function": {"name": "x"}}]}, "tools[0].type", "custom"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name",
     "letters"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "two tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}}}]},
     "tools[0].function.parameters", "'minimum'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integr"}}}}}]},
     "tools[0].function.parameters", "not a valid JSON Schema"),
    ({"tools": [{"type": "function", "function": {"name": "f",
                                                  "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters", "object"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameter": {}}}]},
     "tools[0].function.parameter", "unknown field"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "boolean"),
])
def test_bad_tools_name_the_field(body, param, words):
    with pytest.raises(ToolError) as ei:
        _setup(**body)
    assert ei.value.param == param and f"'{param}'" in ei.value.message
    assert words in ei.value.message, ei.value.message


def test_tool_turns_become_messages_in_the_call_syntax():
    msgs = [{"role": "system", "content": "Be brief."}, *ASK,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"}]
    s = _setup(tools=[WEATHER], messages=msgs)
    assert s.messages[0]["role"] == "system"
    assert s.messages[0]["content"].startswith("Be brief.\nYou can call these functions:")
    assert "get_weather: The weather forecast" in s.messages[0]["content"]
    assert s.messages[2] == {"role": "assistant", "content":
                             '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}'}
    assert s.messages[3] == {"role": "tool", "content": "sunny, 21 C"}
    # "none": the conversation keeps its calls, the tool definitions are left out
    none = _setup(tools=[WEATHER], messages=msgs, tool_choice="none")
    assert none.messages[0] == {"role": "system", "content": "Be brief."}
    # a tool message must answer an earlier call
    bad = [*ASK, {"role": "tool", "tool_call_id": "zz", "content": "x"}]
    with pytest.raises(ToolError) as ei:
        _setup(tools=[WEATHER], messages=bad)
    assert ei.value.param == "messages[1].tool_call_id"
    broken = [{"role": "assistant", "tool_calls": [{"id": "c", "function": {
        "name": "get_weather", "arguments": "{not json"}}]}]
    with pytest.raises(ToolError) as ei:
        _setup(tools=[WEATHER], messages=broken)
    assert ei.value.param == "messages[0].tool_calls[0].function.arguments"


def test_ollama_tool_turns():
    s = tool_calls.ollama_setup({"tools": [WEATHER], "messages": [*ASK, {
        "role": "assistant", "content": "", "tool_calls": [{"function": {
            "name": "get_weather", "arguments": {"city": "Lima", "days": 1}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "rain"}]})
    assert s.choice == "auto" and s.messages[0]["role"] == "system"
    assert s.messages[2]["content"] == \
        '{"name": "get_weather", "arguments": {"city": "Lima", "days": 1}}'
    assert s.messages[3] == {"role": "tool", "content": "rain"}


def test_fallback_template_renders_tool_turns():
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": '{"name": "w", "arguments": {}}'},
            {"role": "tool", "content": "rain"}]
    chat = render_chat(msgs, None)
    assert chat.prompt.endswith('Assistant: {"name": "w", "arguments": {}}\nTool: rain\n'
                                'Assistant:')
    assert "\nTool:" in chat.stop
    # a template without a tool role gets the results as one user turn
    template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    two = render_chat([*msgs, {"role": "tool", "content": "wind"}], template).prompt
    assert "<user>Tool result: rain\nTool result: wind\n<assistant>" in two


def test_rename_rules_leaves_literals_classes_and_counts():
    g = 'root ::= "a-b" item{2,3} [a-z\\]x-] space\nitem ::= "\\"root\\"" space # root\n'
    assert tool_calls.rename_rules(g, "p-") == (
        'p-root ::= "a-b" p-item{2,3} [a-z\\]x-] p-space\n'
        'p-item ::= "\\"root\\"" p-space # root\n')
    grammar = tool_calls.call_grammar(tool_calls.parse_tools([WEATHER, TIME]), "required", None)
    assert grammar.startswith("root ::= tc0-call | tc1-call\n")
    # every rule of each tool's grammar is there, once, under its prefix
    for i, params in enumerate((WEATHER_PARAMS, TIME_PARAMS)):
        for line in grammar_for_schema(params).splitlines():
            assert f"tc{i}-{line.split(' ::= ')[0]} ::= " in grammar


# ---- unit: the answer ---------------------------------------------------------------


def _result(reason: str = "stop") -> GenerationResult:
    return GenerationResult(finish_reason=reason, prompt_tokens=5, completion_tokens=9)


def _sse_events(data: bytes) -> list:
    return [json.loads(e[6:]) for e in data.split(b"\n\n") if e.startswith(b"data: {")]


def _stream(fmt, pieces, reason="stop") -> list:
    out = fmt.first() if fmt.first else b""
    for p in pieces:
        out += fmt.chunk(p)
    return _sse_events(out + fmt.final(_result(reason), ["node"]))


def _accumulate(events: list) -> tuple[str | None, dict[int, dict], str | None]:
    """What the openai client's stream helpers make of the deltas."""
    content, calls, finish = None, {}, None
    for e in events:
        for c in e["choices"]:
            d = c["delta"]
            if d.get("content") is not None:
                content = (content or "") + d["content"]
            for tc in d.get("tool_calls") or []:
                cur = calls.setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
                cur["id"] = tc.get("id") or cur["id"]
                cur["name"] += tc.get("function", {}).get("name") or ""
                cur["arguments"] += tc.get("function", {}).get("arguments") or ""
            finish = c["finish_reason"] or finish
    return content, calls, finish


FORCED_TEXT = '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3} }'


@pytest.mark.parametrize("cut", [1, 3, 7])
def test_forced_call_streams_its_arguments(cut):
    s = _setup(tools=[WEATHER], tool_choice="required")
    pieces = [FORCED_TEXT[i:i + cut] for i in range(0, len(FORCED_TEXT), cut)]
    events = _stream(s.openai_format(openai_chat_format(MODEL, False)), pieces)
    content, calls, finish = _accumulate(events)
    assert finish == "tool_calls" and content is None
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "days": 3}
    assert calls[0]["arguments"] == '{"city": "Paris", "days": 3}'
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    whole = s.openai_format(openai_chat_format(MODEL, False)).whole(
        FORCED_TEXT, _result(), ["node"])
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"] == {
        "name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}


def test_forced_call_cut_short_is_length_with_the_arguments_so_far():
    s = _setup(tools=[WEATHER], tool_choice="required")
    text = '{"name": "get_weather", "arguments": {"city": "Par'
    _, calls, finish = _accumulate(_stream(s.openai_format(openai_chat_format(MODEL, False)),
                                           [text], "length"))
    assert finish == "length" and calls[0]["arguments"] == '{"city": "Par'


@pytest.mark.parametrize("text,is_call", [
    (' {"name": "get_weather", "arguments": {"city": "Lima", "days": 2}}', True),
    ('{"name": "get_weather", "arguments": {"city": "Berlin", "days": 2}}', False),  # enum
    ('{"name": "get_weather", "arguments": {"city": "Lima"}}', False),  # required
    ('{"name": "launch", "arguments": {}}', False),  # unknown function
    ('{"a": 1}', False),
    ('It is sunny.', False),
])
def test_auto_answer_is_a_call_only_when_it_validates(text, is_call):
    s = _setup(tools=[WEATHER])
    content, calls, finish = _accumulate(_stream(
        s.openai_format(openai_chat_format(MODEL, False)), [text[:5], text[5:]]))
    if is_call:
        assert finish == "tool_calls" and content is None and len(calls) == 1
        assert json.loads(calls[0]["arguments"]) == {"city": "Lima", "days": 2}
    else:
        assert finish == "stop" and content == text and not calls


def test_auto_parallel_calls_and_parallel_off():
    text = ('{"name": "get_time", "arguments": {"zone": "UTC"}}\n'
            '{"name": "get_weather", "arguments": {"city": "Tokyo", "days": 1}}')
    both = _setup(tools=[WEATHER, TIME]).openai_format(openai_chat_format(MODEL, False))
    calls = both.whole(text, _result(), ["n"])["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_time", "get_weather"]
    assert len({c["id"] for c in calls}) == 2
    one = _setup(tools=[WEATHER, TIME], parallel_tool_calls=False).openai_format(
        openai_chat_format(MODEL, False))
    assert len(one.whole(text, _result(), ["n"])["choices"][0]["message"]["tool_calls"]) == 1


def test_ollama_answer_shapes():
    s = tool_calls.ollama_setup({"tools": [WEATHER], "messages": ASK})
    text = '{"name": "get_weather", "arguments": {"city": "Tokyo", "days": 4}}'
    fmt = s.ollama_format(ollama_format(MODEL, True, 0.0))
    lines = [json.loads(x) for x in (fmt.chunk(text[:9]) + fmt.chunk(text[9:]) + fmt.final(
        _result(), ["n"])).splitlines()]
    assert [x["done"] for x in lines] == [False, True]
    assert lines[0]["message"]["tool_calls"] == [{"function": {
        "index": 0, "name": "get_weather", "arguments": {"city": "Tokyo", "days": 4}}}]
    whole = s.ollama_format(ollama_format(MODEL, True, 0.0)).whole(text, _result(), ["n"])
    assert whole["message"]["content"] == "" and whole["done_reason"] == "stop"
    assert whole["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    plain = s.ollama_format(ollama_format(MODEL, True, 0.0))
    assert json.loads(plain.chunk("Sunny"))["message"]["content"] == "Sunny"


# ---- a real daemon, the real model, the official clients ------------------------------


@pytest.fixture(scope="module")
def oai(shared_daemon):
    return openai.OpenAI(base_url=shared_daemon.api + "/v1", api_key="unused", max_retries=0)


def _valid_call(name: str, arguments: str | dict) -> dict:
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(args, SCHEMAS[name])
    return args


def test_named_function_call_validates_streamed_and_not(oai):
    named = {"type": "function", "function": {"name": "get_weather"}}
    # temperature 1: the grammar, not a likely guess, is what makes the call valid
    r = oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME],
                                    tool_choice=named, max_tokens=48, temperature=1.0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    _valid_call("get_weather", call.function.arguments)
    # streamed: the openai client's stream helper puts the deltas together
    with oai.chat.completions.stream(model=MODEL, messages=ASK, tools=[WEATHER, TIME],
                                     tool_choice=named, max_tokens=48) as stream:
        deltas = [e for e in stream if e.type == "tool_calls.function.arguments.delta"]
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    _valid_call("get_weather", call.function.arguments)
    assert len(deltas) >= 2, "the arguments should stream in pieces, not at the end"


def test_required_calls_one_of_the_tools(oai):
    chunks = list(oai.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
        max_tokens=48, stream=True, stream_options={"include_usage": True}))
    with_choices = [c for c in chunks if c.choices]
    first = with_choices[0].choices[0].delta
    assert first.role == "assistant"
    head = next(c.choices[0].delta.tool_calls[0] for c in with_choices
                if c.choices[0].delta.tool_calls)
    assert head.index == 0 and head.id.startswith("call_") and head.type == "function"
    assert head.function.name in SCHEMAS
    args = "".join(c.choices[0].delta.tool_calls[0].function.arguments or ""
                   for c in with_choices if c.choices[0].delta.tool_calls)
    _valid_call(head.function.name, args)
    assert with_choices[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in with_choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_none_answers_in_text_without_the_tools(oai):
    def ask(choice):
        return oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER],
                                           tool_choice=choice, max_tokens=2)

    none, auto = ask("none"), ask("auto")
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].finish_reason in ("stop", "length")
    assert isinstance(none.choices[0].message.content, str)
    # auto puts the tool definitions in the prompt; none leaves them out
    assert auto.usage.prompt_tokens > none.usage.prompt_tokens + 40


def test_tool_result_is_fed_back(oai):
    result = ("Forecast for Paris: sunny on Monday at 21 degrees, light rain on Tuesday at 17 "
              "degrees, clouds on Wednesday at 18 degrees, with a gentle wind from the west.")

    def ask(content):
        msgs = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": content}]
        return oai.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER],
                                           max_tokens=8, temperature=0)

    full, empty = ask(result), ask("")
    assert full.usage.completion_tokens >= 1
    choice = full.choices[0]
    if choice.finish_reason == "tool_calls":  # auto: a call is allowed, and must validate
        _valid_call(choice.message.tool_calls[0].function.name,
                    choice.message.tool_calls[0].function.arguments)
    else:
        assert isinstance(choice.message.content, str)
    # the result's text reached the prompt (about 35 tokens of it)
    assert full.usage.prompt_tokens >= empty.usage.prompt_tokens + 25


@pytest.mark.parametrize("kwargs,param,words", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "not in tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "strin"}}}}}]},
     "tools[0].function.parameters", "not a valid JSON Schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "^a"}}}}}]},
     "tools[0].function.parameters", "'pattern'"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]},
     "tools[0].function.name", "letters"),
    ({"functions": [WEATHER["function"]]}, "functions", "tools="),
])
def test_bad_tools_are_400s(oai, kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as ei:
        oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, **kwargs)
    body = ei.value.body
    assert ei.value.status_code == 400 and body["param"] == param, body
    assert f"'{param}'" in body["message"] and words in body["message"], body["message"]


def test_malformed_tool_messages_are_400s(shared_daemon):
    url = shared_daemon.api + "/v1/chat/completions"
    bad = [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "sunny"}]
    r = httpx.post(url, json={"model": MODEL, "messages": bad, "max_tokens": 2}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].tool_call_id"
    r = httpx.post(shared_daemon.api + "/api/chat", timeout=60, json={
        "model": MODEL, "messages": ASK, "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {
                "n": {"type": "number", "minimum": 0}}}}}]})
    assert r.status_code == 400 and "tools[0].function.parameters" in r.json()["error"]


def _weather_call(city: str, days: int) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [{"function": {
        "name": "get_weather", "arguments": {"city": city, "days": days}}}]}


# Two earlier calls, their results and answers: the base model follows the pattern and
# calls the tool for the third question (Ollama has no tool_choice: the model decides).
FEW_SHOT = [
    {"role": "user", "content": "Weather in Tokyo for 2 days?"}, _weather_call("Tokyo", 2),
    {"role": "tool", "tool_name": "get_weather", "content": "sunny"},
    {"role": "assistant", "content": "Sunny."},
    {"role": "user", "content": "Weather in Lima for 5 days?"}, _weather_call("Lima", 5),
    {"role": "tool", "tool_name": "get_weather", "content": "rain"},
    {"role": "assistant", "content": "Rain."},
    {"role": "user", "content": "Weather in Paris for 3 days?"},
]


def test_ollama_tools_on_api_chat(shared_daemon):
    client = ollama.Client(host=shared_daemon.api)
    assert "tools" in client.show(MODEL).capabilities  # what Ollama's clients check first
    opts = {"temperature": 0, "num_predict": 40}
    r = client.chat(model=MODEL, messages=FEW_SHOT, tools=[WEATHER], stream=False,
                    options=opts)
    assert r.done and r.message.tool_calls, r.message
    call = r.message.tool_calls[0].function
    assert call.name == "get_weather"
    assert _valid_call("get_weather", dict(call.arguments)) == {"city": "Paris", "days": 3}
    parts = list(client.chat(model=MODEL, messages=FEW_SHOT, tools=[WEATHER], stream=True,
                             options=opts))
    assert parts[-1].done and not parts[-1].message.tool_calls
    calls = [p.message.tool_calls for p in parts if p.message.tool_calls]
    assert len(calls) == 1 and calls[0][0].function.name == "get_weather"
    _valid_call("get_weather", dict(calls[0][0].function.arguments))


def test_delegated_named_call_comes_back_as_tool_calls(mesh):
    mesh.add("laptop", "--memory-budget", "64MiB")  # too small for the model: delegates
    mesh.add("desktop")
    mesh.trust("laptop", "desktop", ALL_ROLES)
    mesh.trust("desktop", "laptop", ALL_ROLES)
    mesh.start("desktop")
    small = mesh.start("laptop", bootstrap=["desktop"])
    mesh.wait_peers("laptop", ["desktop"])
    client = openai.OpenAI(base_url=small.api + "/v1", api_key="x", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=48, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert raw.headers["x-qvac-served-by"] == mesh.ids["desktop"]
    chunks = [c for c in raw.parse() if c.choices]
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices[0].delta.tool_calls]
    assert deltas and deltas[0].function.name == "get_weather"
    _valid_call("get_weather", "".join(d.function.arguments or "" for d in deltas))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def _openai_shape(messages: list[dict]) -> list[dict]:
    """FEW_SHOT as OpenAI sends it: calls with ids and JSON-text arguments, results
    answering them by id."""
    out, n = [], 0
    for m in messages:
        if m.get("tool_calls"):
            n += 1
            fn = m["tool_calls"][0]["function"]
            out.append({"role": "assistant", "content": None, "tool_calls": [{
                "id": f"call_{n}", "type": "function", "function": {
                    "name": fn["name"], "arguments": json.dumps(fn["arguments"])}}]})
        elif m["role"] == "tool":
            out.append({"role": "tool", "tool_call_id": f"call_{n}", "content": m["content"]})
        else:
            out.append(m)
    return out


def test_openai_auto_call_streams_as_tool_calls(oai):
    chunks = [c for c in oai.chat.completions.create(
        model=MODEL, messages=_openai_shape(FEW_SHOT), tools=[WEATHER], max_tokens=40,
        temperature=0, stream=True) if c.choices]
    deltas = [c.choices[0].delta for c in chunks]
    assert deltas[0].role == "assistant"
    calls = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert calls and calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    args = "".join(c.function.arguments or "" for c in calls)
    assert _valid_call("get_weather", args) == {"city": "Paris", "days": 3}
    assert not any(d.content for d in deltas)  # held back, then sent as the call
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
