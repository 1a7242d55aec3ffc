"""Delegated inference beyond the LAN: through a relay, and direct after hole punching,
against a direct LAN peer, side by side in one run (needs root, iproute2, nftables).

    python bench/relay.py [--rounds 5] [--tokens 64]
    python bench/relay.py --pull [--rounds 2]     # model pulls instead of completions

Topology (bench/lab/nat.py): A (10.1.0.2, too small for the model) delegates to
  - C on its own LAN (10.1.0.3): the direct LAN baseline;
  - B behind another NAT (10.2.0.2) through the relay (A's hole punching off);
  - B again after A restarts with hole punching on and DCUtR made the connection direct.
Each round streams one completion per path back to back (a shared machine's drifting
load cancels in the ratios); prints median TTFT and tokens/s and ratios to LAN.

With --pull, A (without the model) pulls the default model from C on its LAN and from B
through the relay (hole punching off), each round one pull per path back to back (A's
models are wiped and A restarted between pulls); prints the median MB/s of each and the
ratio, and what the relay carried.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.lab import nat  # noqa: E402
from bench.lab.nat import NsNode  # noqa: E402
from tests.harness import clone_data_dir, install_model_template  # noqa: E402

MODEL = "gemma3-270m"


def stream_once(node: NsNode, max_tokens: int) -> tuple[float, float, int, str]:
    """(ttft s, tokens/s after the first, tokens, served-by) for one streamed completion."""
    http = httpx.Client(transport=httpx.HTTPTransport(uds=node.sock), timeout=120)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens,
            "temperature": 0, "seed": 1, "stream": True}
    t0 = time.perf_counter()
    first = last = None
    n = 0
    served = ""
    with http.stream("POST", "http://localhost/v1/completions", json=body) as r:
        r.raise_for_status()
        served = r.headers.get("x-qvac-served-by", "")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                now = time.perf_counter()
                first = first or now
                last = now
                n += 1
    http.close()
    if first is None or last is None or n < 2:
        raise RuntimeError(f"stream returned {n} tokens")
    return first - t0, (n - 1) / (last - first), n, served


def wait(what: str, fn, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if fn():
                return
        except (httpx.TransportError, KeyError, TypeError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{what} not within {timeout}s")


def pull_once(node: NsNode, source: str) -> tuple[float, int]:
    """(seconds, bytes) of one POST /api/pull of the default model from peer `source`."""
    http = httpx.Client(transport=httpx.HTTPTransport(uds=node.sock), timeout=600)
    t0 = time.perf_counter()
    last: dict = {}
    with http.stream("POST", "http://localhost/api/pull",
                     json={"model": MODEL, "from": source}) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"pull failed: {r.status_code} {r.text}")
        for line in r.iter_lines():
            if line.strip():
                last = json.loads(line)
                if "error" in last:
                    raise RuntimeError(f"pull failed: {last['error']}")
    took = time.perf_counter() - t0
    http.close()
    if last.get("status") != "success" or not last.get("fetched"):
        raise RuntimeError(f"pull did not fetch the model: {last}")
    return took, int(last["fetched"])


def bench_pull(args: argparse.Namespace, lab: nat.NatLab, work: Path, template: Path,
               nodes: list[NsNode]) -> int:
    from peers.trust import TrustStore

    relay = NsNode(lab, "relay", nat.RELAY_IP, work / "relay" / "data")
    a = NsNode(lab, "a", nat.HOSTS["a"][1], work / "a" / "data")
    a.data_dir.mkdir(parents=True, exist_ok=True)
    b = NsNode(lab, "b", nat.HOSTS["b"][1], clone_data_dir(template, work / "b" / "data"))
    c = NsNode(lab, "c", nat.HOSTS["c"][1], clone_data_dir(template, work / "c" / "data"))
    nodes += [relay, a, b, c]
    for p in (b, c):
        TrustStore.in_dir(p.data_dir).add(a.peer_id, ["seeder"])
        TrustStore.in_dir(a.data_dir).add(p.peer_id, ["provider"])
    join = ["--bootstrap", relay.addr, "--relay", relay.addr]
    relay.start("--relay-service", "--no-default-model", "--no-preload",
                "--relay-circuit-bytes", "0")
    b.start(*join, "--no-preload")
    c.start("--bootstrap", relay.addr, "--no-preload")
    wait("B's reservation", lambda: b.status()["network"]["relayed_addrs"], 30)
    results: dict[str, list[float]] = {"lan": [], "relayed": []}  # printed in this order
    relayed_bytes = 0
    for _ in range(args.rounds):
        for label, peer, path in (("relayed", b, "relayed"), ("lan", c, "direct")):
            a.stop()
            shutil.rmtree(a.data_dir / "models", ignore_errors=True)
            a.start(*join, "--no-default-model", "--no-preload", "--no-hole-punch")
            wait(f"A sees {peer.role}'s model over a {path} path",
                 lambda peer=peer, path=path: (a.peer(peer.peer_id) or {}).get("path") == path
                 and any(m["name"] == MODEL
                         for m in a.peer(peer.peer_id)["capacity"]["models"]), 90)
            before = relay.status()["network"]["service"]["bytes_relayed"]
            took, size = pull_once(a, peer.peer_id)
            carried = relay.status()["network"]["service"]["bytes_relayed"] - before
            if label == "relayed":
                assert carried >= size, (carried, size)
                relayed_bytes = carried
            assert (a.peer(peer.peer_id) or {}).get("path") == path
            results[label].append(size / took / 1e6)
    lan = statistics.median(results["lan"])
    print(f"model pulls, gemma3-270m ({size} bytes), {args.rounds} round(s) per path, A <- peer"
          " (median)")
    print(f"{'path':<34} {'MB/s':>8} {'ratio':>7}")
    names = {"lan": "direct, same LAN (A <- C)", "relayed": "through the relay (A <- B)"}
    for label, rows in results.items():
        rate = statistics.median(rows)
        print(f"{names[label]:<34} {rate:>8.1f} {rate / lan:>7.2f}")
    print(f"the relay carried {relayed_bytes} bytes for one relayed pull of {size}"
          f" ({relayed_bytes / size - 1:+.2%} framing and other traffic)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds per path (default: 5 completions, 2 pulls)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--pull", action="store_true",
                    help="measure model pulls through the relay vs direct on the LAN")
    args = ap.parse_args()
    args.rounds = args.rounds or (2 if args.pull else 5)
    why = nat.why_not()
    if why:
        print(f"bench/relay.py: cannot run here: {why}", file=sys.stderr)
        return 2
    from peers.trust import TrustStore

    work = Path(tempfile.mkdtemp(prefix="qvac-relay-bench-"))
    template = work / "template"
    if install_model_template(template) is None:
        print("the default model is not installed: pip install -e '.[model]'", file=sys.stderr)
        return 2
    lab = nat.NatLab()
    lab.up()
    nodes: list[NsNode] = []
    try:
        if args.pull:
            return bench_pull(args, lab, work, template, nodes)
        relay = NsNode(lab, "relay", nat.RELAY_IP, work / "relay" / "data")
        a = NsNode(lab, "a", nat.HOSTS["a"][1], clone_data_dir(template, work / "a" / "data"))
        b = NsNode(lab, "b", nat.HOSTS["b"][1], clone_data_dir(template, work / "b" / "data"))
        c = NsNode(lab, "c", nat.HOSTS["c"][1], clone_data_dir(template, work / "c" / "data"))
        nodes = [relay, a, b, c]
        for p in (b, c):
            TrustStore.in_dir(p.data_dir).add(a.peer_id, ["consumer"])
        join = ["--bootstrap", relay.addr, "--relay", relay.addr]
        small = ["--memory-budget", "16MiB", "--no-preload"]
        relay.start("--relay-service", "--no-default-model", "--no-preload")
        b.start(*join)
        c.start("--bootstrap", relay.addr)
        wait("B's reservation", lambda: b.status()["network"]["relayed_addrs"], 30)

        def use(peer: NsNode) -> None:
            store = TrustStore.in_dir(a.data_dir)
            for other in (b, c):
                if other is not peer:
                    store.remove(other.peer_id)
            store.add(peer.peer_id, ["provider"])

        results: dict[str, list[tuple[float, float]]] = {"lan": [], "relayed": [], "punched": []}

        def measure(label: str, peer: NsNode, want_path: str) -> None:
            use(peer)
            wait(f"A -> {peer.role} {want_path}",
                 lambda: (a.peer(peer.peer_id) or {}).get("path") == want_path
                 and (a.peer(peer.peer_id) or {}).get("capacity"), 90)
            stream_once(a, 8)  # warm the path
            for _ in range(args.rounds):
                ttft, tps, _n, served = stream_once(a, args.tokens)
                assert served == peer.peer_id, (served, peer.peer_id)
                results[label].append((ttft, tps))

        a.start(*join, *small, "--no-hole-punch")
        measure("lan", c, "direct")
        measure("relayed", b, "relayed")
        a.stop()
        a.start(*join, *small)
        measure("punched", b, "direct")
        base_ttft = statistics.median(t for t, _ in results["lan"])
        base_tps = statistics.median(s for _, s in results["lan"])
        print(f"delegated completions, {args.tokens} tokens, {args.rounds} rounds per path, "
              "gemma3-270m, A -> peer (medians)")
        print(f"{'path':<34} {'TTFT ms':>9} {'tok/s':>8} {'TTFT ratio':>11} {'tok/s ratio':>12}")
        names = {"lan": "direct, same LAN (A -> C)", "relayed": "through the relay (A -> B)",
                 "punched": "direct after hole punch (A -> B)"}
        for label, rows in results.items():
            ttft = statistics.median(t for t, _ in rows)
            tps = statistics.median(s for _, s in rows)
            print(f"{names[label]:<34} {ttft * 1000:>9.1f} {tps:>8.1f} {ttft / base_ttft:>11.2f}"
                  f" {tps / base_tps:>12.3f}")
        svc = relay.status()["network"]["service"]
        print(f"relay forwarded {svc['bytes_relayed']} bytes in {svc['circuits_opened']} circuits")
        return 0
    finally:
        for n in nodes:
            n.close()
        lab.down()


if __name__ == "__main__":
    sys.exit(main())
