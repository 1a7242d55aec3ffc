"""The lab's network: N network namespaces on one LAN segment, with per-host impairment.

Every host is a network namespace `qlab<pid>n<i>` with one interface `eth0` holding
10.77.0.<i+1>/24, a route for multicast (mDNS) and nothing else: no default route, so no
packet can leave the segment the lab made. The host namespace gets no address on that
segment at all; the lab reaches each daemon's API through a Unix socket forwarder that
runs inside the namespace (bench/lab/forward.py), so API traffic never crosses the
impaired links.

Two ways to join the namespaces, chosen by probing the kernel (`--plane auto`):

- `bridge`: a veth pair per host, host ends enslaved to a Linux bridge `qlab<pid>br`;
  impairment is `tc qdisc replace dev eth0 root netem delay D jitter J loss L` inside
  the host's namespace (netem on a host's egress, as on a real slow link).
- `switch`: for kernels without sch_netem (many cloud and microVM kernels lack it), a TAP
  device per host, joined by a learning Ethernet switch in user space (bench/lab/switch.py)
  that applies the same netem semantics (delay, jitter without reordering, random loss)
  to the frames each host sends.

Either way a link is cut with `ip link set eth0 down` inside the host's namespace.

Names carry the lab's pid, so two labs never collide and a later run can tell a stale
lab (its pid is gone) from a running one: `cleanup_stale()` removes only stale ones.
Making and removing namespaces is tests/harness/namespaces.py, shared with the NAT lab
and the tests; this module is the lab's own shape of network on top of it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.harness import namespaces

PREFIX = "qlab"
SUBNET = "10.77.0"
RUN_DIR = Path("/run/qvac-lab") if os.path.isdir("/run") else Path("/tmp/qvac-lab-run")
REPO = Path(__file__).resolve().parent.parent.parent


class LabError(Exception):
    """The lab cannot run here; one sentence that says why and what to do."""


def sh(*cmd: str, check: bool = True, timeout: float = 15) -> subprocess.CompletedProcess:
    return namespaces.sh(*cmd, check=check, timeout=timeout, error=LabError)


def nsexec(ns: str, *cmd: str, check: bool = True, timeout: float = 15) -> subprocess.CompletedProcess:
    return namespaces.nsexec(ns, *cmd, check=check, timeout=timeout, error=LabError)


def preflight() -> None:
    """Raise LabError unless this process can build namespaces."""
    if sys.platform != "linux":
        raise LabError("the mesh lab needs Linux network namespaces; this is " + sys.platform)
    if os.geteuid() != 0:
        raise LabError("the mesh lab needs root to create network namespaces:"
                       " run it with sudo (or as root)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise LabError(f"the mesh lab needs the `{tool}` tool: install iproute2")
    try:
        with namespaces.throwaway_namespace(f"{PREFIX}{os.getpid()}probe", error=LabError):
            pass
    except (LabError, OSError) as e:
        raise LabError(f"cannot create a network namespace here ({e}); run the lab on a"
                       " Linux host or a privileged container") from e


def netem_missing() -> str | None:
    """None if this kernel has sch_netem, else why not, in one line (probed with
    `tc qdisc add ... netem` on a dummy link, else loopback, in a throwaway namespace)."""
    try:
        with namespaces.throwaway_namespace(f"{PREFIX}{os.getpid()}netem",
                                            error=LabError) as probe:
            nsexec(probe, "ip", "link", "add", "d0", "type", "dummy", check=False)
            r = nsexec(probe, "tc", "qdisc", "add", "dev", "d0", "root", "netem", "delay",
                       "1ms", check=False)
            if r.returncode != 0:
                # no dummy driver: try loopback, which always exists
                nsexec(probe, "ip", "link", "set", "lo", "up", check=False)
                r = nsexec(probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay",
                           "1ms", check=False)
            if r.returncode == 0:
                return None
            said = " ".join((r.stderr or r.stdout or "").split())[:120]
            return (f"this kernel has no sch_netem (`tc qdisc add ... netem` in a namespace:"
                    f" {said or f'exit {r.returncode}'}); load it with `modprobe sch_netem`"
                    " or use --plane switch")
    except LabError as e:
        return f"cannot probe sch_netem: {e}"


def netem_available() -> bool:
    """Whether this kernel has sch_netem."""
    return netem_missing() is None


def tun_available() -> bool:
    return os.path.exists("/dev/net/tun")


# ---- stale labs --------------------------------------------------------------------------

_NAME = re.compile(rf"^{PREFIX}(\d+)")


def _pid_alive(pid: int) -> bool:
    if not namespaces.pid_exists(pid):
        return False
    try:  # a recycled pid is not our lab
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"bench.lab" in cmd or b"bench/lab" in cmd or b"test_lab" in cmd


def cleanup_stale(log=print) -> list[str]:
    """Remove namespaces, links and state of earlier labs whose process is gone."""
    removed = namespaces.remove_stale_namespaces(_NAME, _pid_alive)
    for name in namespaces.list_links():
        m = _NAME.match(name)
        if m and not _pid_alive(int(m.group(1))):
            sh("ip", "link", "del", name, check=False)
            removed.append(name)
    if RUN_DIR.is_dir():
        for f in RUN_DIR.glob("*.json"):
            try:
                st = json.loads(f.read_text())
                pid = int(st["pid"])
            except (OSError, ValueError, KeyError):
                f.unlink(missing_ok=True)
                continue
            if _pid_alive(pid):
                continue
            namespaces.kill_pids([p for p in st.get("procs", []) if isinstance(p, int)])
            work = st.get("work")
            if work and Path(work).name.startswith("qvac-lab-"):
                shutil.rmtree(work, ignore_errors=True)
            f.unlink(missing_ok=True)
            removed.append(f"state {f.name}")
    if removed:
        log(f"cleaned up a stale lab: {', '.join(removed)}")
    return removed


# ---- the LAN -----------------------------------------------------------------------------


@dataclass
class Impair:
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    rate_mbit: float = 0.0  # the host's upload rate cap; 0 = none

    def __str__(self) -> str:
        if not (self.delay_ms or self.jitter_ms or self.loss_pct or self.rate_mbit):
            return "clean"
        s = f"{self.delay_ms:g} ms"
        if self.jitter_ms:
            s += f" ±{self.jitter_ms:g} ms"
        if self.loss_pct:
            s += f", {self.loss_pct:g}% loss"
        if self.rate_mbit:
            s += f", up {self.rate_mbit:g} Mbit/s"
        return s


class Lan:
    """N namespaces on one segment. `up()` builds it, `down()` removes all of it (idempotent)."""

    def __init__(self, n: int, plane: str = "auto", log=print) -> None:
        self.n = n
        self.tag = f"{PREFIX}{os.getpid()}"
        self.ns = [f"{self.tag}n{i}" for i in range(n)]
        self.ips = [f"{SUBNET}.{i + 1}" for i in range(n)]
        self.log = log
        self.plane = plane
        self.bridge = f"{self.tag}br"
        self.switch: subprocess.Popen | None = None
        self.impairs = [Impair() for _ in range(n)]
        self.spaces = namespaces.Namespaces(error=LabError)
        self.created_links: list[str] = []

    # -- build -------------------------------------------------------------------------

    def up(self) -> None:
        if self.plane == "auto":
            self.plane = "bridge" if netem_available() else "switch"
        if self.plane == "switch" and not tun_available():
            raise LabError("this kernel has no sch_netem and no /dev/net/tun: the lab cannot"
                           " inject latency here; load sch_netem (modprobe sch_netem)")
        if self.plane == "bridge" and (why := netem_missing()) is not None:
            raise LabError(f"plane bridge skipped: {why}")
        for ns in self.ns:
            self.spaces.add(ns)
        if self.plane == "bridge":
            self._up_bridge()
        else:
            self._up_switch()
        for i, ns in enumerate(self.ns):
            nsexec(ns, "ip", "addr", "add", f"{self.ips[i]}/24", "dev", "eth0")
            self._link_up(i)

    def _up_bridge(self) -> None:
        # the bridge is created here, so recorded before a later step can fail
        self.created_links.append(self.bridge)
        namespaces.add_bridge(self.bridge, flood_multicast=True, error=LabError)
        for i, ns in enumerate(self.ns):
            host_end = f"{self.tag}v{i}"
            self.created_links.append(host_end)
            namespaces.plug(self.bridge, host_end, ns, "eth0", error=LabError)

    def _up_switch(self) -> None:
        taps = [f"{self.tag}t{i}" for i in range(self.n)]
        self.switch = subprocess.Popen(
            [sys.executable, "-m", "bench.lab.switch", *taps],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=REPO, start_new_session=True)
        line = self.switch.stdout.readline().strip()
        if line != "ready":
            err = self.switch.stderr.read() if self.switch.poll() is not None else ""
            raise LabError(f"the user-space switch did not start: {line} {err}".strip())
        for i, ns in enumerate(self.ns):
            sh("ip", "link", "set", taps[i], "netns", ns)
            nsexec(ns, "ip", "link", "set", taps[i], "name", "eth0")

    def _link_up(self, i: int) -> None:
        ns = self.ns[i]
        nsexec(ns, "ip", "link", "set", "eth0", "up")
        # No default route (nothing may leave the lab); multicast needs a route to be sent.
        # IPv4 drops routes of a device that goes down, so this is redone on every up.
        nsexec(ns, "ip", "route", "replace", "224.0.0.0/4", "dev", "eth0")

    # -- control -----------------------------------------------------------------------

    def impair(self, i: int, imp: Impair) -> None:
        """netem on host i's egress: every frame it sends is delayed/jittered/dropped."""
        self.impairs[i] = imp
        if self.plane == "bridge":
            ns = self.ns[i]
            if not (imp.delay_ms or imp.jitter_ms or imp.loss_pct or imp.rate_mbit):
                nsexec(ns, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
                return
            args = ["delay", f"{imp.delay_ms}ms"]
            if imp.jitter_ms:
                args.append(f"{imp.jitter_ms}ms")
            if imp.loss_pct:
                args += ["loss", f"{imp.loss_pct}%"]
            if imp.rate_mbit:
                args += ["rate", f"{imp.rate_mbit}mbit"]
            nsexec(ns, "tc", "qdisc", "replace", "dev", "eth0", "root", "netem", *args)
        else:
            self._switch_cmd({"port": i, "delay_ms": imp.delay_ms, "jitter_ms": imp.jitter_ms,
                              "loss_pct": imp.loss_pct, "rate_mbit": imp.rate_mbit})

    def impair_all(self, imp: Impair) -> None:
        for i in range(self.n):
            self.impair(i, imp)

    def link(self, i: int, up: bool) -> None:
        if up:
            self._link_up(i)
        else:
            nsexec(self.ns[i], "ip", "link", "set", "eth0", "down")

    def switch_stats(self) -> dict:
        if self.plane != "switch":
            return {}
        return self._switch_cmd({"cmd": "stats"})

    def _switch_cmd(self, obj: dict) -> dict:
        assert self.switch is not None and self.switch.stdin and self.switch.stdout
        if self.switch.poll() is not None:
            raise LabError(f"the user-space switch died (exit {self.switch.returncode})")
        self.switch.stdin.write(json.dumps(obj) + "\n")
        self.switch.stdin.flush()
        reply = json.loads(self.switch.stdout.readline())
        if "error" in reply:
            raise LabError(f"switch: {reply['error']}")
        return reply

    def exec_prefix(self, i: int) -> list[str]:
        return namespaces.exec_prefix(self.ns[i])

    # -- teardown ----------------------------------------------------------------------

    def down(self) -> None:
        """Kill whatever still runs in our namespaces, delete them and our links. Best effort
        at every step: this runs after any failure, Ctrl-C included."""
        self.spaces.kill_processes()
        if self.switch is not None and self.switch.poll() is None:
            try:
                os.killpg(self.switch.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.switch.wait()
        self.spaces.delete()
        for link in self.created_links:
            sh("ip", "link", "del", link, check=False)
        # veth host ends vanish with their namespace peers; make sure nothing is left
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and self.leftovers():
            time.sleep(0.1)
        self.created_links.clear()

    def leftovers(self) -> list[str]:
        def ours(name: str) -> bool:
            m = _NAME.match(name)
            return bool(m) and int(m.group(1)) == os.getpid()

        return [name for name in namespaces.list_namespaces() + namespaces.list_links()
                if ours(name)]
