"""Kademlia streams that end when their query does (py-libp2p 0.8.1 work-arounds).

Two measured leaks, one per side, each of which filled a node's 12 inbound DHT handler
slots for good (bench/dht_lookup.py: node 0, everyone's bootstrap peer, stayed full, so
later FIND_NODEs were reset and routing tables stopped growing):

- Ours, as the asker: the library closes its query stream in a `finally`, but when the
  query is cancelled (a lookup that reached its quorum cancels the asks still in flight;
  every lookup and walk runs under a deadline) that `await stream.close()` is cancelled
  too before it sends anything. The remote's handler then waits for our next request
  forever, holding one of its slots, and our connection keeps the stream (yamux allows
  256 per connection). `DhtHost` hands KadDHT streams whose close and reset run
  shielded (bounded): a cancelled query resets its stream, a finished one closes it.
- Theirs, as the server: `KadDHT.handle_stream` reads the next request with no deadline,
  so any peer that opens streams and goes quiet (a leaky client like the one above, or
  one doing it on purpose) holds our slots; twelve such streams and we answer nobody.
  `guard_inbound` ends an inbound DHT stream that stays silent for `INBOUND_IDLE_S`
  (go-libp2p-kad-dht closes idle ones after a minute; our slots are fewer) and caps the
  streams one peer may hold at once (`INBOUND_PER_PEER`).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.kad_dht.common import PROTOCOL_ID
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.peer.id import ID

log = logging.getLogger("qvacd.peers.dht")

CLOSE_TIMEOUT_S = 2.0  # a close or reset that cannot get its frame out gives up
INBOUND_IDLE_S = 10.0  # an inbound DHT stream silent this long is reset
INBOUND_PER_PEER = 4  # inbound DHT streams one peer may hold at once (of the 12 slots)


class _ClosingStream:
    """An outbound DHT stream whose close/reset reach the wire even when cancelled."""

    def __init__(self, stream: INetStream) -> None:
        self._stream = stream

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def close(self) -> None:
        # why: the library calls close() in a finally; a cancelled query gets a reset
        # (the remote drops the request at once) instead of a FIN that never goes out
        cancelled = trio.current_effective_deadline() == -math.inf
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
            try:
                if cancelled:
                    await self._stream.reset()
                else:
                    await self._stream.close()
            except Exception as exc:
                log.debug("closing a DHT stream failed: %s", exc)

    async def reset(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
            try:
                await self._stream.reset()
            except Exception as exc:
                log.debug("resetting a DHT stream failed: %s", exc)


class DhtHost:
    """The host as KadDHT sees it: the same host, but its new streams close when their
    query ends, cancelled or not. Everything else is the host's own."""

    def __init__(self, host: IHost) -> None:
        self._host = host

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host, name)

    async def new_stream(self, peer_id: ID, protocol_ids: Any) -> INetStream:
        return _ClosingStream(await self._host.new_stream(peer_id, protocol_ids))  # type: ignore[return-value]


class _IdleLimitedStream:
    """An inbound stream whose every read must return within `idle_s`."""

    def __init__(self, stream: INetStream, idle_s: float) -> None:
        self._stream = stream
        self._idle_s = idle_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def read(self, n: int | None = None) -> bytes:
        # why end-of-stream and not an error: between requests KadDHT reads b"" as the
        # asker being done and closes its side, quietly; go-libp2p peers keep a stream
        # open for their next request and open a new one when they find it closed. A
        # peer that goes silent inside a message gets the library's reset.
        with trio.move_on_after(self._idle_s):
            return await self._stream.read(n)
        return b""


def guard_inbound(
    kad: KadDHT,
    host: IHost,
    counters: Counter[str],
    *,
    idle_s: float = INBOUND_IDLE_S,
    per_peer: int = INBOUND_PER_PEER,
) -> None:
    """Serve the Kademlia protocol through `kad` with a read deadline and a per-peer cap
    (see the module docstring); refusals are counted in `counters`."""
    active: Counter[ID] = Counter()

    async def handle(stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        limiter = kad._inbound_limiter
        if active[peer] >= per_peer or limiter.borrowed_tokens >= limiter.total_tokens:
            # why count: a node whose slots are full answers nobody; /metrics shows it
            counters["dht_inbound_refused"] += 1
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                try:
                    await stream.reset()
                except Exception:
                    pass
            return
        active[peer] += 1
        try:
            await kad.handle_stream(_IdleLimitedStream(stream, idle_s))  # type: ignore[arg-type]
        finally:
            active[peer] -= 1
            if active[peer] <= 0:
                del active[peer]

    host.set_stream_handler(PROTOCOL_ID, handle)
