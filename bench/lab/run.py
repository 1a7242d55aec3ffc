"""The mesh lab: one command builds N hosts (network namespaces) on one LAN segment, runs
a real `qvacd` on each, runs the scenarios under injected latency, jitter, loss, link
cuts, node deaths and a hostile peer, and writes a report and a chart.

    sudo python -m bench.lab [--nodes 4] [--scenarios discovery,delegation,...] [--fast]

Needs Linux, root and iproute2 (`ip`, `tc`). Everything it creates (namespaces, links,
processes, a work dir under /tmp) is removed when it ends, also after a failure, a time
limit, Ctrl-C or SIGTERM; a lab killed outright (SIGKILL) is cleaned up by the next run.
Exit status: 0 all scenarios passed (or were skipped), 1 one failed, 2 cannot run here,
130 interrupted.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import trio

from bench.lab import netns
from bench.lab.netns import LabError
from bench.lab.nodes import Lab
from bench.lab.report import machine_meta, write_chart, write_markdown, write_ttft_chart
from bench.lab.scenarios import SCENARIOS, Impair, Options, Result, say
from bench.lab.pull_capped import CAPPED_SCENARIOS
from bench.lab.split_scenario import SPLIT_SCENARIOS, write_split_chart

REPO = Path(__file__).resolve().parent.parent.parent
# scenarios in their own modules join the list after the ones in scenarios.py
SCENARIOS = {**SCENARIOS, **CAPPED_SCENARIOS, **SPLIT_SCENARIOS}
FAST = ["discovery", "failover"]


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.lab", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=4,
                    help="qvacd daemons (>= 3: one small node and two full ones); default 4")
    ap.add_argument("--scenarios", default=None,
                    help=f"comma-separated, in this order: {','.join(SCENARIOS)} (default all)")
    ap.add_argument("--fast", action="store_true",
                    help=f"the CI subset: {' + '.join(FAST)} (unless --scenarios is given),"
                         " fewer rounds and tokens")
    ap.add_argument("--plane", choices=["auto", "bridge", "switch"], default="auto",
                    help="how hosts are joined: bridge = Linux bridge + veth + tc netem,"
                         " switch = TAP devices + user-space switch with the same impairment"
                         " (for kernels without sch_netem); auto picks bridge when netem works")
    ap.add_argument("--report", type=Path, default=REPO / "docs" / "lab-report.md")
    ap.add_argument("--chart", type=Path, default=REPO / "docs" / "lab-chart.png")
    ap.add_argument("--logs", type=Path, default=None,
                    help="copy the daemons' logs here at the end (default: only when a"
                         " scenario failed, to /tmp/qvac-lab-logs-PID)")
    ap.add_argument("--churn-seconds", type=float, default=None)
    ap.add_argument("--rounds", type=int, default=None,
                    help="delegation: measured local/delegated pairs per network condition"
                         " (default 8; --fast 2)")
    ap.add_argument("--threads", type=int, default=1,
                    help="llama.cpp threads per daemon (default 1: the daemons share this"
                         " machine's cores; 0 = all cores each)")
    args = ap.parse_args(argv)
    if args.scenarios is None:
        args.scenarios = ",".join(FAST if args.fast else SCENARIOS)
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenario_list if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    if args.nodes < 3:
        ap.error("--nodes must be at least 3 (one small node, two full nodes for failover)")
    if args.nodes > 16:
        ap.error("--nodes above 16 would not fit one small machine's memory (about 400 MB"
                 " per daemon)")
    return args


def options(args: argparse.Namespace) -> Options:
    opt = Options()
    if args.fast:
        opt.rounds, opt.max_tokens, opt.churn_s, opt.hostile_rounds = 2, 24, 30.0, 2
        opt.delegation_conditions = [Impair(0), Impair(20, 5, 1)]
    if args.churn_seconds:
        opt.churn_s = args.churn_seconds
    if args.rounds:
        opt.rounds = args.rounds
    return opt


async def run_scenario(lab: Lab, name: str, opt: Options) -> Result:
    fn, title, limit = SCENARIOS[name]
    res = Result(name, title, limit_s=limit)
    say(f"\n== {title} (limit {limit} s)")
    t0 = time.monotonic()
    try:
        with trio.fail_after(limit):
            await fn(lab, opt, res)
        if res.passed is None and res.summary.startswith("skipped"):
            pass
        else:
            res.passed = not res.failures
    except trio.TooSlowError:
        res.passed = False
        res.failures.append(f"did not finish within its time limit of {limit} s")
    except Exception as e:  # noqa: BLE001 - any scenario error is that scenario's FAIL
        res.passed = False
        res.failures.append(f"{type(e).__name__}: {e}")
        traceback.print_exc()
    res.seconds = time.monotonic() - t0
    if not res.summary and res.failures:
        res.summary = res.failures[0][:200]
    say(f"{res.verdict} {title}: {res.summary}")
    for f in res.failures:
        say(f"   - {f}")
    if res.passed is False:  # leave nothing half-broken for the next scenario
        lab.dirty = True
    return res


async def amain(args: argparse.Namespace, lab: Lab, results: list[Result]) -> None:
    opt = options(args)
    async with trio.open_nursery() as nursery:
        async def watch_signals() -> None:
            # SIGINT too: delivered here, at one place, rather than as a KeyboardInterrupt
            # raised wherever the main task happens to be (a client stream could eat it)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM,
                                           signal.SIGHUP) as sigs:
                async for sig in sigs:
                    say(f"\nreceived {signal.Signals(sig).name}; stopping and cleaning up")
                    raise KeyboardInterrupt

        nursery.start_soon(watch_signals)
        say(f"building {lab.lan.n} hosts ...")
        with trio.fail_after(180):
            await lab.setup()
        say(f"LAN up: {lab.n} daemons, plane {lab.lan.plane}, namespaces"
            f" {', '.join(lab.lan.ns)}")
        for name in args.scenario_list:
            results.append(await run_scenario(lab, name, opt))
        with trio.move_on_after(30):
            await lab.stop_all()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        netns.preflight()
    except LabError as e:
        print(f"qvac lab: {e}", file=sys.stderr)
        return 2
    if args.plane == "bridge" and (why := netns.netem_missing()) is not None:
        # asked for the netem plane by name: nothing of it can run here; say why, once
        print(f"qvac lab: plane bridge skipped: {why}", file=sys.stderr)
        return 2
    netns.cleanup_stale()
    work = Path(tempfile.mkdtemp(prefix="qvac-lab-"))
    extra = 1 if "hostile" in args.scenario_list else 0
    lab = Lab(args.nodes, work, args.plane, extra_hosts=extra)
    lab.threads = args.threads
    results: list[Result] = []
    rc = 0
    started = time.time()
    # SIGTERM outside trio (before it runs, after it ends) must still clean up
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        trio.run(amain, args, lab, results)
    except KeyboardInterrupt:
        print("\nqvac lab: interrupted; cleaning up", file=sys.stderr)
        rc = 130
    except LabError as e:
        print(f"qvac lab: {e}", file=sys.stderr)
        rc = 2
    except BaseException as e:  # noqa: BLE001 - report anything, then clean up
        while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
            e = e.exceptions[0]
        if isinstance(e, KeyboardInterrupt):
            print("\nqvac lab: interrupted; cleaning up", file=sys.stderr)
            rc = 130
        elif isinstance(e, LabError):
            print(f"qvac lab: {e}", file=sys.stderr)
            rc = 2
        else:
            traceback.print_exception(e)
            rc = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # nothing may interrupt the cleanup
        failed = any(r.passed is False for r in results) or rc
        logs = args.logs or (Path(f"/tmp/qvac-lab-logs-{__import__('os').getpid()}")
                             if failed else None)
        if logs is not None:
            logs.mkdir(parents=True, exist_ok=True)
            for f in work.glob("*.log"):
                shutil.copy(f, logs / f.name)
            print(f"daemon logs kept in {logs}", file=sys.stderr)
        lab.close()
        shutil.rmtree(work, ignore_errors=True)
        left = lab.lan.leftovers()
        if left:
            print(f"qvac lab: could not remove {', '.join(left)}", file=sys.stderr)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if results:
        meta = machine_meta()
        meta.update({"command": " ".join(["python -m bench.lab", *(argv if argv is not None
                                                                   else sys.argv[1:])]),
                     "nodes": f"{args.nodes} qvacd daemons (n0: --memory-budget 64MiB;"
                              f" n1..: full) + {extra} hostile",
                     "network": {"bridge": "veth + Linux bridge, tc netem per host",
                                 "switch": "TAP + user-space switch with netem semantics per"
                                           " host (kernel has no sch_netem)"}.get(
                                     lab.lan.plane, lab.lan.plane),
                     "model": f"gemma3-270m (Q4_K_M), greedy, --threads {args.threads} per daemon",
                     "wall time": f"{time.time() - started:.0f} s"})
        why = write_chart(args.chart, results)
        if why:
            print(f"qvac lab: chart not drawn: {why}", file=sys.stderr)
        ttft_chart = args.chart.with_name(args.chart.stem + "-ttft-rtt.png")
        figures = {} if write_ttft_chart(ttft_chart, results) else {"delegation": ttft_chart}
        split_chart = args.chart.with_name(args.chart.stem + "-split-rtt.png")
        if not write_split_chart(split_chart, results):
            figures["split"] = split_chart
        write_markdown(args.report, results, meta, None if why else args.chart, figures)
        say("\n| scenario | result | figures |\n|---|---|---|")
        for r in results:
            say(f"| {r.title} | {r.verdict} | {r.summary} |")
        say(f"\nreport: {args.report}" + ("" if why else f"\nchart: {args.chart}"))
        if rc == 0 and any(r.passed is False for r in results):
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
