"""mDNS discovery across two network namespaces joined by a bridge (needs root + `ip`).

Each namespace runs tests/test_mdns_helper.py: a PeerNetwork with mdns=True, listening on
0.0.0.0, with no bootstrap. They must find each other by mDNS alone and hold each other's
verified capacity record within 2 s of starting their networks.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peers.mdns import parse_service_info
from tests.harness import namespaces

HELPER = Path(__file__).resolve().parent / "test_mdns_helper.py"
REPO = HELPER.parent.parent


def _netns_available() -> str | None:
    """None if we can build namespaces here, else why not."""
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs the `ip` tool (iproute2)"
    try:
        with namespaces.throwaway_namespace(f"qvac-probe-{secrets.token_hex(3)}", timeout=10):
            pass
    except (namespaces.NetnsError, OSError) as exc:
        return f"cannot create a network namespace here: {exc}"
    return None


class Bridge:
    """Two namespaces, each with a veth into one bridge in the root namespace."""

    def __init__(self) -> None:
        sfx = secrets.token_hex(2)
        self.br = f"qbr{sfx}"
        self.ns = [f"qvac-{sfx}-a", f"qvac-{sfx}-b"]
        self.veth = [f"qv{sfx}a", f"qv{sfx}b"]
        net = 64 + secrets.randbelow(128)
        self.ips = [f"10.{net}.77.1", f"10.{net}.77.2"]
        self.spaces = namespaces.Namespaces(timeout=10)

    def up(self) -> None:
        namespaces.add_bridge(self.br, flood_multicast=True, timeout=10)
        for ns, veth, ip in zip(self.ns, self.veth, self.ips, strict=True):
            self.spaces.add(ns)
            namespaces.plug(self.br, veth, ns, veth + "p", timeout=10)
            self.spaces.run(ns, "ip", "addr", "add", f"{ip}/24", "dev", veth + "p")
            self.spaces.run(ns, "ip", "link", "set", veth + "p", "up")
            self.spaces.run(ns, "ip", "route", "add", "224.0.0.0/4", "dev", veth + "p")

    def down(self) -> None:
        # Best effort, every step: this runs in a finally after any failure.
        for veth in self.veth:
            subprocess.run(["ip", "link", "del", veth], capture_output=True)
        self.spaces.down()
        subprocess.run(["ip", "link", "del", self.br], capture_output=True)


def _read_event(proc: subprocess.Popen, deadline: float) -> dict:
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(
                f"helper exited early: {proc.stderr.read() if proc.stderr else ''}"
            )
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError("helper timed out")


def test_two_namespaces_find_each_other_by_mdns_within_2s() -> None:
    why = _netns_available()
    if why:
        pytest.skip(why)
    bridge = Bridge()
    procs: list[subprocess.Popen] = []
    try:
        bridge.up()
        for ns in bridge.ns:
            procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", ns, sys.executable, str(HELPER), "3", "8"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    cwd=REPO,
                )
            )
        deadline = time.monotonic() + 60
        for p in procs:
            assert _read_event(p, deadline)["event"] == "ready"
        for p in procs:  # start both networks at the same moment
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        deadline = time.monotonic() + 20
        ups = [_read_event(p, deadline) for p in procs]
        assert [u["event"] for u in ups] == ["up", "up"]
        # Each announces its namespace address, never 0.0.0.0.
        for u, ip in zip(ups, bridge.ips, strict=True):
            assert any(f"/ip4/{ip}/tcp/" in a for a in u["addrs"]), u
            assert not any("0.0.0.0" in a for a in u["addrs"])
        saws = [_read_event(p, deadline) for p in procs]
        assert [s["event"] for s in saws] == ["saw", "saw"], saws
        assert saws[0]["peer_id"] == ups[1]["peer_id"]
        assert saws[1]["peer_id"] == ups[0]["peer_id"]
        for s in saws:
            assert s["elapsed_s"] < 2.0, saws
        downs = [_read_event(p, deadline) for p in procs]
        for d in downs:
            assert d["event"] == "down"
            assert not [t for t in d["threads"] if "zeroconf" in t.lower()], d
        for p in procs:
            assert p.wait(10) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        bridge.down()
    assert not any(
        ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for ns in bridge.ns
    )


def test_parse_service_info_rejects_junk() -> None:
    from zeroconf import ServiceInfo

    from peers.identity import Identity

    pid = Identity.generate().peer_id_str
    good = ServiceInfo(
        "_qvac._tcp.local.",
        f"{pid}._qvac._tcp.local.",
        port=4001,
        properties={
            "id": pid,
            "a0": "/ip4/10.0.0.2/tcp/4001",
            "a1": "/dns4/evil/tcp/1",
            "a2": "not a multiaddr",
        },
    )
    assert parse_service_info(good) == (pid, ["/ip4/10.0.0.2/tcp/4001"])
    bad_id = ServiceInfo(
        "_qvac._tcp.local.",
        "x._qvac._tcp.local.",
        port=4001,
        properties={"id": "not-a-peer-id", "a0": "/ip4/10.0.0.2/tcp/4001"},
    )
    assert parse_service_info(bad_id) is None
    no_addr = ServiceInfo(
        "_qvac._tcp.local.", "y._qvac._tcp.local.", port=0, properties={"id": pid}
    )
    assert parse_service_info(no_addr) is None
