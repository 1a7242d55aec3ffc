"""CPU use of an idle node: alone, and with 8 connected peers (all real daemons on
loopback, bootstrapped to the measured node, capacity refreshed every 5 s).

    python bench/idle_cpu.py [--peers 8] [--seconds 60] [--settle 60]

"With peers" is measured twice: just after the mesh formed (DHT self-lookups still
backing off from every 0.5 s toward every 5 min), and once it has settled (`--settle`
seconds later): the state a laptop sits in for hours.

Goal (issues 3 and 4): under 1% of one core in both cases.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness import temporary_mesh  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(pid: int, seconds: float) -> float:
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - c0) / (time.monotonic() - t0) * 100


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--settle", type=float, default=60)
    args = ap.parse_args()

    with temporary_mesh("qvacd-bench-idle-") as mesh:
        mesh.add("hub", "--no-preload")
        hub = mesh.start("hub")
        time.sleep(3)  # let start-up work finish
        alone = measure(hub.proc.pid, args.seconds)
        names = [f"p{i}" for i in range(args.peers)]
        for n in names:
            mesh.add(n, "--no-preload")
            mesh.start(n, bootstrap=["hub"])
        mesh.wait_peers("hub", names, timeout=60)
        time.sleep(5)
        forming = measure(hub.proc.pid, args.seconds)
        time.sleep(max(0.0, args.settle - args.seconds))
        settled = measure(hub.proc.pid, args.seconds)
        print(f"idle node alone:            {alone:.2f}% of one core over {args.seconds:.0f} s")
        print(f"idle node with {args.peers} peers, mesh just formed: {forming:.2f}% of one core"
              f" over {args.seconds:.0f} s")
        print(f"idle node with {args.peers} peers, settled:          {settled:.2f}% of one core"
              f" over {args.seconds:.0f} s  (goal < 1%)")


if __name__ == "__main__":
    main()
