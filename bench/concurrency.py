"""Many clients at once, side by side in one run: qvacd's continuous batching against
llama.cpp's own `llama-server --parallel 8` (what a user would run instead), same
llama.cpp, same model, same threads and context per sequence.

For N = 1, 2, 4, 8, 16 concurrent streaming clients on /v1/completions (distinct
prompts, greedy, --max-tokens each), it prints aggregate tokens/s and median time to first
token of both servers and their ratios; the two servers take turns round by round so
machine noise hits both alike. Also printed:
- how often a greedy answer under load equals the same request alone (per N, both
  servers: batching changes the shapes llama.cpp computes with, and so the logits' last
  bits; nothing here hides that);
- prefix reuse: time to first token of a chat's second turn against its first.

    python bench/concurrency.py [--clients 1,2,4,8,16] [--rounds 2] [--max-tokens 128]
                                [--llama-server PATH]

llama-server is built from the llama.cpp that llama-cpp-python vendors (the sdist's
vendor/llama.cpp), e.g.:
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcp
    tar xzf /tmp/lcp/llama_cpp_python-*.tar.gz -C /tmp && cd /tmp/llama_cpp_python-*/
    cmake -S vendor/llama.cpp -B build -DLLAMA_CURL=OFF \\
      -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' \\
      -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'
    cmake --build build --target llama-server -j2
and found by --llama-server, $LLAMA_SERVER or on PATH; without it only qvacd is measured.
"""

from __future__ import annotations

import argparse
import concurrent.futures
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

MODEL = "gemma3-270m"
TOPICS = ["a dragon who learned to cook", "the first ship to reach Mars", "a lighthouse keeper",
          "a city under the sea", "a robot that paints", "the last bookshop on earth",
          "a cat who became mayor", "a forgotten piano", "a winter in Siberia",
          "a clockmaker's apprentice", "the river that ran backwards", "a garden on the moon",
          "a detective who could not see", "a storm over the desert", "a violin made of glass",
          "a train that never stopped"]
SYSTEM = ("You are a patient assistant who answers in plain words. " * 30).strip()


def prompt(i: int) -> str:
    return f"Here is a long story about {TOPICS[i % len(TOPICS)]}. Once upon a time,"


def stream(client: httpx.Client, base: str, path: str, body: dict) -> tuple[float, int, str, float]:
    """(TTFT, tokens, text, end time) of one streamed request, as the client sees it."""
    t0 = time.perf_counter()
    first = None
    n = 0
    usage = None
    parts = []
    with client.stream("POST", base + path, json={**body, "stream": True,
                                                   "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"].get("completion_tokens")
            for c in chunk.get("choices") or []:
                piece = c.get("text") or (c.get("delta") or {}).get("content") or ""
                if piece:
                    first = first or time.perf_counter()
                    n += 1
                    parts.append(piece)
    assert first is not None, f"{base}: no tokens streamed"
    return first - t0, usage or n, "".join(parts), time.perf_counter()


def burst(base: str, n: int, max_tokens: int, offset: int = 0) -> dict:
    """N clients at once; aggregate tokens/s over the burst's wall time, median TTFT."""
    body = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0}
    with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        def one(i: int):
            return stream(client, base, "/v1/completions", {**body, "prompt": prompt(offset + i)})

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            rows = list(pool.map(one, range(n)))
    wall = max(r[3] for r in rows) - t0
    return {"tps": sum(r[1] for r in rows) / wall, "ttft": statistics.median(r[0] for r in rows),
            "texts": [r[2] for r in rows]}


def chat_turns(base: str) -> tuple[float, float]:
    """TTFT of a chat's first turn and of its second (the first turn's prefix cached)."""
    with httpx.Client(timeout=600) as client:
        msgs = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": "Tell me about lighthouses."}]
        t1, _, reply, _ = stream(client, base, "/v1/chat/completions",
                                 {"model": MODEL, "messages": msgs, "max_tokens": 24,
                                  "temperature": 0})
        msgs += [{"role": "assistant", "content": reply},
                 {"role": "user", "content": "And who keeps them?"}]
        t2, _, _, _ = stream(client, base, "/v1/chat/completions",
                             {"model": MODEL, "messages": msgs, "max_tokens": 24,
                              "temperature": 0})
    return t1, t2


def find_llama_server(arg: str | None) -> str | None:
    for cand in (arg, os.environ.get("LLAMA_SERVER"), shutil.which("llama-server"),
                 "/tmp/llama-build/bin/llama-server"):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,2,4,8,16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--ctx", type=int, default=1024, help="context of one sequence")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--llama-server", default=None)
    args = ap.parse_args()
    sizes = [int(x) for x in args.clients.split(",")]

    work = Path(tempfile.mkdtemp(prefix="qvacd-bench-conc-"))
    procs: list[subprocess.Popen] = []
    try:
        tmpl = work / "template"
        entry = install_model_template(tmpl)
        assert entry, "default model not installed: pip install '.[model]'"
        qvacd = Daemon(clone_data_dir(tmpl, work / "node"), "--no-p2p", "--threads",
                       str(args.threads), "--parallel", str(args.parallel), "--ctx-size",
                       str(args.ctx), "--queue-size", "64", log_path=work / "qvacd.log")
        qvacd.base_args = ("--no-mdns",)  # no p2p: no --listen
        procs.append(qvacd.start(wait=False).proc)
        servers = {"qvacd": qvacd.api}

        binary = find_llama_server(args.llama_server)
        if binary:
            port = free_port()
            # -c is the whole context, split into --parallel sequences of --ctx each,
            # as qvacd does (kv_unified off in both)
            procs.append(subprocess.Popen(
                [binary, "-m", str(entry.path), "--parallel", str(args.parallel),
                 "-c", str(args.ctx * args.parallel), "-t", str(args.threads), "-tb",
                 str(args.threads), "--host", "127.0.0.1", "--port", str(port),
                 "--no-webui", "-b", "512", "-ub", "512"],
                stdout=subprocess.DEVNULL, stderr=open(work / "llama-server.log", "w")))
            servers["llama-server"] = f"http://127.0.0.1:{port}"
        else:
            print("note: llama-server not found (see this file's docstring); qvacd alone")

        for name, base in servers.items():
            wait_http(base + "/v1/models", timeout=180)
            burst(base, 1, 8)  # load and warm up

        # greedy references: each prompt alone, on each server
        largest = max(sizes)
        alone = {name: [burst(base, 1, args.max_tokens, offset=i)["texts"][0]
                        for i in range(largest)] for name, base in servers.items()}
        res: dict[tuple[str, int], list[dict]] = {}
        for _ in range(args.rounds):
            for n in sizes:
                for name, base in servers.items():
                    res.setdefault((name, n), []).append(burst(base, n, args.max_tokens))

        def med(name: str, n: int, key: str) -> float:
            return statistics.median(r[key] for r in res[(name, n)])

        def same_as_alone(name: str, n: int) -> tuple[int, int]:
            runs = res[(name, n)]
            same = sum(t == alone[name][i] for r in runs for i, t in enumerate(r["texts"]))
            return same, sum(len(r["texts"]) for r in runs)

        print(f"\nGemma 3 270M Q4_K_M, greedy, {args.max_tokens} tokens per client,"
              f" {args.threads} threads, {args.parallel} parallel sequences of {args.ctx} tokens,"
              f" {args.rounds} interleaved rounds (medians)\n")
        names = list(servers)
        head = f"{'clients':>7}" + "".join(f" {n + ' tok/s':>19} {n + ' TTFT ms':>21}"
                                          for n in names)
        if len(names) == 2:
            head += f" {'tok/s ratio':>11} {'TTFT ratio':>10}"
        print(head)
        for n in sizes:
            row = f"{n:>7}" + "".join(f" {med(s, n, 'tps'):>19.1f} {med(s, n, 'ttft') * 1000:>21.0f}"
                                      for s in names)
            if len(names) == 2:
                row += (f" {med('qvacd', n, 'tps') / med('llama-server', n, 'tps'):>11.2f}"
                        f" {med('qvacd', n, 'ttft') / med('llama-server', n, 'ttft'):>10.2f}")
            print(row)
        if len(names) == 2:
            print("\ngoals: tok/s ratio >= 1.0 at 4 and 8 clients; TTFT ratio <= 1.2 at 8 clients")
        print("\ngreedy answer under load identical to the same request alone:")
        for s in names:
            print(f"  {s:<13}" + "  ".join(
                f"{n}: {same_as_alone(s, n)[0]}/{same_as_alone(s, n)[1]}" for n in sizes))
        print("\nprefix reuse, chat (long system prompt): TTFT turn 1 -> turn 2")
        for s, base in servers.items():
            try:
                t1, t2 = chat_turns(base)
            except httpx.HTTPError as e:  # seen: llama-server dying on a chat's second turn
                print(f"  {s:<13} failed: {e!r}")
                continue
            print(f"  {s:<13} {t1 * 1000:7.0f} ms -> {t2 * 1000:5.0f} ms ({t2 / t1:.2f}x)")
    except BaseException:
        for log in sorted(work.glob("*.log")):
            print(f"--- last lines of {log.name}:\n" + "\n".join(
                log.read_text(errors="replace").splitlines()[-15:]), file=sys.stderr)
        raise
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
