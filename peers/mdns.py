"""LAN discovery with mDNS / DNS-SD, using zeroconf directly.

Each node registers `<peer id>._qvac._tcp.local.` with TXT properties `id` (its peer id)
and `a0`..`a7` (its TCP multiaddrs, without /p2p), and browses for the same type.

zeroconf runs its own threads and calls the browser handler on one of them. The handler
only hands the event to trio with `TrioToken.run_sync_soon`, which never blocks: a
blocking hand-off (`trio.from_thread.run_sync`) could deadlock at shutdown, when trio
waits for zeroconf's threads while one of them waits for trio. All blocking zeroconf calls
(register, resolve, close) run in trio worker threads.

Nothing here is trusted: an mDNS answer only says "peer X might be at these addresses".
The Noise handshake proves the peer id on dial, and the capacity record is verified.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import Any

import multiaddr
import trio
from libp2p.peer.id import ID
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

log = logging.getLogger("qvacd.peers.mdns")

SERVICE_TYPE = "_qvac._tcp.local."
MAX_TXT_ADDRS = 8
RESOLVE_TIMEOUT_MS = 1500
CLOSE_TIMEOUT_S = 3.0

PeerFound = Callable[[str, list[str]], None]


def _txt_addrs(addrs: list[str]) -> dict[str, str]:
    return {f"a{i}": a for i, a in enumerate(addrs[:MAX_TXT_ADDRS]) if len(a) <= 200}


def parse_service_info(info: ServiceInfo) -> tuple[str, list[str]] | None:
    """(peer id, multiaddrs) announced by `info`, or None if it is not a valid qvac node."""
    props: dict[bytes, bytes | None] = info.properties or {}
    raw_id = props.get(b"id")
    if not raw_id:
        return None
    try:
        peer_id = ID.from_base58(raw_id.decode("ascii")).to_base58()
    except Exception:
        return None
    addrs: list[str] = []
    for i in range(MAX_TXT_ADDRS):
        raw = props.get(f"a{i}".encode())
        if not raw:
            continue
        try:
            m = multiaddr.Multiaddr(raw.decode("ascii"))
            protos = [p.name for p in m.protocols()]
        except Exception:
            continue
        if len(protos) == 2 and protos[0] in ("ip4", "ip6") and protos[1] == "tcp":
            addrs.append(str(m))
    if not addrs and info.port:
        # Fallback for an announcer without TXT addrs: its A/AAAA records and SRV port.
        for ip in info.parsed_addresses():
            v = "ip6" if ":" in ip else "ip4"
            addrs.append(f"/{v}/{ip}/tcp/{info.port}")
    return (peer_id, addrs) if addrs else None


class MdnsService:
    """Announce this node and report others through `on_peer(peer_id, addrs)` (trio thread)."""

    def __init__(
        self,
        peer_id: str,
        addrs: Callable[[], list[str]],
        on_peer: PeerFound,
        *,
        service_type: str = SERVICE_TYPE,
    ) -> None:
        self.peer_id = peer_id
        self._addrs = addrs
        self._on_peer = on_peer
        self.service_type = service_type
        self.zc: Zeroconf | None = None
        self.found = 0

    def _announce_addrs(self) -> list[str]:
        """Our multiaddrs worth announcing on a LAN: loopback only if there is nothing else."""
        out, loop = [], []
        for a in self._addrs():
            m = multiaddr.Multiaddr(a)
            protos = [p.name for p in m.protocols()]
            if len(protos) < 2 or protos[0] not in ("ip4", "ip6") or protos[1] != "tcp":
                continue
            base = (
                f"/{protos[0]}/{m.value_for_protocol(protos[0])}/tcp/{m.value_for_protocol('tcp')}"
            )
            ip = ipaddress.ip_address(m.value_for_protocol(protos[0]))
            (loop if ip.is_loopback else out).append(base)
        return out or loop

    def _service_info(self) -> ServiceInfo:
        addrs = self._announce_addrs()
        if not addrs:
            raise RuntimeError("no bound TCP address to announce over mDNS")
        first = multiaddr.Multiaddr(addrs[0])
        port = int(first.value_for_protocol("tcp"))
        ips = []
        for a in addrs:
            m = multiaddr.Multiaddr(a)
            if m.protocols()[0].name == "ip4":
                ips.append(socket.inet_aton(m.value_for_protocol("ip4")))
        props = {"id": self.peer_id, **_txt_addrs(addrs)}
        return ServiceInfo(
            self.service_type,
            f"{self.peer_id}.{self.service_type}",
            addresses=ips,
            port=port,
            properties=props,
            server=f"qvac-{self.peer_id[-12:].lower()}.local.",
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Announce and browse until cancelled; then unregister and close zeroconf."""
        token = trio.lowlevel.current_trio_token()
        send, recv = trio.open_memory_channel[str](256)

        def on_change(
            zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
        ) -> None:
            # zeroconf's thread: hand over and return at once, never block here.
            if state_change not in (ServiceStateChange.Added, ServiceStateChange.Updated):
                return

            def deliver() -> None:
                try:
                    send.send_nowait(name)
                except (trio.WouldBlock, trio.ClosedResourceError):
                    log.debug("mdns event for %s dropped (queue full or closed)", name)

            try:
                token.run_sync_soon(deliver)
            except trio.RunFinishedError:
                pass

        info = self._service_info()
        zc = await trio.to_thread.run_sync(lambda: Zeroconf(ip_version=IPVersion.V4Only))
        self.zc = zc
        browser: ServiceBrowser | None = None
        try:
            # Browse first so answers to our queries flow while our own probing runs.
            browser = ServiceBrowser(zc, self.service_type, handlers=[on_change])
            # why cooperating_responders: the instance name is our peer id, unique by
            # construction, so the RFC 6762 conflict probing (~1.2 s) would buy nothing;
            # skipping it is what gets two nodes to see each other well under 2 s.
            await trio.to_thread.run_sync(
                lambda: zc.register_service(info, cooperating_responders=True)
            )
            log.info(
                "mdns announcing peer_id=%s type=%s addrs=%s",
                self.peer_id,
                self.service_type,
                ",".join(self._announce_addrs()),
            )
            task_status.started()
            async with trio.open_nursery() as nursery:
                async for name in recv:
                    nursery.start_soon(self._resolve, zc, name)
        finally:
            send.close()
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S) as scope:
                await trio.to_thread.run_sync(self._close, zc, browser, abandon_on_cancel=True)
            if scope.cancelled_caught:
                log.warning("zeroconf did not close within %.0f s; left its thread to finish"
                            " on its own", CLOSE_TIMEOUT_S)
            self.zc = None

    @staticmethod
    def _close(zc: Zeroconf, browser: ServiceBrowser | None) -> None:
        try:
            if browser is not None:
                browser.cancel()
            zc.unregister_all_services()
        finally:
            zc.close()
        log.info("mdns stopped")

    async def _resolve(self, zc: Zeroconf, name: str) -> None:
        info: Any = await trio.to_thread.run_sync(
            lambda: zc.get_service_info(self.service_type, name, RESOLVE_TIMEOUT_MS),
            abandon_on_cancel=True,
        )
        if info is None:
            log.debug("mdns could not resolve %s", name)
            return
        parsed = parse_service_info(info)
        if parsed is None:
            log.debug("mdns ignoring %s: no valid peer id or addresses", name)
            return
        peer_id, addrs = parsed
        if peer_id == self.peer_id:
            return
        self.found += 1
        log.debug("mdns found peer_id=%s addrs=%s", peer_id, ",".join(addrs))
        self._on_peer(peer_id, addrs)
