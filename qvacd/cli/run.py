"""`qvacd run MODEL`: a chat in the terminal, like `ollama run`.

Each turn sends the whole conversation to the running daemon's /v1/chat/completions
(through DaemonClient) and prints the answer as it streams, so the daemon's router
decides where it runs: here, or on a trusted peer when the model is elsewhere.

Input: `>>> ` prompts one line; a line that starts with \"\"\" opens a multi-line message
that ends at the line ending with \"\"\" (as in ollama). `/bye` exits, `/clear` forgets
the conversation, `/?` lists the commands. Ctrl-C during an answer closes its HTTP
stream (the daemon cancels the generation when its client goes away) and returns to
the prompt; the interrupted turn is dropped from the conversation, so the next question
does not follow half an answer. Ctrl-C or Ctrl-D at the prompt exits.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .client import DaemonClient
from .common import CliError

PROMPT = ">>> "
CONTINUE = "... "
FENCE = '"""'
HELP = """commands:
  /bye      exit (also Ctrl-D, or Ctrl-C at the prompt)
  /clear    forget the conversation so far
  /?        this help
  \"\"\"       begin and end a multi-line message
Ctrl-C while an answer streams stops that answer."""


def cmd_run(args: argparse.Namespace) -> int:
    client = DaemonClient.for_args(args)
    _check_model(client, args.model)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:  # why: not on every platform; plain input() still works
        pass
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    while True:
        text = _read_message()
        if text is None:
            return 0
        cmd = text.strip()
        if not cmd:
            continue
        if cmd in ("/bye", "/exit"):
            return 0
        if cmd == "/clear":
            del messages[1 if args.system else 0:]
            print("conversation cleared")
            continue
        if cmd in ("/?", "/help"):
            print(HELP)
            continue
        if cmd.startswith("/") and "\n" not in cmd and " " not in cmd:
            print(f"unknown command {cmd}; /? lists the commands")
            continue
        turn = [*messages, {"role": "user", "content": text}]
        try:
            answer = _stream_answer(client, args, turn)
        except KeyboardInterrupt:
            print()  # the stream is closed; drop this turn, back to the prompt
            continue
        except CliError as e:
            print(f"qvacd: error: {e}", file=sys.stderr)
            continue
        messages = [*turn, {"role": "assistant", "content": answer}]


def _read_message() -> str | None:
    """The next message, or None to exit (Ctrl-D, or Ctrl-C at the prompt)."""
    try:
        line = input(PROMPT)
    except (EOFError, KeyboardInterrupt):
        print()
        return None
    if not line.lstrip().startswith(FENCE):
        return line
    body = line.lstrip()[len(FENCE):]
    lines = []
    while True:
        if body.rstrip().endswith(FENCE):
            lines.append(body.rstrip()[: -len(FENCE)])
            return "\n".join(lines)
        lines.append(body)
        try:
            body = input(CONTINUE)
        except EOFError:
            print()
            return None
        except KeyboardInterrupt:  # abandon this message, not the session
            print()
            return ""


def _stream_answer(client: DaemonClient, args: argparse.Namespace,
                   messages: list[dict[str, str]]) -> str:
    body: dict[str, Any] = {"model": args.model, "messages": messages, "stream": True,
                            "temperature": args.temperature}
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    if args.seed is not None:
        body["seed"] = args.seed
    headers = {"X-Qvac-Local-Only": "1"} if args.local_only else {}
    parts: list[str] = []
    with client.stream("POST", "/v1/chat/completions", body=body, headers=headers) as r:
        served_by = r.headers.get("x-qvac-served-by", "?")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:  # the daemon failed after the answer began
                err = chunk["error"]
                sys.stdout.write("\n")
                raise CliError(err.get("message") if isinstance(err, dict) else str(err))
            for ch in chunk.get("choices", []):
                piece = (ch.get("delta") or {}).get("content") or ""
                parts.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            if chunk.get("x_qvac_served_by"):
                served_by = ",".join(chunk["x_qvac_served_by"])
    sys.stdout.write("\n\n")
    if args.verbose:
        print(f"served by {served_by}", file=sys.stderr)
    return "".join(parts)


def _check_model(client: DaemonClient, model: str) -> None:
    """One line before the first prompt when no daemon answers or no one has `model`:
    a model here (/v1/models) or one a known peer advertises (/qvac/peers) will do.
    Matched by name (with or without `:latest`) or sha256."""
    want = model.removesuffix(":latest").removeprefix("sha256:")
    here = client.get_json("/v1/models").get("data", [])
    names = {m.get("id") for m in here}
    peers = client.get_json("/qvac/peers").get("peers", [])
    for p in peers:
        for m in (p.get("capacity") or {}).get("models", []):
            names.update((m.get("name"), m.get("sha256")))
    if want not in names:
        known = sorted(n for n in {m.get("id") for m in here} if n)
        raise CliError(f"model {model!r} is neither here ({', '.join(known) or 'none'}) nor on"
                       f" a known peer; `qvacd models pull {model}` fetches it from a trusted"
                       " peer, `qvacd models list` shows what is here")
