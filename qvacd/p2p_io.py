"""Frames over a libp2p stream: the sans-IO protocol package meets real I/O here.

Two ways in, for two kinds of stream:
- `FrameStream`, one message at a time (the infer protocol): a broken stream is
  `StreamGone`; anything else a read raises goes up as it is.
- `read_some`, `write_frame`, `close_stream` (the shard protocol's bulk chunks): reads
  of BULK_READ_SIZE bytes, every failed read is `StreamEnded`, and a close is bounded
  and shielded, because it runs in the finally blocks of cancelled transfers.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import trio

from protocol import (
    DEFAULT_LIMITS,
    ErrorCode,
    FrameDecoder,
    Limits,
    Message,
    ProtocolError,
    encode_frame,
)

READ_SIZE = 64 * 1024
# Bytes asked of the stream per read: larger means fewer awaits and yamux window updates
# per byte, but FrameDecoder compacts its buffer per frame, which costs more past ~256 KiB.
BULK_READ_SIZE = 256 << 10


class StreamGone(ConnectionError):
    """The peer reset or closed the stream, or the connection died."""


def _is_stream_error(e: BaseException) -> bool:
    try:
        from libp2p.io.exceptions import IOException
        from libp2p.network.stream.exceptions import StreamError
        from libp2p.stream_muxer.exceptions import MuxedStreamError
    except ImportError:  # pragma: no cover
        return isinstance(e, OSError)
    return isinstance(e, (IOException, StreamError, MuxedStreamError, OSError, EOFError))


class FrameStream:
    """Send and receive protocol messages on one libp2p stream (one request per stream)."""

    def __init__(self, stream: Any, limits: Limits = DEFAULT_LIMITS) -> None:
        self.stream = stream
        self.limits = limits
        self.decoder = FrameDecoder(limits)
        self.eof = False

    async def send(self, msg: Message) -> None:
        try:
            await self.stream.write(encode_frame(msg, self.limits))
        except Exception as e:
            if _is_stream_error(e):
                raise StreamGone(f"stream closed while sending: {type(e).__name__}") from e
            raise

    async def send_all(self, msgs: list[Message]) -> None:
        """Several messages in one write: one yamux frame and one encryption for all
        (each still its own length-prefixed frame on the wire)."""
        try:
            await self.stream.write(b"".join(encode_frame(m, self.limits) for m in msgs))
        except Exception as e:
            if _is_stream_error(e):
                raise StreamGone(f"stream closed while sending: {type(e).__name__}") from e
            raise

    async def recv(self) -> Message | None:
        """The next message; None at a clean end of stream. ProtocolError on garbage."""
        while True:
            msg = self.decoder.next_message()
            if msg is not None:
                return msg
            if self.eof:
                return None
            try:
                data = await self.stream.read(READ_SIZE)
            except EOFError:
                data = b""
            except Exception as e:
                if _is_stream_error(e):
                    raise StreamGone(f"stream broke: {type(e).__name__}") from e
                raise
            if not data:
                self.eof = True
                self.decoder.feed_eof()
                continue
            self.decoder.feed(data)

    async def close(self) -> None:
        try:
            await self.stream.close()
        except Exception:
            pass

    async def reset(self) -> None:
        try:
            await self.stream.reset()
        except Exception:
            pass


# ---- bulk transfers (the shard protocol) -------------------------------------------------


class Stream(Protocol):
    """What the bulk helpers need of a libp2p stream (libp2p's INetStream)."""

    async def read(self, n: int | None = None) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    async def close(self) -> None: ...
    async def reset(self) -> None: ...


class StreamEnded(Exception):
    """A read failed: the stream was reset or broke (a clean end reads as b"")."""


async def read_some(stream: Stream) -> bytes:
    """Up to BULK_READ_SIZE bytes; b"" at a clean end. StreamEnded on reset or other failure."""
    try:
        return await stream.read(BULK_READ_SIZE)
    except Exception as e:  # noqa: BLE001 - libp2p raises many types for a broken stream
        if type(e).__name__ == "StreamEOF" or isinstance(e, EOFError):
            return b""
        raise StreamEnded(f"{type(e).__name__}: {e}"[:200]) from None


async def close_stream(stream: Stream, *, reset: bool = False) -> None:
    with trio.move_on_after(1) as scope:
        scope.shield = True  # why: runs in finally blocks of cancelled tasks too
        with contextlib.suppress(Exception):
            await (stream.reset() if reset else stream.close())


async def write_frame(stream: Stream, msg: Message, limits: Limits) -> None:
    await stream.write(encode_frame(msg, limits))


# ---- provider-side helpers shared by the infer and embed services ----------------------


def error_code(code: str) -> ErrorCode:
    """An engine error's code as the wire's ErrorCode (unknown ones are INTERNAL)."""
    try:
        return ErrorCode(code.lower())
    except ValueError:
        return ErrorCode.INTERNAL


async def cancel_on_inbound_close(io: FrameStream, scope: trio.CancelScope) -> None:
    """The consumer sends nothing after its request: EOF, a reset or any frame ends it."""
    try:
        await io.recv()
    except (StreamGone, ProtocolError):
        pass
    io.eof = True
    scope.cancel()


async def try_send(io: FrameStream, msg: Any) -> None:
    """Best effort, within a second: the stream may already be gone."""
    with trio.move_on_after(1):
        try:
            await io.send(msg)
        except (StreamGone, ProtocolError):
            pass
