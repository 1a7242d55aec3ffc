"""What every protocol handler does with a libp2p stream: read one whole message, close
without waiting long, say which path the stream took, and contain a handler's failure.

`contain_handler_errors` wraps every handler PeerNetwork registers (capacity, and the
services qvacd adds: infer, shard): an exception that escaped a handler into py-libp2p
would tear down the whole connection, so it ends at the stream. A peer that resets or
closes its stream mid-request (it gave up, was killed, lost its network) is routine in
a mesh: one INFO line, no traceback. `peer_ended_stream` tells it apart, inside an
exception group or as qvacd's StreamGone too, so a service may let it rise to here.
Anything else is a fault here and is logged with its traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import INetStream
from libp2p.io.exceptions import IOException
from libp2p.stream_muxer.exceptions import MuxedConnError, MuxedStreamError

from peers.identity import short_peer_id
from peers.reachability import is_relayed
from protocol import ErrorCode, FrameDecoder, Message, ProtocolError

log = logging.getLogger("qvacd.peers.network")

StreamHandler = Callable[[INetStream, str], Awaitable[None]]

_READ_CHUNK = 64 * 1024

# What py-libp2p raises when the other end reset or closed a stream, or its connection
# went away under it: StreamReset, StreamClosed, StreamEOF and "Read operation failed"
# are all StreamError (an IOException, like RawConnError); the muxer's own errors are
# MuxedStreamError / MuxedConnError.
STREAM_GONE: tuple[type[Exception], ...] = (IOException, MuxedStreamError, MuxedConnError)


def peer_ended_stream(exc: BaseException) -> BaseException | None:
    """The error in `exc` that says the peer reset or closed the stream, or its connection
    went away, when that is all `exc` says; None for anything else (a fault here).

    Besides py-libp2p's own (STREAM_GONE), a ConnectionError counts: the builtin family
    (a reset, a broken pipe) and qvacd's StreamGone, which wraps the libp2p error. An
    exception group (a nursery wraps what its body and tasks raise) counts when every
    error in it does, trio.Cancelled aside.
    """
    if isinstance(exc, BaseExceptionGroup):
        found = [peer_ended_stream(e) for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        return found[0] if found and all(f is not None for f in found) else None
    return exc if isinstance(exc, (*STREAM_GONE, ConnectionError)) else None


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


async def close_quietly(stream: INetStream, *, reset: bool = False) -> None:
    with trio.move_on_after(1) as scope:
        scope.shield = True
        try:
            await (stream.reset() if reset else stream.close())
        except Exception:
            pass


def stream_path(stream: INetStream) -> str:
    """"relayed" or "direct": the connection `stream` runs over (a stream opened
    before a hole punch stays on the relayed connection)."""
    return "relayed" if is_relayed(stream) else "direct"


def contain_handler_errors(
    handler: StreamHandler, protocol_id: str
) -> Callable[[INetStream], Awaitable[None]]:
    """`handler(stream, remote peer id)` as a py-libp2p stream handler whose failures
    end at the stream (reset), never at the connection."""

    async def wrapped(stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        try:
            await handler(stream, peer)
        except Exception as exc:
            gone = peer_ended_stream(exc)
            if gone is not None:
                log.info(
                    "peer %s ended its %s stream mid-request (%s: %s); dropped the stream",
                    short_peer_id(peer), protocol_id, type(gone).__name__,
                    str(gone)[:120] or "-",
                )
            else:
                # why: an exception escaping here would tear down the whole connection
                log.exception(
                    "handler for %s from peer %s failed; reset the stream",
                    protocol_id, short_peer_id(peer),
                )
            await close_quietly(stream, reset=True)

    return wrapped
