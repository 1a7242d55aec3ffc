"""A split model against the same model whole, and against llama.cpp's own RPC, in one run.

Four ways to run gemma3-270m, greedy, same prompt, 1 thread per process:
- whole:   one qvacd node holding the whole model;
- split:   a qvacd head (budget too small) + a qvacd worker (--layers-memory): the last 9
           of 18 layers on the worker over /qvac/layers/1.0.0 on loopback;
- anchor:  llama.cpp's ggml-rpc-server + llama-server --rpc over plain TCP on loopback,
           the same split (-ngl 10 with the output head kept on the host: 9 blocks remote),
           --no-repack (the plain kernels of our split head: models/split_load.py);
- local:   llama-server without RPC, --no-repack (the anchor's own whole-model baseline).
Reported: tokens/s and TTFT (median of rounds), CPU ms per generated token of every
process of each (the work, which the machine's load does not change), split/anchor ratio
(goal >= 0.8), RPC bytes per token over the tunnel, the first-request load time of the
split, and whether the texts agree. Why the anchor beats `local` in tokens/s at the same
CPU per token: on a loaded machine two processes that take turns and sleep on RPC get the
CPU back sooner than one that computes all along; the split profits alike, so compare
split with anchor, and CPU per token with CPU per token.

Load time (`compare_load`, first): the split's first token of its first request, with the
worker holding the model file (its weights read from its own copy: SET_TENSOR_FROM_FILE)
and without (a worker whose store is empty: every weight crosses the tunnel), two more
head + worker pairs whose head dials its worker through bench/shaped_link.py at each
`--load-links` speed (0: loopback as is); interleaved, heads restarted for every load;
both times, their ratio and the bytes carried.

    python bench/split.py [--rounds 3] [--max-tokens 64] [--llama-bin DIR]
                          [--load-rounds 2] [--load-links 0,100]

llama-server and ggml-rpc-server come from the llama-cpp-python sdist's vendored tree,
built with -DGGML_RPC=ON (docs in ../shared/llama-cpp-batching-and-rpc.md); without them
the anchor rows are left out and the run says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.shaped_link import ShapedLink
from tests.harness import Daemon, Mesh, clone_data_dir, temporary_mesh  # noqa: E402

PROMPT = "Here is a long story about a dragon who learned to cook. Once upon a time,"
MODEL = "gemma3-270m"
DEFAULT_BIN = Path(os.environ.get("QVACD_LLAMA_BIN", "/work/llama-rpc-build/bin"))
CTX = "1024"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_path(data_dir: Path) -> Path:
    from models.store import ModelStore

    entry = ModelStore(data_dir).resolve(MODEL)
    assert entry is not None, f"{MODEL} is not in {data_dir}"
    return Path(entry.path)


def llama_bin(bin_dir: Path = DEFAULT_BIN) -> Path | None:
    ok = all((bin_dir / n).exists() for n in ("llama-server", "ggml-rpc-server"))
    return bin_dir if ok else None


@contextlib.contextmanager
def llama_server(model: Path, bin_dir: Path, *, rpc_blocks: int, repack: bool = True
                 ) -> Iterator[str]:
    """llama-server on loopback (with a ggml-rpc-server holding `rpc_blocks` blocks when
    > 0, output head on the host as qvacd does); yields its base URL. `repack` False is
    --no-repack: the plain CPU kernels a qvacd split head uses (models/split_load.py)."""
    procs = []
    try:
        args = [str(bin_dir / "llama-server"), "-m", str(model), "-t", "1", "-c", CTX,
                "--port", str(port := _port()), "--host", "127.0.0.1"]
        if not repack:
            args.append("--no-repack")
        if rpc_blocks:
            rpc_port = _port()
            procs.append(subprocess.Popen([str(bin_dir / "ggml-rpc-server"), "-t", "1", "-p",
                                           str(rpc_port)], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
            time.sleep(1)
            args += ["--rpc", f"127.0.0.1:{rpc_port}", "-ngl", str(rpc_blocks + 1),
                     "-ot", r"^(output|token_embd)\.=CPU"]
        else:
            args += ["-ngl", "0"]
        procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield url
    finally:
        for p in procs:
            p.kill()
            p.wait()


def llama_complete(url: str, prompt: str, n: int) -> tuple[str, float, float]:
    """(text, tokens/s, ttft s) from llama-server, greedy."""
    d = httpx.post(url + "/completion", timeout=600, json={
        "prompt": prompt, "n_predict": n, "temperature": 0, "cache_prompt": False}).json()
    t = d["timings"]
    return d["content"], t["predicted_per_second"], t["prompt_ms"] / 1000


def qvacd_stream(api: str, prompt: str, n: int) -> tuple[str, float, float]:
    """(text, tokens/s of generation after the first token, ttft s) through qvacd."""
    t0 = time.monotonic()
    first = None
    pieces = []
    usage = None
    with httpx.stream("POST", api + "/v1/completions", timeout=600, json={
            "model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}) as r:
        if r.status_code != 200:
            raise SystemExit(f"{api}: {r.status_code} {r.read().decode()[:400]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                usage = d["usage"]
            for c in d.get("choices", []):
                if c.get("text"):
                    first = first or time.monotonic()
                    pieces.append(c["text"])
    end = time.monotonic()
    tokens = (usage or {}).get("completion_tokens") or len(pieces)
    assert first is not None, "no text came back"
    tps = (tokens - 1) / (end - first) if end > first and tokens > 1 else 0.0
    return "".join(pieces), tps, first - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--llama-bin", type=Path, default=DEFAULT_BIN)
    ap.add_argument("--load-rounds", type=int, default=2,
                    help="split first loads with and without the worker holding the file"
                         " (0: none)")
    ap.add_argument("--load-links", default="0,100",
                    help="link speeds in Mbit/s for the load comparison (0: loopback)")
    a = ap.parse_args()
    rows: dict[str, list[tuple[str, float, float, dict[str, float]]]] = {}
    with temporary_mesh("qvacd-split-bench-") as m:
        model = model_path(m.template)
        m.add("head", "--memory-budget", "300MiB", "--ctx-size", CTX, "--threads", "1")
        m.add("worker", "--memory-budget", "300MiB", "--layers-memory", "200MiB",
              "--ctx-size", CTX, "--threads", "1")
        m.trust("worker", "head", ["layers"])
        m.trust("head", "worker", ["provider"])
        m.start("worker")
        m.start("head", bootstrap=["worker"])
        m.wait_peers("head", ["worker"], timeout=30)
        whole = Daemon(clone_data_dir(m.template, m.root / "whole"), "--no-p2p",
                       "--ctx-size", CTX, "--threads", "1").start()
        try:
            if a.load_rounds > 0:
                compare_load(m.root / "load", m.template, a.load_rounds,
                             [float(x) for x in a.load_links.split(",")])
            head = m.nodes["head"]
            t0 = time.monotonic()
            qvacd_stream(head.api, PROMPT, 2)
            load_s = time.monotonic() - t0
            layers = m.nodes["worker"].status()["layers"]
            print(f"split: first request (load over the tunnel) {load_s:.1f} s,"
                  f" {layers['bytes_in'] / 2**20:.1f} MiB carried to the worker")
            anchor_bin = llama_bin(a.llama_bin)
            servers = contextlib.ExitStack()
            with servers:
                urls = {}
                if anchor_bin:  # the kernels of a qvacd split head: no repacking
                    urls["anchor"] = servers.enter_context(
                        llama_server(model, anchor_bin, rpc_blocks=9, repack=False))
                    urls["local"] = servers.enter_context(
                        llama_server(model, anchor_bin, rpc_blocks=0, repack=False))
                else:
                    print(f"no llama-server/ggml-rpc-server in {a.llama_bin}: anchor left out")
                worker = m.nodes["worker"]
                runs: dict[str, Any] = {
                    "whole": lambda: qvacd_stream(whole.api, PROMPT, a.max_tokens),
                    "split": lambda: qvacd_stream(head.api, PROMPT, a.max_tokens)}
                procs = {"whole": {"daemon": [whole.proc.pid]},
                         "split": {"head": [head.proc.pid], "split process":
                                   _children(head.proc.pid), "worker": [worker.proc.pid],
                                   "RPC server": layers["server_pids"]}}
                for name, url in urls.items():
                    runs[name] = (lambda url=url: llama_complete(url, PROMPT, a.max_tokens))
                    pids = _llama_pids(url)
                    procs[name] = {"llama-server": pids[:1]}
                    if pids[1:]:
                        procs[name]["ggml-rpc-server"] = pids[1:]
                moved = (layers["bytes_in"], layers["bytes_out"])
                try:
                    _rounds(a, rows, runs, procs)
                    n = a.rounds * (a.max_tokens + 1)  # about: a prompt's step counts too
                    after = worker.status()["layers"]
                    print(f"split transport per token: {(after['bytes_in'] - moved[0]) / n:.0f}"
                          f" B head->worker, {(after['bytes_out'] - moved[1]) / n:.0f} B back")
                except AssertionError:
                    print("\n".join(ln for ln in head.log().splitlines()
                                    if "split" in ln or "level=warning" in ln)[-3000:])
                    raise
        finally:
            whole.stop()
    _report(rows)
    return 0


HEAD_ARGS = ("--memory-budget", "300MiB", "--ctx-size", CTX, "--threads", "1")
WORKER_ARGS = ("--memory-budget", "300MiB", "--layers-memory", "200MiB", "--ctx-size", CTX,
               "--threads", "1")


def _wait_plan(m: Mesh, timeout: float = 120) -> None:
    """Until the head can plan a split with its worker (a restarted head's worker frees the
    old grant when its RPC server process has lingered SERVER_LINGER_S)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            r = httpx.get(m.nodes["head"].api + "/qvac/plan", params={"model": MODEL},
                          timeout=10)
            if r.status_code == 200 and any(d["device"] == m.ids["worker"] and d["layers"]
                                            for d in r.json()["devices"]):
                return
        time.sleep(0.5)
    raise SystemExit(f"no split plan with the worker within {timeout:.0f} s")


def _load_mesh(root: Path, template: Path, *, holds_file: bool) -> tuple[Mesh, ShapedLink]:
    """A head and a worker (holding the model file or not) whose head reaches the worker
    only through a ShapedLink."""
    m = Mesh(root, template)
    m.add("head", *HEAD_ARGS)
    if holds_file:
        m.add("worker", *WORKER_ARGS)
    else:
        m.add("worker", "--no-default-model", *WORKER_ARGS)
        shutil.rmtree(m.root / "worker" / "models")
    m.trust("worker", "head", ["layers"])
    m.trust("head", "worker", ["provider"])
    m.start("worker")
    link = ShapedLink(m.ports["worker"])
    head = m.nodes["head"]
    head.args += ["--bootstrap", f"/ip4/127.0.0.1/tcp/{link.port}/p2p/{m.ids['worker']}"]
    m.start("head")
    m.wait_peers("head", ["worker"], timeout=30)
    return m, link


def compare_load(root: Path, template: Path, rounds: int, links_mbit: list[float]) -> None:
    """Split load time (first token of the first request) with the worker holding the
    model file and without, each head dialling its worker through a ShapedLink at each
    of `links_mbit` (0: loopback speed); interleaved, heads restarted for every load."""
    built: dict[str, tuple[Mesh, ShapedLink]] = {}
    times: dict[tuple[float, str], list[float]] = {}
    carried: dict[tuple[float, str], tuple[int, int, int]] = {}
    try:
        for name in ("held", "bare"):
            built[name] = _load_mesh(root / name, template, holds_file=name == "held")
        n = 0
        for r in range(rounds):
            for mbit in links_mbit:
                if n:  # a first load again: restart both heads
                    for m, _ in built.values():
                        m.nodes["head"].stop()
                        m.nodes["head"].start()
                for m, link in built.values():
                    link.rate = mbit * 1e6 / 8 if mbit else None
                    _wait_plan(m)
                for name in (("held", "bare") if n % 2 == 0 else ("bare", "held")):
                    m, link = built[name]
                    worker = m.nodes["worker"]
                    before, via = worker.status()["layers"], link.carried
                    _, _, ttft = qvacd_stream(m.nodes["head"].api, PROMPT, 2)
                    after = worker.status()["layers"]
                    times.setdefault((mbit, name), []).append(ttft)
                    carried[(mbit, name)] = (
                        after["bytes_in"] - before["bytes_in"],
                        after["bytes_from_file"] - before["bytes_from_file"],
                        link.carried - via)
                n += 1
    finally:
        for m, link in built.values():
            m.stop_all()
            link.close()
    for mbit in links_mbit:
        where = f"{mbit:g} Mbit/s link" if mbit else "loopback"
        med = {}
        for name, what in (("held", "worker holds the file"), ("bare", "worker has no file")):
            net, from_file, via = carried[(mbit, name)]
            med[name] = statistics.median(times[(mbit, name)])
            print(f"split load, {where}, {what}: first token {med[name]:.2f} s (rounds:"
                  f" {', '.join(f'{t:.2f}' for t in times[(mbit, name)])});"
                  f" {net / 2**20:.1f} MiB of RPC to the worker ({via / 2**20:.1f} MiB through"
                  f" the link both ways), {from_file / 2**20:.1f} MiB read from its file")
        print(f"split load, {where}: without / with the file {med['bare'] / med['held']:.2f}x")


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
    return out


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (0 for one that is gone)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])
    return total / os.sysconf("SC_CLK_TCK")


def _llama_pids(url: str) -> list[int]:
    """llama-server behind `url` and, with --rpc, its ggml-rpc-server."""
    port = url.rsplit(":", 1)[1]
    out = []
    for pid in _children(os.getpid()):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"--port" in argv and argv[argv.index(b"--port") + 1].decode() == port:
            out.append(pid)
            if b"--rpc" in argv:
                rpc_port = argv[argv.index(b"--rpc") + 1].decode().rsplit(":", 1)[1]
                out += [q for q in _children(os.getpid()) if rpc_port.encode() in
                        Path(f"/proc/{q}/cmdline").read_bytes().split(b"\0")]
    return out


def _rounds(a: argparse.Namespace, rows: dict, runs: dict[str, Any],
            procs: dict[str, dict[str, list[int]]]) -> None:
    """`runs`: name -> () -> (text, tok/s, ttft); `procs`: name -> role -> pids, whose CPU
    time per generated token is recorded beside (rows: text, tok/s, ttft, {role: ms})."""
    for _ in range(a.rounds):  # interleaved, so load changes hit all alike
        for name, run in runs.items():
            before = {role: _cpu_s(pids) for role, pids in procs[name].items()}
            text, tps, ttft = run()
            cpu = {role: (_cpu_s(pids) - before[role]) * 1000 / a.max_tokens
                   for role, pids in procs[name].items()}
            rows.setdefault(name, []).append((text, tps, ttft, cpu))


def _report(rows: dict) -> None:
    med = {k: (statistics.median(r[1] for r in v), statistics.median(r[2] for r in v))
           for k, v in rows.items()}
    print("1 thread per process; split and anchor: 9 of 18 blocks on the worker, output head"
          " and embeddings on the head, plain kernels (no repack) on both sides; whole: the"
          " product's default (repacked); tok/s is wall clock on a shared machine (a"
          " process that waits on RPC gets the CPU back sooner under load), CPU ms per"
          " generated token is the work, whatever the load")
    for k, (tps, ttft) in med.items():
        roles = rows[k][0][3]
        cpu = {role: statistics.median(r[3][role] for r in rows[k]) for role in roles}
        parts = ", ".join(f"{role} {ms:.1f}" for role, ms in cpu.items())
        print(f"{k:7s} {tps:6.1f} tok/s   ttft {ttft * 1000:6.0f} ms   CPU/token"
              f" {sum(cpu.values()):5.1f} ms ({parts})")
    if "anchor" in med:
        print(f"split / anchor: {med['split'][0] / med['anchor'][0]:.2f} (goal >= 0.8)")
        print(f"split text == anchor text: {rows['split'][0][0] == rows['anchor'][0][0]}")
        print(f"anchor text == llama-server local text: "
              f"{rows['anchor'][0][0] == rows['local'][0][0]};"
              f" split text == llama-server local text:"
              f" {rows['split'][0][0] == rows['local'][0][0]}")
    print(f"split / whole: {med['split'][0] / med['whole'][0]:.2f};"
          f" split text == whole (repacked) text: {rows['split'][0][0] == rows['whole'][0][0]}")


if __name__ == "__main__":
    sys.exit(main())
