"""Is the path to a peer still there? Pings on the connection a stream runs over.

A cut link says nothing: no FIN, no reset, TCP retransmits for minutes. Before this,
the consumer of a delegated stream noticed only by the silence of the stream, after its
5 s stall timeout, and that timeout cannot be shorter: an overloaded but alive provider
may be silent for seconds (a long prefill, a saturated CPU). Pings tell the two apart:
a provider busy computing still answers them (they are echoed by its trio loop, not its
model thread), a cut path does not.

`PathProbe` (client): while a caller streams from a peer, ping it on a
`/ipfs/ping/1.0.0` stream opened on the same connection (negotiation pipelined with the
first ping, so the first answer comes one round trip after the open) whenever the path
has been quiet for `PING_INTERVAL_S`; the path is dead after `dead_after_s` without a
pong or any other sign of life (`saw_traffic`). Quiet, not every interval: while the
stream's own frames keep coming they prove the path alive, and a ping then only costs
both ends CPU (in the lab at 20 tokens/s, 4 pings/s were a tenth of the Python time of
either end of the stream); the first ping still goes out, so `working` is known before a
cut. A peer that refuses the ping protocol, or whose ping stream cannot be opened, is
not judged at all (`working` False): the caller keeps its stall timeout alone, as before.

`PingServer` (server): replaces py-libp2p's echo, which answers as fast as a peer
sends: every ping from every peer takes a token from that peer's bucket (`PING_RATE_PER_S`,
burst `PING_BURST`, above the 4/s a probe sends); past it the stream is reset and the
peer scored `rate_limited` (the guard ignores that for trusted peers); at most
`MAX_PING_STREAMS_PER_PEER` ping streams per peer and `MAX_PING_STREAMS` in all.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable

import trio
from libp2p.abc import INetStream, INetwork

from peers._capacity import TokenBucket
from peers._errors import PeerUnavailable, ProtocolRefused
from peers._pipelined import open_pipelined
from peers._streams import STREAM_GONE, close_quietly

log = logging.getLogger("qvacd.peers.network")

PING_PROTOCOL = "/ipfs/ping/1.0.0"
PING_LENGTH = 32
PING_INTERVAL_S = 0.25
LIVENESS_S = 1.0  # a path silent this long (no pong, no frame) is dead ...
LIVENESS_RTT_FACTOR = 4.0  # ... or this many of its round trips, on a slow path
OPEN_TIMEOUT_S = 5.0
PROBE_START_S = 0.25  # pings start this long after the stream is accepted
WATCH_MIN_S = 0.05  # the verdict is re-checked at least this far apart ...
WATCH_MAX_S = 0.5  # ... and at most this far (the stall deadline is pushed on from it)

PING_RATE_PER_S = 8.0  # pings answered per peer, sustained (a probe sends 4/s)
PING_BURST = 16
PING_IDLE_S = 15.0  # a ping stream with no ping for this long is closed
MAX_PING_STREAMS_PER_PEER = 2
MAX_PING_STREAMS = 256

# (offence kind, stream, peer) -> whether the peer is now banned
Offence = Callable[[str, INetStream, str], bool]


def _conn_of(swarm: INetwork, stream: INetStream):  # -> INetConn | None
    """The swarm connection `stream` runs on (its muxer is the connection's)."""
    for conn in swarm.get_connections(stream.muxed_conn.peer_id):
        if conn.muxed_conn is stream.muxed_conn:
            return conn
    return None


class PathProbe:
    """Liveness of the path under one stream; see the module docstring."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.last_alive = clock()
        self.rtt_s: float | None = None
        self.working = False  # pongs are coming: the verdict below means something
        self.pongs = 0
        self._watched: trio.CancelScope | None = None
        self._alive_deadline: float | None = None
        self.dead = False

    def saw_traffic(self) -> None:
        """Any frame from the peer on this path: it is alive now."""
        self.last_alive = self.clock()
        self.dead = False

    @property
    def dead_after_s(self) -> float:
        rtt = self.rtt_s or 0.0
        return max(LIVENESS_S, LIVENESS_RTT_FACTOR * rtt)

    def silent_for(self) -> float:
        return self.clock() - self.last_alive

    @contextlib.contextmanager
    def guarding(self, scope: trio.CancelScope, alive_deadline: float | None = None):
        """While inside, a dead path cancels `scope` (the caller's wait for a frame);
        the caller then reads `dead`. While the path answers, `scope`'s deadline is
        pushed to `alive_deadline` (trio time), if later: silent but reachable is
        slow, and gets longer."""
        self._watched, self._alive_deadline = scope, alive_deadline
        self._judge()
        try:
            yield
        finally:
            self._watched = self._alive_deadline = None

    def _judge(self) -> None:
        if self.working and not self.dead and self.silent_for() > self.dead_after_s:
            self.dead = True
        scope = self._watched
        if scope is None:
            return
        if self.dead:
            scope.cancel()
        elif self.working and self._alive_deadline is not None:
            scope.deadline = max(scope.deadline, self._alive_deadline)

    async def run(self, swarm: INetwork, stream: INetStream, start_after: float = 0.0) -> None:
        """Ping until cancelled. Never raises for a broken or refused ping stream."""
        # why wait: opening the ping stream costs both ends some CPU, which the first
        # token should not wait behind (the stall limit covers the first moments)
        await trio.sleep(start_after)
        self.last_alive = self.clock()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch)
            await self._ping(swarm, stream)
            nursery.cancel_scope.cancel()

    async def _watch(self) -> None:
        # why not a fixed tick: while frames flow the verdict is due only at
        # last_alive + dead_after_s, so the watcher wakes twice a second, not 8 times
        while True:
            self._judge()
            due = WATCH_MAX_S if self.dead else self.last_alive + self.dead_after_s - self.clock()
            await trio.sleep(min(WATCH_MAX_S, max(WATCH_MIN_S, due)))

    async def _until_quiet(self, rtt: float) -> None:
        """Until the path has been silent long enough that the next pong should land
        `PING_INTERVAL_S` after the last sign of life; frames seen meanwhile push it on."""
        while True:
            wait = self.last_alive + max(0.0, PING_INTERVAL_S - rtt) - self.clock()
            if wait <= 0:
                return
            await trio.sleep(wait)

    async def _ping(self, swarm: INetwork, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        conn = _conn_of(swarm, stream)
        if conn is None:
            return
        payload = secrets.token_bytes(PING_LENGTH)
        sent = self.clock()
        try:
            with trio.fail_after(OPEN_TIMEOUT_S):
                ping = await open_pipelined(swarm, peer, PING_PROTOCOL, payload, conn=conn)
        except ProtocolRefused:
            log.debug("peer %s does not answer pings; no fast liveness", peer)
            return
        except (PeerUnavailable, trio.TooSlowError) as exc:
            log.debug("no ping stream to %s: %s", peer, exc)
            return
        try:
            while True:
                pong = await _read_exactly(ping, PING_LENGTH)
                if pong != payload:
                    log.info("peer %s answered a ping with other bytes; stopped pinging", peer)
                    return
                now = self.clock()
                rtt = now - sent
                self.rtt_s = rtt if self.rtt_s is None else 0.8 * self.rtt_s + 0.2 * rtt
                self.last_alive = now
                self.working = True
                self.pongs += 1
                await self._until_quiet(rtt)
                payload = secrets.token_bytes(PING_LENGTH)
                sent = self.clock()
                await ping.write(payload)
        except Exception as exc:  # the ping stream broke: so did the path, or the peer
            log.debug("ping stream to %s ended: %s: %s", peer, type(exc).__name__, exc)
        finally:
            # a close, not a reset: the server then ends its handler quietly at EOF
            await close_quietly(ping, reset=self.dead)


@contextlib.asynccontextmanager
async def watch_path(swarm: INetwork, stream: INetStream,
                     start_after: float = PROBE_START_S) -> AsyncIterator[PathProbe]:
    """A PathProbe pinging the connection of `stream` while the body runs, from
    `start_after` seconds on."""
    probe = PathProbe()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe.run, swarm, stream, start_after)
            try:
                yield probe
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # why: the probe's task never raises, so a group here holds what the body
        # raised; the caller catches it as it is (e.g. delegation's PeerFailed)
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


async def _read_exactly(stream: INetStream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        try:
            data = await stream.read(n - len(buf))
        except Exception as exc:
            if type(exc).__name__ != "StreamEOF":
                raise
            data = b""
        if not data:
            raise EOFError(f"ping stream ended after {len(buf)} of {n} bytes")
        buf += data
    return buf


class PingServer:
    """`/ipfs/ping/1.0.0` with limits; see the module docstring."""

    def __init__(self, offence: Offence, counters: dict[str, int] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._offence = offence
        self.counters = counters if counters is not None else defaultdict(int)
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._active: dict[str, int] = defaultdict(int)
        self._total = 0

    def _bucket(self, peer: str, now: float) -> TokenBucket:
        b = self._buckets.get(peer)
        if b is None:
            if len(self._buckets) >= 4096:  # bounded; idle buckets are full: no state lost
                for p in [p for p, x in self._buckets.items() if now - x.stamp > 10]:
                    del self._buckets[p]
            b = self._buckets[peer] = TokenBucket(PING_RATE_PER_S, PING_BURST, now)
        return b

    async def serve(self, stream: INetStream, peer: str) -> None:
        if self._total >= MAX_PING_STREAMS or self._active[peer] >= MAX_PING_STREAMS_PER_PEER:
            self.counters["ping_streams_refused"] += 1
            await close_quietly(stream, reset=True)
            return
        self._total += 1
        self._active[peer] += 1
        try:
            while True:
                with trio.move_on_after(PING_IDLE_S) as idle:
                    try:
                        payload = await _read_exactly(stream, PING_LENGTH)
                    except (EOFError, *STREAM_GONE):
                        return  # the prober is done, or its path went away
                if idle.cancelled_caught:
                    return
                now = self.clock()
                if not self._bucket(peer, now).take(now):
                    self.counters["ping_rate_limited"] += 1
                    self._offence("rate_limited", stream, peer)
                    await close_quietly(stream, reset=True)
                    return
                try:
                    await stream.write(payload)
                except STREAM_GONE:
                    return
        finally:
            self._total -= 1
            self._active[peer] -= 1
            if not self._active[peer]:
                del self._active[peer]
            await close_quietly(stream)
