"""Reachability: can peers open a connection to us? public / private / unknown.

Why not py-libp2p 0.8.1's AutoNAT (`libp2p.host.autonat.AutoNATService`): its server
dials back with `host.connect()`, which returns at once when a connection to the peer
already exists, and one always does (the request arrived on it), so the dial-back
proves nothing; its client advertises only the listen addresses, which behind NAT are
private and never match the IP the server observes, so every answer is E_DIAL_REFUSED,
counted as a failure; and it needs 4 agreeing servers (CONFIRMATIONS_REQUIRED), which a
home mesh with one relay never has.

Our dial-back, `/qvac/dialback/1.0.0`:
- client -> server: 1 byte N (1..4), then N big-endian u16 TCP ports we listen on;
- the server dials `/ip4/<the IP it sees us at>/tcp/<port>` on a *new* connection (never
  the one the request came on), Noise-authenticated as the requesting peer id, closes
  it again, and answers one byte: 1 reachable, 0 not, 2 refused (request over a relayed
  connection, or from a peer that asked less than `min_interval_s` ago), 3 busy.
The server only ever dials the requester's own observed IP (no amplification), at most
4 ports, one request per peer per `min_interval_s`, `max_concurrent` at once.

The client asks up to 3 peers it is directly connected to, every `interval_s` (sooner
while unknown): most answers reachable -> public, most not -> private, else unknown.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

log = logging.getLogger("qvacd.peers.reachability")

DIALBACK_PROTOCOL = "/qvac/dialback/1.0.0"
MAX_PORTS = 4
REACHABLE, UNREACHABLE, REFUSED, BUSY = 1, 0, 2, 3
PUBLIC, PRIVATE, UNKNOWN = "public", "private", "unknown"


async def _read_exactly(stream: INetStream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            raise EOFError("stream ended")
        buf += chunk
    return buf


def is_relayed(stream: INetStream) -> bool:
    """Whether `stream` runs over a circuit relay connection."""
    try:
        conn = stream.muxed_conn
        if conn.get_connection_type() == ConnectionType.RELAYED:  # type: ignore[attr-defined]
            return True
        addrs = conn.get_transport_addresses()  # type: ignore[attr-defined]
        return any("/p2p-circuit" in str(a) for a in addrs)
    except Exception:
        return False


class Reachability:
    """Serve dial-backs and find out our own reachability; `run()` in a nursery."""

    def __init__(
        self,
        host: IHost,
        *,
        listen_ports: Callable[[], list[int]],
        servers: Callable[[], list[str]],
        on_change: Callable[[str], None] = lambda s: None,
        interval_s: float = 120.0,
        unknown_interval_s: float = 10.0,
        dial_timeout_s: float = 4.0,
        min_interval_s: float = 10.0,
        max_concurrent: int = 4,
    ) -> None:
        self.host = host
        self._listen_ports = listen_ports
        self._servers = servers
        self._on_change = on_change
        self.interval_s = interval_s
        self.unknown_interval_s = unknown_interval_s
        self.dial_timeout_s = dial_timeout_s
        self.min_interval_s = min_interval_s
        self._limiter = trio.CapacityLimiter(max_concurrent)
        self._last_request: dict[str, float] = {}
        self.state = UNKNOWN
        self.checked_at: float | None = None
        self.answers: dict[str, str] = {}  # server -> reachable|unreachable|refused|error
        self.counters: dict[str, int] = {"dialbacks_served": 0, "dialbacks_refused": 0}
        host.set_stream_handler(TProtocol(DIALBACK_PROTOCOL), self._handle)

    # -- server ------------------------------------------------------------------------

    async def _handle(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        try:
            await self._serve(stream, peer)
        except Exception as e:  # why: a misbehaving peer never takes the handler down
            log.debug("dial-back for %s failed: %s", peer, e)
        finally:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                try:
                    await stream.close()
                except Exception:
                    pass

    async def _serve(self, stream: INetStream, peer: ID) -> None:
        with trio.fail_after(5):
            n = (await _read_exactly(stream, 1))[0]
            if not 1 <= n <= MAX_PORTS:
                raise ValueError(f"bad port count {n}")
            raw = await _read_exactly(stream, 2 * n)
        ports = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, 2 * n, 2)]
        now = time.monotonic()
        key = peer.to_base58()
        last = self._last_request.get(key)
        remote = stream.get_remote_address()
        if is_relayed(stream) or remote is None or (
            last is not None and now - last < self.min_interval_s
        ):
            self.counters["dialbacks_refused"] += 1
            await stream.write(bytes([REFUSED]))
            return
        if len(self._last_request) > 4096:
            self._last_request.clear()
        self._last_request[key] = now
        if self._limiter.statistics().tasks_waiting >= 16:
            await stream.write(bytes([BUSY]))
            return
        async with self._limiter:
            ok = await self._dial_back(peer, remote[0], ports)
        self.counters["dialbacks_served"] += 1
        await stream.write(bytes([REACHABLE if ok else UNREACHABLE]))

    async def _dial_back(self, peer: ID, ip: str, ports: list[int]) -> bool:
        """TCP connect and a Noise handshake that proves `peer` answers there, then close.

        why not swarm.dial_addr: a registered second connection makes py-libp2p trim the
        older one (max_connections_per_peer=1, peers/host.py), streams and all, on both
        sides: every dial-back cut the requester's open streams (a split model's layer
        session, a delegated answer). Stopping after the security upgrade registers
        nothing: no muxer, no add_conn, no trim; the requester's half-upgraded inbound
        connection ends when we close."""
        proto = "ip6" if ":" in ip else "ip4"
        swarm = self.host.get_network()
        for port in ports:
            if not 0 < port < 65536:
                continue
            addr = multiaddr.Multiaddr(f"/{proto}/{ip}/tcp/{port}")
            raw = None
            try:
                with trio.fail_after(self.dial_timeout_s):
                    transport = swarm.transport_manager.transport_for_dialing(addr)
                    if transport is None:
                        continue
                    raw = await transport.dial(addr)
                    secured = await swarm.upgrader.upgrade_security(raw, True, peer)
                    if secured.get_remote_peer() != peer:
                        continue
                return True
            except (Exception, trio.TooSlowError):
                continue
            finally:
                if raw is not None:
                    with trio.move_on_after(2) as scope:
                        scope.shield = True
                        try:
                            await raw.close()
                        except Exception:
                            pass
        return False

    # -- client ------------------------------------------------------------------------

    async def run(self) -> None:
        await trio.sleep(2.0)
        while True:
            await self.check()
            await trio.sleep(self.interval_s if self.state != UNKNOWN else self.unknown_interval_s)

    async def check(self) -> str:
        servers = [s for s in self._servers() if self._direct(s)][:3]
        ports = sorted(set(self._listen_ports()))[:MAX_PORTS]
        if not servers or not ports:
            return self.state
        answers: dict[str, str] = {}

        async def ask(server: str) -> None:
            answers[server] = await self._ask(server, ports)

        async with trio.open_nursery() as nursery:
            for s in servers:
                nursery.start_soon(ask, s)
        self.answers = answers
        yes = sum(1 for a in answers.values() if a == "reachable")
        no = sum(1 for a in answers.values() if a == "unreachable")
        new = PUBLIC if yes > no else PRIVATE if no > yes else self.state
        self.checked_at = time.time()
        if new != self.state:
            log.info(
                "reachability: %s (dial-back answers: %s)",
                new, ", ".join(f"{k[:16]}={v}" for k, v in answers.items()),
            )
            self.state = new
            self._on_change(new)
        return new

    def _direct(self, peer: str) -> bool:
        try:
            conns = self.host.get_network().connections.get(ID.from_base58(peer)) or []
        except Exception:
            return False
        return any(
            getattr(c, "get_connection_type", lambda: None)() == ConnectionType.DIRECT
            for c in conns
        )

    async def _ask(self, server: str, ports: list[int]) -> str:
        stream = None
        try:
            with trio.fail_after(self.dial_timeout_s * MAX_PORTS + 5):
                stream = await self.host.new_stream(
                    ID.from_base58(server), [TProtocol(DIALBACK_PROTOCOL)]
                )
                await stream.write(
                    bytes([len(ports)]) + b"".join(p.to_bytes(2, "big") for p in ports)
                )
                reply = await _read_exactly(stream, 1)
        except (Exception, trio.TooSlowError) as e:
            log.debug("dial-back request to %s failed: %s", server, e)
            return "error"
        finally:
            if stream is not None:
                with trio.move_on_after(1):
                    try:
                        await stream.close()
                    except Exception:
                        pass
        return {REACHABLE: "reachable", UNREACHABLE: "unreachable", REFUSED: "refused"}.get(
            reply[0], "busy"
        )

    def status(self) -> dict[str, Any]:
        return {
            "reachability": self.state,
            "checked_at": self.checked_at,
            "dialback_answers": dict(self.answers),
            **self.counters,
        }
