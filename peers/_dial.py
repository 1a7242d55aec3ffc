"""Dialling: getting a connection to a peer we know addresses of.

Order of a dial: the direct addresses we were just given (bootstrap, mDNS, a fresh
record) first, then the peerstore's, one by one; then a relay, for a peer behind NAT.
Two py-libp2p 0.8.1 behaviours are worked around here, each with its measured reason in
its docstring: `Swarm.dial_peer` tries only the first TCP address in the peerstore
(`Dialler._dial_each`), and the swarm refuses every dial for 60 s after one failed
(`forget_failed_dial`).

Addresses learnt from records, the DHT and mDNS go into the libp2p peerstore here too
(`Dialler.learn_addrs`), so later dials, ours or the library's, find them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import multiaddr
import trio
from libp2p.abc import INetwork
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

from peers._errors import NetworkError, PeerUnavailable
from peers._limits import NetworkLimits
from peers.guard import PeerGuard
from peers.host import Host
from peers.identity import as_id
from peers.relay import RelayService, is_circuit
from peers.table import PeerTable

log = logging.getLogger("qvacd.peers.network")

Spawn = Callable[..., None]  # (async fn, *args): start it in the network's nursery

_PEERSTORE_TTL = 3600
WARM_INTERVAL_S = 5.0  # how often disconnected trusted providers are redialled


def direct_addrs(addrs: Iterable[str], peer: str) -> list[multiaddr.Multiaddr]:
    """Address strings of `peer` as multiaddrs without its /p2p suffix; bad ones skipped."""
    out = []
    for a in addrs:
        try:
            m = multiaddr.Multiaddr(a)
            if "p2p" in [p.name for p in m.protocols()]:
                m = m.decapsulate(multiaddr.Multiaddr(f"/p2p/{peer}"))
            out.append(m)
        except Exception:
            continue
    return out


def forget_failed_dial(swarm: INetwork, pid: ID) -> None:
    """Drop `pid` from py-libp2p's negative dial cache before one of our own dials.

    why: the library refuses any dial for 60 s after one that failed, so a peer that
    restarted (kill -9, reboot, laptop lid) stayed unreachable for a minute even
    though our bootstrap loop, peer table and router already pace retries with their
    own back-off (the delegation bench lost its failover target this way)."""
    cache = getattr(swarm, "_negative_peer_cache", None)
    if cache is not None:
        with contextlib.suppress(Exception):
            cache.evict(str(pid))


async def _never_start() -> None:
    return None


def disable_library_autoconnect(swarm: INetwork) -> None:
    """Keep py-libp2p's AutoConnector from ever starting on this swarm (instance only).

    why: it dials every peer in the peerstore, every 10 s while we have fewer than 50
    connections, until we have 100 (its watermarks), past everything that decides our
    dials: `max_auto_connect`, the peer table's back-off, bans, relays. Every peer a DHT
    answer names lands in the peerstore, so in a mesh each node dialled every other
    (measured, bench/dht_lookup.py: 16 nodes in one process, lookup p95 229 ms with it,
    34 ms without). qvacd dials on its own: bootstrap peers kept connected
    (`bootstrap_loop`), mDNS peers, trusted providers kept warm (`keep_providers_warm`),
    and DHT-found peers up to `max_auto_connect` by the discovery loop, which a lost
    connection wakes (PeerNetwork._on_disconnected)."""
    connector = getattr(swarm, "auto_connector", None)
    if connector is None:
        return
    # why start, not stop: the swarm starts it when it runs; a connector never started
    # also ignores the swarm's on-disconnect trigger (maybe_connect returns at once)
    connector.start = _never_start


class Dialler:
    """Dials peers for the network: bootstrap, mDNS, DHT-found, manual, stream opens."""

    def __init__(
        self,
        host: Host,
        table: PeerTable,
        guard: PeerGuard,
        relay: RelayService,
        limits: NetworkLimits,
        *,
        spawn: Spawn,
        on_already_connected: Callable[[str], None],
        on_told_about_dialled: Callable[[], None],
    ) -> None:
        self.host = host
        self._libp2p = host.libp2p
        self.peer_id_str = host.peer_id_str
        self.table = table
        self.guard = guard
        self.relay = relay
        self.limits = limits
        self._spawn = spawn
        # why: a peer already connected still gets its record re-fetched when told about
        self._on_already_connected = on_already_connected
        # a peer we were told about (not DHT-found) was dialled: it knows others
        self._on_told_about_dialled = on_told_about_dialled
        self.inflight: set[str] = set()
        self._learnt_addrs: dict[str, tuple[tuple[str, ...], float]] = {}

    def is_connected(self, peer_id: str | ID) -> bool:
        return bool(self._libp2p.get_network().connections.get(as_id(peer_id)))

    def forget_failed_dial(self, pid: ID) -> None:
        forget_failed_dial(self._libp2p.get_network(), pid)

    def learn_addrs(self, peer: str, addrs: Iterable[str], ttl: int = _PEERSTORE_TTL) -> None:
        addrs = tuple(addrs)
        # why the cache: the same signed record arrives every refresh, and parsing
        # multiaddrs is slow in py-multiaddr (it was ~12% of a busy node's CPU); re-add
        # only when they change or half their peerstore TTL has passed
        now = time.monotonic()
        seen = self._learnt_addrs.get(peer)
        if not addrs or (seen is not None and seen[0] == addrs and now - seen[1] < ttl / 2):
            return
        self._learnt_addrs[peer] = (addrs, now)
        if len(self._learnt_addrs) > 4 * self.table.max_peers:
            self._learnt_addrs.clear()
        maddrs = direct_addrs(addrs, peer)
        if maddrs and peer != self.peer_id_str:
            self._libp2p.get_peerstore().add_addrs(as_id(peer), maddrs, ttl)

    async def connect(self, addr: str, *, source: str = "manual") -> str:
        """Dial a full multiaddr with /p2p/<id>; returns the peer id. PeerUnavailable on failure."""
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception:
            raise NetworkError(f"bad peer address {addr!r}; expected .../p2p/<peer id>") from None
        peer = info.peer_id.to_base58()
        if not await self.dial(peer, [str(a) for a in info.addrs], source):
            entry = self.table.get(peer)
            raise PeerUnavailable(f"cannot reach {peer}: {entry.last_error if entry else ''}")
        return peer

    def _direct_dial_order(self, pid: ID, addrs: Sequence[str]) -> list[multiaddr.Multiaddr]:
        """Direct addresses to try: the ones we were just given (bootstrap, mDNS, a
        fresh record) first, then the peerstore's; at most 4."""
        out: list[multiaddr.Multiaddr] = []
        seen: set[str] = set()
        given = direct_addrs(addrs, pid.to_base58())
        for m in [*given, *self._libp2p.get_peerstore().addrs(pid)]:
            if is_circuit(m) or str(m) in seen:
                continue
            seen.add(str(m))
            out.append(m)
        return out[:4]

    async def _dial_each(self, pid: ID, maddrs: Sequence[multiaddr.Multiaddr]) -> None:
        """Dial the addresses one by one until one connects.

        why not host.connect(): py-libp2p 0.8.1's Swarm.dial_peer tries one address per
        transport class, the first TCP one in its peerstore; a peer that restarted on a
        new port or came back with a new IP (DHCP) was never dialled where it now is
        (the delegation bench lost a restarted desktop for minutes)."""
        swarm = self._libp2p.get_network()
        errors: list[str] = []
        with trio.fail_after(self.limits.dial_timeout_s * 2):
            for m in maddrs:
                if self.is_connected(pid):
                    return
                self.forget_failed_dial(pid)
                try:
                    with trio.fail_after(self.limits.dial_timeout_s):
                        conn = await swarm.dial_addr(m, pid)
                        started = getattr(conn, "event_started", None)
                        if started is not None:
                            await started.wait()
                    return
                except (Exception, trio.TooSlowError) as exc:
                    errors.append(f"{m}: {type(exc).__name__}: {exc}"[:160])
        raise PeerUnavailable("; ".join(errors) or "no address answered")

    async def dial(self, peer: str, addrs: Sequence[str], source: str) -> bool:
        if peer == self.peer_id_str or self.guard.peer_banned(peer):
            return False
        self.table.upsert(peer, source=source, addrs=addrs)
        if self.is_connected(peer):
            self._on_already_connected(peer)
            return True
        if peer in self.inflight:
            return False
        self.inflight.add(peer)
        try:
            self.learn_addrs(peer, addrs)
            pid = as_id(peer)
            maddrs = self._direct_dial_order(pid, addrs)
            try:
                if not maddrs:
                    raise PeerUnavailable("no direct address")
                await self._dial_each(pid, maddrs)
            except (Exception, trio.TooSlowError):
                # why: a peer behind NAT is reachable only through a relay
                if not await self.relay.dial(peer, list(addrs) + self.known_circuits(peer)):
                    raise
        except (Exception, trio.TooSlowError) as exc:
            msg = (
                "timed out"
                if isinstance(exc, trio.TooSlowError)
                else f"{type(exc).__name__}: {exc}"
            )
            self.table.record_failure(peer, f"dial failed: {msg}"[:200], kind="network")
            log.info(
                "dial failed peer_id=%s source=%s error=%s", peer, source, msg.splitlines()[0][:160]
            )
            return False
        finally:
            self.inflight.discard(peer)
        self.table.record_reachable(peer)
        if source not in ("dht", "outbound"):  # outbound: a redial of a known peer
            # why: a peer we were told about (bootstrap, mDNS, manual) knows others; ask
            # soon. Not for DHT-found or inbound peers, or lookups would cascade.
            self._on_told_about_dialled()
        log.info("dialled peer_id=%s source=%s", peer, source)
        return True

    async def bootstrap_loop(self, bootstrap: Mapping[str, Sequence[multiaddr.Multiaddr]]) -> None:
        """Keep every bootstrap peer connected: redial with back-off 0.5 s doubling to 30 s,
        reset once it is connected."""
        next_try = {p: 0.0 for p in bootstrap}
        delay = {p: 0.5 for p in bootstrap}
        while True:
            now = time.monotonic()
            for peer, maddrs in bootstrap.items():
                if self.is_connected(peer) or peer in self.inflight:
                    delay[peer] = 0.5
                    continue
                if now >= next_try[peer]:
                    next_try[peer] = now + delay[peer]
                    delay[peer] = min(delay[peer] * 2, 30.0)
                    self._spawn(self.dial, peer, [str(m) for m in maddrs], "bootstrap")
            await trio.sleep(0.25)

    async def keep_providers_warm(self, interval_s: float = WARM_INTERVAL_S) -> None:
        """Redial trusted providers with a live record that we are not connected to.

        why: a request to a provider we have no connection to pays TCP + Noise + yamux
        (about four round trips) before its own round trip; peers that are neither
        bootstrap peers nor re-announced by mDNS (found through the DHT, or whose
        connection dropped) had no one to dial them back until a request did. A peer
        backing off after failures is left alone until its back-off ends."""
        while True:
            await trio.sleep(interval_s)
            now = time.time()
            for e in list(self.table):
                if (e.connected or e.record is None or e.record.is_expired(now)
                        or not e.available(now) or e.peer_id in self.inflight
                        or not self.table.is_trusted(e.peer_id, "provider")
                        or self.is_connected(e.peer_id)):
                    continue
                self._spawn(self.dial, e.peer_id, list(e.record.addrs), "outbound")

    # -- beyond the LAN ------------------------------------------------------------------

    def known_circuits(self, peer: str) -> list[str]:
        entry = self.table.get(peer)
        addrs = list(entry.record.addrs) if entry is not None and entry.record else []
        try:
            addrs += [str(a) for a in self._libp2p.get_peerstore().addrs(as_id(peer))]
        except Exception:
            pass
        return [a for a in addrs if is_circuit(a)]

    async def connect_relayed_if_needed(self, peer: str, timeout: float) -> None:
        """Not connected to `peer`: try its direct addresses, then a relay (best effort)."""
        with trio.move_on_after(timeout):
            try:
                maddrs = [
                    m for m in self._libp2p.get_peerstore().addrs(as_id(peer)) if not is_circuit(m)
                ]
                if maddrs:
                    with trio.move_on_after(min(3.0, timeout / 2)):
                        await self._libp2p.connect(PeerInfo(as_id(peer), maddrs))
                        return
            except Exception:
                pass
            if not self.is_connected(peer):
                await self.relay.dial(peer, self.known_circuits(peer))
