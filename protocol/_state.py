"""Per-stream state machines: which message may legally come next (h11's _state.py)."""

from __future__ import annotations

import enum

from ._errors import ErrorCode, ProtocolError
from ._messages import Accepted, ChunkData, ChunkRequest, Done, Error, Message, Token

__all__ = ["ChunkClientState", "InferClientState", "StreamState"]


class StreamState(enum.Enum):
    """Where a response stream is, as seen by the side that sent the request."""

    AWAITING_REPLY = "awaiting_reply"  # request sent; Accepted or Error must come first
    STREAMING = "streaming"  # accepted / receiving data
    DONE = "done"  # the response finished normally
    FAILED = "failed"  # an Error frame arrived (a normal, final answer)
    BROKEN = "broken"  # the peer broke the protocol or vanished mid-answer


def _kind(msg: object) -> str:
    return type(msg).__name__


class InferClientState:
    """The consumer's view of one `/qvac/infer` stream.

    Legal: (Accepted Token* (Done | Error)) | Error. Anything else raises
    ProtocolError(PROTOCOL), so a misbehaving provider is treated as garbage. Collects
    the generated text, which is what a failover `resume` needs.
    """

    def __init__(self) -> None:
        self.state = StreamState.AWAITING_REPLY
        self.queue_position: int | None = None
        self.result: Done | Error | None = None
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All text received so far."""
        return "".join(self._pieces)

    @property
    def finished(self) -> bool:
        return self.state in (StreamState.DONE, StreamState.FAILED)

    def receive(self, msg: Message) -> Message:
        """Check `msg` against the state, advance, and hand it back."""
        state = self.state
        if state is StreamState.AWAITING_REPLY and isinstance(msg, Accepted):
            self.queue_position = msg.queue_position
            self.state = StreamState.STREAMING
        elif state is StreamState.STREAMING and isinstance(msg, Token):
            self._pieces.append(msg.text)
        elif state is StreamState.STREAMING and isinstance(msg, Done):
            self.result = msg
            self.state = StreamState.DONE
        elif state in (StreamState.AWAITING_REPLY, StreamState.STREAMING) and isinstance(
            msg, Error
        ):
            self.result = msg
            self.state = StreamState.FAILED
        else:
            self.state = StreamState.BROKEN
            raise ProtocolError(
                ErrorCode.PROTOCOL, f"infer stream got {_kind(msg)} while {state.value}"
            )
        return msg

    def receive_eof(self) -> None:
        """The provider closed the stream; fine only after Done or Error."""
        if not self.finished:
            state = self.state
            self.state = StreamState.BROKEN
            raise ProtocolError(
                ErrorCode.UNAVAILABLE,
                f"provider closed the infer stream while {state.value} "
                f"({len(self.text)} characters received)",
            )


class ChunkClientState:
    """The fetcher's view of one `/qvac/shard` chunk stream.

    Legal: ChunkData* with the requested index and contiguous offsets from 0, ending with
    one whose last=True, or ending with an Error (first or after some data). Assembles
    nothing: `received` counts bytes; the caller writes each piece and verifies the
    chunk's hash at the end.
    """

    def __init__(self, request: ChunkRequest) -> None:
        self.request = request
        self.state = StreamState.AWAITING_REPLY
        self.received = 0
        self.error: Error | None = None

    @property
    def finished(self) -> bool:
        return self.state in (StreamState.DONE, StreamState.FAILED)

    def receive(self, msg: Message) -> Message:
        state = self.state
        if state in (StreamState.AWAITING_REPLY, StreamState.STREAMING):
            if isinstance(msg, Error):  # first, or mid-chunk (e.g. the seeder's disk failed)
                self.error = msg
                self.state = StreamState.FAILED
                return msg
            if isinstance(msg, ChunkData):
                if msg.index != self.request.index:
                    self.state = StreamState.BROKEN
                    raise ProtocolError(
                        ErrorCode.PROTOCOL,
                        f"asked for chunk {self.request.index}, got data for chunk {msg.index}",
                    )
                if msg.offset != self.received:
                    self.state = StreamState.BROKEN
                    raise ProtocolError(
                        ErrorCode.PROTOCOL,
                        f"chunk data at offset {msg.offset}, expected {self.received}",
                    )
                self.received += len(msg.data)
                self.state = StreamState.DONE if msg.last else StreamState.STREAMING
                return msg
        self.state = StreamState.BROKEN
        raise ProtocolError(
            ErrorCode.PROTOCOL, f"chunk stream got {_kind(msg)} while {state.value}"
        )

    def receive_eof(self) -> None:
        if not self.finished:
            state = self.state
            self.state = StreamState.BROKEN
            raise ProtocolError(
                ErrorCode.UNAVAILABLE,
                f"provider closed the chunk stream while {state.value} "
                f"({self.received} bytes received)",
            )
