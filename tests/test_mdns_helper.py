"""Helper process for tests/test_mdns.py (holds no tests): one PeerNetwork with mDNS on.

Run as `python tests/test_mdns_helper.py [linger_s]` inside a network namespace. Prints
JSON lines on stdout: {"event": "ready"} after imports; waits for a line "go" on stdin
(so two helpers start their networks at the same moment); then {"event": "up", ...},
{"event": "saw", "peer_id", "elapsed_s", "seq"} once another node is in its table with a
verified capacity record, and finally {"event": "down", "threads": [...]} after a clean
shutdown, listing any threads still alive (zeroconf's must be gone).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import trio
from test_network_support import FakeCapacity

from peers.identity import Identity
from peers import PeerNetwork


def emit(**obj: object) -> None:
    print(json.dumps(obj), flush=True)


async def main(linger_s: float, wait_s: float) -> None:
    emit(event="ready")
    await trio.to_thread.run_sync(sys.stdin.readline)
    started = time.monotonic()
    net = PeerNetwork(
        Identity.generate(),
        capacity_source=FakeCapacity(),
        listen_addrs=["/ip4/0.0.0.0/tcp/0"],
        mdns=True,
    )
    async with net:
        emit(event="up", peer_id=net.peer_id_str, addrs=net.listen_addrs())
        with trio.move_on_after(wait_s):
            while True:
                fresh = [e for e in net.table if e.is_fresh(30) and e.record is not None]
                if fresh:
                    e = fresh[0]
                    emit(
                        event="saw",
                        peer_id=e.peer_id,
                        elapsed_s=time.monotonic() - started,
                        seq=e.record.seq,
                        source=e.source,
                    )
                    break
                await trio.sleep(0.01)
        await trio.sleep(linger_s)  # why: stay visible until the other side has seen us
    emit(
        event="down",
        threads=[
            t.name
            for t in threading.enumerate()
            if t is not threading.main_thread() and t.is_alive() and not t.daemon
        ],
    )


if __name__ == "__main__":
    trio.run(
        main,
        float(sys.argv[1]) if len(sys.argv) > 1 else 3.0,
        float(sys.argv[2]) if len(sys.argv) > 2 else 10.0,
    )
