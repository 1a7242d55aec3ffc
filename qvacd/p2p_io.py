"""Frames over a libp2p stream: the sans-IO protocol package meets real I/O here."""

from __future__ import annotations

from typing import Any

from protocol import DEFAULT_LIMITS, FrameDecoder, Limits, Message, encode_frame

READ_SIZE = 64 * 1024


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
