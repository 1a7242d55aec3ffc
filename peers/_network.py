"""PeerNetwork: the composed P2P service of a node.

One object owns the libp2p host, the Kademlia DHT, mDNS, the peer table and the
`/qvac/capacity/1.0.0` protocol, and runs them all in one trio nursery:

    async with PeerNetwork(identity, capacity_source=..., bootstrap=[...]) as net:
        ...                           # or: await nursery.start(net.run)

This module is the composition and the public API; each responsibility lives in its own
private module and is wired here with the few callables it needs of the others:

    peers/_capacity.py       the capacity protocol, server and client (rate limits)
    peers/_capacity_sync.py  our record re-signed and pushed; peers' records re-fetched
    peers/_dht_wiring.py     DHT put, lookups, providers, discovery walks
    peers/_dial.py           dialling (direct addresses in order, then a relay)
    peers/_bans.py           offences scored on streams, bans put into effect
    peers/_streams.py        reading frames, closing, handler errors kept to the stream

They all log as `qvacd.peers.network`, the one logger name operators filter on.

Discovery: bootstrap dials (retried with back-off), mDNS, DHT self-lookups (which find
the peers our peers know), and every new connection, inbound too, triggers a direct
capacity fetch. Connected peers are re-fetched every `refresh_interval_s`.

Every record that arrives (fetch, push, DHT) is verified against the peer it came from,
checked against replay (SeqTracker), and counted by reason when refused (`metrics()`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Any

import multiaddr
import trio
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.rcmgr import Direction
from libp2p.tools.anyio_service import background_trio_service

from peers._bans import close_peer, kernel_filter_loop, score_offence, trusted_ips
from peers._capacity import CapacityProtocol
from peers._capacity_sync import CapacitySource, CapacitySync, OurRecord
from peers._dht_streams import DhtHost, guard_inbound
from peers._dht_wiring import DhtWiring
from peers._dial import Dialler, disable_library_autoconnect
from peers._errors import NetworkError, PeerUnavailable
from peers._limits import NetworkLimits
from peers._liveness import PING_PROTOCOL, PathProbe, PingServer, watch_path
from peers._pipelined import open_pipelined
from peers._streams import StreamHandler, contain_handler_errors, stream_path
from peers._swarm_fix import set_inbound_policy
from peers.dht import CapacityDHT
from peers.guard import GuardConfig, PeerGuard
from peers.host import DEFAULT_LISTEN, Host, make_host, parse_peer_addrs
from peers.identity import Identity, as_id
from peers.mdns import SERVICE_TYPE, MdnsService
from peers.reachability import PRIVATE, Reachability
from peers.records import REASONS, CapacityRecord, SeqTracker
from peers.relay import RelayOptions, RelayService
from peers.table import PeerTable, RoleSource
from protocol import CAPACITY_PROTOCOL

log = logging.getLogger("qvacd.peers.network")


class _Notifee(INotifee):
    """Forwards swarm connection events to the network (runs inside swarm code: no waits)."""

    def __init__(self, net: PeerNetwork) -> None:
        self.net = net

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self.net._on_connected(conn)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self.net._on_disconnected(conn)

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None


class PeerNetwork:
    """The node's P2P side. Construct, then `async with` it or `await nursery.start(run)`."""

    def __init__(
        self,
        identity: Identity,
        *,
        capacity_source: CapacitySource,
        listen_addrs: Sequence[str] = DEFAULT_LISTEN,
        bootstrap: Iterable[str] = (),
        mdns: bool = True,
        trust_store: RoleSource | None = None,
        limits: NetworkLimits | None = None,
        mdns_service_type: str = SERVICE_TYPE,
        relay: RelayOptions | None = None,
        guard_config: GuardConfig | None = None,
    ) -> None:
        self.identity = identity
        self.peer_id: ID = identity.peer_id
        self.peer_id_str: str = identity.peer_id_str
        self.limits = limits or NetworkLimits()
        self._bootstrap = parse_peer_addrs(bootstrap, "bootstrap", NetworkError)
        self._bootstrap.pop(self.peer_id_str, None)  # why: a node listed as its own peer
        self.host: Host = make_host(identity.keypair, list(listen_addrs))
        libp2p = self.host.libp2p
        self.table = PeerTable(trust_store)
        self.guard = PeerGuard(
            lambda peer: self.table.is_trusted(peer),
            trusted_ips=lambda: trusted_ips(libp2p, self.table),
            config=guard_config,
            on_ban=self._on_ban,
        )
        set_inbound_policy(libp2p.get_network(), self.guard)
        disable_library_autoconnect(libp2p.get_network())  # why: see peers/_dial.py
        self.trust_store = trust_store
        self.seq_tracker = SeqTracker()
        self.rejected: Counter[str] = Counter({r: 0 for r in REASONS})
        self.counters: Counter[str] = Counter()
        # why DhtHost and guard_inbound: py-libp2p's DHT streams outlive their queries on
        # both sides and filled the handler slots for good (peers/_dht_streams.py)
        self.dht = CapacityDHT(DhtHost(libp2p), self._count_reject)  # type: ignore[arg-type]
        guard_inbound(self.dht.kad, libp2p, self.counters)
        self._mdns = (
            MdnsService(
                self.peer_id_str,
                self.listen_addrs,
                self._on_mdns_peer,
                service_type=mdns_service_type,
            )
            if mdns
            else None
        )
        self._nursery: trio.Nursery | None = None
        self._stack: AsyncExitStack | None = None
        self._outer: trio.Nursery | None = None
        self._running = False
        # Beyond the LAN (peers/relay.py, peers/reachability.py)
        self.relay = RelayService(
            libp2p, relay or RelayOptions(), on_addrs_changed=self.capacity_changed,
            find_relays=lambda: self._dht_wiring.find_relays(),
            needs_relay=lambda: self.reachability.state == PRIVATE,
        )
        self.reachability = Reachability(
            libp2p,
            listen_ports=self._listen_ports,
            servers=self._dialback_servers,
            on_change=lambda _state: self.capacity_changed(),
        )
        # The rooms of the network; each gets what it needs of the others as callables.
        self._our = OurRecord(
            identity, capacity_source, self.limits,
            default_addrs=lambda: self.listen_addrs() + self.relay.circuit_addrs(),
        )
        self._dialler = Dialler(
            self.host, self.table, self.guard, self.relay, self.limits,
            spawn=self._nursery_start,
            on_already_connected=lambda peer: self._sync.queue_fetch(peer),
            on_told_about_dialled=lambda: self._dht_wiring.wake_discovery(),
        )
        self._capacity = CapacityProtocol(
            libp2p, self.limits, self.counters,
            current_record=self._our.current,
            accept_push=lambda peer, data: self._sync.accept_record(peer, data, source="inbound"),
            offence=self.offence,
        )
        self._sync = CapacitySync(
            self._our, self._capacity, libp2p, self.table, self.dht, self.limits, self.counters,
            seq_tracker=self.seq_tracker,
            count_reject=self._count_reject,
            learn_addrs=self._learn_addrs,
            publish_dht=lambda: self._dht_wiring.publish_round(),
            spawn=self._nursery_start,
        )
        self._dht_wiring = DhtWiring(
            self.dht, libp2p, self._dialler, self.table, self._our, self.limits, self.counters,
            seq_tracker=self.seq_tracker,
            count_reject=self._count_reject,
            announce_relay=self.relay.options.service,
            publish_again_after=self._sync.publish_again_after,
            spawn=self._nursery_start,
        )
        libp2p.set_stream_handler(
            TProtocol(CAPACITY_PROTOCOL),
            contain_handler_errors(self._capacity.serve, CAPACITY_PROTOCOL),
        )
        # why our own ping handler: py-libp2p's echoes as fast as anyone sends; this one
        # rate-limits per peer like every other service (peers/_liveness.py)
        self._pings = PingServer(self.offence, self.counters)
        libp2p.set_stream_handler(
            TProtocol(PING_PROTOCOL), contain_handler_errors(self._pings.serve, PING_PROTOCOL)
        )

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> PeerNetwork:
        self._stack = AsyncExitStack()
        nursery = await self._stack.enter_async_context(trio.open_nursery())
        try:
            await nursery.start(self.run)
        except BaseException:
            nursery.cancel_scope.cancel()
            await self._stack.aclose()
            raise
        self._outer = nursery
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        assert self._stack is not None and self._outer is not None
        self._outer.cancel_scope.cancel()
        return await self._stack.__aexit__(*exc)

    async def run(
        self, *, task_status: trio.TaskStatus[PeerNetwork] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until cancelled. `task_status.started(self)` once listening with a record."""
        notifee = _Notifee(self)
        async with self.host.run():
            # why not raise here: inside the host's nursery it would reach the caller
            # wrapped in an ExceptionGroup
            unsigned = not self._our.sign()
            if not unsigned:
                await self._serve(notifee, task_status)
        if unsigned:
            raise NetworkError(
                "cannot sign an initial capacity record (see the error logged above); "
                "fix the capacity source"
            )

    async def _serve(self, notifee: _Notifee, task_status: trio.TaskStatus[PeerNetwork]) -> None:
        """Everything but the host: DHT service, our loops, mDNS; until cancelled."""
        libp2p = self.host.libp2p
        swarm = libp2p.get_network()
        swarm.register_notifee(notifee)
        try:
            async with background_trio_service(self.dht.kad), trio.open_nursery() as nursery:
                self._nursery = nursery
                self._running = True
                await nursery.start(self.relay.run)
                nursery.start_soon(self.reachability.run)
                nursery.start_soon(self._sync.fetch_worker)
                nursery.start_soon(self._sync.refresh_loop)
                nursery.start_soon(kernel_filter_loop, libp2p, self.guard, self.counters)
                nursery.start_soon(self._sync.publisher)
                nursery.start_soon(self._dht_wiring.discovery_loop)
                nursery.start_soon(self._dialler.keep_providers_warm)
                if self._bootstrap:
                    nursery.start_soon(self._dialler.bootstrap_loop, self._bootstrap)
                if self._mdns is not None:
                    nursery.start_soon(self._run_mdns)
                for peer in self.connected_peers():  # why: connected before we ran
                    self._sync.queue_fetch(peer)
                log.info(
                    "network up peer_id=%s listen=%s bootstrap=%d mdns=%s",
                    self.peer_id_str,
                    ",".join(self.listen_addrs()),
                    len(self._bootstrap),
                    self._mdns is not None,
                )
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._running = False
            self._nursery = None
            swarm.remove_notifee(notifee)
            log.info("network down peer_id=%s", self.peer_id_str)

    # -- public API ----------------------------------------------------------------------

    def listen_addrs(self) -> list[str]:
        """Bound, dialable addresses with /p2p/<our id> (wildcards expanded)."""
        return self.host.listen_addrs()

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self.host.libp2p.get_connected_peers()]

    def is_connected(self, peer_id: str | ID) -> bool:
        return self._dialler.is_connected(peer_id)

    def current_record(self) -> tuple[CapacityRecord, bytes] | None:
        """Our latest signed record and its wire bytes."""
        return self._our.current()

    def set_stream_handler(self, protocol_id: str, handler: StreamHandler) -> None:
        """Serve `protocol_id`; `handler(stream, remote_peer_id_str)`. Errors are contained:
        a handler that raises gets its stream reset, never the connection closed."""
        self.host.libp2p.set_stream_handler(
            TProtocol(protocol_id), contain_handler_errors(handler, protocol_id)
        )

    async def open_stream(
        self, peer_id: str | ID, protocol_id: str, timeout: float = 10.0,
        first: bytes | None = None,
    ) -> INetStream:
        """A new stream to `peer_id` speaking `protocol_id`, dialling if needed.

        With `first` (the protocol's first request, already framed), the negotiation is
        pipelined (peers/_pipelined.py): header, protocol id and `first` go out in one
        write, one round trip instead of three before the answer. ProtocolRefused when
        the peer does not serve `protocol_id`."""
        pid = as_id(peer_id)
        try:
            with trio.fail_after(timeout):
                if not self.is_connected(pid):
                    self._dialler.forget_failed_dial(pid)
                    await self._dialler.connect_relayed_if_needed(pid.to_base58(), timeout / 2)
                if first is not None:
                    return await open_pipelined(self.host.libp2p.get_network(), pid,
                                                protocol_id, first)
                return await self.host.libp2p.new_stream(pid, [TProtocol(protocol_id)])
        except trio.TooSlowError:
            raise PeerUnavailable(
                f"peer {pid} did not open {protocol_id} within {timeout:.1f} s"
            ) from None
        except PeerUnavailable:
            raise
        except Exception as exc:
            raise PeerUnavailable(f"cannot open {protocol_id} to peer {pid}: {exc}") from exc

    async def connect(self, addr: str, *, source: str = "manual") -> str:
        """Dial a full multiaddr with /p2p/<id>; returns the peer id. PeerUnavailable on failure."""
        return await self._dialler.connect(addr, source=source)

    def capacity_changed(self) -> None:
        """Our capacity changed: re-sign now, push to connected peers, republish to the DHT.

        Cheap and non-blocking; bursts of calls are coalesced (`min_push_interval_s`).
        Call it from the trio thread (it sets a trio.Event).
        """
        self._sync.changed()

    async def fetch_capacity(
        self, peer_id: str | ID, timeout: float | None = None
    ) -> CapacityRecord:
        """Ask `peer_id` directly for its current record; verified, replay-checked, stored.

        Raises CapacityError (refused, timed out, malformed) or RecordError (forged/stale).
        """
        return await self._sync.fetch(as_id(peer_id).to_base58(), timeout)

    async def lookup_capacity(
        self, peer_id: str | ID, timeout: float | None = None
    ) -> CapacityRecord | None:
        """`peer_id`'s newest valid record in the DHT (None if none found in time).

        A hint: before routing to a peer, confirm with `fetch_capacity` (or a fresh table
        entry). A DHT copy older than one we have already verified is not returned.
        """
        return await self._dht_wiring.lookup_capacity(as_id(peer_id).to_base58(), timeout)

    async def find_model_providers(
        self, sha256: str, *, timeout: float | None = None, include_table: bool = True
    ) -> list[str]:
        """Peer ids that can serve model `sha256`: DHT provider records, minus peers whose
        fresh verified record says they no longer hold it, plus (if `include_table`) peers
        whose fresh record lists it."""
        return await self._dht_wiring.find_model_providers(
            sha256, timeout=timeout, include_table=include_table
        )

    def metrics(self) -> dict[str, Any]:
        """Counters for /metrics: rejections by reason, capacity protocol events, peers."""
        connected = self.connected_peers()
        return {
            "peers_known": len(self.table),
            "peers_connected": len(connected),
            "peers_trusted": sum(1 for e in self.table if self.table.roles_of(e.peer_id)),
            "records_rejected": {r: self.rejected[r] for r in REASONS},
            "capacity": dict(self.counters),
            "dht_routing_table": self.dht.kad.get_routing_table_size(),
        }

    def offence(self, kind: str, stream: INetStream, peer: str) -> bool:
        """Score one offence by `peer` (and its IP) on `stream`; True if it is now banned.
        Services call it for refused, malformed or unauthorized requests."""
        return score_offence(self.guard, kind, stream, peer)

    def watch_path(self, stream: INetStream) -> AbstractAsyncContextManager[PathProbe]:
        """`async with net.watch_path(stream) as probe`: ping the connection `stream`
        runs over while inside; `probe.dead` once it stopped answering (peers/_liveness.py)."""
        return watch_path(self.host.libp2p.get_network(), stream)

    def stream_path(self, stream: INetStream) -> str:
        """"relayed" or "direct": the connection `stream` runs over (a stream opened
        before a hole punch stays on the relayed connection)."""
        return stream_path(stream)

    def peer_path(self, peer: str) -> tuple[str | None, str | None]:
        """("direct"|"relayed"|None, relay peer id) of our connection to `peer`."""
        return self.relay.path(peer)

    def beyond_lan_status(self) -> dict[str, Any]:
        """Reachability, relayed addresses and reservations, relay service counters."""
        return {**self.reachability.status(), **self.relay.status()}

    # -- wiring --------------------------------------------------------------------------

    def _nursery_start(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)

    def _count_reject(self, reason: str) -> None:
        self.rejected[reason] += 1

    def _on_ban(self, peer: str) -> None:
        self.counters["peers_banned"] += 1
        self.table.record_failure(peer, "banned for misbehaving", kind="network")
        self._nursery_start(close_peer, self.host.libp2p, peer)

    def _on_connected(self, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id.to_base58()
        if not self.guard.allow_peer(peer):  # outbound, or inbound racing the ban
            self._nursery_start(close_peer, self.host.libp2p, peer)
            return
        inbound = getattr(conn, "direction", None) == Direction.INBOUND
        self.table.upsert(peer, source="inbound" if inbound else "outbound")
        self.table.set_connected(peer, True)
        log.debug("connected peer_id=%s direction=%s", peer, "in" if inbound else "out")
        if self._running:
            self._nursery_start(self.dht.add_peer, conn.muxed_conn.peer_id)
            self._sync.queue_fetch(peer)
            if self._dht_wiring.had_no_peers:
                # why: our last DHT put had nobody to go to; put again now that we can
                self._dht_wiring.had_no_peers = False
                self._sync.request_dht_publish()

    def _learn_addrs(self, peer: str, addrs: Iterable[str]) -> None:
        """Addresses from a verified record: into the peerstore, and a connected peer
        the routing table lacks goes into it now that it has them.

        why: the routing table takes only peers with addresses; a peer that dialled us
        has none until identify answers, which is after `_on_connected` tried to add it,
        so it waited for the next refresh (`refresh_interval_s`); the record fetched on
        every new connection brings them sooner."""
        self._dialler.learn_addrs(peer, addrs)
        if not self._running or peer == self.peer_id_str:
            return
        pid = as_id(peer)
        if self.is_connected(pid) and not self.dht.kad.routing_table.peer_in_table(pid):
            self._nursery_start(self.dht.add_peer, pid)

    def _on_disconnected(self, conn: INetConn) -> None:
        pid = conn.muxed_conn.peer_id
        if not self.host.libp2p.get_network().connections.get(pid):
            self.table.set_connected(pid.to_base58(), False)
            log.debug("disconnected peer_id=%s", pid)
            if self._running and len(self.connected_peers()) < self.limits.max_auto_connect:
                # why: with py-libp2p's auto-connector off (peers/_dial.py) this is what
                # replaces a lost connection: a discovery round (at most one per
                # min_discovery_interval_s) dials known peers up to max_auto_connect
                self._dht_wiring.wake_discovery()

    def _listen_ports(self) -> list[int]:
        ports = []
        for a in self.host.bound_addrs():
            try:
                ports.append(int(a.value_for_protocol("tcp")))
            except Exception:
                continue
        return ports

    def _dialback_servers(self) -> list[str]:
        """Peers to ask for a dial-back: our relays and bootstrap peers first."""
        first = [p for p in (*self.relay.relays(), *self._bootstrap) if self.is_connected(p)]
        rest = [p for p in self.connected_peers() if p not in first]
        return first + rest

    # -- mDNS ----------------------------------------------------------------------------

    async def _run_mdns(self) -> None:
        assert self._mdns is not None
        try:
            await self._mdns.run()
        except Exception as exc:
            # why: no multicast (containers, some VPNs) must not take the node down
            log.error("mDNS discovery stopped: %s; peers are still found via bootstrap/DHT", exc)

    def _on_mdns_peer(self, peer: str, addrs: list[str]) -> None:
        self.counters["mdns_found"] += 1
        if self.is_connected(peer):
            self.table.upsert(peer, source="mdns", addrs=addrs)
            return
        self._nursery_start(self._dialler.dial, peer, addrs, "mdns")
