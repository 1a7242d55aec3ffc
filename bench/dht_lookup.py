"""DHT lookup latency: capacity records and model providers, 16/32/64 nodes on loopback.

All nodes run in this one process (one trio loop, one CPU core for all of them), so the
numbers are pessimistic for a real mesh where each node has its own machine. They also
share one address, 127.0.0.1, which a real mesh never does: the guard scores offences by
IP, and the handshakes that time out while 64 nodes start on one core add up to a ban of
127.0.0.1 (measured: "refusing connections from 127.0.0.1 ... after repeated handshake
offences" within the first minute; every node then refuses every other at TCP accept).
The bench raises the guard's threshold so that one shared address is not one offender;
each node's guard is otherwise as shipped.

Known limit (measured, not fixed): at 64 nodes in one process the mesh still does not
form well (median routing table 2-4 of 63). The first node's 12 inbound DHT handler
slots (py-libp2p's cap) stay full once ~16 nodes have joined, so later FIND_NODEs are
reset, and py-libp2p's auto-connector dials every known peer every 10 s (its low
watermark is 100 connections), which keeps the core busy; lookups then mostly time out.

    python bench/dht_lookup.py [--sizes 16,32,64] [--lookups 100]

Each node bootstraps to node 0 and to one random earlier node, auto-connects to at most
8 discovered peers, and holds one of N/4 models (so ~4 providers each). After the mesh
settles (at most 45 s per settle), lookups run one at a time from random nodes for
random targets, each kind for at most --budget-s seconds per size:
- capacity: `lookup_capacity(peer)` - the newest valid record found in the DHT;
- providers: `find_model_providers(sha, include_table=False)` - DHT provider records only.
Goal: p95 < 1 s at 64 nodes.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import random
import statistics
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peers.device import DeviceInfo
from peers.identity import Identity
from peers import NetworkLimits, PeerNetwork
from peers.guard import GuardConfig
from peers.records import CapacityRecord, ModelInfo

DEVICE = DeviceInfo("cpu", "bench", 8 << 30, 4 << 30)


def source_for(sha: str):  # type: ignore[no-untyped-def]
    def source() -> CapacityRecord:
        return CapacityRecord.issue(
            "", 0, DEVICE, models=(ModelInfo(sha, "m", 1, True, 1),), slots_total=1, slots_free=1
        )

    return source


def progress(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def settle(nets: list[PeerNetwork], max_s: float = 45.0, quiet: float = 0.2) -> float:
    """Wait until routing tables stop growing: the median size unchanged and at least
    min(N - 1, 8) for two 2-second windows in a row while this process is nearly idle
    (under `quiet` of a core), or for five in a row however busy it is. Why not idle
    alone: 64 nodes' own chores (capacity polls, DHT puts, reachability) keep one core
    above 20 % for good, and waiting for idle then never ends."""
    start = time.monotonic()
    floor = min(len(nets) - 1, 8)
    last_rt, stable, share, rt = -1.0, 0, 1.0, 0.0
    while time.monotonic() - start < max_s:
        c0, t0 = time.process_time(), time.monotonic()
        await trio.sleep(2.0)
        share = (time.process_time() - c0) / (time.monotonic() - t0)
        rt = statistics.median(n.dht.kad.get_routing_table_size() for n in nets)
        stable = stable + 1 if rt == last_rt and rt >= floor else 0
        last_rt = rt
        if (stable >= 2 and share < quiet) or stable >= 5:
            break
    progress(f"settled after {time.monotonic() - start:.0f} s (cpu {share:.0%}, rt {rt})")
    return time.monotonic() - start


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def run_size(n: int, lookups: int, rng: random.Random, budget_s: float
                   ) -> dict[str, object]:
    # Background work (capacity polling, discovery, republishing) is turned down so that
    # the lookups being timed are not queued behind 63 other nodes' chores on one core.
    limits = NetworkLimits(
        max_auto_connect=8,
        refresh_interval_s=120.0,
        republish_interval_s=600.0,
        discovery_max_interval_s=600.0,
    )
    n_models = max(1, n // 4)
    shas = [hashlib.sha256(f"model-{i}".encode()).hexdigest() for i in range(n_models)]
    holder = {i: shas[i % n_models] for i in range(n)}
    nets: list[PeerNetwork] = []
    async with AsyncExitStack() as stack:
        t0 = time.monotonic()
        for i in range(n):
            boot: list[str] = []
            j = 0
            if i:
                boot = [nets[0].listen_addrs()[0]]
                j = rng.randrange(i)
                if j:
                    boot.append(nets[j].listen_addrs()[0])
            net = PeerNetwork(
                Identity.generate(),
                capacity_source=source_for(holder[i]),
                listen_addrs=["/ip4/127.0.0.1/tcp/0"],
                bootstrap=boot,
                mdns=False,
                limits=limits,
                guard_config=GuardConfig(threshold=1e12),  # one shared IP: see the docstring
            )
            await stack.enter_async_context(net)
            nets.append(net)
        started = time.monotonic() - t0
        progress(f"{n} nodes started in {started:.0f} s")
        # Let discovery settle, then have everyone (re)publish into the fuller DHT.
        settle_s = await settle(nets)
        for net in nets:
            net.capacity_changed()
        await trio.sleep(1.0)
        settle_s += await settle(nets)
        rt = [net.dht.kad.get_routing_table_size() for net in nets]
        conns = [len(net.connected_peers()) for net in nets]

        progress(f"{n} nodes: routing tables median {statistics.median(rt)}, timing lookups")
        cap_t: list[float] = []
        cap_ok = 0
        # why a budget: a lookup that finds nothing waits out its 5 s timeout, and 100 of
        # them would keep a sparse mesh's run going for over 8 minutes
        phase_end = time.monotonic() + budget_s
        for _ in range(lookups):
            if time.monotonic() > phase_end:
                break
            src, dst = rng.sample(range(n), 2)
            t = time.perf_counter()
            rec = await nets[src].lookup_capacity(nets[dst].peer_id_str, timeout=5)
            cap_t.append(time.perf_counter() - t)
            cap_ok += rec is not None and rec.peer_id == nets[dst].peer_id_str

        progress(f"capacity lookups done: p50 {pct(cap_t, 0.5) * 1000:.0f} ms")
        prov_t: list[float] = []
        recall: list[float] = []
        phase_end = time.monotonic() + budget_s
        for _ in range(lookups):
            if time.monotonic() > phase_end:
                break
            src = rng.randrange(n)
            sha = rng.choice(shas)
            truth = {nets[i].peer_id_str for i in range(n) if holder[i] == sha and i != src}
            t = time.perf_counter()
            got = await nets[src].find_model_providers(sha, timeout=5, include_table=False)
            prov_t.append(time.perf_counter() - t)
            recall.append(len(truth & set(got)) / len(truth) if truth else 1.0)

        result = {
            "nodes": n,
            "startup_s": started,
            "settle_s": settle_s,
            "rt_median": statistics.median(rt),
            "conns_median": statistics.median(conns),
            "cap_p50": pct(cap_t, 0.5),
            "cap_p95": pct(cap_t, 0.95),
            "cap_found": cap_ok / len(cap_t),
            "cap_n": len(cap_t),
            "prov_n": len(prov_t),
            "prov_p50": pct(prov_t, 0.5),
            "prov_p95": pct(prov_t, 0.95),
            "prov_recall": statistics.mean(recall),
        }
        print_row(result)  # before the nodes stop: that takes a while at 64 on one core
        progress(f"stopping {n} nodes")
    return result


def print_row(r: dict) -> None:
    print(
        f"{r['nodes']:>5} {r['startup_s']:>7.1f} {r['settle_s']:>6.0f} {r['rt_median']:>4.0f} "
        f"{r['conns_median']:>5.0f} | {r['cap_p50'] * 1000:>6.0f}ms "
        f"{r['cap_p95'] * 1000:>6.0f}ms {r['cap_found']:>6.0%} | "
        f"{r['prov_p50'] * 1000:>6.0f}ms {r['prov_p95'] * 1000:>6.0f}ms "
        f"{r['prov_recall']:>6.0%}  ({r['cap_n']}+{r['prov_n']} lookups)",
        flush=True,
    )


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="16,32,64")
    ap.add_argument("--lookups", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=45.0,
                    help="most seconds per size for each kind of lookup (fewer lookups then)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    rng = random.Random(args.seed)
    print(
        f"{'nodes':>5} {'start s':>7} {'settle':>6} {'rt':>4} {'conns':>5} | "
        f"{'cap p50':>8} {'cap p95':>8} {'found':>6} | "
        f"{'prov p50':>8} {'prov p95':>8} {'recall':>6}",
        flush=True,
    )
    for n in (int(x) for x in args.sizes.split(",")):
        await run_size(n, args.lookups, rng, args.budget_s)
        await trio.sleep(0.5)
    print("goal: p95 < 1000 ms at 64 nodes (all nodes share one process and core here)")


if __name__ == "__main__":
    trio.run(main)
