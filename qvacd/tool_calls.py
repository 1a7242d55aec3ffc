"""Tool calls: OpenAI `tools`/`tool_choice` on /v1/chat/completions, Ollama `tools` on
/api/chat (issue 14 item 3).

What the model is told, and where. The tools, earlier calls and their results are turned
into ordinary chat messages here, on the node that took the HTTP request, and the
grammar of a forced call is built here too; the model's chat template (on this node or on
the peer that runs the model) then renders plain messages:

- the tool definitions and the call syntax go in the system message (appended to the
  first one, or a new one at the start);
- an assistant turn's `tool_calls` becomes its content, written in the call syntax;
- a `tool` turn keeps its role and its content (the result) for the template;
  models/chat.py renders it as `Tool: ...` in its fallback template, and as a user turn
  for a template that has no tool role.

Why not the template's own `tools` support: each model family that has one asks for its
own call syntax (`<tool_call>` tags, `[TOOL_CALLS]`, a "parameters" key) that the output
would have to be parsed in, and a consumer cannot know the template of a model a peer
runs; with one syntax chosen here, the grammar, the instruction and the parser agree on
every node and only `grammar` needs to cross the wire. The default model has no template.

The call syntax: one JSON object per call, `{"name": "<function>", "arguments": {...}}`,
one call per line.

- `tool_choice` "required" or a named function: the answer is generated under a grammar
  that admits exactly one call (of that function, or of one of the tools) whose arguments
  match the function's parameter schema (models.grammar.grammar_for_schema), so the call
  always parses and validates; it comes back as `tool_calls` with finish_reason
  "tool_calls" (or "length" with the arguments cut short when max_tokens ran out first).
- "auto" (the default with tools; Ollama's only mode): the model chooses. An answer that
  starts with `{` is held back until it ends; if it is one or more calls of known tools
  whose arguments validate against their schemas, they are the `tool_calls`, otherwise
  the text is the content. So every returned call validates, in every mode.
- "none": the tools are left out of the prompt and the answer is text.

The legacy `functions`/`function_call` fields are refused (api_params) with the
equivalent `tools`/`tool_choice` named: they answer in a different shape
(`message.function_call`) that no current client asks for.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

import jsonschema

from models.grammar import MAX_GRAMMAR_CHARS, GrammarError, grammar_for_schema

MAX_TOOLS = 128  # OpenAI's limit
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
# The start of a call in the call syntax (json.dumps' separators); the grammar writes it so.
_CALL_START = re.compile(r'\{"name": "([A-Za-z0-9_-]{1,64})", "arguments": ')


class ToolError(ValueError):
    """A 400: `message` is one line naming the field (`param`) and what to do."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    grammar: str  # GBNF of the arguments, root rule "root"

    def validates(self, arguments: Any) -> bool:
        return isinstance(arguments, dict) and jsonschema.Draft202012Validator(
            self.parameters).is_valid(arguments)


@dataclass(frozen=True)
class Call:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it (cut short when the answer was)

    def arguments_object(self) -> Any:
        return json.loads(self.arguments)


# ---- the request --------------------------------------------------------------------


def parse_tools(value: Any, param: str = "tools") -> tuple[Tool, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ToolError(f"'{param}' must be an array of {{\"type\": \"function\", "
                        f"\"function\": {{\"name\": ..., \"parameters\": ...}}}} objects", param)
    if len(value) > MAX_TOOLS:
        raise ToolError(f"'{param}' has {len(value)} tools; at most {MAX_TOOLS}", param)
    tools: list[Tool] = []
    for i, t in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("function"), dict):
            raise ToolError(f"'{where}' must be an object {{\"type\": \"function\", "
                            f"\"function\": {{...}}}}", where)
        for key in t:
            if key not in ("type", "function"):
                raise ToolError(f"unknown field '{where}.{key}'; leave it out", f"{where}.{key}")
        if t.get("type", "function") != "function":
            raise ToolError(f"'{where}.type' must be \"function\" (custom tools are not "
                            f"supported)", f"{where}.type")
        fn = t["function"]
        for key in fn:
            if key not in ("name", "description", "parameters", "strict"):
                raise ToolError(f"unknown field '{where}.function.{key}'; leave it out",
                                f"{where}.function.{key}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ToolError(f"'{where}.function.name' must be 1 to 64 letters, digits, _ or -",
                            f"{where}.function.name")
        if any(x.name == name for x in tools):
            raise ToolError(f"'{where}.function.name': two tools are named {name!r}; name each "
                            f"once", f"{where}.function.name")
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise ToolError(f"'{where}.function.description' must be a string",
                            f"{where}.function.description")
        if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
            raise ToolError(f"'{where}.function.strict' must be a boolean",
                            f"{where}.function.strict")
        parameters = fn.get("parameters")
        label = f"{where}.function.parameters"
        if parameters is None:
            parameters = _EMPTY_PARAMETERS
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise ToolError(f"'{label}' must be a JSON Schema of an object (type \"object\"): "
                            f"a call's arguments are a JSON object", label)
        try:
            grammar = grammar_for_schema(parameters)
        except GrammarError as e:
            raise ToolError(f"'{label}': {e}", label) from None
        tools.append(Tool(name, description, parameters, grammar))
    return tuple(tools)


def parse_tool_choice(value: Any, tools: tuple[Tool, ...],
                      param: str = "tool_choice") -> tuple[str, str | None]:
    """("auto" | "none" | "required" | "function", the named function or None)."""
    if value is None:
        return ("auto" if tools else "none"), None
    if value in ("none", "auto"):
        return value, None
    if value == "required":
        if not tools:
            raise ToolError(f"'{param}' \"required\" needs tools to call; send tools too", param)
        return "required", None
    if isinstance(value, dict) and value.get("type") == "function":
        fn = value.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise ToolError(f"'{param}' must name the function: {{\"type\": \"function\", "
                            f"\"function\": {{\"name\": ...}}}}", param)
        if not any(t.name == name for t in tools):
            known = ", ".join(t.name for t in tools) or "none"
            raise ToolError(f"'{param}' names the function {name!r}, which is not in tools "
                            f"(tools: {known}); name one of them", param)
        return "function", name
    if isinstance(value, dict) and value.get("type") in ("allowed_tools", "custom"):
        raise ToolError(f"'{param}' of type {value['type']!r} is not supported; send \"auto\", "
                        f"\"required\" or one function", param)
    raise ToolError(f"'{param}' must be \"none\", \"auto\", \"required\" or {{\"type\": "
                    f"\"function\", \"function\": {{\"name\": ...}}}}", param)


def call_text(name: str, arguments: Any) -> str:
    """One call in the call syntax (what the grammar generates, byte for byte up to the
    arguments' own whitespace)."""
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


def instructions(tools: tuple[Tool, ...], choice: str, function: str | None) -> str:
    lines = ["You can call these functions:"]
    for t in tools:
        about = f" {t.description}" if t.description else ""
        lines.append(f"- {t.name}:{about} Arguments (JSON Schema): "
                     f"{json.dumps(t.parameters, ensure_ascii=False)}")
    syntax = '{"name": "<function name>", "arguments": {<the arguments>}}'
    if choice == "function":
        lines.append(f"Now call {function}: reply with only the JSON object "
                     f'{{"name": "{function}", "arguments": {{<the arguments>}}}}.')
    elif choice == "required":
        lines.append(f"Now call one of them: reply with only the JSON object {syntax}.")
    else:
        lines.append(f"To call a function, reply with only the JSON object {syntax}, one line "
                     "per call. To answer without calling one, reply in plain text.")
    return "\n".join(lines)


def _with_text(content: Any, text: str) -> Any:
    """Content (a string, text parts or null) with `text` after it."""
    if isinstance(content, list):
        return [*content, {"type": "text", "text": "\n" + text}]
    if isinstance(content, str) and content:
        return f"{content}\n{text}"
    return text


def convert_messages(messages: Any, tools: tuple[Tool, ...], choice: str,
                     function: str | None, *, ollama: bool) -> Any:
    """The conversation as role/content messages: tool definitions in the system message,
    earlier calls as assistant text in the call syntax, results as `tool` turns.
    Anything that is not a list of objects is returned as is for normalize_messages to
    name what is wrong with it."""
    if not isinstance(messages, list):
        return messages
    out: list[Any] = []
    call_names: dict[str, str] = {}  # OpenAI tool_call_id -> function name
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            out.append(m)
            continue
        role, content = m.get("role"), m.get("content")
        calls = m.get("tool_calls")
        if calls is not None and calls != []:
            if role != "assistant":
                raise ToolError(f"'messages[{i}].tool_calls' belongs on an assistant message",
                                f"messages[{i}].tool_calls")
            content = _with_text(content, "\n".join(
                _earlier_call(c, f"messages[{i}].tool_calls[{j}]", call_names, ollama)
                for j, c in enumerate(_array(calls, f"messages[{i}].tool_calls"))))
        elif role == "tool" and not ollama:
            ref = m.get("tool_call_id")
            if not isinstance(ref, str):
                raise ToolError(f"'messages[{i}].tool_call_id' is required on a tool message: "
                                f"the id of the call it answers", f"messages[{i}].tool_call_id")
            if ref not in call_names:
                raise ToolError(f"'messages[{i}].tool_call_id' {ref[:64]!r} answers no tool call "
                                f"of an earlier assistant message", f"messages[{i}].tool_call_id")
        elif role == "tool" and m.get("tool_name") is not None \
                and not isinstance(m["tool_name"], str):
            raise ToolError(f"'messages[{i}].tool_name' must be a string",
                            f"messages[{i}].tool_name")
        out.append({"role": role, "content": content})
    if tools and choice != "none":
        text = instructions(tools, choice, function)
        first = out[0] if out else None
        if isinstance(first, dict) and first.get("role") in ("system", "developer"):
            out[0] = {"role": first["role"], "content": _with_text(first.get("content"), text)}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def _array(v: Any, label: str) -> list[Any]:
    if not isinstance(v, list):
        raise ToolError(f"'{label}' must be an array", label)
    return v


def _earlier_call(c: Any, where: str, call_names: dict[str, str], ollama: bool) -> str:
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ToolError(f"'{where}' must be {{\"function\": {{\"name\": ..., \"arguments\": "
                        f"...}}}}", where)
    args = fn.get("arguments")
    if isinstance(args, str):  # OpenAI's shape: a JSON text
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise ToolError(f"'{where}.function.arguments' is not valid JSON; send the "
                            f"arguments as a JSON object text", f"{where}.function.arguments"
                            ) from None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ToolError(f"'{where}.function.arguments' must be a JSON object",
                        f"{where}.function.arguments")
    if not ollama:
        if not isinstance(c.get("id"), str):
            raise ToolError(f"'{where}.id' is required: the id its tool message answers",
                            f"{where}.id")
        call_names[c["id"]] = fn["name"]
    return call_text(fn["name"], args)


# ---- the grammar of a forced call ---------------------------------------------------


def _gbnf_literal(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _is_word(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c in "-_")


def rename_rules(gbnf: str, prefix: str) -> str:
    """`gbnf` with every rule name prefixed, so several grammars can share one text.
    Skips string literals, character classes, repetition counts and comments."""
    out: list[str] = []
    i, n = 0, len(gbnf)
    while i < n:
        c = gbnf[i]
        if c in '"[{#':
            end = {'"': '"', "[": "]", "{": "}", "#": "\n"}[c]
            j = i + 1
            while j < n and gbnf[j] != end:
                j += 2 if gbnf[j] == "\\" and c in '"[' else 1
            out.append(gbnf[i:j + 1])
            i = j + 1
        elif _is_word(c):
            j = i
            while j < n and _is_word(gbnf[j]):
                j += 1
            out.append(prefix + gbnf[i:j])
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def call_grammar(tools: tuple[Tool, ...], choice: str, function: str | None) -> str | None:
    """GBNF admitting exactly one call in the call syntax, of `function` (choice
    "function") or of any tool ("required"); None for "auto" and "none"."""
    if choice == "function":
        chosen = [t for t in tools if t.name == function]
    elif choice == "required":
        chosen = list(tools)
    else:
        return None
    rules, alternatives = [], []
    for i, t in enumerate(chosen):
        prefix = f"tc{i}-"
        rules.append(rename_rules(t.grammar, prefix).rstrip("\n"))
        start = call_text(t.name, None)[:-len("null}")]
        rules.append(f'{prefix}call ::= {_gbnf_literal(start)} {prefix}root "}}"')
        alternatives.append(f"{prefix}call")
    grammar = f"root ::= {' | '.join(alternatives)}\n" + "\n".join(rules) + "\n"
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise ToolError(f"the grammar of the tools' parameter schemas is {len(grammar)} "
                        f"characters, over the {MAX_GRAMMAR_CHARS} allowed; send fewer or "
                        f"simpler tools, or name one in tool_choice", "tools")
    return grammar


# ---- the answer ---------------------------------------------------------------------


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_calls(text: str, tools: tuple[Tool, ...], parallel: bool = True) -> list[Call] | None:
    """The calls `text` consists of, if it is nothing but calls of known tools whose
    arguments validate; None otherwise (the text is an ordinary answer)."""
    s = text.strip()
    decoder = json.JSONDecoder()
    calls: list[Call] = []
    pos = 0
    while pos < len(s):
        try:
            obj, pos = decoder.raw_decode(s, pos)
        except ValueError:
            return None
        if not isinstance(obj, dict) or set(obj) != {"name", "arguments"}:
            return None
        tool = next((t for t in tools if t.name == obj["name"]), None)
        if tool is None or not tool.validates(obj["arguments"]):
            return None
        calls.append(Call(_call_id(), tool.name, json.dumps(obj["arguments"],
                                                            ensure_ascii=False)))
        while pos < len(s) and s[pos].isspace():
            pos += 1
    if not calls:
        return None
    return calls if parallel else calls[:1]


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _sse_objects(data: bytes) -> list[Any]:
    """The events of an SSE body we wrote ("[DONE]" kept as the string)."""
    out: list[Any] = []
    for event in data.split(b"\n\n"):
        if event.startswith(b"data: "):
            payload = event[len(b"data: "):]
            out.append(payload.decode() if payload == b"[DONE]" else json.loads(payload))
    return out


def _sse_join(objects: list[Any]) -> bytes:
    return b"".join(b"data: " + o.encode() + b"\n\n" if isinstance(o, str) else _sse(o)
                    for o in objects)


@dataclass(frozen=True)
class ToolSetup:
    """What a chat request asked of tools: its messages to render, the grammar of a
    forced call, and the response format that turns the answer into tool_calls."""

    tools: tuple[Tool, ...]
    choice: str
    function: str | None
    parallel: bool
    messages: Any
    grammar: str | None

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def grammar_with(self, format_grammar: str | None) -> str | None:
        """The one grammar of the answer: a forced call's, or the response format's."""
        if self.grammar and format_grammar:
            raise ToolError("'tool_choice' forces a tool call, which cannot also follow "
                            "response_format; send one of them", "tool_choice")
        return self.grammar or format_grammar

    def openai_format(self, base: Any) -> Any:
        """`base` (api.openai_chat_format's Format) answering calls as OpenAI does."""
        if not self.active:
            return base
        return _OpenAIAnswer(self, base).format()

    def ollama_format(self, base: Any) -> Any:
        if not self.active:
            return base
        return _OllamaAnswer(self, base).format()


def openai_setup(body: dict[str, Any]) -> ToolSetup:
    tools = parse_tools(body.get("tools"))
    choice, function = parse_tool_choice(body.get("tool_choice"), tools)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ToolError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    messages = convert_messages(body.get("messages"), tools, choice, function, ollama=False)
    return ToolSetup(tools, choice, function, parallel is not False, messages,
                     call_grammar(tools, choice, function))


def ollama_setup(body: dict[str, Any]) -> ToolSetup:
    tools = parse_tools(body.get("tools"))
    choice = "auto" if tools else "none"  # Ollama has no tool_choice: the model decides
    messages = convert_messages(body.get("messages"), tools, choice, None, ollama=True)
    return ToolSetup(tools, choice, None, True, messages, None)


class _Answer:
    """Splits the generated text into content and calls as it streams. Forced: the text
    is a call by grammar; its arguments stream as they come, less a possible closing
    `}` of the call. Auto: text that starts with `{` is held until the end and then
    parsed; anything else streams as content."""

    def __init__(self, setup: ToolSetup, base: Any) -> None:
        self.setup = setup
        self.base = base
        self.forced = setup.grammar is not None
        self.text = ""
        self.state = "call" if self.forced else "undecided"  # -> "content" | "call"
        self.calls: list[Call] | None = None
        self.complete = False
        self.call_id: str | None = None  # the forced call's, once its name is streamed

    def feed(self, piece: str) -> str:
        """Content to send now (auto mode)."""
        self.text += piece
        if self.state == "undecided":
            head = self.text.lstrip()
            if not head:
                return ""
            self.state = "call" if head.startswith("{") else "content"
            return self.text if self.state == "content" else ""
        return piece if self.state == "content" else ""

    def end(self) -> str:
        """Content left to send at the end; sets `calls` (and `complete`: they parsed and
        validated) when the answer is calls."""
        if self.state == "content":
            return ""
        if not self.forced:
            self.calls = parse_calls(self.text, self.setup.tools, self.setup.parallel)
            self.complete = self.calls is not None
            return "" if self.calls else self.text
        m = _CALL_START.match(self.text)
        if m is None:  # cut short before the call's name was out
            return self.text
        call_id = self.call_id or _call_id()
        args = self.text[m.end():]
        self.complete = parse_calls(self.text, self.setup.tools, parallel=False) is not None
        if self.complete:  # the arguments as generated, less the `}` that closes the call
            args = args.rstrip()[:-1].rstrip()
        # else cut short by max_tokens: the arguments so far, as OpenAI does
        self.calls = [Call(call_id, m.group(1), args)]
        return ""


class _OpenAIAnswer(_Answer):
    def __init__(self, setup: ToolSetup, base: Any) -> None:
        super().__init__(setup, base)
        self.started = False  # the role delta is out
        self.sent_args = ""

    def format(self) -> Any:
        return dataclasses.replace(self.base, chunk=self.chunk, final=self.final,
                                   whole=self.whole, first=None)

    def _event(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        obj = _sse_objects(self.base.chunk(""))[0]
        if not self.started:
            delta = {"role": "assistant", **delta}
            self.started = True
        obj["choices"][0]["delta"] = delta
        obj["choices"][0]["finish_reason"] = finish
        return _sse(obj)

    def _content(self, text: str) -> bytes:
        return self._event({"content": text}) if text else b""

    def _call_delta(self, index: int, call_id: str, name: str, args: str) -> bytes:
        return self._event({"content": None, "tool_calls": [
            {"index": index, "id": call_id, "type": "function",
             "function": {"name": name, "arguments": args}}]})

    def _args_delta(self, args: str) -> bytes:
        return self._event({"tool_calls": [{"index": 0, "function": {"arguments": args}}]})

    def chunk(self, piece: str) -> bytes:
        if not self.forced:
            return self._content(self.feed(piece))
        self.text += piece
        m = _CALL_START.match(self.text)
        if m is None:
            return b""
        out = b""
        if self.call_id is None:
            self.call_id = _call_id()
            out = self._call_delta(0, self.call_id, m.group(1), "")
        # Hold back trailing whitespace and one `}`: they may close the call, not the
        # arguments.
        ready = self.text[m.end():].rstrip()
        ready = ready[:-1].rstrip() if ready.endswith("}") else ready
        if len(ready) > len(self.sent_args):
            out += self._args_delta(ready[len(self.sent_args):])
            self.sent_args = ready
        return out

    def final(self, result: Any, served_by: list[str]) -> bytes:
        out = self._content(self.end())
        if self.calls:
            if self.call_id is not None:  # forced: the name and some arguments are out
                rest = self.calls[0].arguments[len(self.sent_args):]
                out += self._args_delta(rest) if rest else b""
            else:
                for i, c in enumerate(self.calls):
                    out += self._call_delta(i, c.id, c.name, c.arguments)
        elif not self.started:  # nothing generated: still one delta with the role
            out += self._event({"content": ""})
        events = _sse_objects(self.base.final(result, served_by))
        if self.complete:
            for e in events:
                if isinstance(e, dict) and e.get("choices"):
                    e["choices"][0]["finish_reason"] = "tool_calls"
        return out + _sse_join(events)

    def whole(self, text: str, result: Any, served_by: list[str]) -> dict[str, Any]:
        content = self.feed(text) + self.end()
        d = self.base.whole(content, result, served_by)
        if self.calls:
            d["choices"][0]["message"] = {"role": "assistant", "content": None, "tool_calls": [
                {"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}} for c in self.calls]}
            if self.complete:
                d["choices"][0]["finish_reason"] = "tool_calls"
        return d


class _OllamaAnswer(_Answer):
    """Ollama sends a call whole, in one chunk before the last (done) one."""

    def format(self) -> Any:
        return dataclasses.replace(self.base, chunk=self.chunk, final=self.final,
                                   whole=self.whole)

    def _tool_calls(self) -> list[dict[str, Any]]:
        assert self.calls is not None
        return [{"function": {"index": i, "name": c.name, "arguments": c.arguments_object()}}
                for i, c in enumerate(self.calls)]

    def chunk(self, piece: str) -> bytes:
        text = self.feed(piece)
        return self.base.chunk(text) if text else b""

    def final(self, result: Any, served_by: list[str]) -> bytes:
        text = self.end()
        out = self.base.chunk(text) if text else b""
        if self.calls:
            obj = json.loads(self.base.chunk(""))
            obj["message"]["tool_calls"] = self._tool_calls()
            out += json.dumps(obj, separators=(",", ":")).encode() + b"\n"
        return out + self.base.final(result, served_by)

    def whole(self, text: str, result: Any, served_by: list[str]) -> dict[str, Any]:
        content = self.feed(text) + self.end()
        d = self.base.whole(content, result, served_by)
        if self.calls:
            d["message"]["tool_calls"] = self._tool_calls()
        return d

