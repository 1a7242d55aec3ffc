"""Beyond the LAN: circuit relay v2 (serve and use), DCUtR hole punching, and the path
(direct or relayed) to each peer.

Built on py-libp2p 0.8.1's `libp2p.relay.circuit_v2`, with these parts replaced because
they are wrong or unbounded there (all checked against its source):

- `CircuitV2Protocol._handle_reserve` reserves for the peer id named *in the message*
  when there is one, so any peer could take (or refresh) a slot in another's name; ours
  reserves for the connection's authenticated peer only, and checks the allow list.
- `CircuitV2Protocol.handle_incoming_connection` (the STOP side) labels the relayed
  connection `/p2p/<our own id>/p2p-circuit/...` instead of the relay's id; ours uses the
  relay that opened the STOP stream, and accepts STOP streams only from relays this node
  holds (or held) a reservation on, so a stranger cannot make us run handshakes for it.
- `CircuitV2Transport.dial` discards the relay's per-circuit limit (bytes, duration)
  from the CONNECT answer and, with the client role, makes a reservation on every dial;
  ours dials with one CONNECT, keeps the limit per peer (a pull checks it before it
  starts) and never reserves by surprise. Both ends of a circuit (the dialler from the
  CONNECT answer, the destination from the STOP message) record its limits and count the
  bytes it carried, as the relay counts them, so `circuit(peer)` says what is left.
- Reservations are made and renewed here (the library's refresher is not used): renewed
  at half their lifetime or at once when the relay connection drops; a refusal or a
  failure backs off and is logged and shown in status.

Trust is unchanged by a relay: a relayed connection is Noise-encrypted end to end
between the two peers (the relay forwards ciphertext) and the peers still authorize each
other by peer id; the relay is never trusted with prompts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, StopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service

from peers.host import parse_peer_addrs

log = logging.getLogger("qvacd.peers.relay")

CIRCUIT = "p2p-circuit"
_MAX_CIRCUIT_ADDRS = 4  # advertised /p2p-circuit addresses
_MAX_LIMITS = 1024  # remembered per-peer circuit limits
_MAX_CIRCUITS_PER_PEER = 4  # remembered circuits to one peer (newest kept)
_DHT_RELAY_MAX_FAILURES = 3  # a DHT-found relay failing this often in a row is dropped
_DHT_RELAY_FORGET_S = 600.0  # ... and not picked again for this long
_DHT_BACKOFF_MAX_S = 300.0
_DHT_TRIES_PER_SEARCH = 4  # relays one search tries (each up to reserve_timeout_s)


def _status(resp: HopMessage) -> StatusCode:
    """The status of a relay's answer; UNUSED for none or a value we do not know."""
    try:
        return StatusCode(resp.status) if resp.HasField("status") else StatusCode.UNUSED
    except ValueError:
        return StatusCode.UNUSED


class RelayError(Exception):
    """A relay option is malformed."""


@dataclasses.dataclass(frozen=True)
class RelayOptions:
    service: bool = False  # act as a relay (hop) for others
    max_reservations: int = 32
    reservation_ttl_s: int = 3600
    circuit_duration_s: int = 3600  # per relayed connection; 0: unlimited
    circuit_bytes: int = 1 << 30  # per relayed connection, both directions; 0: unlimited
    max_circuits_per_peer: int = 8
    allow: tuple[str, ...] = ()  # peer ids that may reserve; empty: anyone, within limits
    relays: tuple[str, ...] = ()  # relays to reserve a slot on, MULTIADDR/p2p/PEERID
    hole_punch: bool = True
    reserve_timeout_s: float = 10.0
    dial_timeout_s: float = 10.0
    dht_max: int = 2  # relays found in the DHT to reserve on when private (0: never look)
    dht_lookup_timeout_s: float = 10.0
    dht_backoff_s: float = 5.0  # first wait between DHT relay searches; doubles to 300 s

    def limits(self) -> RelayLimits:
        return RelayLimits(
            duration=self.circuit_duration_s,
            data=self.circuit_bytes,
            max_circuit_conns=self.max_circuits_per_peer,
            max_reservations=self.max_reservations,
            reservation_ttl=self.reservation_ttl_s,
        )


def is_circuit(addr: str | multiaddr.Multiaddr) -> bool:
    return f"/{CIRCUIT}" in str(addr)


@dataclasses.dataclass
class Circuit:
    """One relayed connection to a peer, with the relay's limits on it. `used` counts the
    bytes it carried both ways, as the relay counts them (the relay reads each side's hop
    or stop stream and charges every byte it forwards to one budget per circuit)."""

    peer: str
    relay: str
    limit_bytes: int  # 0: unlimited
    limit_duration_s: int  # 0: unlimited
    opened: float = dataclasses.field(default_factory=time.monotonic)
    used: int = 0
    closed: bool = False

    def bytes_left(self) -> int | None:
        """Bytes this circuit may still carry; None when unlimited."""
        return None if self.limit_bytes <= 0 else max(0, self.limit_bytes - self.used)

    def seconds_left(self) -> float | None:
        """Seconds before the relay cuts this circuit; None when unlimited."""
        if self.limit_duration_s <= 0:
            return None
        return max(0.0, self.opened + self.limit_duration_s - time.monotonic())


def _limit_of(msg: Any) -> tuple[int, int]:
    """(bytes, seconds) from a HOP/STOP message's limit; (0, 0) without one (unlimited)."""
    if not msg.HasField("limit"):
        return 0, 0
    return int(msg.limit.data), int(msg.limit.duration)


class _CountedConnection(RawConnection):
    """A relayed raw connection that counts what it carries into its Circuit."""

    def __init__(self, circuit: Circuit, stream: Any, initiator: bool, addr: multiaddr.Multiaddr
                 ) -> None:
        super().__init__(stream=stream, initiator=initiator,
                         connection_type=ConnectionType.RELAYED, addresses=[addr])
        self.circuit = circuit

    async def write(self, data: bytes) -> None:
        try:
            await super().write(data)
        except BaseException as e:
            if not isinstance(e, trio.Cancelled):
                self.circuit.closed = True
            raise
        self.circuit.used += len(data)

    async def read(self, n: int | None = None) -> bytes:
        try:
            data = await super().read(n)
        except BaseException as e:
            if not isinstance(e, trio.Cancelled):
                self.circuit.closed = True
            raise
        if not data:
            self.circuit.closed = True
        self.circuit.used += len(data)
        return data

    async def close(self) -> None:
        self.circuit.closed = True
        await super().close()


def _dialable(addrs: Iterable[str]) -> list[multiaddr.Multiaddr]:
    """A relay's addresses from the DHT that are worth dialling and advertising through:
    no circuits, no wildcards, loopback only if that is all there is; at most 4."""
    good: list[multiaddr.Multiaddr] = []
    loop: list[multiaddr.Multiaddr] = []
    for a in addrs:
        s = str(a).split("/p2p/")[0]
        if not s or is_circuit(s) or "/0.0.0.0/" in s or "/::/" in s:
            continue
        try:
            ma = multiaddr.Multiaddr(s)
        except Exception:
            continue
        bucket = loop if s.startswith(("/ip4/127.", "/ip6/::1/")) else good
        if ma not in bucket:
            bucket.append(ma)
    return (good or loop)[:4]


def parse_relays(addrs: Iterable[str]) -> dict[str, list[multiaddr.Multiaddr]]:
    """MULTIADDR/p2p/PEERID strings -> {relay peer id: [addresses without /p2p]}."""
    return parse_peer_addrs(addrs, "relay", RelayError)


def connection_path(host: IHost, peer: ID) -> tuple[str | None, str | None]:
    """("direct"|"relayed"|None, relay peer id or None) for our live connections to peer."""
    conns = host.get_network().connections.get(peer) or []
    relay = None
    relayed = False
    for conn in conns if isinstance(conns, list) else [conns]:
        try:
            if getattr(conn, "is_closed", False):
                continue
            kind = conn.get_connection_type()
            addrs = conn.get_transport_addresses()
        except Exception:
            continue
        if kind == ConnectionType.RELAYED or any(is_circuit(a) for a in addrs):
            relayed = True
            for a in addrs:
                s = str(a)
                if is_circuit(s):
                    head = s.split(f"/{CIRCUIT}")[0]
                    relay = head.rsplit("/p2p/", 1)[-1] if "/p2p/" in head else relay
        else:
            return "direct", None
    return ("relayed", relay) if relayed else (None, None)


class QvacRelayProtocol(CircuitV2Protocol):
    """The library's circuit relay v2 protocol with the fixes named in the module doc."""

    def __init__(
        self,
        host: IHost,
        options: RelayOptions,
        accept_stop_from: Callable[[str], bool],
        on_circuit: Callable[[Circuit], None] = lambda c: None,
    ) -> None:
        super().__init__(host, limits=options.limits(), allow_hop=options.service)
        self.allow = frozenset(options.allow)
        self._accept_stop_from = accept_stop_from
        self._on_circuit = on_circuit
        if options.circuit_bytes <= 0:
            # why: with no byte limit the library skips the circuit budget but falls back
            # to a per-reservation one of limit 0, and cuts a circuit at its first byte
            self.resource_manager.track_data_transfer = lambda peer_id, n: True  # type: ignore[method-assign]
        self.counters: dict[str, int] = {
            "reservations_accepted": 0,
            "reservations_refused": 0,
            "circuits_opened": 0,
            "bytes_relayed": 0,
            "stop_refused": 0,
        }

    # -- hop (relay service) ---------------------------------------------------------

    async def _handle_reserve(self, stream: INetStream, msg: HopMessage) -> None:
        peer = stream.muxed_conn.peer_id
        if self.allow and peer.to_base58() not in self.allow:
            self.counters["reservations_refused"] += 1
            log.info("relay: reservation refused peer_id=%s reason=not in relay_allow", peer)
            await self._send_status(stream, StatusCode.PERMISSION_DENIED, "not allowed")
            return
        if not self.resource_manager.has_reservation(
            peer
        ) and not self.resource_manager.can_accept_reservation(peer):
            self.counters["reservations_refused"] += 1
            log.info("relay: reservation refused peer_id=%s reason=relay full", peer)
        else:
            self.counters["reservations_accepted"] += 1
        # why: the library reserves for msg.peer when present; only the authenticated
        # connection peer may reserve for itself
        msg.ClearField("peer")
        await super()._handle_reserve(stream, msg)

    async def _handle_connect(self, stream: INetStream, msg: HopMessage) -> None:
        self.counters["circuits_opened"] += 1
        await super()._handle_connect(stream, msg)

    async def _read_stream_with_retry(self, stream: INetStream, max_retries: int = 3) -> Any:
        # The relay's copy loop reads each chunk through here: count what it carries.
        data = await super()._read_stream_with_retry(stream, max_retries)
        if data:
            self.counters["bytes_relayed"] += len(data)
        return data

    def reservations(self) -> int:
        rm = self.resource_manager
        rm._clean_expired()
        return len(rm._reservations)

    def active_circuits(self) -> int:
        return sum(1 for _s, d in self._active_relays.values() if d is not None)

    # -- stop (we are the destination of a circuit) ------------------------------------

    async def _handle_stop_stream(self, stream: INetStream) -> None:
        # Replaces the library's handler: the same exchange, plus the relay check above
        # and the circuit's limits kept from the STOP message (the library drops them).
        relay = stream.muxed_conn.peer_id.to_base58()
        if not self._accept_stop_from(relay):
            self.counters["stop_refused"] += 1
            log.info("relay: circuit refused from %s (not a relay we reserved on)", relay)
            await self._send_stop_status(stream, StatusCode.PERMISSION_DENIED, "no reservation")
            await self._close_stream(stream)
            return
        try:
            with trio.fail_after(15):
                msg = await read_delimited_msg(stream, StopMessage)
        except (Exception, trio.TooSlowError):  # noqa: BLE001 - any failure: no circuit
            await self._close_stream(stream)
            return
        if msg.type != StopMessage.CONNECT:
            await self._send_stop_status(stream, StatusCode.MALFORMED_MESSAGE, "not a CONNECT")
            await self._close_stream(stream)
            return
        await self._send_stop_status(stream, StatusCode.OK, "Connection established")
        try:
            await self._accept_circuit(stream, msg.peer.id, _limit_of(msg))
        except ConnectionError as e:
            log.info("relay: %s", e)

    async def handle_incoming_connection(self, stream: INetStream, remote_peer_id: bytes) -> None:
        await self._accept_circuit(stream, remote_peer_id, (0, 0))

    async def _accept_circuit(self, stream: INetStream, remote_peer_id: bytes,
                              limit: tuple[int, int]) -> None:
        relay = stream.muxed_conn.peer_id.to_base58()
        try:
            peer_id = ID(remote_peer_id)
            ma = multiaddr.Multiaddr(f"/p2p/{relay}/{CIRCUIT}/p2p/{peer_id.to_base58()}")
            circuit = Circuit(peer_id.to_base58(), relay, *limit)
            raw_conn = _CountedConnection(circuit, stream, False, ma)
            with trio.fail_after(15):
                await self.host.upgrade_inbound_connection(raw_conn, ma)
            self._on_circuit(circuit)
        except (Exception, trio.TooSlowError) as e:
            await self._close_stream(stream)
            raise ConnectionError(f"relayed connection via {relay} failed: {e}") from None


@dataclasses.dataclass
class _Reservation:
    relay: str
    addrs: list[multiaddr.Multiaddr]
    state: str = "pending"  # pending | reserved | refused | unreachable
    expires: float = 0.0  # unix time
    error: str = ""
    limit_bytes: int = 0
    limit_duration_s: int = 0
    since: float = 0.0
    source: str = "flag"  # flag (--relay) | dht (found in the DHT)
    failures: int = 0  # consecutive failed reservation attempts


class RelayService:
    """Everything relay-related for one node; `run()` in the network's nursery."""

    def __init__(
        self,
        host: IHost,
        options: RelayOptions,
        *,
        on_addrs_changed: Callable[[], None] = lambda: None,
        find_relays: Callable[[], Awaitable[list[tuple[str, list[str]]]]] | None = None,
        needs_relay: Callable[[], bool] = lambda: False,
    ) -> None:
        self.host = host
        # Relays from the DHT: `find_relays()` returns (relay peer id, addresses) of relay
        # providers; asked only while `needs_relay()` (we are private) and no reservation
        # works, for at most `options.dht_max` relays.
        self._find_relays = find_relays
        self._needs_relay = needs_relay
        self._nursery: trio.Nursery | None = None
        self.options = options
        self.peer_id_str = host.get_id().to_base58()
        relays = parse_relays(options.relays)
        relays.pop(self.peer_id_str, None)
        self._reservations = {r: _Reservation(r, a) for r, a in relays.items()}
        self._on_addrs_changed = on_addrs_changed
        self._ever_reserved: set[str] = set()
        self._dht_dropped: dict[str, float] = {}  # DHT relay -> when dropped (monotonic)
        self.protocol = QvacRelayProtocol(host, options, self._may_stop, self._add_circuit)
        self.dcutr = DCUtRProtocol(host, read_timeout=10, write_timeout=10, dial_timeout=3)
        self._circuits: dict[str, list[Circuit]] = {}  # peer -> its relayed connections
        self._dialling: set[str] = set()
        self.counters: dict[str, int] = {"relayed_dials": 0, "relayed_dial_failures": 0}

    # -- lifecycle -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.protocol), trio.open_nursery() as nursery:
            self._nursery = nursery
            if self._find_relays is not None and self.options.dht_max > 0:
                nursery.start_soon(self._dht_relay_loop)
            if self.options.hole_punch:
                await nursery.start(self._run_dcutr)
            for res in self._reservations.values():
                nursery.start_soon(self._keep_reserved, res)
            if self.options.service:
                log.info(
                    "relay service on: max_reservations=%d circuit_bytes=%d "
                    "circuit_duration_s=%d allow=%s",
                    self.options.max_reservations, self.options.circuit_bytes,
                    self.options.circuit_duration_s,
                    ",".join(self.options.allow) or "anyone",
                )
            task_status.started()
            await trio.sleep_forever()

    async def _run_dcutr(self, *, task_status: trio.TaskStatus[None]) -> None:
        async with background_trio_service(self.dcutr):
            task_status.started()
            await trio.sleep_forever()

    # -- reservations (client side) --------------------------------------------------

    def _may_stop(self, relay: str) -> bool:
        return relay in self._ever_reserved

    async def _keep_reserved(self, res: _Reservation) -> None:
        backoff = 2.0
        while True:
            ok = await self._reserve_once(res)
            if not ok and res.source == "dht" and res.failures >= _DHT_RELAY_MAX_FAILURES:
                # A relay found in the DHT that keeps failing is dropped: the search
                # (below) picks another one. --relay ones are kept, as configured.
                log.warning("relay: dropping DHT-found relay %s after %d failed attempts (%s);"
                            " the DHT relay search picks another when one is needed",
                            res.relay, res.failures, res.error or res.state)
                if self._reservations.get(res.relay) is res:
                    del self._reservations[res.relay]
                    self._dht_dropped[res.relay] = time.monotonic()
                return
            if ok:
                backoff = 2.0
                ttl = max(10.0, res.expires - time.time())
                # renew at half the lifetime, or at once if the relay connection drops
                with trio.move_on_after(ttl / 2):
                    while self._connected(res.relay):
                        await trio.sleep(1.0)
                    log.warning(
                        "relay: connection to relay %s lost; reserving again", res.relay
                    )
                if res.expires <= time.time() + 1:
                    self._set_state(res, "pending", "reservation expired")
                continue
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 120.0)

    def _unblock(self, relay: ID) -> None:
        """Forget the library's failed-dial cache entry for a relay: after one failed dial
        it refuses to dial that peer for 60 s, so a relay that restarted would stay out
        of reach for a minute; our own back-off (2 s doubling) paces the retries."""
        unblock = getattr(self.host.get_network(), "unblock_peer", None)
        if unblock is not None:
            unblock(relay)

    def _connected(self, peer: str) -> bool:
        conns = self.host.get_network().connections.get(ID.from_base58(peer))
        return bool(conns)

    def _set_state(self, res: _Reservation, state: str, error: str = "") -> None:
        changed = (res.state == "reserved") != (state == "reserved")
        res.state, res.error, res.since = state, error, time.time()
        if changed:
            self._on_addrs_changed()

    async def _reserve_once(self, res: _Reservation) -> bool:
        pid = ID.from_base58(res.relay)
        stream = None
        try:
            with trio.fail_after(self.options.reserve_timeout_s):
                self._unblock(pid)
                await self.host.connect(PeerInfo(pid, res.addrs))
                stream = await self.host.new_stream(pid, [HOP_PROTOCOL])
                await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
                resp = await read_delimited_msg(stream, HopMessage)
        except (Exception, trio.TooSlowError) as e:
            msg = "timed out" if isinstance(e, trio.TooSlowError) else f"{type(e).__name__}: {e}"
            if res.state != "unreachable" or res.error != msg:
                log.warning("relay: cannot reserve on %s: %s; will retry", res.relay, msg[:160])
            self._set_state(res, "unreachable", msg[:200])
            res.failures += 1
            return False
        finally:
            if stream is not None:
                with trio.move_on_after(2):
                    try:
                        await stream.close()
                    except Exception:
                        pass
        status = _status(resp)
        if status != StatusCode.OK or not resp.HasField("reservation"):
            reason = status.name if status != StatusCode.OK else "no reservation in answer"
            log.warning("relay: %s refused the reservation: %s; will retry later", res.relay, reason)
            self._set_state(res, "refused", reason)
            res.failures += 1
            return False
        res.expires = float(resp.reservation.expire) or time.time() + 60
        if resp.HasField("limit"):
            res.limit_bytes, res.limit_duration_s = resp.limit.data, resp.limit.duration
        self._ever_reserved.add(res.relay)
        res.failures = 0
        was = res.state
        self._set_state(res, "reserved")
        if was != "reserved":
            log.info(
                "relay: reserved on %s (%s) for %.0f s (circuit limits: %d bytes, %d s); "
                "advertising %s",
                res.relay, "found in the DHT" if res.source == "dht" else "--relay",
                res.expires - time.time(), res.limit_bytes, res.limit_duration_s,
                ",".join(self.circuit_addrs()),
            )
        return True

    # -- relays found in the DHT -------------------------------------------------------

    def _has_working_reservation(self) -> bool:
        now = time.time()
        return any(r.state == "reserved" and r.expires > now for r in self._reservations.values())

    async def _dht_relay_loop(self) -> None:
        """While we are private and no reservation works, look up relay providers in the
        DHT and reserve on one (the next on refusal), up to `dht_max` DHT relays. Every
        lookup is bounded; searches that find nothing back off (5 s doubling to 5 min)."""
        backoff = self.options.dht_backoff_s
        await trio.sleep(1.0)
        while True:
            dht_held = sum(1 for r in self._reservations.values() if r.source == "dht")
            if (self._has_working_reservation() or not self._needs_relay()
                    or dht_held >= self.options.dht_max):
                backoff = self.options.dht_backoff_s
                await trio.sleep(2.0)
                continue
            if await self._reserve_from_dht():
                backoff = self.options.dht_backoff_s
                continue
            await trio.sleep(backoff)
            backoff = min(backoff * 2, _DHT_BACKOFF_MAX_S)

    async def _reserve_from_dht(self) -> bool:
        """One search: True once a reservation on a DHT-found relay is made."""
        assert self._find_relays is not None and self._nursery is not None
        found: list[tuple[str, list[str]]] = []
        try:
            with trio.fail_after(self.options.dht_lookup_timeout_s):
                found = await self._find_relays()
        except (Exception, trio.TooSlowError) as e:
            msg = "timed out" if isinstance(e, trio.TooSlowError) else f"{type(e).__name__}: {e}"
            log.info("relay: looking up relays in the DHT failed: %s", msg[:160])
            return False
        now = time.monotonic()
        if len(self._dht_dropped) > 256:
            self._dht_dropped = {r: t for r, t in self._dht_dropped.items()
                                 if now - t < _DHT_RELAY_FORGET_S}
        tried: list[str] = []
        for relay, addrs in found:
            if relay == self.peer_id_str or relay in self._reservations:
                continue
            if now - self._dht_dropped.get(relay, -math.inf) < _DHT_RELAY_FORGET_S:
                continue
            if sum(1 for r in self._reservations.values() if r.source == "dht") >= \
                    self.options.dht_max:
                break
            maddrs = _dialable(addrs)
            if not maddrs:
                continue
            if len(tried) >= _DHT_TRIES_PER_SEARCH:
                break
            res = _Reservation(relay, maddrs, source="dht")
            tried.append(relay)
            self._reservations[relay] = res  # why first: status shows the attempt
            if await self._reserve_once(res):
                log.info("relay: using relay %s found in the DHT", relay)
                self._nursery.start_soon(self._keep_reserved_after_first, res)
                return True
            if self._reservations.get(relay) is res:
                del self._reservations[relay]
            self._dht_dropped[relay] = now  # refused or unreachable: try the next one
        log.info("relay: no usable relay in the DHT (%d found%s); retrying later", len(found),
                 f", tried {', '.join(t[:16] for t in tried)}" if tried else "")
        return False

    async def _keep_reserved_after_first(self, res: _Reservation) -> None:
        """`_keep_reserved` for a reservation just made: wait out half its lifetime (or a
        drop of the relay connection) before the first renewal."""
        ttl = max(10.0, res.expires - time.time())
        with trio.move_on_after(ttl / 2):
            while self._connected(res.relay):
                await trio.sleep(1.0)
        await self._keep_reserved(res)

    def circuit_addrs(self) -> list[str]:
        """Our /p2p-circuit addresses through every relay we hold a reservation on."""
        out: list[str] = []
        now = time.time()
        for res in self._reservations.values():
            if res.state != "reserved" or res.expires <= now:
                continue
            for a in res.addrs:
                s = f"{a}/p2p/{res.relay}/{CIRCUIT}/p2p/{self.peer_id_str}"
                if s not in out:
                    out.append(s)
        return out[:_MAX_CIRCUIT_ADDRS]

    def relays(self) -> list[str]:
        return list(self._reservations)

    # -- dialling through a relay ------------------------------------------------------

    def candidate_circuits(self, peer: str, addrs: Iterable[str]) -> list[str]:
        """Circuit addresses to try for `peer`: those it advertised, then one through each
        relay we use (a relay answers NO_RESERVATION at once if the peer has none)."""
        out = [a for a in addrs if is_circuit(a) and a.endswith(f"/p2p/{peer}")]
        for res in self._reservations.values():
            if res.relay == peer:
                continue
            for a in res.addrs[:1]:
                s = f"{a}/p2p/{res.relay}/{CIRCUIT}/p2p/{peer}"
                if s not in out:
                    out.append(s)
        return out[:8]

    async def dial(self, peer: str, addrs: Sequence[str]) -> bool:
        """Connect to `peer` through a relay; True once a relayed connection is up."""
        if peer in self._dialling or peer == self.peer_id_str:
            return False
        self._dialling.add(peer)
        try:
            errors = []
            for circuit in self.candidate_circuits(peer, addrs):
                try:
                    with trio.fail_after(self.options.dial_timeout_s):
                        await self._dial_circuit(peer, circuit)
                    self.counters["relayed_dials"] += 1
                    log.info("relay: connected to %s via %s", peer, circuit)
                    return True
                except (Exception, trio.TooSlowError) as e:
                    msg = "timed out" if isinstance(e, trio.TooSlowError) else str(e)
                    errors.append(f"{circuit.split('/p2p-circuit')[0]}: {msg[:120]}")
            if errors:
                self.counters["relayed_dial_failures"] += 1
                log.info("relay: no relayed path to %s: %s", peer, "; ".join(errors)[:400])
            return False
        finally:
            self._dialling.discard(peer)

    async def _dial_circuit(self, peer: str, circuit: str) -> None:
        relay_part, _, _ = circuit.partition(f"/{CIRCUIT}")
        info = info_from_p2p_addr(multiaddr.Multiaddr(relay_part))
        relay = info.peer_id
        dest = ID.from_base58(peer)
        self._unblock(relay)
        await self.host.connect(info)
        stream = await self.host.new_stream(relay, [HOP_PROTOCOL])
        ok = False
        try:
            await write_delimited_msg(
                stream,
                HopMessage(type=HopMessage.CONNECT, peer=CircuitPeerId(id=dest.to_bytes())),
            )
            resp = await read_delimited_msg(stream, HopMessage)
            status = _status(resp)
            if status != StatusCode.OK:
                raise ConnectionError(f"relay answered {status.name}")
            circuit = Circuit(peer, relay.to_base58(), *_limit_of(resp))
            ma = multiaddr.Multiaddr(f"/p2p/{relay.to_base58()}/{CIRCUIT}/p2p/{peer}")
            raw = _CountedConnection(circuit, stream, True, ma)
            await self.host.upgrade_outbound_connection(raw, dest)
            self._add_circuit(circuit)
            ok = True
        finally:
            if not ok:
                with trio.move_on_after(1):
                    try:
                        await stream.reset()
                    except Exception:
                        pass

    # -- views -------------------------------------------------------------------------

    def path(self, peer: str) -> tuple[str | None, str | None]:
        try:
            return connection_path(self.host, ID.from_base58(peer))
        except Exception:
            return None, None

    def _add_circuit(self, circuit: Circuit) -> None:
        if circuit.peer not in self._circuits and len(self._circuits) >= _MAX_LIMITS:
            for p in [p for p, cs in self._circuits.items() if all(c.closed for c in cs)]:
                del self._circuits[p]
            if len(self._circuits) >= _MAX_LIMITS:
                self._circuits.pop(next(iter(self._circuits)))
        kept = [c for c in self._circuits.get(circuit.peer, []) if not c.closed]
        self._circuits[circuit.peer] = [*kept, circuit][-_MAX_CIRCUITS_PER_PEER:]
        log.info(
            "relay: circuit to %s via %s (limits: %s bytes, %s s)", circuit.peer, circuit.relay,
            circuit.limit_bytes or "no limit", circuit.limit_duration_s or "no limit",
        )

    def circuit(self, peer: str) -> Circuit | None:
        """The relayed connection that limits traffic to `peer`, when our only path to it
        is relayed: of its open circuits, the one with the fewest bytes left (a stream may
        go over any of them). None when the path is direct, or there is no connection, or
        the relayed connection is not one we know the limits of (the spec's default: a
        relay that names no limit imposes none)."""
        path, _ = self.path(peer)
        if path != "relayed":
            return None
        live = [c for c in self._circuits.get(peer, []) if not c.closed]
        if not live:
            return None

        def left(c: Circuit) -> float:
            b = c.bytes_left()
            return float("inf") if b is None else b

        return min(live, key=left)

    def circuit_limit(self, peer: str) -> tuple[str, int, int] | None:
        """(relay, bytes, seconds) limiting our relayed connection to `peer`, when relayed."""
        c = self.circuit(peer)
        return (c.relay, c.limit_bytes, c.limit_duration_s) if c is not None else None

    def status(self) -> dict[str, Any]:
        now = time.time()
        out: dict[str, Any] = {
            "relayed_addrs": self.circuit_addrs(),
            "reservations": [
                {
                    "relay": r.relay,
                    "source": r.source,
                    "state": r.state,
                    **({"expires_in_s": round(r.expires - now)} if r.state == "reserved" else {}),
                    **({"error": r.error} if r.error else {}),
                    **(
                        {"circuit_bytes": r.limit_bytes, "circuit_duration_s": r.limit_duration_s}
                        if r.state == "reserved"
                        else {}
                    ),
                }
                for r in self._reservations.values()
            ],
            "hole_punch": self.options.hole_punch,
            **self.counters,
        }
        if self.options.service:
            out["service"] = {
                "reservations": self.protocol.reservations(),
                "max_reservations": self.options.max_reservations,
                "circuits_active": self.protocol.active_circuits(),
                "circuit_bytes": self.options.circuit_bytes,
                "circuit_duration_s": self.options.circuit_duration_s,
                "allow": list(self.options.allow) or "anyone",
                **self.protocol.counters,
            }
        return out
