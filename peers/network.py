"""PeerNetwork: the composed P2P service of a node.

One object owns the libp2p host, the Kademlia DHT, mDNS, the peer table and the
`/qvac/capacity/1.0.0` protocol, and runs them all in one trio nursery:

    async with PeerNetwork(identity, capacity_source=..., bootstrap=[...]) as net:
        ...                           # or: await nursery.start(net.run)

Capacity protocol (one request per stream, frames from `protocol/`):
- `CapacityRequest`  -> `CapacityResponse(our signed record)`.
- `CapacityResponse` sent *unsolicited* is a push: the server verifies the record (it
  must be signed by the stream's remote peer), stores it, and answers with its own
  record, so one push is a two-way exchange. `capacity_changed()` pushes to every
  connected peer, which is how a change reaches peers in milliseconds instead of at
  their next poll.
- Served to anyone connected: capacity is public within the mesh; trust governs who may
  *use* a peer (infer, shard), not who may see what it offers. What is served is what
  the record already says to the DHT, so refusing it to strangers would hide nothing.
- Rate limited per peer (token bucket, 10/s burst 20 by default) and globally (64
  handlers at once); beyond that the stream gets an `Error(busy, retry_after)` frame and
  is closed, the connection stays up. Malformed or oversized frames get
  `Error(protocol|too_large)`; the connection stays up.

Discovery: bootstrap dials (retried with back-off), mDNS, DHT self-lookups (which find
the peers our peers know), and every new connection, inbound too, triggers a direct
capacity fetch. Connected peers are re-fetched every `refresh_interval_s`.

Every record that arrives (fetch, push, DHT) is verified against the peer it came from,
checked against replay (SeqTracker), and counted by reason when refused (`metrics()`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AsyncExitStack
from typing import Any

import multiaddr
import trio
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.rcmgr import Direction
from libp2p.tools.anyio_service import background_trio_service

from peers._swarm_fix import set_inbound_policy
from peers.dht import PROVIDE_BATCH, PROVIDE_WINDOW_S, RELAY_KEY_SHA256, CapacityDHT
from peers import sockfilter
from peers.guard import GuardConfig, PeerGuard
from peers.host import DEFAULT_LISTEN, Host, make_host, parse_peer_addrs
from peers.mdns import SERVICE_TYPE, MdnsService
from peers.reachability import PRIVATE, Reachability, is_relayed
from peers.relay import RelayOptions, RelayService, is_circuit
from peers.records import (
    MAX_ADDRS,
    REASONS,
    CapacityRecord,
    RecordError,
    SeqSource,
    SeqTracker,
    sign_record,
    verify_record,
)
from peers.table import PeerTable, RoleSource
from protocol import (
    CAPACITY_PROTOCOL,
    CapacityRequest,
    CapacityResponse,
    Error,
    ErrorCode,
    FrameDecoder,
    Message,
    ProtocolError,
    encode_frame,
    limits_for,
)

log = logging.getLogger("qvacd.peers.network")

StreamHandler = Callable[[INetStream, str], Awaitable[None]]
CapacitySource = Callable[[], CapacityRecord]

_READ_CHUNK = 64 * 1024
_DHT_REPLICAS = 3  # a put or provide that reached fewer close peers is retried
_DHT_RETRY_S = 5.0
_PEERSTORE_TTL = 3600


class NetworkError(Exception):
    """Bad network configuration (e.g. a malformed bootstrap address)."""


class PeerUnavailable(Exception):
    """A peer could not be reached, or did not answer in time."""


class CapacityError(Exception):
    """A capacity fetch failed: the peer refused, timed out or spoke nonsense."""


@dataclasses.dataclass(frozen=True)
class NetworkLimits:
    capacity_rate_per_s: float = 10.0  # inbound capacity streams per peer, sustained
    capacity_burst: int = 20  # ... and in a burst
    max_capacity_streams: int = 64  # inbound capacity handlers at once, all peers
    max_capacity_streams_per_peer: int = 4  # ... and from one peer
    capacity_timeout_s: float = 3.0  # our fetch/push: whole round trip
    capacity_read_timeout_s: float = 5.0  # serving: wait for the request frame
    refresh_interval_s: float = 5.0  # re-fetch connected peers' capacity
    republish_interval_s: float = 30.0  # re-sign and put our record in the DHT
    # Coalesce bursts of capacity_changed() (the engine calls it on every request start
    # and end): the first change goes out at once, later ones at most this often. A
    # push costs ~8 ms CPU per connected peer.
    min_push_interval_s: float = 1.0
    min_dht_publish_interval_s: float = 5.0
    reprovide_interval_s: float = 300.0  # re-announce held models (provider records)
    record_ttl_s: float = 300.0  # lifetime of our signed record
    dial_timeout_s: float = 5.0
    lookup_timeout_s: float = 5.0
    max_auto_connect: int = 64  # connect to discovered peers until this many are up
    max_parallel_fetches: int = 32
    # why 5 min: new nodes walk toward themselves on joining and so connect to us; our own
    # walk only heals (go-libp2p refreshes every 10 min); each costs ~20 streams
    discovery_max_interval_s: float = 300.0
    min_discovery_interval_s: float = 2.0
    fresh_max_age_s: float = 30.0  # "fresh" in the table snapshot / provider filtering


class _TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst, self.tokens, self.stamp = rate, float(burst), float(burst), now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def retry_after(self) -> float:
        return max(0.0, (1.0 - self.tokens) / self.rate)


def _id(peer_id: str | ID) -> ID:
    return peer_id if isinstance(peer_id, ID) else ID.from_base58(peer_id)


def _direct_addrs(addrs: Iterable[str], peer: str) -> list[multiaddr.Multiaddr]:
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


async def read_message(stream: INetStream, decoder: FrameDecoder) -> Message:
    """The next whole message from `stream`; ProtocolError if it ends or is malformed."""
    while True:
        msg = decoder.next_message()
        if msg is not None:
            return msg
        try:
            data = await stream.read(_READ_CHUNK)
        except Exception as exc:  # StreamEOF, StreamReset, ...
            if type(exc).__name__ != "StreamEOF":
                raise
            data = b""
        if not data:
            decoder.feed_eof()
            msg = decoder.next_message()
            if msg is None:
                raise ProtocolError(ErrorCode.PROTOCOL, "stream ended before a whole frame")
            return msg
        decoder.feed(data)


async def _close_quietly(stream: INetStream, *, reset: bool = False) -> None:
    with trio.move_on_after(1) as scope:
        scope.shield = True
        try:
            await (stream.reset() if reset else stream.close())
        except Exception:
            pass


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
        identity: Any,
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
        self._capacity_source = capacity_source
        self._bootstrap = parse_peer_addrs(bootstrap, "bootstrap", NetworkError)
        self._bootstrap.pop(self.peer_id_str, None)  # why: a node listed as its own peer
        self.host: Host = make_host(identity.keypair, list(listen_addrs))
        self.table = PeerTable(trust_store)
        self.guard = PeerGuard(
            lambda peer: self.table.is_trusted(peer),
            trusted_ips=self._trusted_ips,
            config=guard_config,
            on_ban=self._on_ban,
        )
        set_inbound_policy(self.host.libp2p.get_network(), self.guard)
        self.trust_store = trust_store
        self.seq_tracker = SeqTracker()
        self._seq = SeqSource()
        self.rejected: Counter[str] = Counter({r: 0 for r in REASONS})
        self.counters: Counter[str] = Counter()
        self.dht = CapacityDHT(self.host.libp2p, self._count_reject)
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
        self._record: CapacityRecord | None = None
        self._record_bytes: bytes | None = None
        self._buckets: dict[str, _TokenBucket] = {}
        self._capacity_active = 0
        self._capacity_active_per_peer: Counter[str] = Counter()
        self._inflight_fetch: set[str] = set()
        self._inflight_dial: set[str] = set()
        self._learnt_addrs: dict[str, tuple[tuple[str, ...], float]] = {}
        self._fetch_send, self._fetch_recv = trio.open_memory_channel[str](4096)
        self._wake_publisher = trio.Event()
        self._push_pending = False
        self._push_busy = False
        self._wake_scheduled = False
        self._dht_publish_pending = False
        self._dht_had_no_peers = True
        self._dht_busy = False
        self._next_dht_publish = -math.inf  # trio.current_time() of the next allowed put
        self._dht_retry_s = _DHT_RETRY_S
        self._provided: dict[str, float] = {}  # model sha256 -> when announced well
        self._wake_discovery = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._stack: AsyncExitStack | None = None
        self._outer: trio.Nursery | None = None
        self._running = False
        self.host.libp2p.set_stream_handler(
            TProtocol(CAPACITY_PROTOCOL), self._wrap(self._serve_capacity, CAPACITY_PROTOCOL)
        )
        # Beyond the LAN (peers/relay.py, peers/reachability.py)
        self.relay = RelayService(
            self.host.libp2p, relay or RelayOptions(), on_addrs_changed=self.capacity_changed,
            find_relays=self._find_dht_relays,
            needs_relay=lambda: self.reachability.state == PRIVATE,
        )
        self.reachability = Reachability(
            self.host.libp2p,
            listen_ports=self._listen_ports,
            servers=self._dialback_servers,
            on_change=lambda _state: self.capacity_changed(),
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
            unsigned = not self._sign_current()
            if not unsigned:
                await self._serve(notifee, task_status)
        if unsigned:
            raise NetworkError(
                "cannot sign an initial capacity record (see the error logged above); "
                "fix the capacity source"
            )

    async def _serve(self, notifee: _Notifee, task_status: trio.TaskStatus[PeerNetwork]) -> None:
        """Everything but the host: DHT service, our loops, mDNS; until cancelled."""
        swarm = self.host.libp2p.get_network()
        swarm.register_notifee(notifee)
        try:
            async with background_trio_service(self.dht.kad), trio.open_nursery() as nursery:
                self._nursery = nursery
                self._running = True
                await nursery.start(self.relay.run)
                nursery.start_soon(self.reachability.run)
                nursery.start_soon(self._fetch_worker)
                nursery.start_soon(self._refresh_loop)
                nursery.start_soon(self._kernel_filter_loop)
                nursery.start_soon(self._publisher)
                nursery.start_soon(self._discovery_loop)
                if self._bootstrap:
                    nursery.start_soon(self._bootstrap_loop)
                if self._mdns is not None:
                    nursery.start_soon(self._run_mdns)
                for peer in self.connected_peers():  # why: connected before we ran
                    self._queue_fetch(peer)
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
        return bool(self.host.libp2p.get_network().connections.get(_id(peer_id)))

    def current_record(self) -> tuple[CapacityRecord, bytes] | None:
        """Our latest signed record and its wire bytes."""
        if self._record is None or self._record_bytes is None:
            return None
        return self._record, self._record_bytes

    def set_stream_handler(self, protocol_id: str, handler: StreamHandler) -> None:
        """Serve `protocol_id`; `handler(stream, remote_peer_id_str)`. Errors are contained:
        a handler that raises gets its stream reset, never the connection closed."""
        self.host.libp2p.set_stream_handler(
            TProtocol(protocol_id), self._wrap(handler, protocol_id)
        )

    async def open_stream(
        self, peer_id: str | ID, protocol_id: str, timeout: float = 10.0
    ) -> INetStream:
        """A new stream to `peer_id` speaking `protocol_id`, dialling if needed."""
        pid = _id(peer_id)
        try:
            with trio.fail_after(timeout):
                if not self.is_connected(pid):
                    self._forget_failed_dial(pid)
                    await self._connect_relayed_if_needed(pid.to_base58(), timeout / 2)
                return await self.host.libp2p.new_stream(pid, [TProtocol(protocol_id)])
        except trio.TooSlowError:
            raise PeerUnavailable(
                f"peer {pid} did not open {protocol_id} within {timeout:.1f} s"
            ) from None
        except Exception as exc:
            raise PeerUnavailable(f"cannot open {protocol_id} to peer {pid}: {exc}") from exc

    async def connect(self, addr: str, *, source: str = "manual") -> str:
        """Dial a full multiaddr with /p2p/<id>; returns the peer id. PeerUnavailable on failure."""
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception:
            raise NetworkError(f"bad peer address {addr!r}; expected .../p2p/<peer id>") from None
        peer = info.peer_id.to_base58()
        if not await self._dial(peer, [str(a) for a in info.addrs], source):
            entry = self.table.get(peer)
            raise PeerUnavailable(f"cannot reach {peer}: {entry.last_error if entry else ''}")
        return peer

    def capacity_changed(self) -> None:
        """Our capacity changed: re-sign now, push to connected peers, republish to the DHT.

        Cheap and non-blocking; bursts of calls are coalesced (`min_push_interval_s`).
        Call it from the trio thread (it sets a trio.Event).
        """
        self._push_pending = True
        self._dht_publish_pending = True
        self._wake_publisher.set()

    async def fetch_capacity(
        self, peer_id: str | ID, timeout: float | None = None
    ) -> CapacityRecord:
        """Ask `peer_id` directly for its current record; verified, replay-checked, stored.

        Raises CapacityError (refused, timed out, malformed) or RecordError (forged/stale).
        """
        peer = _id(peer_id).to_base58()
        reply, rtt_ms, path = await self._exchange(peer, CapacityRequest(), timeout)
        if isinstance(reply, Error):
            raise CapacityError(
                f"peer {peer} refused the capacity request: {reply.code}: {reply.message}"
            )
        if not isinstance(reply, CapacityResponse):
            raise CapacityError(
                f"peer {peer} answered a capacity request with {type(reply).__name__}"
            )
        rec = self._accept_record(peer, reply.record, source="outbound", rtt_ms=rtt_ms,
                                  path=path)
        self.counters["capacity_fetched"] += 1
        return rec

    async def lookup_capacity(
        self, peer_id: str | ID, timeout: float | None = None
    ) -> CapacityRecord | None:
        """`peer_id`'s newest valid record in the DHT (None if none found in time).

        A hint: before routing to a peer, confirm with `fetch_capacity` (or a fresh table
        entry). A DHT copy older than one we have already verified is not returned.
        """
        peer = _id(peer_id).to_base58()
        found = None
        with trio.move_on_after(timeout or self.limits.lookup_timeout_s):
            found = await self.dht.lookup_record(peer)
        if found is None:
            return None
        rec, data = found
        highest = self.seq_tracker.highest(peer)
        if highest is not None and rec.seq < highest:
            entry = self.table.get(peer)
            return entry.record if entry is not None else None
        try:
            self.seq_tracker.check(rec, data)
        except RecordError as exc:
            self._count_reject(exc.reason)
            return None
        self.table.update_record(peer, rec, source="dht")
        self._learn_addrs(peer, rec.addrs)
        return rec

    async def find_model_providers(
        self, sha256: str, *, timeout: float | None = None, include_table: bool = True
    ) -> list[str]:
        """Peer ids that can serve model `sha256`: DHT provider records, minus peers whose
        fresh verified record says they no longer hold it, plus (if `include_table`) peers
        whose fresh record lists it."""
        infos: list[PeerInfo] = []
        with trio.move_on_after(timeout or self.limits.lookup_timeout_s):
            infos = await self.dht.find_providers(sha256)
        max_age = self.limits.fresh_max_age_s
        out: list[str] = []
        for info in infos:
            peer = info.peer_id.to_base58()
            self._learn_addrs(peer, [str(a) for a in info.addrs], ttl=600)
            entry = self.table.get(peer)
            if entry is not None and entry.is_fresh(max_age) and entry.record is not None:
                if not any(m.sha256 == sha256 for m in entry.record.models):
                    continue  # why: provider records outlive the model by up to 48 h
            out.append(peer)
        if include_table:
            out += [p for p in self.table.with_model(sha256, max_age) if p not in out]
        return out

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

    # -- our record ----------------------------------------------------------------------

    def _sign_current(self) -> bool:
        try:
            base = self._capacity_source()
        except Exception:
            log.exception("capacity source failed; keeping the previous record")
            return False
        now = time.time()
        addrs = tuple(base.addrs) or tuple(
            (self.listen_addrs() + self.relay.circuit_addrs())[:MAX_ADDRS]
        )
        rec = dataclasses.replace(
            base,
            peer_id=self.peer_id_str,
            seq=self._seq.next(now),
            issued_at=now,
            expires_at=now + self.limits.record_ttl_s,
            addrs=addrs,
        )
        try:
            data = sign_record(rec, self.identity)
        except (RecordError, ValueError) as exc:
            log.error("cannot sign our capacity record: %s", exc)
            return False
        self._record, self._record_bytes = rec, data
        log.debug("capacity record signed seq=%d models=%d", rec.seq, len(rec.models))
        return True

    async def _publisher(self) -> None:
        """Re-sign, push and publish: on capacity_changed() (coalesced), and periodically."""
        while True:
            with trio.move_on_after(self.limits.republish_interval_s) as idle:
                await self._wake_publisher.wait()
            self._wake_publisher = trio.Event()
            push, self._push_pending = self._push_pending, False
            publish = self._dht_publish_pending or idle.cancelled_caught
            # Re-sign on every wake: a new seq per put, else peers refuse the put as
            # "not better" than the identical record they hold.
            self._sign_current()
            if push and self._push_busy:
                self._push_pending = True  # why: one round at a time; it re-wakes us
            elif push:
                self._push_busy = True
                self._nursery_start(self._push_all)
            if publish and not self._dht_busy and trio.current_time() >= self._next_dht_publish:
                self._dht_publish_pending = False
                self._dht_busy = True
                self._next_dht_publish = (
                    trio.current_time() + self.limits.min_dht_publish_interval_s
                )
                self._nursery_start(self._publish_dht)
            elif publish:
                # Too soon after the last put, or one is running: come back for it.
                self._dht_publish_pending = True
                self._nursery_start(self._wake_after_interval)
            await trio.sleep(self.limits.min_push_interval_s)

    async def _wake_later(self, delay: float) -> None:
        await trio.sleep(delay)
        self._wake_publisher.set()

    async def _wake_after_interval(self) -> None:
        """One pending wake for 'publish, but not yet': bursts of changes share it."""
        if self._wake_scheduled:
            return
        self._wake_scheduled = True
        try:
            await trio.sleep_until(max(self._next_dht_publish, trio.current_time() + 0.05))
        finally:
            self._wake_scheduled = False
        self._wake_publisher.set()

    async def _publish_dht(self) -> None:
        """Put our record at the closest peers and announce held models; retry soon
        (not in 30 s) whatever reached fewer than `_DHT_REPLICAS` peers."""
        try:
            retry = False
            want = min(_DHT_REPLICAS, self.dht.kad.get_routing_table_size())
            self._dht_had_no_peers = want == 0
            current = self.current_record()
            if current is not None:
                try:
                    with trio.fail_after(15):  # a walk (5 s) and the stores (5 s)
                        stored = await self.dht.publish_record(self.peer_id_str, current[1])
                    self.counters["dht_published"] += 1
                    retry |= stored < want
                except Exception as exc:
                    log.warning("publishing our capacity record to the DHT failed: %s", exc)
                    retry = True
            if want == 0:
                return  # nobody to announce to yet; the first connection brings us back
            now = time.monotonic()
            rec = self._record
            held = [m.sha256 for m in rec.models] if rec else []
            if self.relay.options.service:
                # why here: a relay is announced like a held model, on the same schedule
                held.insert(0, RELAY_KEY_SHA256)
            for sha in list(self._provided):
                if sha not in held:
                    del self._provided[sha]  # its provider records expire on their own

            def due(sha: str) -> bool:
                last = self._provided.get(sha, -math.inf)
                return now - last >= self.limits.reprovide_interval_s

            due_models = [sha for sha in held if due(sha)]
            # why the batch: the library refuses more than 10 ADD_PROVIDER per 10 s from one
            # peer; the rest waits for the next round.
            for sha in due_models[:PROVIDE_BATCH]:
                with trio.move_on_after(15):
                    sent = await self.dht.provide(sha)
                    self.counters["dht_provided"] += 1
                    if sent >= want:
                        self._provided[sha] = now
                        continue
                retry = True
            if len(due_models) > PROVIDE_BATCH:
                self._nursery_start(self._wake_later, PROVIDE_WINDOW_S)
                self._dht_publish_pending = True
            if retry:
                # why exponential: a put fails most when the mesh is overloaded, and
                # retrying at a fixed pace would add to the load that made it fail
                self._dht_publish_pending = True
                self._nursery_start(self._wake_later, self._dht_retry_s)
                self._dht_retry_s = min(self._dht_retry_s * 2, self.limits.republish_interval_s)
            else:
                self._dht_retry_s = _DHT_RETRY_S
        finally:
            self._dht_busy = False

    async def _push_all(self) -> None:
        peers = self.connected_peers()

        async def push(peer: str) -> None:
            try:
                await self._push_to(peer)
            except Exception as exc:
                log.debug("capacity push to %s failed: %s", peer, exc)

        try:
            async with trio.open_nursery() as nursery:
                for peer in peers:
                    nursery.start_soon(push, peer)
        finally:
            self._push_busy = False
            if self._push_pending:
                self._wake_publisher.set()

    async def _push_to(self, peer: str) -> None:
        current = self.current_record()
        if current is None:
            return
        reply, rtt_ms, path = await self._exchange(
            peer, CapacityResponse(record=current[1]), None
        )
        self.counters["capacity_pushed"] += 1
        if isinstance(reply, CapacityResponse):
            self._accept_record(peer, reply.record, source="outbound", rtt_ms=rtt_ms, path=path)

    # -- capacity protocol: client -------------------------------------------------------

    async def _exchange(
        self, peer: str, msg: Message, timeout: float | None
    ) -> tuple[Message, float, str]:
        """Open a capacity stream, send `msg`, read one reply: (reply, round trip ms, the
        path it took: "direct" or "relayed")."""
        timeout = timeout or self.limits.capacity_timeout_s
        started = time.perf_counter()
        stream: INetStream | None = None
        ok = False
        try:
            with trio.fail_after(timeout):
                stream = await self.host.libp2p.new_stream(
                    _id(peer), [TProtocol(CAPACITY_PROTOCOL)]
                )
                await stream.write(encode_frame(msg))
                reply = await read_message(stream, FrameDecoder(limits_for(CAPACITY_PROTOCOL)))
                ok = True
        except trio.TooSlowError:
            raise CapacityError(
                f"peer {peer} did not answer on {CAPACITY_PROTOCOL} within {timeout:.1f} s"
            ) from None
        except ProtocolError as exc:
            raise CapacityError(f"peer {peer} sent a bad capacity frame: {exc}") from None
        except (CapacityError, RecordError):
            raise
        except Exception as exc:
            raise CapacityError(
                f"capacity exchange with {peer} failed: {type(exc).__name__}: {exc}"
            ) from None
        finally:
            if stream is not None:
                await _close_quietly(stream, reset=not ok)
        return reply, (time.perf_counter() - started) * 1000.0, self.stream_path(stream)

    def _accept_record(
        self, peer: str, data: bytes, *, source: str, rtt_ms: float | None = None,
        path: str | None = None,
    ) -> CapacityRecord:
        """Verify a record received from `peer` and store it; count and re-raise if bad."""
        try:
            rec = verify_record(data, now=time.time(), expected_peer_id=peer)
            self.seq_tracker.check(rec, data)
        except RecordError as exc:
            self._count_reject(exc.reason)
            log.warning("capacity record from %s rejected: %s", peer, exc)
            raise
        self.table.update_record(peer, rec, rtt_ms=rtt_ms, source=source)
        self.table.record_reachable(peer)
        if rtt_ms is not None:
            self.table.record_path(peer, path, rtt_ms=rtt_ms)
        self._learn_addrs(peer, rec.addrs)
        return rec

    def _count_reject(self, reason: str) -> None:
        self.rejected[reason] += 1

    # -- capacity protocol: server -------------------------------------------------------

    def _bucket(self, peer: str, now: float) -> _TokenBucket:
        b = self._buckets.get(peer)
        if b is None:
            if len(self._buckets) >= 4096:  # why: bounded; full, idle buckets carry no state
                idle = [p for p, x in self._buckets.items() if now - x.stamp > 10]
                for p in idle:
                    del self._buckets[p]
            b = self._buckets[peer] = _TokenBucket(
                self.limits.capacity_rate_per_s, self.limits.capacity_burst, now
            )
        return b

    async def _serve_capacity(self, stream: INetStream, peer: str) -> None:
        now = time.monotonic()
        bucket = self._bucket(peer, now)
        if not bucket.take(now):
            self.counters["capacity_rate_limited"] += 1
            if self.offence("rate_limited", stream, peer):
                return  # banned: its connections are being closed, answer nothing
            await self._send_and_close(
                stream,
                Error(
                    code=ErrorCode.BUSY,
                    message="too many capacity requests; slow down",
                    retry_after=round(bucket.retry_after(), 3),
                ),
            )
            return
        # why a per-peer cap too: one peer holding streams open until the read timeout
        # could otherwise take every global slot (10/s x 5 s = 50 of 64).
        if (
            self._capacity_active >= self.limits.max_capacity_streams
            or self._capacity_active_per_peer[peer] >= self.limits.max_capacity_streams_per_peer
        ):
            self.counters["capacity_busy"] += 1
            if self.offence("busy", stream, peer):
                return
            await self._send_and_close(
                stream, Error(code=ErrorCode.BUSY, message="capacity service busy", retry_after=1.0)
            )
            return
        self._capacity_active += 1
        self._capacity_active_per_peer[peer] += 1
        try:
            await self._serve_capacity_inner(stream, peer)
        finally:
            self._capacity_active -= 1
            self._capacity_active_per_peer[peer] -= 1
            if not self._capacity_active_per_peer[peer]:
                del self._capacity_active_per_peer[peer]

    async def _serve_capacity_inner(self, stream: INetStream, peer: str) -> None:
        decoder = FrameDecoder(limits_for(CAPACITY_PROTOCOL))
        try:
            with trio.fail_after(self.limits.capacity_read_timeout_s):
                msg = await read_message(stream, decoder)
        except trio.TooSlowError:
            self.counters["capacity_protocol_errors"] += 1
            await self._send_and_close(
                stream, Error(code=ErrorCode.DEADLINE, message="no request within the time limit")
            )
            return
        except ProtocolError as exc:
            self.counters["capacity_protocol_errors"] += 1
            log.info("capacity protocol error from %s: %s", peer, exc)
            if self.offence("protocol", stream, peer):
                return
            await self._send_and_close(stream, Error.from_exception(exc))
            return

        current = self.current_record()
        if isinstance(msg, CapacityResponse):  # a push
            self.counters["capacity_push_received"] += 1
            try:
                self._accept_record(peer, msg.record, source="inbound")
            except RecordError as exc:
                await self._send_and_close(
                    stream,
                    Error(code=ErrorCode.BAD_REQUEST, message=f"record refused: {exc.reason}"),
                )
                return
        elif not isinstance(msg, CapacityRequest):
            self.counters["capacity_protocol_errors"] += 1
            if self.offence("protocol", stream, peer):
                return
            await self._send_and_close(
                stream,
                Error(
                    code=ErrorCode.PROTOCOL,
                    message=f"unexpected {type(msg).__name__} on {CAPACITY_PROTOCOL}",
                ),
            )
            return
        if current is None:
            await self._send_and_close(
                stream, Error(code=ErrorCode.UNAVAILABLE, message="no capacity record yet")
            )
            return
        self.counters["capacity_served"] += 1
        await self._send_and_close(stream, CapacityResponse(record=current[1]))

    async def _send_and_close(self, stream: INetStream, msg: Message) -> None:
        try:
            with trio.fail_after(self.limits.capacity_timeout_s):
                await stream.write(encode_frame(msg))
        except Exception as exc:
            log.debug("capacity reply failed: %s", exc)
            await _close_quietly(stream, reset=True)
            return
        await _close_quietly(stream)

    def _wrap(
        self, handler: StreamHandler, protocol_id: str
    ) -> Callable[[INetStream], Awaitable[None]]:
        async def wrapped(stream: INetStream) -> None:
            peer = stream.muxed_conn.peer_id.to_base58()
            try:
                await handler(stream, peer)
            except Exception:
                # why: an exception escaping here would tear down the whole connection
                log.exception("handler for %s from %s failed", protocol_id, peer)
                await _close_quietly(stream, reset=True)

        return wrapped

    # -- connections and discovery -------------------------------------------------------

    def _nursery_start(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)

    def _learn_addrs(self, peer: str, addrs: Iterable[str], ttl: int = _PEERSTORE_TTL) -> None:
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
        maddrs = _direct_addrs(addrs, peer)
        if maddrs and peer != self.peer_id_str:
            self.host.libp2p.get_peerstore().add_addrs(_id(peer), maddrs, ttl)

    # -- misbehaviour -------------------------------------------------------------------

    def offence(self, kind: str, stream: INetStream, peer: str) -> bool:
        """Score one offence by `peer` (and its IP) on `stream`; True if it is now banned.
        Services call it for refused, malformed or unauthorized requests."""
        ip = None
        # why not on a relayed stream: its remote address is the relay's, and banning it
        # would cut every peer behind that relay
        if not is_relayed(stream):
            try:
                addr = stream.get_remote_address()
                ip = addr[0] if addr else None
            except Exception:
                pass
        return self.guard.offence(kind, peer=peer, ip=ip)

    def _trusted_ips(self) -> set[str]:
        ips: set[str] = set()
        for pid, conns in list(self.host.libp2p.get_network().connections.items()):
            if not self.table.is_trusted(pid.to_base58()):
                continue
            for conn in conns if isinstance(conns, (list, tuple, set)) else [conns]:
                try:
                    addr = conn.muxed_conn.get_remote_address()
                except Exception:
                    continue
                if addr:
                    ips.add(addr[0])
        return ips

    async def _kernel_filter_loop(self) -> None:
        """Keep the listening sockets' kernel filter equal to the banned IPs (see
        peers.sockfilter): new bans go in at once, expired ones leave within 2 s."""
        if not sockfilter.supported():
            return
        installed: frozenset[str] = frozenset()
        while True:
            with trio.move_on_after(2.0):
                await self.guard.ip_banned_event().wait()
            want = frozenset(self.guard.banned_ips())
            if want == installed:
                continue
            socks = []
            for listener in list(self.host.libp2p.get_network().listeners.values()):
                for sl in getattr(listener, "listeners", ()):
                    sock = getattr(sl, "socket", None)
                    if sock is not None and sock.family == socket.AF_INET:
                        socks.append(sock)
            try:
                for sock in socks:
                    sockfilter.attach(sock, want)
                installed = want
                self.counters["kernel_filter_updates"] += 1
                log.info("kernel drops TCP from %d banned addresses", len(want))
            except OSError as exc:  # not permitted here: the userland refusal still works
                log.warning("cannot install the kernel filter for banned addresses: %s", exc)
                return

    def _on_ban(self, peer: str) -> None:
        self.counters["peers_banned"] += 1
        self.table.record_failure(peer, "banned for misbehaving", kind="network")
        self._nursery_start(self._close_peer, peer)

    async def _close_peer(self, peer: str) -> None:
        with trio.move_on_after(2):
            try:
                await self.host.libp2p.get_network().close_peer(_id(peer))
            except Exception as exc:
                log.debug("closing banned peer %s failed: %s", peer, exc)

    def _on_connected(self, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id.to_base58()
        if not self.guard.allow_peer(peer):  # outbound, or inbound racing the ban
            self._nursery_start(self._close_peer, peer)
            return
        inbound = getattr(conn, "direction", None) == Direction.INBOUND
        self.table.upsert(peer, source="inbound" if inbound else "outbound")
        self.table.set_connected(peer, True)
        log.debug("connected peer_id=%s direction=%s", peer, "in" if inbound else "out")
        if self._running:
            self._nursery_start(self.dht.add_peer, conn.muxed_conn.peer_id)
            self._queue_fetch(peer)
            if self._dht_had_no_peers:
                # why: our last DHT put had nobody to go to; put again now that we can
                self._dht_had_no_peers = False
                self._dht_publish_pending = True
                self._wake_publisher.set()

    def _on_disconnected(self, conn: INetConn) -> None:
        pid = conn.muxed_conn.peer_id
        if not self.host.libp2p.get_network().connections.get(pid):
            self.table.set_connected(pid.to_base58(), False)
            log.debug("disconnected peer_id=%s", pid)

    def _queue_fetch(self, peer: str) -> None:
        try:
            self._fetch_send.send_nowait(peer)
        except trio.WouldBlock:
            pass  # why: the refresh loop will catch up

    async def _fetch_worker(self) -> None:
        limiter = trio.CapacityLimiter(self.limits.max_parallel_fetches)
        async with trio.open_nursery() as nursery:
            async for peer in self._fetch_recv:
                if peer in self._inflight_fetch or peer == self.peer_id_str:
                    continue
                self._inflight_fetch.add(peer)
                nursery.start_soon(self._fetch_task, peer, limiter)

    async def _fetch_task(self, peer: str, limiter: trio.CapacityLimiter) -> None:
        try:
            async with limiter:
                await self.fetch_capacity(peer)
        except (CapacityError, RecordError) as exc:
            self.counters["capacity_fetch_failed"] += 1
            self.table.record_failure(peer, str(exc), kind="network")
            log.debug("capacity fetch from %s failed: %s", peer, exc)
        finally:
            self._inflight_fetch.discard(peer)

    async def _refresh_loop(self) -> None:
        interval = self.limits.refresh_interval_s
        while True:
            await trio.sleep(interval)
            now = time.time()
            routing = set(self.dht.routing_peers())
            for pid in self.host.libp2p.get_connected_peers():
                peer = pid.to_base58()
                entry = self.table.get(peer)
                if entry is None or (
                    entry.available(now) and not entry.is_fresh(interval * 0.9, now)
                ):
                    self._queue_fetch(peer)
                if pid not in routing:
                    # why: the library drops a peer from its routing table after one failed
                    # query (common under load) and never re-adds it while connected
                    self._nursery_start(self.dht.add_peer, pid)

    def _forget_failed_dial(self, pid: ID) -> None:
        """Drop `pid` from py-libp2p's negative dial cache before one of our own dials.

        why: the library refuses any dial for 60 s after one that failed, so a peer that
        restarted (kill -9, reboot, laptop lid) stayed unreachable for a minute even
        though our bootstrap loop, peer table and router already pace retries with their
        own back-off (the delegation bench lost its failover target this way)."""
        cache = getattr(self.host.libp2p.get_network(), "_negative_peer_cache", None)
        if cache is not None:
            with contextlib.suppress(Exception):
                cache.evict(str(pid))

    def _direct_dial_order(self, pid: ID, addrs: Sequence[str]) -> list[multiaddr.Multiaddr]:
        """Direct addresses to try: the ones we were just given (bootstrap, mDNS, a
        fresh record) first, then the peerstore's; at most 4."""
        out: list[multiaddr.Multiaddr] = []
        seen: set[str] = set()
        given = _direct_addrs(addrs, pid.to_base58())
        for m in [*given, *self.host.libp2p.get_peerstore().addrs(pid)]:
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
        swarm = self.host.libp2p.get_network()
        errors: list[str] = []
        with trio.fail_after(self.limits.dial_timeout_s * 2):
            for m in maddrs:
                if self.is_connected(pid):
                    return
                self._forget_failed_dial(pid)
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

    async def _dial(self, peer: str, addrs: Sequence[str], source: str) -> bool:
        if peer == self.peer_id_str or self.guard.peer_banned(peer):
            return False
        self.table.upsert(peer, source=source, addrs=addrs)
        if self.is_connected(peer):
            self._queue_fetch(peer)
            return True
        if peer in self._inflight_dial:
            return False
        self._inflight_dial.add(peer)
        try:
            self._learn_addrs(peer, addrs)
            pid = _id(peer)
            maddrs = self._direct_dial_order(pid, addrs)
            try:
                if not maddrs:
                    raise PeerUnavailable("no direct address")
                await self._dial_each(pid, maddrs)
            except (Exception, trio.TooSlowError):
                # why: a peer behind NAT is reachable only through a relay
                if not await self.relay.dial(peer, list(addrs) + self._known_circuits(peer)):
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
            self._inflight_dial.discard(peer)
        self.table.record_reachable(peer)
        if source != "dht":
            # why: a peer we were told about (bootstrap, mDNS, manual) knows others; ask
            # soon. Not for DHT-found or inbound peers, or lookups would cascade.
            self._wake_discovery.set()
        log.info("dialled peer_id=%s source=%s", peer, source)
        return True

    async def _bootstrap_loop(self) -> None:
        next_try = {p: 0.0 for p in self._bootstrap}
        delay = {p: 0.5 for p in self._bootstrap}
        while True:
            now = time.monotonic()
            for peer, maddrs in self._bootstrap.items():
                if self.is_connected(peer) or peer in self._inflight_dial:
                    delay[peer] = 0.5
                    continue
                if now >= next_try[peer]:
                    next_try[peer] = now + delay[peer]
                    delay[peer] = min(delay[peer] * 2, 30.0)
                    self._nursery_start(self._dial, peer, [str(m) for m in maddrs], "bootstrap")
            await trio.sleep(0.25)

    async def _discovery_loop(self) -> None:
        """DHT self-lookups: after 0.5, 1, 2, 4 ... s up to every `discovery_max_interval_s`,
        and soon after we dial a peer we were told about (never closer together than
        `min_discovery_interval_s`). Inbound connections do not trigger one, or each new
        node would set off a lookup on every node it touches."""
        interval = 0.5
        last = -math.inf
        while True:
            with trio.move_on_after(interval):
                await self._wake_discovery.wait()
            woken = self._wake_discovery.is_set()
            self._wake_discovery = trio.Event()
            # why: let a burst of connections settle into one lookup, and never run
            # lookups back to back however often we are woken
            await trio.sleep(
                max(0.1, last + self.limits.min_discovery_interval_s - time.monotonic())
            )
            if not self.connected_peers():
                interval = 1.0
                continue
            last = time.monotonic()
            try:
                with trio.move_on_after(self.limits.lookup_timeout_s):
                    self._connect_discovered(await self.dht.discover_peers())
            except Exception as exc:
                log.debug("DHT discovery round failed: %s", exc)
            if not woken:
                interval = min(interval * 2, self.limits.discovery_max_interval_s)

    def _connect_discovered(self, found: Iterable[ID]) -> None:
        """Dial found peers we are not connected to, up to `max_auto_connect`."""
        budget = self.limits.max_auto_connect - len(self.connected_peers())
        now = time.time()
        for pid in found:
            if budget <= 0:
                break
            peer = pid.to_base58()
            if peer == self.peer_id_str or self.is_connected(pid) or peer in self._inflight_dial:
                continue
            entry = self.table.get(peer)
            if entry is not None and not entry.available(now):
                continue
            addrs = [str(a) for a in self.host.libp2p.get_peerstore().addrs(pid)]
            if not addrs:
                continue
            budget -= 1
            self._nursery_start(self._dial, peer, addrs, "dht")

    # -- beyond the LAN: relays, paths, reachability -------------------------------------

    def _known_circuits(self, peer: str) -> list[str]:
        entry = self.table.get(peer)
        addrs = list(entry.record.addrs) if entry is not None and entry.record else []
        try:
            addrs += [str(a) for a in self.host.libp2p.get_peerstore().addrs(_id(peer))]
        except Exception:
            pass
        return [a for a in addrs if is_circuit(a)]

    async def _connect_relayed_if_needed(self, peer: str, timeout: float) -> None:
        """Not connected to `peer`: try its direct addresses, then a relay (best effort)."""
        with trio.move_on_after(timeout):
            try:
                maddrs = [
                    m for m in self.host.libp2p.get_peerstore().addrs(_id(peer)) if not is_circuit(m)
                ]
                if maddrs:
                    with trio.move_on_after(min(3.0, timeout / 2)):
                        await self.host.libp2p.connect(PeerInfo(_id(peer), maddrs))
                        return
            except Exception:
                pass
            if not self.is_connected(peer):
                await self.relay.dial(peer, self._known_circuits(peer))

    async def _find_dht_relays(self) -> list[tuple[str, list[str]]]:
        """Relay providers in the DHT: (peer id, addresses), not us. Bounded by the
        caller; the addresses are learnt for later dials."""
        infos = await self.dht.find_providers(RELAY_KEY_SHA256)
        out = []
        for info in infos:
            peer = info.peer_id.to_base58()
            addrs = [str(a) for a in info.addrs]
            self._learn_addrs(peer, addrs, ttl=600)
            if not addrs:  # why: a provider record may omit them; the peerstore may not
                try:
                    addrs = [str(a) for a in self.host.libp2p.get_peerstore().addrs(info.peer_id)]
                except Exception:
                    addrs = []
            out.append((peer, addrs))
        return out

    def stream_path(self, stream: INetStream) -> str:
        """"relayed" or "direct": the connection `stream` runs over (a stream opened
        before a hole punch stays on the relayed connection)."""
        return "relayed" if is_relayed(stream) else "direct"

    def peer_path(self, peer: str) -> tuple[str | None, str | None]:
        """("direct"|"relayed"|None, relay peer id) of our connection to `peer`."""
        return self.relay.path(peer)

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

    def beyond_lan_status(self) -> dict[str, Any]:
        """Reachability, relayed addresses and reservations, relay service counters."""
        return {**self.reachability.status(), **self.relay.status()}

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
        self._nursery_start(self._dial, peer, addrs, "mdns")
