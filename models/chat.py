"""Turn chat messages into a prompt.

A model whose GGUF carries `tokenizer.chat_template` is rendered with that Jinja
template (sandboxed, as Hugging Face and llama.cpp do). A model without one (a base
model such as the default Gemma 3 270M) gets the documented fallback template:

    <system text>            (only when a system message is present)

    User: <content>
    Assistant: <content>
    ...
    User: <content>
    Assistant:

and generation stops at the next "\\nUser:" line, so a base model continues the
dialogue in a plain-text style it has seen in pre-training and does not write the
user's next turn. A tool result (role "tool") is a `Tool: <content>` line, and
"\\nTool:" stops generation too (the model must not make up a result); qvacd/tool_calls.py
says how tool definitions and calls reach these messages.

A template with no tool role (none of its text says "tool") gets each run of tool
results as one user turn, `Tool result: <content>`, instead: templates that insist on
alternating user and assistant turns then still render the conversation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

FALLBACK_STOP = ("\nUser:", "\nTool:")
_ROLES = {"system", "user", "assistant", "tool", "developer"}


class ChatError(ValueError):
    pass


@dataclass(frozen=True)
class ChatPrompt:
    prompt: str
    stop: tuple[str, ...]
    template: str  # "model" or "fallback"


def _content_text(content: Any) -> str:
    """OpenAI allows content as a string or a list of parts; we accept text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            else:
                raise ChatError("only text content parts are supported")
        return "".join(texts)
    if content is None:
        return ""
    raise ChatError("message content must be a string or a list of text parts")


def normalize_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ChatError("'messages' must be a non-empty array")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in _ROLES:
            raise ChatError(f"messages[{i}].role must be one of system, user, assistant, tool")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content_text(m.get("content"))})
    return out


def fallback_prompt(messages: Sequence[dict[str, str]]) -> str:
    parts: list[str] = []
    system = [m["content"] for m in messages if m["role"] == "system"]
    if system:
        parts.append("\n".join(system) + "\n")
    for m in messages:
        if m["role"] == "user":
            parts.append(f"User: {m['content']}")
        elif m["role"] == "assistant":
            parts.append(f"Assistant: {m['content']}")
        elif m["role"] == "tool":
            parts.append(f"Tool: {m['content']}")
    if not messages or messages[-1]["role"] != "assistant":
        parts.append("Assistant:")
    return "\n".join(parts)


def _tool_turns_for(template: str, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The messages, with tool results as user turns when the template has no tool role."""
    if "tool" in template:
        return list(messages)
    out: list[dict[str, str]] = []
    for m in messages:
        if m["role"] != "tool":
            out.append(m)
        elif out and out[-1].get("tool_result"):
            out[-1] = {**out[-1], "content": f"{out[-1]['content']}\nTool result: {m['content']}"}
        else:
            out.append({"role": "user", "content": f"Tool result: {m['content']}",
                        "tool_result": "1"})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def render_chat(
    messages: Sequence[dict[str, str]],
    template: str | None,
    *,
    bos_token: str = "",
    eos_token: str = "",
) -> ChatPrompt:
    if template:
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(msg: str) -> None:
                raise ChatError(f"chat template rejected the messages: {msg}")

            text = env.from_string(template).render(
                messages=_tool_turns_for(template, messages),
                add_generation_prompt=True,
                bos_token=bos_token,
                eos_token=eos_token,
                raise_exception=raise_exception,
            )
            # llama.cpp adds BOS itself when tokenizing; avoid a double BOS.
            if bos_token and text.startswith(bos_token):
                text = text[len(bos_token):]
            return ChatPrompt(text, (), "model")
        except ChatError:
            raise
        except Exception:  # a template we cannot render: fall back rather than fail
            pass
    return ChatPrompt(fallback_prompt(messages), FALLBACK_STOP, "fallback")
