"""JSON Schema → GBNF for grammar-constrained sampling (structured output, tool calls).

`grammar_for_schema` checks a schema against its JSON Schema metaschema (the `jsonschema`
package), then walks it and refuses, by name and path, every keyword whose constraint the
grammar would not enforce: llama-cpp-python's converter (`llama_cpp.llama_grammar`) drops
such keywords silently (`minimum`, `pattern` with `"` in a class, `oneOf` overlap, ...), and
an output that parses but fails its schema is the thing structured output promises not to
give. Within the subset below every output the grammar admits validates against the schema:

- `type` (one name, or a list of names with nothing but annotations beside it)
- objects: `properties`, `required` (each named in `properties`), `additionalProperties`
  (absent means none: stricter than JSON Schema's default, still valid)
- arrays: `items` (a schema), `minItems`, `maxItems`; or `prefixItems` alone
- strings: `minLength`/`maxLength` (with `type: "string"`), `format` date, time, date-time,
  uuid
- `enum`, `const` (with `type` beside them at most), `anyOf`, local `$ref` into `$defs` or
  `definitions`
- annotations: title, description, default, examples, `$schema`, `$id`, `$comment`, ...

Two fixes to the converter's output: its string `char` rule admits raw control characters
(a newline inside a string, which `json.loads` refuses), so it is replaced by JSON's own
rule; and `{}`/`true` subschemas (any value) would become "any object", so they are
rewritten to a union of every JSON type first.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
from llama_cpp import llama_grammar

__all__ = [
    "JSON_OBJECT_GRAMMAR",
    "MAX_GRAMMAR_CHARS",
    "MAX_GRAMMAR_NESTING",
    "GrammarError",
    "check_grammar_text",
    "grammar_for_schema",
]

# A grammar travels in InferRequest.grammar, bounded there to the same size
# (protocol.MAX_GRAMMAR_CHARS; tests/test_structured_output.py checks they agree).
MAX_GRAMMAR_CHARS = 64 * 1024
MAX_SCHEMA_DEPTH = 32
# llama.cpp parses GBNF by recursive descent: 20000 nested parentheses overflow its stack
# (a segfault, measured); 5000 parse. A schema's maxLength of n nests n deep.
MAX_GRAMMAR_NESTING = 1024


class GrammarError(ValueError):
    """A schema or grammar we cannot enforce; the message is one line naming the problem."""


_ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment",
    "deprecated", "readOnly", "writeOnly",
})
_SUPPORTED = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems",
    "minItems", "maxItems", "minLength", "maxLength", "format", "enum", "const", "anyOf",
    "$ref", "$defs", "definitions",
}) | _ANNOTATIONS
# Keywords the converter would drop silently, with what to do instead.
_WHY_NOT = {
    "oneOf": "use anyOf (the grammar cannot keep the alternatives exclusive)",
    "allOf": "merge the subschemas into one",
    "pattern": "use enum or format, or drop it",
    "minimum": "describe the range in the prompt", "maximum": "describe the range in the prompt",
    "exclusiveMinimum": "describe the range in the prompt",
    "exclusiveMaximum": "describe the range in the prompt",
    "multipleOf": "drop it",
}
_FORMATS = frozenset({"date", "time", "date-time", "uuid"})
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_ANY_VALUE: dict[str, Any] = {"type": ["object", "array", "string", "number", "boolean", "null"]}

# The converter's string char rule, and JSON's (no raw control characters, no DEL).
_CONVERTER_CHAR = llama_grammar.PRIMITIVE_RULES["char"].content
_JSON_CHAR = (r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | '
              r'"u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])')


def _where(path: list[str]) -> str:
    return "/" + "/".join(path) if path else "the root"


def _normalized(node: Any, path: list[str], depth: int) -> Any:
    """A copy of the subschema at `path` with `{}`/`true` made explicit; refuses what the
    grammar would not enforce."""
    if depth > MAX_SCHEMA_DEPTH:
        raise GrammarError(f"schema nests deeper than {MAX_SCHEMA_DEPTH} levels at {_where(path)}")
    if node is True or node == {}:
        return copy.deepcopy(_ANY_VALUE)
    if node is False:
        raise GrammarError(f"schema false at {_where(path)} admits no value; remove it")
    if not isinstance(node, dict):
        raise GrammarError(f"schema at {_where(path)} must be an object")
    for key in node:
        if key not in _SUPPORTED:
            why = _WHY_NOT.get(key, "it is outside the subset the grammar enforces")
            raise GrammarError(f"schema keyword {key!r} at {_where(path)} is not supported: {why}")
    present = set(node) - _ANNOTATIONS
    out = {k: v for k, v in node.items() if k not in _ANNOTATIONS}

    def alone(keyword: str, allowed: set[str]) -> None:
        extra = sorted(present - allowed - {keyword})
        if extra:
            raise GrammarError(f"schema at {_where(path)}: {keyword!r} with {extra[0]!r} beside "
                               f"it is not supported; nest them under anyOf or drop one")

    kind = node.get("type")
    if isinstance(kind, list):
        alone("type", set())
    if "$ref" in node:
        ref = node["$ref"]
        if not ref.startswith(("#/$defs/", "#/definitions/")):
            raise GrammarError(f"$ref {ref!r} at {_where(path)} is not supported: only "
                               f"#/$defs/... and #/definitions/... references")
        alone("$ref", {"$defs", "definitions"})
    if "anyOf" in node:
        alone("anyOf", {"$defs", "definitions"})
        out["anyOf"] = [_normalized(s, path + ["anyOf", str(i)], depth + 1)
                        for i, s in enumerate(node["anyOf"])]
    for keyword in ("enum", "const"):
        if keyword in node:
            alone(keyword, {"type"})
            values = node[keyword] if keyword == "enum" else [node[keyword]]
            for value in values:
                if kind is not None and not jsonschema.Draft202012Validator(
                        {"type": kind}).is_valid(value):
                    raise GrammarError(f"{keyword} value {json.dumps(value)} at {_where(path)} "
                                       f"is not of type {kind!r}")
    for keyword in ("$defs", "definitions"):
        if keyword in node:
            out[keyword] = {name: _normalized(s, path + [keyword, name], depth + 1)
                            for name, s in node[keyword].items()}
    if "properties" in node:
        out["properties"] = {name: _normalized(s, path + ["properties", name], depth + 1)
                             for name, s in node["properties"].items()}
    missing = [n for n in node.get("required", []) if n not in node.get("properties", {})]
    if missing:
        raise GrammarError(f"required names {missing[0]!r} at {_where(path)}, which is not in "
                           f"its properties; add it there")
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) or extra is True:
        out["additionalProperties"] = _normalized(extra, path + ["additionalProperties"], depth + 1)
    if "items" in node:
        if "prefixItems" in node:
            raise GrammarError(f"schema at {_where(path)}: 'items' with 'prefixItems' is not "
                               f"supported; use one")
        out["items"] = _normalized(node["items"], path + ["items"], depth + 1)
    if "prefixItems" in node:
        alone("prefixItems", {"type"})
        out["prefixItems"] = [_normalized(s, path + ["prefixItems", str(i)], depth + 1)
                              for i, s in enumerate(node["prefixItems"])]
    if "format" in node:
        if node["format"] not in _FORMATS:
            raise GrammarError(f"format {node['format']!r} at {_where(path)} is not supported "
                               f"(supported: {', '.join(sorted(_FORMATS))})")
        if kind not in (None, "string") or {"minLength", "maxLength"} & present:
            raise GrammarError(f"schema at {_where(path)}: format {node['format']!r} goes with "
                               f"type string and no minLength/maxLength")
    if {"minLength", "maxLength"} & present and kind != "string":
        raise GrammarError(f"schema at {_where(path)}: minLength/maxLength need "
                           f"type \"string\" beside them")
    if {"minItems", "maxItems"} & present and "items" not in node:
        out["items"] = copy.deepcopy(_ANY_VALUE)  # else the converter drops the bounds
    if kind is None and {"minItems", "maxItems"} & present:
        out["type"] = "array"
    return out


def grammar_for_schema(schema: Any) -> str:
    """GBNF (root rule "root") that admits exactly JSON texts valid against `schema`, within
    the subset in this module's docstring; GrammarError naming the problem otherwise."""
    if not isinstance(schema, dict):
        raise GrammarError("the JSON schema must be an object")
    try:
        validator = jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator)
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = _where([str(p) for p in exc.path])
        raise GrammarError(f"not a valid JSON Schema at {where}: {exc.message}") from None
    except jsonschema.exceptions.UnknownType as exc:
        raise GrammarError(f"not a valid JSON Schema: {exc}") from None
    normalized = _normalized(schema, [], 0)
    converter = llama_grammar.SchemaConverter(
        prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        resolved = converter.resolve_refs(normalized, "input")
        converter.visit(resolved, "")
    except (AssertionError, KeyError, ValueError, TypeError, RecursionError) as exc:
        raise GrammarError(f"the schema cannot be turned into a grammar: {exc}") from None
    rules = []
    for line in converter.format_grammar().splitlines():
        name, _, body = line.partition(" ::= ")
        rules.append(f"{name} ::= {_JSON_CHAR}" if name == "char" and body == _CONVERTER_CHAR
                     else line)
    grammar = "\n".join(rules) + "\n"
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"the schema's grammar is {len(grammar)} characters, over the "
                           f"{MAX_GRAMMAR_CHARS} allowed; simplify the schema")
    return grammar


def check_grammar_text(grammar: Any) -> None:
    """Refuses, before llama.cpp sees it, GBNF text that could hurt the process parsing it:
    not a string, longer than MAX_GRAMMAR_CHARS, or nested deeper than MAX_GRAMMAR_NESTING.
    Names a missing root or an undefined rule; the rest of parsing is llama.cpp's to say
    (BatchRunner.check_grammar)."""
    if not isinstance(grammar, str) or not grammar.strip():
        raise GrammarError("the grammar must be non-empty GBNF text")
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"the grammar is {len(grammar)} characters, over the "
                           f"{MAX_GRAMMAR_CHARS} allowed")
    depth = 0
    defined: set[str] = set()
    used: dict[str, None] = {}  # in order of first use
    i, n = 0, len(grammar)
    while i < n:
        c = grammar[i]
        if c in "\"[":  # a literal or a character class: skip to its end, escapes included
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and grammar[i] != close:
                i += 2 if grammar[i] == "\\" else 1
        elif c == "#":
            while i < n and grammar[i] != "\n":
                i += 1
        elif c == "{":  # a repetition count, {m} or {m,n}
            while i < n and grammar[i] != "}":
                i += 1
        elif c == "(":
            depth += 1
            if depth > MAX_GRAMMAR_NESTING:
                raise GrammarError(f"the grammar nests parentheses deeper than "
                                   f"{MAX_GRAMMAR_NESTING}")
        elif c == ")":
            depth -= 1
        elif c.isalnum() or c in "-_":
            start = i
            while i + 1 < n and (grammar[i + 1].isalnum() or grammar[i + 1] in "-_"):
                i += 1
            name = grammar[start:i + 1]
            if grammar[i + 1:].lstrip(" \t").startswith("::="):
                defined.add(name)
            else:
                used.setdefault(name, None)
        i += 1
    if "root" not in defined:
        raise GrammarError("the grammar has no rule named root (the rule sampling starts from)")
    undefined = [name for name in used if name not in defined]
    if undefined:
        raise GrammarError(f"the grammar uses rule {undefined[0]!r} but does not define it")


# Any JSON object, whitespace limited to one optional space between tokens (a model left
# free to emit whitespace can spend its whole budget on it).
JSON_OBJECT_GRAMMAR: str = grammar_for_schema({"type": "object"})
