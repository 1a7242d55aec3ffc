"""Two private LANs behind two NAT routers and a public segment with a relay, in namespaces.

    public  198.51.100.0/24 (bridge in namespace `wan`)
      relay   198.51.100.2            (the relay node: publicly reachable)
      nat1    198.51.100.11 -- LAN1 10.1.0.0/24: a 10.1.0.2, c 10.1.0.3
      nat2    198.51.100.12 -- LAN2 10.2.0.0/24: b 10.2.0.2

Each NAT router forwards its LAN out of `wan0` with nftables MASQUERADE (Linux keeps the
source port when it is free: endpoint-independent mapping, what hole punching needs) and
drops unsolicited inbound connections, as a home router's firewall does; replies and
connections matching a mapping its LAN opened pass. Hosts have a default route only to
their router; routers and the relay have no default route at all, so no packet can leave
the namespaces this lab made, and the host namespace holds none of its links.

Names are `qnat<pid>-<role>`; `down()` kills what runs inside and deletes them (all links
go with their namespaces); `cleanup_stale()` removes labs whose process is gone. Making
and removing namespaces is tests/harness/namespaces.py, shared with the mesh lab.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.harness import namespaces
from tests.harness.daemons import REPO, Daemon

PREFIX = "qnat"
RELAY_IP = "198.51.100.2"
NAT_WAN = {"nat1": "198.51.100.11", "nat2": "198.51.100.12"}
HOSTS = {"a": ("nat1", "10.1.0.2"), "c": ("nat1", "10.1.0.3"), "b": ("nat2", "10.2.0.2")}
LAN_GW = {"nat1": "10.1.0.1", "nat2": "10.2.0.1"}


class NatLabError(Exception):
    """The NAT lab cannot run here; one sentence saying why."""


def sh(*cmd: str, check: bool = True, timeout: float = 15) -> subprocess.CompletedProcess:
    return namespaces.sh(*cmd, check=check, timeout=timeout, error=NatLabError)


def why_not() -> str | None:
    """None if this process can build the NAT lab, else the reason (for a skip message)."""
    if sys.platform != "linux":
        return f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "building network namespaces needs root"
    for tool, pkg in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"the `{tool}` tool is missing (install {pkg})"
    try:
        with namespaces.throwaway_namespace(f"{PREFIX}{os.getpid()}-probe",
                                            error=NatLabError) as probe:
            r = sh("ip", "netns", "exec", probe, "nft", "add", "table", "ip", "nat", check=False)
            if r.returncode != 0:
                return f"nftables NAT does not work in a namespace here: {r.stderr.strip()}"
    except NatLabError as e:
        return f"cannot create a network namespace here ({e})"
    return None


_NAME = re.compile(rf"^{PREFIX}(\d+)-")


def cleanup_stale() -> list[str]:
    """Delete NAT-lab namespaces whose creating process is gone."""
    return namespaces.remove_stale_namespaces(_NAME, namespaces.pid_exists)


class NatLab:
    """Build with `up()`, tear down with `down()` (idempotent, best effort at every step)."""

    def __init__(self, *, firewall: bool = True) -> None:
        self.tag = f"{PREFIX}{os.getpid()}"
        self.firewall = firewall
        self.spaces = namespaces.Namespaces(error=NatLabError)

    def ns(self, role: str) -> str:
        return f"{self.tag}-{role}"

    def exec_prefix(self, role: str) -> list[str]:
        return namespaces.exec_prefix(self.ns(role))

    def _x(self, role: str, *cmd: str) -> None:
        self.spaces.run(self.ns(role), *cmd)

    def _plug(self, bridge_role: str, bridge: str, port: str, role: str, iface: str) -> None:
        namespaces.plug(bridge, port, self.ns(role), iface, bridge_ns=self.ns(bridge_role),
                        error=NatLabError)

    def up(self) -> None:
        cleanup_stale()
        try:
            self._up()
        except BaseException:
            self.down()
            raise

    def _up(self) -> None:
        for role in ("wan", "relay", "nat1", "nat2", *HOSTS):
            self.spaces.add(self.ns(role))
        namespaces.add_bridge("br0", ns=self.ns("wan"), error=NatLabError)
        # the public segment
        for i, (role, ip) in enumerate([("relay", RELAY_IP), *NAT_WAN.items()]):
            iface = "eth0" if role == "relay" else "wan0"
            self._plug("wan", "br0", f"p{i}", role, iface)
            self._x(role, "ip", "addr", "add", f"{ip}/24", "dev", iface)
            self._x(role, "ip", "link", "set", iface, "up")
        # the private LANs
        for nat, gw in LAN_GW.items():
            namespaces.add_bridge("br1", ns=self.ns(nat), error=NatLabError)
            self._x(nat, "ip", "addr", "add", f"{gw}/24", "dev", "br1")
            self._x(nat, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            rules = [
                "add table ip nat",
                "add chain ip nat post { type nat hook postrouting priority 100 ; }",
                'add rule ip nat post oifname "wan0" masquerade',
            ]
            if self.firewall:
                rules += [
                    "add table inet fw",
                    "add chain inet fw guard_in { type filter hook input priority 0 ; }",
                    'add rule inet fw guard_in iifname "wan0" ct state new drop',
                    "add chain inet fw guard_fwd { type filter hook forward priority 0 ; }",
                    'add rule inet fw guard_fwd iifname "wan0" ct state new drop',
                ]
            for rule in rules:
                self._x(nat, "nft", *rule.split(" "))
        for host, (nat, ip) in HOSTS.items():
            self._plug(nat, "br1", f"l{host}", host, "eth0")
            self._x(host, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
            self._x(host, "ip", "link", "set", "eth0", "up")
            self._x(host, "ip", "route", "add", "default", "via", LAN_GW[nat])

    def conntrack_count(self, nat: str) -> int:
        """Entries in a router's NAT table (a hint that traffic went through it)."""
        r = sh("ip", "netns", "exec", self.ns(nat), "cat", "/proc/sys/net/netfilter/nf_conntrack_count",
               check=False)
        return int(r.stdout.strip() or 0)

    def down(self) -> None:
        self.spaces.down()

    def leftovers(self) -> list[str]:
        return [n for n in namespaces.list_namespaces() if n.startswith(self.tag + "-")]

    def __enter__(self) -> NatLab:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


API_PORT = 11435
P2P_PORT = 4001


class NsNode(Daemon):
    """A real `qvacd start` inside a namespace; its API reached over a Unix socket that
    bench/lab/forward.py, run in the same namespace, relays to the daemon's port there."""

    own_session = True  # `ip netns exec` and what it runs are signalled as one group
    poll_interval = 0.2
    log_tail_chars = 5000

    def __init__(self, lab: NatLab, role: str, ip: str, data_dir: Path) -> None:
        from peers.identity import load_or_create_identity

        super().__init__(data_dir, port=API_PORT, log_path=data_dir.parent / f"{role}.log",
                         name=role)
        self.lab, self.role, self.ip = lab, role, ip
        self.peer_id = load_or_create_identity(data_dir).peer_id_str
        self.launcher = (*lab.exec_prefix(role), *Daemon.launcher)
        self.base_args = ("--no-mdns", "--listen", f"/ip4/{ip}/tcp/{P2P_PORT}")
        self.sock = str(data_dir.parent / f"{role}.sock")
        self.fwd: subprocess.Popen | None = None
        self.client = httpx.Client(transport=httpx.HTTPTransport(uds=self.sock),
                                   base_url="http://localhost", timeout=60)
        self.api = "http://localhost"  # the base URL of `client`; plain httpx cannot reach it

    @property
    def addr(self) -> str:
        return f"/ip4/{self.ip}/tcp/{P2P_PORT}/p2p/{self.peer_id}"

    def start(self, *args: str) -> NsNode:  # type: ignore[override]
        """Start with the lab's options plus `args` (each start gives its own)."""
        self.args = ["--api", f"127.0.0.1:{API_PORT}", *args]
        super().start(wait=False)
        if self.fwd is None:
            self.fwd = subprocess.Popen(
                [*self.lab.exec_prefix(self.role), sys.executable, "-m", "bench.lab.forward",
                 self.sock, str(API_PORT)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO, start_new_session=True)
            assert self.fwd.stdout is not None
            assert self.fwd.stdout.readline().strip() == b"ready"
        self.wait_ready(90)
        return self

    def probe(self) -> httpx.Response:
        return self.client.get("/qvac/status", timeout=2)

    def ready(self, r: httpx.Response) -> bool:
        return r.status_code == 200

    def status(self) -> dict:
        return self.client.get("/qvac/status").json()

    def peers(self) -> list[dict]:
        return self.client.get("/qvac/peers").json()["peers"]

    def peer(self, peer_id: str) -> dict | None:
        return next((p for p in self.peers() if p["peer_id"] == peer_id), None)

    def stop(self) -> None:  # type: ignore[override]
        try:
            super().stop()
        except subprocess.TimeoutExpired:
            pass  # SIGKILLed after 10 s: the lab's teardown goes on, as it always has

    def close(self) -> None:
        self.stop()
        if self.fwd is not None and self.fwd.poll() is None:
            os.killpg(self.fwd.pid, signal.SIGKILL)
            self.fwd.wait()
        self.client.close()


def tcp_probe(lab: NatLab, src: str, dst_ip: str, port: int = 9) -> bool:
    """Whether `src` can open a TCP connection to dst_ip:port (a refusal counts as reached)."""
    code = (
        "import socket,sys\n"
        "try:\n"
        f"    socket.create_connection(({dst_ip!r}, {port}), timeout=1)\n"
        "except ConnectionRefusedError:\n"
        "    pass\n"
        "except OSError:\n"
        "    sys.exit(1)\n"
    )
    return sh(*lab.exec_prefix(src), sys.executable, "-c", code, check=False).returncode == 0


if __name__ == "__main__":  # python -m bench.lab.nat: build, probe, tear down
    with NatLab() as lab:
        print("a -> relay", tcp_probe(lab, "a", RELAY_IP))
        print("b -> relay", tcp_probe(lab, "b", RELAY_IP))
        print("a -> c (same LAN)", tcp_probe(lab, "a", HOSTS["c"][1]))
        print("a -> nat2 (firewall: False)", tcp_probe(lab, "a", NAT_WAN["nat2"]))
        print("relay -> a's private address (False)", tcp_probe(lab, "relay", HOSTS["a"][1]))
    print("leftovers:", lab.leftovers())
