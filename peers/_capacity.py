"""The `/qvac/capacity/1.0.0` protocol, both ends: one request per stream, frames from
`protocol/`.

- `CapacityRequest`  -> `CapacityResponse(our signed record)`.
- `CapacityResponse` sent *unsolicited* is a push: the server verifies the record (it
  must be signed by the stream's remote peer), stores it, and answers with its own
  record, so one push is a two-way exchange.
- Served to anyone connected: capacity is public within the mesh; trust governs who may
  *use* a peer (infer, shard), not who may see what it offers. What is served is what
  the record already says to the DHT, so refusing it to strangers would hide nothing.
- Rate limited per peer (token bucket, 10/s burst 20 by default) and globally (64
  handlers at once); beyond that the stream gets an `Error(busy, retry_after)` frame and
  is closed, the connection stays up. Malformed or oversized frames get
  `Error(protocol|too_large)`; the connection stays up.

`CapacityProtocol` knows the wire and the limits, not where records come from or go:
the composition (peers/_network.py) hands it our current record, what to do with a
pushed one, and where offences are scored.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from peers._errors import CapacityError
from peers._limits import NetworkLimits
from peers._streams import close_quietly, read_message, stream_path
from peers.records import CapacityRecord, RecordError
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

CurrentRecord = Callable[[], "tuple[CapacityRecord, bytes] | None"]
# (peer, record bytes) -> the verified record; RecordError if it is refused
AcceptPush = Callable[[str, bytes], CapacityRecord]
# (offence kind, stream, peer) -> whether the peer is now banned
Offence = Callable[[str, INetStream, str], bool]


class TokenBucket:
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


class CapacityProtocol:
    """Serve `/qvac/capacity/1.0.0` (`serve`) and speak it to a peer (`exchange`)."""

    def __init__(
        self,
        libp2p: IHost,
        limits: NetworkLimits,
        counters: Counter[str],
        *,
        current_record: CurrentRecord,
        accept_push: AcceptPush,
        offence: Offence,
    ) -> None:
        self._libp2p = libp2p
        self.limits = limits
        self.counters = counters
        self._current_record = current_record
        self._accept_push = accept_push
        self._offence = offence
        self._buckets: dict[str, TokenBucket] = {}
        self._active = 0
        self._active_per_peer: Counter[str] = Counter()

    # -- client --------------------------------------------------------------------------

    async def exchange(
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
                stream = await self._libp2p.new_stream(
                    ID.from_base58(peer), [TProtocol(CAPACITY_PROTOCOL)]
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
                await close_quietly(stream, reset=not ok)
        assert stream is not None
        return reply, (time.perf_counter() - started) * 1000.0, stream_path(stream)

    # -- server --------------------------------------------------------------------------

    def _bucket(self, peer: str, now: float) -> TokenBucket:
        b = self._buckets.get(peer)
        if b is None:
            if len(self._buckets) >= 4096:  # why: bounded; full, idle buckets carry no state
                idle = [p for p, x in self._buckets.items() if now - x.stamp > 10]
                for p in idle:
                    del self._buckets[p]
            b = self._buckets[peer] = TokenBucket(
                self.limits.capacity_rate_per_s, self.limits.capacity_burst, now
            )
        return b

    async def serve(self, stream: INetStream, peer: str) -> None:
        now = time.monotonic()
        bucket = self._bucket(peer, now)
        if not bucket.take(now):
            self.counters["capacity_rate_limited"] += 1
            if self._offence("rate_limited", stream, peer):
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
            self._active >= self.limits.max_capacity_streams
            or self._active_per_peer[peer] >= self.limits.max_capacity_streams_per_peer
        ):
            self.counters["capacity_busy"] += 1
            if self._offence("busy", stream, peer):
                return
            await self._send_and_close(
                stream, Error(code=ErrorCode.BUSY, message="capacity service busy", retry_after=1.0)
            )
            return
        self._active += 1
        self._active_per_peer[peer] += 1
        try:
            await self._serve_inner(stream, peer)
        finally:
            self._active -= 1
            self._active_per_peer[peer] -= 1
            if not self._active_per_peer[peer]:
                del self._active_per_peer[peer]

    async def _serve_inner(self, stream: INetStream, peer: str) -> None:
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
            if self._offence("protocol", stream, peer):
                return
            await self._send_and_close(stream, Error.from_exception(exc))
            return

        current = self._current_record()
        if isinstance(msg, CapacityResponse):  # a push
            self.counters["capacity_push_received"] += 1
            try:
                self._accept_push(peer, msg.record)
            except RecordError as exc:
                await self._send_and_close(
                    stream,
                    Error(code=ErrorCode.BAD_REQUEST, message=f"record refused: {exc.reason}"),
                )
                return
        elif not isinstance(msg, CapacityRequest):
            self.counters["capacity_protocol_errors"] += 1
            if self._offence("protocol", stream, peer):
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
            await close_quietly(stream, reset=True)
            return
        await close_quietly(stream)
