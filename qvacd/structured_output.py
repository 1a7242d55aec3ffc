"""Structured output (issue 14 item 2): OpenAI `response_format` and Ollama `format` turned
into the GBNF grammar a generation is sampled under (GenerationRequest.grammar).

- OpenAI `{"type": "json_object"}`, Ollama `"json"`: any JSON object
  (models.grammar.JSON_OBJECT_GRAMMAR).
- OpenAI `{"type": "json_schema", "json_schema": {"name", "schema", "strict",
  "description"}}`, Ollama `format: <schema>`: exactly the JSON texts valid against the
  schema (models.grammar.grammar_for_schema); a schema that is not valid JSON Schema, or
  uses a keyword the grammar would not enforce, is a 400 naming it and where.
- `strict`: OpenAI's strict mode promises the answer follows the schema; without it
  OpenAI only tries to. qvacd always enforces the grammar, so `strict: false` gets the
  same guarantee as `strict: true`, and both refuse the same schemas (a keyword left
  unenforced would be silently ignored, which api_params exists to prevent).

The grammar is built here, on the node that took the HTTP request, and travels with a
delegated request (InferRequest.grammar), so the provider samples inside it and a
failover resume continues inside it. An answer cut by max_tokens ends mid-JSON with
finish_reason "length", as OpenAI's does.
"""

from __future__ import annotations

from typing import Any

from models.grammar import JSON_OBJECT_GRAMMAR, GrammarError, grammar_for_schema

__all__ = ["StructuredOutputError", "ollama_format_grammar", "openai_format_grammar"]

_JSON_SCHEMA_FIELDS = {"name", "schema", "strict", "description"}


class StructuredOutputError(ValueError):
    """A 400: `message` is one line, `param` the field it is about."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _schema_grammar(schema: Any, param: str) -> str:
    try:
        return grammar_for_schema(schema)
    except GrammarError as e:
        raise StructuredOutputError(f"'{param}': {e}", param) from None


def openai_format_grammar(value: Any) -> str | None:
    """The grammar for an OpenAI `response_format`; None for plain text."""
    p = "response_format"
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise StructuredOutputError(f"'{p}' must be an object with a 'type' of text, "
                                    f"json_object or json_schema", p)
    kind = value["type"]
    extra = sorted(set(value) - {"type", "json_schema"})
    if extra:
        raise StructuredOutputError(f"unknown field '{p}.{extra[0]}'; leave it out",
                                    f"{p}.{extra[0]}")
    if kind in ("text", "json_object"):
        if "json_schema" in value:
            raise StructuredOutputError(f"'{p}.json_schema' goes with type json_schema, not "
                                        f"{kind}", f"{p}.json_schema")
        return None if kind == "text" else JSON_OBJECT_GRAMMAR
    if kind != "json_schema":
        raise StructuredOutputError(f"'{p}.type' must be text, json_object or json_schema, "
                                    f"not {kind!r}", f"{p}.type")
    spec = value.get("json_schema")
    p = "response_format.json_schema"
    if not isinstance(spec, dict):
        raise StructuredOutputError(f"'{p}' must be an object with the schema in 'schema'", p)
    extra = sorted(set(spec) - _JSON_SCHEMA_FIELDS)
    if extra:
        raise StructuredOutputError(f"unknown field '{p}.{extra[0]}'; leave it out",
                                    f"{p}.{extra[0]}")
    for name, kinds in (("name", str), ("description", str), ("strict", bool)):
        if spec.get(name) is not None and not isinstance(spec[name], kinds):
            kind_name = "a string" if kinds is str else "a boolean"
            raise StructuredOutputError(f"'{p}.{name}' must be {kind_name}", f"{p}.{name}")
    if "schema" not in spec:
        raise StructuredOutputError(f"'{p}.schema' is required: the JSON schema the answer "
                                    f"must follow", f"{p}.schema")
    # strict true or false: enforced the same way (module docstring)
    return _schema_grammar(spec["schema"], f"{p}.schema")


def ollama_format_grammar(value: Any) -> str | None:
    """The grammar for an Ollama `format` ("json" or a JSON schema); None when absent."""
    if value is None or value == "":
        return None
    if value == "json":
        return JSON_OBJECT_GRAMMAR
    if isinstance(value, dict):
        return _schema_grammar(value, "format")
    raise StructuredOutputError("'format' must be \"json\" or a JSON schema object", "format")
