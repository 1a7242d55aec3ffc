"""Linux network namespaces for the tests and labs that build networks (needs root and
iproute2): run `ip`, make namespaces and remove them with what runs inside, join them
with veth pairs and bridges, and find what a run that died left behind.

Used by bench/lab/netns.py (the mesh lab's LAN), bench/lab/nat.py (the NAT lab, which
tests/test_relay.py and bench/relay.py use) and tests/test_mdns.py (two namespaces on a
bridge). Each of those names its namespaces with its own prefix and the creating
process's pid, so runs never collide and a stale one can be told from a live one.

Every failure is raised as `error`, an exception class the caller chooses (the lab's
LabError, the NAT lab's NatLabError), so each caller's own `except` clauses keep working.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class NetnsError(Exception):
    """A namespace command failed; one sentence with the command and what it said."""


ErrorType = type[Exception]


def sh(*cmd: str, check: bool = True, timeout: float = 15,
       error: ErrorType = NetnsError) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise error(f"`{' '.join(cmd)}` failed: {(r.stderr or r.stdout).strip()}")
    return r


def nsexec(ns: str, *cmd: str, check: bool = True, timeout: float = 15,
           error: ErrorType = NetnsError) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *cmd, check=check, timeout=timeout, error=error)


def exec_prefix(ns: str) -> list[str]:
    """What runs a command inside namespace `ns`."""
    return ["ip", "netns", "exec", ns]


@contextmanager
def throwaway_namespace(name: str, error: ErrorType = NetnsError,
                        timeout: float = 15) -> Iterator[str]:
    """A namespace that exists only inside the with-block: to probe what works here.
    Raises `error` if it cannot be made."""
    try:
        sh("ip", "netns", "add", name, error=error, timeout=timeout)
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


def list_namespaces() -> list[str]:
    return [ln.split()[0] for ln in sh("ip", "netns", "list", check=False).stdout.splitlines()
            if ln.split()]


def list_links() -> list[str]:
    """Names of this namespace's links, without the `@peer` of a veth."""
    names = []
    for line in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            names.append(parts[1].strip().split("@")[0])
    return names


def ns_pids(ns: str) -> list[int]:
    r = sh("ip", "netns", "pids", ns, check=False)
    return [int(x) for x in r.stdout.split() if x.isdigit()]


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def kill_processes_in(ns: str) -> None:
    """SIGKILL everything that runs inside namespace `ns`."""
    kill_pids(ns_pids(ns))


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def remove_stale_namespaces(name: re.Pattern[str], alive: Callable[[int], bool]) -> list[str]:
    """Delete each namespace whose name matches `name` (group 1: the creator's pid) and
    whose creator is not `alive`, after killing what runs inside; returns their names."""
    removed = []
    for ns in list_namespaces():
        m = name.match(ns)
        if not m or alive(int(m.group(1))):
            continue
        kill_processes_in(ns)
        sh("ip", "netns", "del", ns, check=False)
        removed.append(ns)
    return removed


def add_bridge(name: str, *, ns: str | None = None, flood_multicast: bool = False,
               error: ErrorType = NetnsError, timeout: float = 15) -> None:
    """A Linux bridge, up, in namespace `ns` (None: this one). `flood_multicast` turns
    snooping off, so that mDNS reaches every port even before IGMP joins are seen."""
    ip = ["ip", "-n", ns] if ns else ["ip"]
    sh(*ip, "link", "add", name, "type", "bridge", error=error, timeout=timeout)
    if flood_multicast:
        sh(*ip, "link", "set", name, "type", "bridge", "mcast_snooping", "0", error=error,
           timeout=timeout)
    sh(*ip, "link", "set", name, "up", error=error, timeout=timeout)


def plug(bridge: str, port: str, ns: str, iface: str, *, bridge_ns: str | None = None,
         error: ErrorType = NetnsError, timeout: float = 15) -> None:
    """Join namespace `ns` to `bridge` with a veth pair: `port` on the bridge (up, in
    `bridge_ns`, None: this namespace) and `iface` inside `ns` (down, no address yet)."""
    ip = ["ip", "-n", bridge_ns] if bridge_ns else ["ip"]
    sh(*ip, "link", "add", port, "type", "veth", "peer", "name", iface, "netns", ns, error=error,
       timeout=timeout)
    sh(*ip, "link", "set", port, "master", bridge, error=error, timeout=timeout)
    sh(*ip, "link", "set", port, "up", error=error, timeout=timeout)


class Namespaces:
    """The namespaces one run made. `add()` makes one (loopback up); `down()` kills what
    runs inside each and deletes them, newest first: best effort at every step, as it
    runs after any failure. `timeout` bounds each `ip` command it runs."""

    def __init__(self, error: ErrorType = NetnsError, timeout: float = 15) -> None:
        self.error = error
        self.timeout = timeout
        self.created: list[str] = []

    def add(self, ns: str) -> str:
        sh("ip", "netns", "add", ns, error=self.error, timeout=self.timeout)
        self.created.append(ns)
        self.run(ns, "ip", "link", "set", "lo", "up")
        return ns

    def run(self, ns: str, *cmd: str, check: bool = True,
            timeout: float | None = None) -> subprocess.CompletedProcess:
        return nsexec(ns, *cmd, check=check, timeout=timeout or self.timeout, error=self.error)

    def kill_processes(self) -> None:
        for ns in self.created:
            kill_processes_in(ns)

    def delete(self) -> None:
        for ns in reversed(self.created):
            sh("ip", "netns", "del", ns, check=False)
        self.created.clear()

    def down(self) -> None:
        self.kill_processes()
        self.delete()
