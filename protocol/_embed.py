"""`/qvac/embed/1.0.0`: embeddings of texts by a peer that holds the model.

Its own module, apart from _messages.py: the messages reuse that module's base class and
field checks (so the same wire rules hold), and register themselves there
(`register_protocol`) for `parse_message` and `limits_for`; _messages.py never imports
this module (no import circle).

One request per stream: the consumer sends `EmbedRequest`; the provider answers
`EmbedVectors`+ `EmbedDone`, or one `Error` (before or between vectors). Vectors travel as
packed little-endian float32 in runs of whole vectors, at most MAX_EMBED_PIECE bytes a
frame, so a big answer is many bounded frames rather than one huge one.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ._errors import ErrorCode, ProtocolError
from ._limits import Limits
from ._messages import (
    MAX_DEADLINE_MS,
    MAX_NAME_LEN,
    U32_MAX,
    Error,
    Message,
    _check_bool,
    _check_bytes,
    _check_int,
    _check_str,
    _Message,
    _range_error,
    _set,
    _type_error,
    register_protocol,
)
from ._state import StreamState

__all__ = [
    "EMBED_LIMITS",
    "EMBED_PROTOCOL",
    "MAX_EMBED_ANSWER_BYTES",
    "MAX_EMBED_DIMS",
    "MAX_EMBED_INPUTS",
    "MAX_EMBED_INPUT_BYTES",
    "MAX_EMBED_PIECE",
    "EmbedClientState",
    "EmbedDone",
    "EmbedRequest",
    "EmbedVectors",
]

EMBED_PROTOCOL = "/qvac/embed/1.0.0"

KiB = 1024
MiB = 1024 * KiB
MAX_EMBED_INPUTS = 2048  # texts per request (OpenAI's own limit)
MAX_EMBED_INPUT_BYTES = 4 * MiB  # UTF-8 bytes of all inputs together
MAX_EMBED_DIMS = 65536  # floats per vector
MAX_EMBED_PIECE = 1 * MiB  # vector bytes in one EmbedVectors frame
# Vector bytes of one whole answer: 2048 vectors of 8192 floats. Bounds what a consumer
# holds for one request whatever a provider claims (MAX_EMBED_DIMS alone would allow 512 MiB).
MAX_EMBED_ANSWER_BYTES = 64 * MiB
DEFAULT_EMBED_DEADLINE_MS = 120_000

# A request holds up to MAX_EMBED_INPUT_BYTES of text plus a few bytes of msgpack per
# input; answers are frames of at most MAX_EMBED_PIECE data bytes. Two containers only
# (the map and the inputs array).
EMBED_LIMITS = Limits(max_frame_size=MAX_EMBED_INPUT_BYTES + 64 * KiB,
                      max_str_len=MAX_EMBED_INPUT_BYTES, max_bin_len=MAX_EMBED_PIECE,
                      max_array_len=MAX_EMBED_INPUTS, max_map_len=16, max_containers=4)


@dataclasses.dataclass(frozen=True, slots=True)
class EmbedRequest(_Message):
    """Embed `inputs` with `model`. `truncate` false: an input longer than the provider's
    context is refused (BAD_REQUEST, both lengths); true: cut to the context.
    `deadline_ms` is how long, from receipt, the caller will wait for the whole answer."""

    tag: ClassVar[str] = "embq"
    wire_required: ClassVar[frozenset[str]] = frozenset({"model", "inputs", "deadline_ms"})

    model: str
    inputs: tuple[str, ...]
    truncate: bool = True
    deadline_ms: int = DEFAULT_EMBED_DEADLINE_MS

    def __post_init__(self) -> None:
        _check_str("EmbedRequest.model", self.model, max_len=MAX_NAME_LEN, min_len=1)
        if not isinstance(self.inputs, list | tuple):
            raise _type_error("EmbedRequest.inputs", "an array", self.inputs)
        if not 1 <= len(self.inputs) <= MAX_EMBED_INPUTS:
            raise _range_error("EmbedRequest.inputs",
                               f"must hold 1..{MAX_EMBED_INPUTS} texts, got {len(self.inputs)}")
        size = 0
        for text in self.inputs:
            _check_str("EmbedRequest.inputs item", text, max_len=MAX_EMBED_INPUT_BYTES)
            size += len(text.encode("utf-8"))
        if size > MAX_EMBED_INPUT_BYTES:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"EmbedRequest.inputs has {size} bytes,"
                                f" over the {MAX_EMBED_INPUT_BYTES}-byte limit")
        _set(self, "inputs", tuple(self.inputs))
        _check_bool("EmbedRequest.truncate", self.truncate)
        _check_int("EmbedRequest.deadline_ms", self.deadline_ms, 1, MAX_DEADLINE_MS)


@dataclasses.dataclass(frozen=True, slots=True)
class EmbedVectors(_Message):
    """Vectors `first`, `first`+1, ... of the answer: `data` is whole vectors of `dims`
    little-endian float32 each, back to back."""

    tag: ClassVar[str] = "embv"
    wire_required: ClassVar[frozenset[str]] = frozenset({"first", "dims", "data"})

    first: int
    dims: int
    data: bytes

    def __post_init__(self) -> None:
        _check_int("EmbedVectors.first", self.first, 0, MAX_EMBED_INPUTS - 1)
        _check_int("EmbedVectors.dims", self.dims, 1, MAX_EMBED_DIMS)
        _set(self, "data", _check_bytes("EmbedVectors.data", self.data,
                                        max_len=MAX_EMBED_PIECE, min_len=1))
        if len(self.data) % (4 * self.dims):
            raise _range_error("EmbedVectors.data", f"has {len(self.data)} bytes, not a whole"
                               f" number of {self.dims}-float vectors")
        if self.first + self.count > MAX_EMBED_INPUTS:
            raise _range_error("EmbedVectors", f"vectors {self.first}..{self.first + self.count}"
                               f" pass the {MAX_EMBED_INPUTS}-input limit")

    @property
    def count(self) -> int:
        return len(self.data) // (4 * self.dims)


@dataclasses.dataclass(frozen=True, slots=True)
class EmbedDone(_Message):
    """The answer is complete: `count` vectors in all; `prompt_tokens` the tokens embedded
    (after truncation), all inputs together."""

    tag: ClassVar[str] = "embd"
    wire_required: ClassVar[frozenset[str]] = frozenset({"count", "prompt_tokens"})

    count: int
    prompt_tokens: int = 0

    def __post_init__(self) -> None:
        _check_int("EmbedDone.count", self.count, 0, MAX_EMBED_INPUTS)
        _check_int("EmbedDone.prompt_tokens", self.prompt_tokens, 0, U32_MAX)


class EmbedClientState:
    """The consumer's view of one `/qvac/embed` stream.

    Legal: EmbedVectors* EmbedDone, or an Error first or between vectors. Vectors come in
    order (each run's `first` is the count so far), all of one `dims`, no more than were
    asked for nor than MAX_EMBED_ANSWER_BYTES in all, and EmbedDone's count is exactly the
    number of inputs. Anything else is a
    ProtocolError(PROTOCOL): the provider is treated as broken.
    """

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.state = StreamState.AWAITING_REPLY
        self.received = 0
        self.dims: int | None = None
        self.result: EmbedDone | Error | None = None

    @property
    def finished(self) -> bool:
        return self.state in (StreamState.DONE, StreamState.FAILED)

    def _broken(self, why: str) -> ProtocolError:
        self.state = StreamState.BROKEN
        return ProtocolError(ErrorCode.PROTOCOL, why)

    def receive(self, msg: Message) -> Message:
        state = self.state
        if state not in (StreamState.AWAITING_REPLY, StreamState.STREAMING):
            raise self._broken(f"embed stream got {type(msg).__name__} while {state.value}")
        if isinstance(msg, Error):
            self.result = msg
            self.state = StreamState.FAILED
        elif isinstance(msg, EmbedVectors):
            if msg.first != self.received:
                raise self._broken(f"vectors from {msg.first}, expected {self.received}")
            if self.dims is not None and msg.dims != self.dims:
                raise self._broken(f"vectors of {msg.dims} floats after {self.dims}")
            if self.received + msg.count > self.expected:
                raise self._broken(f"more than the {self.expected} vectors asked for")
            if (self.received + msg.count) * msg.dims * 4 > MAX_EMBED_ANSWER_BYTES:
                raise self._broken(f"vectors past the {MAX_EMBED_ANSWER_BYTES}-byte answer"
                                   " limit")
            self.dims = msg.dims
            self.received += msg.count
            self.state = StreamState.STREAMING
        elif isinstance(msg, EmbedDone):
            if msg.count != self.expected or self.received != self.expected:
                raise self._broken(f"done with {msg.count} vectors ({self.received} received),"
                                   f" expected {self.expected}")
            self.result = msg
            self.state = StreamState.DONE
        else:
            raise self._broken(f"embed stream got {type(msg).__name__} while {state.value}")
        return msg

    def receive_eof(self) -> None:
        """The provider closed the stream; fine only after EmbedDone or Error."""
        if not self.finished:
            state = self.state
            self.state = StreamState.BROKEN
            raise ProtocolError(ErrorCode.UNAVAILABLE, f"provider closed the embed stream while"
                                f" {state.value} ({self.received} of {self.expected} vectors)")


register_protocol(EMBED_PROTOCOL, (EmbedRequest, EmbedVectors, EmbedDone), EMBED_LIMITS)
