"""The puller's side of `/qvac/shard/1.0.0`: one request to one provider per stream.

A manifest request, or a chunk request answered by sub-frames of at most 1 MiB. Chunk
requests to one provider go one after another over a `ChunkLane`, one stream kept open
between them: a fresh stream per chunk cost a protocol negotiation each, and each started
with yamux's 256 KiB window, which only grows on a stream that lives (profiled: window
updates and stream opens were ~10 % of the puller's CPU, more with more providers). A
seeder that does not take another request on a stream closes it; the lane then opens a
new one for each chunk. Every
way a provider can fail (unreachable, refused, stalled, too slow, short, garbage, a
broken stream) becomes a PeerFault whose reason names what it did and whose kind is the
metrics label; a BUSY refusal is Busy, to be asked again. A stream that did not end in
a whole answer is reset, so the seeder sees the request was abandoned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from models.manifest import Manifest, ManifestError, parse_manifest
from protocol import (
    SHARD_LIMITS,
    SHARD_PROTOCOL,
    ChunkClientState,
    ChunkData,
    ChunkRequest,
    Error,
    ErrorCode,
    FrameDecoder,
    ManifestRequest,
    ManifestResponse,
    Message,
    ProtocolError,
)

from ..p2p_io import Stream, StreamEnded, close_stream, read_some, write_frame
from .errors import Busy, PeerFault
from .options import PullOptions


class StreamOpener(Protocol):
    """What the shard client needs of peers.PeerNetwork."""

    async def open_stream(self, peer_id: str, protocol_id: str, timeout: float = 10.0
                          ) -> Stream: ...


class ChunkLane:
    """One stream to one provider, reused for chunk after chunk (see the module doc)."""

    def __init__(self) -> None:
        self.stream: Stream | None = None
        self.decoder = FrameDecoder(SHARD_LIMITS)
        self.reuse = True  # False once the provider showed it answers one chunk per stream
        self.served = 0  # whole answers on the current stream

    def drop(self) -> Stream | None:
        stream, self.stream = self.stream, None
        self.decoder = FrameDecoder(SHARD_LIMITS)
        self.served = 0
        return stream

    async def close(self) -> None:
        stream = self.drop()
        if stream is not None:
            await close_stream(stream)


class _EndedBeforeAnswer(Exception):
    """A reused stream ended before any answer: the provider closed it between requests."""


class ShardClient:
    """Asks providers for manifests and chunks, with the pull's timeouts."""

    def __init__(self, network: StreamOpener | None, options: PullOptions) -> None:
        self.network = network
        self.options = options

    async def fetch_manifest(self, peer: str, model: str, sha: str | None) -> Manifest:
        """`peer`'s manifest of `model`, parsed and (given `sha`) checked against it."""
        decoder = FrameDecoder(SHARD_LIMITS)
        stream = await self.open(peer)
        ok = False
        try:
            await write_frame(stream, ManifestRequest(model=model), SHARD_LIMITS)
            reply = await self.read_message(stream, decoder, self.options.manifest_timeout_s)
            if isinstance(reply, Error):
                raise PeerFault(f"refused the manifest: {reply.code.value}: {reply.message}",
                                "refused", reply.code.value)
            if not isinstance(reply, ManifestResponse):
                raise PeerFault(f"answered a manifest request with {reply.tag!r}", "protocol")
            try:
                m = parse_manifest(reply.manifest, expected_sha256=sha)
            except ManifestError as e:
                raise PeerFault(f"sent a bad manifest: {e}", "bad_manifest") from None
            ok = True
            return m
        except StreamEnded as e:
            raise PeerFault(f"the manifest stream broke: {e}", "gone") from None
        except ProtocolError as e:
            raise PeerFault(f"sent a malformed frame: {e}", "protocol") from None
        finally:
            await close_stream(stream, reset=not ok)

    async def open(self, peer: str) -> Stream:
        assert self.network is not None  # why: pulls without a network end before this
        try:
            return await self.network.open_stream(peer, SHARD_PROTOCOL,
                                                  timeout=self.options.open_timeout_s)
        except Exception as e:  # noqa: BLE001 - any dial/negotiation failure: unreachable
            raise PeerFault(f"unreachable: {e}"[:300], "unreachable") from None

    async def read_message(self, stream: Stream, decoder: FrameDecoder, stall: float
                           ) -> Message:
        while True:
            msg = decoder.next_message()
            if msg is not None:
                return msg
            data: bytes | None = None
            with trio.move_on_after(stall):
                data = await read_some(stream)
            if data is None:
                raise PeerFault(f"stalled: nothing for {stall:.0f} s", "stall")
            if data:
                decoder.feed(data)
                continue
            decoder.feed_eof()
            msg = decoder.next_message()
            if msg is None:
                raise PeerFault("closed the stream without an answer", "gone")
            return msg

    async def fetch_chunk(self, peer: str, manifest: Manifest, index: int,
                          lane: ChunkLane | None = None,
                          on_bytes: Callable[[int], None] | None = None) -> list[bytes]:
        """The sub-frames of chunk `index`, their lengths checked (the puller checks the
        hash). Busy when the provider asks us to come back later. With a `lane`, the
        request goes on its open stream when it has one, and the stream stays open for
        the next chunk after a whole answer. `on_bytes(n)` hears of each sub-frame as it
        arrives (the puller's rate measurement, finer than whole chunks)."""
        lane = lane or ChunkLane()
        try:
            if lane.stream is not None:
                try:
                    return await self._fetch_chunk(peer, manifest, index, lane, on_bytes)
                except _EndedBeforeAnswer:
                    # The provider closed the idle stream, or takes one request per
                    # stream (then this lane stops reusing): ask again on a fresh one.
                    if lane.served <= 1:
                        lane.reuse = False
                    lane.drop()
            return await self._fetch_chunk(peer, manifest, index, lane, on_bytes)
        finally:
            if not lane.reuse:
                await lane.close()

    async def _fetch_chunk(self, peer: str, manifest: Manifest, index: int, lane: ChunkLane,
                           on_bytes: Callable[[int], None] | None) -> list[bytes]:
        opts = self.options
        length = manifest.chunk_length(index)
        request = ChunkRequest(sha256=manifest.sha256, index=index)
        deadline = opts.chunk_deadline(length)
        state = ChunkClientState(request)
        reused = lane.stream is not None
        pieces: list[bytes] = []
        ok = False
        try:
            with trio.move_on_after(deadline) as whole:
                if lane.stream is None:
                    lane.stream = await self.open(peer)
                stream, decoder = lane.stream, lane.decoder
                try:
                    await write_frame(stream, request, SHARD_LIMITS)
                except Exception as e:  # noqa: BLE001 - libp2p raises many types
                    if reused:
                        raise _EndedBeforeAnswer() from None
                    raise StreamEnded(f"{type(e).__name__}: {e}"[:200]) from None
                while not state.finished:
                    msg = decoder.next_message()
                    if msg is None:
                        data = b""
                        with trio.move_on_after(opts.stall_timeout_s) as stalled:
                            try:
                                data = await read_some(stream)
                            except StreamEnded:
                                if reused and state.received == 0 and not decoder.buffered:
                                    raise _EndedBeforeAnswer() from None
                                raise
                        if stalled.cancelled_caught:
                            raise PeerFault(f"stalled: no data for {opts.stall_timeout_s:.0f}"
                                            f" s in chunk {index}", "stall")
                        if data:
                            decoder.feed(data)
                        else:
                            if reused and state.received == 0 and not decoder.buffered:
                                raise _EndedBeforeAnswer()
                            decoder.feed_eof()
                            try:
                                tail = decoder.next_message()
                            except ProtocolError as e:
                                # why "gone", not a protocol fault: a connection that
                                # closes mid-transfer (under load, on a flaky path) ends
                                # every stream on it this way; retried like a reset
                                raise PeerFault(f"the stream ended in chunk {index}:"
                                                f" {e.message}", "gone") from None
                            if tail is None:
                                state.receive_eof()  # raises: ended before the last piece
                        continue
                    state.receive(msg)
                    if isinstance(msg, Error):
                        if msg.code == ErrorCode.BUSY:
                            ok = True  # a whole answer; the lane's next request waits
                            raise Busy(msg.retry_after or 0.5)
                        raise PeerFault(f"refused chunk {index}: {msg.code.value}:"
                                        f" {msg.message}", "refused", msg.code.value)
                    assert isinstance(msg, ChunkData)
                    if state.received > length:
                        raise PeerFault(f"sent more than the {length} bytes of chunk {index}",
                                        "protocol")
                    pieces.append(msg.data)
                    if on_bytes is not None:
                        on_bytes(len(msg.data))
            if whole.cancelled_caught:
                raise PeerFault(f"too slow: chunk {index} took over {deadline:.0f} s", "stall")
            if state.received != length:
                raise PeerFault(f"sent a short chunk {index}: {state.received} of {length}"
                                " bytes", "short")
            ok = True
            lane.served += 1
            return pieces
        except _EndedBeforeAnswer:
            ok = True  # nothing to reset: the provider ended it
            raise
        except ProtocolError as e:
            if e.code == ErrorCode.UNAVAILABLE:  # ended before the last piece
                raise PeerFault(f"the stream ended in chunk {index}: {e.message}",
                                "gone") from None
            raise PeerFault(f"broke the protocol in chunk {index}: {e}", "protocol") from None
        except StreamEnded as e:
            raise PeerFault(f"the stream broke in chunk {index}: {e}", "gone") from None
        finally:
            if not ok and lane.stream is not None:
                await close_stream(lane.drop(), reset=True)  # the seeder sees it abandoned


__all__ = ["ChunkLane", "ShardClient", "StreamOpener"]
