"""The capped multi-source pull: does pulling from 3 seeders add up when each seeder's
upload is what limits it (a home uplink, a relay), as it does for real users?

Three full nodes seed the default model; every one of them gets an upload cap of
CAP_MBIT (the switch's or netem's `rate` on its egress: a real link limit, TCP finds it).
A node without the model pulls it (fresh data dir, same identity, --no-default-model),
trusting 1 seeder, then 3: rounds alternate x1, x3 so machine noise hits both alike. A
pull's time runs from POST /api/pull to "success", every sha256 included. PASS: every
pull succeeds from the number of seeders it trusts, the file's sha256 is the model's, and
the median x3 rate is at least GOAL times the median x1 rate.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from typing import Any

import httpx
import trio

from bench.lab.netns import Impair
from bench.lab.nodes import MODEL, Lab, LabNode
from bench.lab.scenarios import Options, Result, _sha256, ensure_mesh, say
from peers.trust import TrustStore

CAP_MBIT = 32.0  # each seeder's upload: 4 MB/s, 63 s for the 253 MB model from one
GOAL = 2.5


async def _fresh_puller(lab: Lab, puller: LabNode, seeders: list[LabNode], tag: str) -> None:
    """Restart `puller` on an empty data dir (same identity) trusting only `seeders`."""
    await puller.stop()
    fresh = lab.work / "nodes" / f"{puller.name}-{tag}"
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    for f in (lab.work / "nodes" / puller.name).iterdir():
        if f.is_file() and f.name != "daemon.json":  # identity and the rest, not models
            shutil.copy2(f, fresh / f.name)
    TrustStore.in_dir(fresh).path.unlink(missing_ok=True)
    ts = TrustStore.in_dir(fresh)
    for s in seeders:
        ts.add(s.peer_id, ["consumer", "provider", "seeder"])
    puller.data_dir = fresh
    await puller.start("--no-default-model", "--no-preload", *lab.node_args(puller.i))
    await lab.wait_mesh([puller, *seeders], timeout=30)


async def _pull(puller: LabNode) -> dict[str, Any]:
    """One whole pull; its time, size, the most sources seen at once, the last event."""
    t0 = time.monotonic()
    sources = 0
    final: dict[str, Any] = {}
    marks: dict[str, float] = {}
    async with puller.client.stream("POST", "/api/pull", json={"model": MODEL},
                                    timeout=httpx.Timeout(10.0, read=120.0)) as r:
        if r.status_code != 200:
            body = (await r.aread()).decode(errors="replace")[:300]
            return {"error": f"POST /api/pull answered {r.status_code}: {body}"}
        async for line in r.aiter_lines():
            if not line.strip():
                continue
            final = json.loads(line)
            sources = max(sources, final.get("sources") or 0)
            total, done = final.get("total") or 0, final.get("completed") or 0
            if total and final.get("status") == "downloading":
                for q in (0.1, 0.9):  # the steady part, without the start and the tail
                    if done >= q * total and str(q) not in marks:
                        marks[str(q)] = time.monotonic()
    wall = time.monotonic() - t0
    size = final.get("total") or 0
    steady = None
    if "0.1" in marks and "0.9" in marks and marks["0.9"] > marks["0.1"]:
        steady = 0.8 * size / (marks["0.9"] - marks["0.1"]) / 1e6
    return {"wall": wall, "size": size, "sources": sources, "final": final,
            "rate": size / 1e6 / wall, "steady": steady}


async def capped_pull(lab: Lab, opt: Options, res: Result) -> None:
    if lab.n < 4:
        res.passed = None
        res.summary = "skipped: needs --nodes 4 or more (3 seeders and a puller)"
        return
    await ensure_mesh(lab, fresh=True)
    puller = lab.nodes[-1]
    seeders = lab.nodes[:-1][-3:]
    original = puller.data_dir
    rounds = 1 if opt.fast else 2
    rates: dict[int, list[float]] = {1: [], 3: []}
    try:
        for s in seeders:
            lab.lan.impair(s.i, Impair(rate_mbit=CAP_MBIT))
        for rnd in range(1, rounds + 1):
            for k in (1, 3):
                await _fresh_puller(lab, puller, seeders[:k], f"capped{k}")
                got = await _pull(puller)
                final = got.get("final") or {}
                ok = final.get("status") == "success"
                sha_ok = None
                if ok:
                    blob = puller.data_dir / "models" / "blobs" / f"sha256-{lab.model_sha}"
                    sha_ok = blob.exists() and (await trio.to_thread.run_sync(_sha256, blob)
                                                == lab.model_sha)
                case = f"x{k} round {rnd}"
                res.check(ok, f"{case}: the pull did not succeed: {got.get('error') or final}")
                res.check(got.get("sources") == k,
                          f"{case}: {got.get('sources')} sources at once, not {k}")
                res.check(not ok or sha_ok is True, f"{case}: the file's sha256 is wrong")
                if not ok:
                    continue
                rates[k].append(got["rate"])
                steady = got["steady"]
                row = {"case": f"{k} seeder{'s' if k > 1 else ''}, round {rnd}",
                       "upload cap each": f"{CAP_MBIT:g} Mbit/s",
                       "size MB": f"{got['size'] / 1e6:.0f}", "time s": f"{got['wall']:.1f}",
                       "MB/s": f"{got['rate']:.2f}",
                       "MB/s 10-90%": "—" if steady is None else f"{steady:.2f}",
                       "sources": str(got["sources"]), "sha256 verified": str(sha_ok),
                       "dropped": "; ".join(f"{p[:12]}: {w}" for p, w in
                                            (final.get("dropped") or {}).items())[:160]}
                res.rows.append(row)
                say(f"  {row['case']}: {row['size MB']} MB in {row['time s']} s"
                    f" ({row['MB/s']} MB/s, {row['MB/s 10-90%']} in the middle),"
                    f" {row['sources']} sources, sha256 verified {sha_ok}")
    finally:
        lab.lan.impair_all(Impair())
        puller.data_dir = original  # the next scenario restarts it on its own data dir
        lab.dirty = True
    if rates[1] and rates[3]:
        one, three = statistics.median(rates[1]), statistics.median(rates[3])
        ratio = three / one
        res.summary = (f"each seeder capped at {CAP_MBIT:g} Mbit/s: 1 seeder {one:.2f} MB/s,"
                       f" 3 seeders {three:.2f} MB/s = {ratio:.2f}x (goal >= {GOAL:g}x)")
        res.check(ratio >= GOAL, f"3 capped seeders pull at {ratio:.2f}x the rate of 1,"
                                 f" under the goal of {GOAL:g}x")
    else:
        res.summary = "no capped pull succeeded"


CAPPED_SCENARIOS = {
    "capped_pull": (capped_pull, "Capped multi-source pull: 1 vs 3 upload-capped seeders",
                    480),
}
