"""Typed messages of the qvac wire protocols and their strict wire-map form.

Every message is a frozen dataclass. Validation lives in `__post_init__`, so a message
that exists is a valid message, whether it was built locally or decoded from a peer.

Rules for the wire map (see docs/protocol.md):
- key `t` names the type; the other keys are the dataclass fields, in declaration order;
- an optional field whose value is None is omitted by the encoder; a decoder treats an
  absent key and nil alike;
- unknown keys are ignored, so a newer peer may add fields without a version bump;
- schema violations (missing field, wrong type, unknown `t`) are `PROTOCOL` errors, values
  of the right type but outside their range are `BAD_REQUEST`, oversized values `TOO_LARGE`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Mapping
from typing import Any, ClassVar, TypeAlias, TypeVar

from ._errors import ErrorCode, ProtocolError
from ._limits import (
    DEFAULT_LIMITS,
    MAX_CHUNK_PIECE,
    MAX_MANIFEST_SIZE,
    MAX_RECORD_SIZE,
    PAIR_LIMITS,
    SHARD_LIMITS,
    Limits,
)

__all__ = [
    "CAPACITY_PROTOCOL",
    "DEFAULT_MIN_P",
    "DEFAULT_REPEAT_PENALTY",
    "DEFAULT_TOP_K",
    "INFER_PROTOCOL",
    "LAYERS_PROTOCOL",
    "MAX_GRAMMAR_LEN",
    "MESSAGE_TYPES",
    "PAIR_PROTOCOL",
    "PROTOCOL_MESSAGES",
    "SHARD_PROTOCOL",
    "Accepted",
    "CapacityRequest",
    "CapacityResponse",
    "ChatMessage",
    "ChunkData",
    "ChunkRequest",
    "Done",
    "Error",
    "FinishReason",
    "InferRequest",
    "LayersHello",
    "LayersReady",
    "ManifestRequest",
    "ManifestResponse",
    "Message",
    "PairConfirm",
    "PairDone",
    "PairReply",
    "PairStart",
    "Token",
    "limits_for",
    "parse_message",
]

INFER_PROTOCOL = "/qvac/infer/1.0.0"
CAPACITY_PROTOCOL = "/qvac/capacity/1.0.0"
SHARD_PROTOCOL = "/qvac/shard/1.0.0"
PAIR_PROTOCOL = "/qvac/pair/1.0.0"
LAYERS_PROTOCOL = "/qvac/layers/1.0.0"

# Value bounds. Generous, but finite: every number a peer sends is checked.
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
MAX_NAME_LEN = 256  # model names, roles, stop strings
MAX_PAKE_MESSAGE = 64  # a SPAKE2 message (33 bytes over Ed25519)
PAIR_MAC_LEN = 32  # HMAC-SHA256
MAX_PAIR_ROLES = 8
MAX_CERTIFICATE_LEN = 4096  # a mesh certificate's text (peers/mesh.py makes ~400)
MAX_STOP = 16  # stop strings per request
# GBNF text of a grammar-constrained request (structured output, tool calls); the same
# bound as models.grammar.MAX_GRAMMAR_CHARS, which builds them
MAX_GRAMMAR_LEN = 64 * 1024
MAX_ERROR_MESSAGE_LEN = 4096
MAX_DEADLINE_MS = 24 * 3600 * 1000  # nobody waits a day for one answer
MAX_RETRY_AFTER = 24 * 3600.0
MAX_TEMPERATURE = 100.0
DEFAULT_TEMPERATURE = 0.8  # llama.cpp's defaults, so a bare request samples as usual
DEFAULT_TOP_P = 0.95
# What an absent top_k, min_p, repeat_penalty mean (llama.cpp's defaults too). A consumer
# leaves a knob out when it holds its default, so a provider that predates these fields
# samples the same way and needs no Accepted.sampling.
DEFAULT_TOP_K = 40
DEFAULT_MIN_P = 0.05
DEFAULT_REPEAT_PENALTY = 1.0
MAX_TOP_K = 2**31 - 1  # llama.cpp takes top_k as an int32; past the vocabulary = all of it
MAX_REPEAT_PENALTY = 100.0
# why not 0: llama.cpp divides positive logits by it (0 makes them infinite)
MIN_REPEAT_PENALTY = 0.01
DEFAULT_DEADLINE_MS = 120_000

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_E = TypeVar("_E", bound=enum.StrEnum)


class FinishReason(enum.StrEnum):
    """Why generation ended (`Done.finish_reason`)."""

    STOP = "stop"  # end of sequence or a stop string
    LENGTH = "length"  # max_tokens or the context was exhausted
    CANCELLED = "cancelled"  # the provider gave up (shutdown, deadline) after some tokens


# --- field checks: type errors are PROTOCOL, range errors BAD_REQUEST --------------------


def _wire_type(value: object) -> str:
    """The msgpack name of a decoded value's type, for error messages."""
    names = {
        type(None): "nil",
        bool: "bool",
        int: "int",
        float: "float",
        str: "str",
        bytes: "bin",
        list: "array",
        tuple: "array",
        dict: "map",
    }
    return names.get(type(value), type(value).__name__)


def _type_error(where: str, expected: str, value: object) -> ProtocolError:
    return ProtocolError(ErrorCode.PROTOCOL, f"{where} must be {expected}, got {_wire_type(value)}")


def _range_error(where: str, what: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, f"{where} {what}")


def _check_str(where: str, value: object, *, max_len: int, min_len: int = 0) -> str:
    if type(value) is not str:
        raise _type_error(where, "a str", value)
    if len(value) < min_len:
        raise _range_error(where, "must not be empty")
    if len(value) > max_len:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"{where} has {len(value)} characters, over the {max_len} limit"
        )
    return value


def _check_int(where: str, value: object, lo: int, hi: int) -> int:
    # bool is an int subclass in Python but a distinct msgpack type: reject it.
    if type(value) is not int:
        raise _type_error(where, "an int", value)
    if not lo <= value <= hi:
        raise _range_error(where, f"must be in [{lo}, {hi}], got {value}")
    return value


def _check_float(where: str, value: object, lo: float, hi: float) -> float:
    # Integers are accepted because some msgpack encoders (JavaScript's) write 1.0 as 1.
    if type(value) is int:
        value = float(value)
    if type(value) is not float:
        raise _type_error(where, "a float", value)
    if not math.isfinite(value) or not lo <= value <= hi:
        raise _range_error(where, f"must be a finite number in [{lo}, {hi}], got {value}")
    return value


def _check_bytes(where: str, value: object, *, max_len: int, min_len: int = 0) -> bytes:
    if isinstance(value, bytearray | memoryview):
        value = bytes(value)
    if type(value) is not bytes:
        raise _type_error(where, "bin", value)
    if len(value) < min_len:
        raise _range_error(where, "must not be empty")
    if len(value) > max_len:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"{where} has {len(value)} bytes, over the {max_len}-byte limit"
        )
    return value


def _check_bool(where: str, value: object) -> bool:
    if type(value) is not bool:
        raise _type_error(where, "a bool", value)
    return value


def _check_enum(where: str, value: object, enum_type: type[_E]) -> _E:
    if isinstance(value, enum_type):
        return value
    if type(value) is not str:
        raise _type_error(where, "a str", value)
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum_type)
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise ProtocolError(
            ErrorCode.PROTOCOL, f"{where} is {shown!r}, expected one of: {allowed}"
        ) from None


def _set(obj: object, name: str, value: object) -> None:
    # Normalising a field of a frozen dataclass from __post_init__.
    object.__setattr__(obj, name, value)


def _to_wire_value(value: object) -> object:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, ChatMessage):
        return value.to_wire()
    if isinstance(value, tuple):
        return [_to_wire_value(item) for item in value]
    return value


# --- messages ----------------------------------------------------------------------------


class _Message:
    """Shared wire conversion. Subclasses are frozen dataclasses with a `tag`."""

    __slots__ = ()
    tag: ClassVar[str]
    # Keys that must be present on the wire besides the fields without a Python default
    # (e.g. deadline_ms: a provider must know the caller's deadline, not assume one).
    wire_required: ClassVar[frozenset[str]] = frozenset()

    def to_wire(self) -> dict[str, Any]:
        """The wire map: `t` first, then fields in declaration order, None omitted."""
        wire: dict[str, Any] = {"t": self.tag}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if value is not None:
                wire[field.name] = _to_wire_value(value)
        return wire

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> Any:
        """Build the message from a decoded wire map; raises ProtocolError if invalid."""
        if not isinstance(wire, Mapping):
            raise _type_error(f"{cls.__name__} message", "a map", wire)
        tag = wire.get("t")
        if tag != cls.tag:
            got = repr(tag[:40]) if type(tag) is str else _wire_type(tag)
            raise ProtocolError(
                ErrorCode.PROTOCOL, f"{cls.__name__} needs t={cls.tag!r}, got {got}"
            )
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            value = wire.get(field.name)
            if value is not None:
                kwargs[field.name] = value
            elif field.name in cls.wire_required or field.default is dataclasses.MISSING:
                raise ProtocolError(
                    ErrorCode.PROTOCOL, f"{cls.__name__} is missing required field {field.name!r}"
                )
            # else: absent or nil, so the field's default applies
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True, slots=True)
class ChatMessage:
    """One turn of a chat: `{role, content}` inside `InferRequest.messages`."""

    role: str
    content: str

    def __post_init__(self) -> None:
        _check_str("ChatMessage.role", self.role, max_len=MAX_NAME_LEN, min_len=1)
        _check_str("ChatMessage.content", self.content, max_len=DEFAULT_LIMITS.max_str_len)

    def to_wire(self) -> dict[str, Any]:
        return {"role": self.role, "content": self.content}

    @classmethod
    def from_wire(cls, wire: object) -> ChatMessage:
        if not isinstance(wire, Mapping):
            raise _type_error("InferRequest.messages item", "a map", wire)
        for key in ("role", "content"):
            if key not in wire:
                raise ProtocolError(
                    ErrorCode.PROTOCOL, f"InferRequest.messages item is missing {key!r}"
                )
        return cls(role=wire["role"], content=wire["content"])


# /qvac/infer/1.0.0 -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class InferRequest(_Message):
    """Generate text. Exactly one of `prompt` (raw completion) or `messages` (chat).

    `deadline_ms` is how long, from receipt, the caller will wait for the whole answer.
    `resume` is text a previous provider already generated for this request: continue
    after prompt+resume (or after the chat prompt + resume as the assistant's partial
    reply) and stream only the new text.
    `grammar` is GBNF (root rule "root") every generated token must fit; with `resume`,
    the resume text is the start of the answer inside the grammar. A provider that
    enforces it says so in Accepted.grammar: one that does not know the field ignores it
    (unknown keys are), and the consumer then goes to another peer.
    `top_k`, `min_p`, `repeat_penalty`: absent means DEFAULT_TOP_K, DEFAULT_MIN_P,
    DEFAULT_REPEAT_PENALTY. A provider that applies them says so in Accepted.sampling,
    for the same reason as grammar.
    """

    tag: ClassVar[str] = "req"
    wire_required: ClassVar[frozenset[str]] = frozenset({"model", "deadline_ms"})

    model: str
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    max_tokens: int | None = None
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    deadline_ms: int = DEFAULT_DEADLINE_MS
    resume: str | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        _check_str("InferRequest.model", self.model, max_len=MAX_NAME_LEN, min_len=1)
        if self.prompt is not None:
            _check_str("InferRequest.prompt", self.prompt, max_len=DEFAULT_LIMITS.max_str_len)
        if self.messages is not None:
            if not isinstance(self.messages, list | tuple):
                raise _type_error("InferRequest.messages", "an array", self.messages)
            if not self.messages:
                raise _range_error("InferRequest.messages", "must not be empty")
            _set(
                self,
                "messages",
                tuple(m if isinstance(m, ChatMessage) else ChatMessage.from_wire(m)
                      for m in self.messages),
            )
        if (self.prompt is None) == (self.messages is None):
            got = "both" if self.prompt is not None else "neither"
            raise _range_error(
                "InferRequest", f"needs exactly one of prompt and messages, got {got}"
            )
        if self.max_tokens is not None:
            _check_int("InferRequest.max_tokens", self.max_tokens, 1, U32_MAX)
        _set(self, "temperature",
             _check_float("InferRequest.temperature", self.temperature, 0.0, MAX_TEMPERATURE))
        _set(self, "top_p", _check_float("InferRequest.top_p", self.top_p, 0.0, 1.0))
        if self.top_k is not None:
            _check_int("InferRequest.top_k", self.top_k, 0, MAX_TOP_K)
        if self.min_p is not None:
            _set(self, "min_p", _check_float("InferRequest.min_p", self.min_p, 0.0, 1.0))
        if self.repeat_penalty is not None:
            _set(self, "repeat_penalty", _check_float(
                "InferRequest.repeat_penalty", self.repeat_penalty, MIN_REPEAT_PENALTY,
                MAX_REPEAT_PENALTY))
        if self.seed is not None:
            _check_int("InferRequest.seed", self.seed, 0, U64_MAX)
        if not isinstance(self.stop, list | tuple):
            raise _type_error("InferRequest.stop", "an array", self.stop)
        if len(self.stop) > MAX_STOP:
            raise _range_error("InferRequest.stop", f"has {len(self.stop)} entries, max {MAX_STOP}")
        for s in self.stop:
            _check_str("InferRequest.stop item", s, max_len=MAX_NAME_LEN, min_len=1)
        _set(self, "stop", tuple(self.stop))
        _check_int("InferRequest.deadline_ms", self.deadline_ms, 1, MAX_DEADLINE_MS)
        if self.resume is not None:
            _check_str("InferRequest.resume", self.resume, max_len=DEFAULT_LIMITS.max_str_len)
        if self.grammar is not None:
            _check_str("InferRequest.grammar", self.grammar, max_len=MAX_GRAMMAR_LEN,
                       min_len=1)

    @property
    def sets_sampling(self) -> bool:
        """Whether any of top_k, min_p, repeat_penalty is on the wire (then the provider
        must say Accepted.sampling = true)."""
        return not (self.top_k is None and self.min_p is None and self.repeat_penalty is None)


@dataclasses.dataclass(frozen=True, slots=True)
class Accepted(_Message):
    """The provider took the request; `queue_position` 0 means it is generating now.
    `grammar` true: the request's grammar is enforced (absent from providers that
    predate the field, which would ignore the grammar). `sampling` true: the request's
    top_k, min_p and repeat_penalty are applied (the same for those fields)."""

    tag: ClassVar[str] = "acc"
    wire_required: ClassVar[frozenset[str]] = frozenset({"queue_position"})
    queue_position: int = 0
    grammar: bool | None = None
    sampling: bool | None = None

    def __post_init__(self) -> None:
        _check_int("Accepted.queue_position", self.queue_position, 0, U32_MAX)
        if self.grammar is not None:
            _check_bool("Accepted.grammar", self.grammar)
        if self.sampling is not None:
            _check_bool("Accepted.sampling", self.sampling)


@dataclasses.dataclass(frozen=True, slots=True)
class Error(_Message):
    """The request failed (any protocol). `retry_after` (seconds) mostly comes with BUSY."""

    tag: ClassVar[str] = "err"

    code: ErrorCode
    message: str
    retry_after: float | None = None

    def __post_init__(self) -> None:
        _set(self, "code", _check_enum("Error.code", self.code, ErrorCode))
        _check_str("Error.message", self.message, max_len=MAX_ERROR_MESSAGE_LEN)
        if self.retry_after is not None:
            _set(self, "retry_after",
                 _check_float("Error.retry_after", self.retry_after, 0.0, MAX_RETRY_AFTER))

    @classmethod
    def from_exception(cls, exc: ProtocolError) -> Error:
        """The frame a server sends back when decoding or validating a request failed."""
        message = exc.message
        if len(message) > MAX_ERROR_MESSAGE_LEN:
            message = message[: MAX_ERROR_MESSAGE_LEN - 3] + "..."
        return cls(code=exc.code, message=message, retry_after=exc.retry_after)


@dataclasses.dataclass(frozen=True, slots=True)
class Token(_Message):
    """A piece of generated text (whole UTF-8 characters; may hold several tokens)."""

    tag: ClassVar[str] = "tok"
    text: str

    def __post_init__(self) -> None:
        _check_str("Token.text", self.text, max_len=DEFAULT_LIMITS.max_str_len)


@dataclasses.dataclass(frozen=True, slots=True)
class Done(_Message):
    """Generation ended. Token counts are this provider's (after a resume: its own share)."""

    tag: ClassVar[str] = "done"
    wire_required: ClassVar[frozenset[str]] = frozenset(
        {"finish_reason", "prompt_tokens", "completion_tokens"}
    )

    finish_reason: FinishReason
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __post_init__(self) -> None:
        _set(self, "finish_reason",
             _check_enum("Done.finish_reason", self.finish_reason, FinishReason))
        _check_int("Done.prompt_tokens", self.prompt_tokens, 0, U32_MAX)
        _check_int("Done.completion_tokens", self.completion_tokens, 0, U32_MAX)


# /qvac/capacity/1.0.0 --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class CapacityRequest(_Message):
    """Ask for the peer's current signed capacity record."""

    tag: ClassVar[str] = "capq"


@dataclasses.dataclass(frozen=True, slots=True)
class CapacityResponse(_Message):
    """A signed capacity record, opaque here (peers/ signs and verifies it)."""

    tag: ClassVar[str] = "cap"
    record: bytes

    def __post_init__(self) -> None:
        _set(self, "record",
             _check_bytes("CapacityResponse.record", self.record, max_len=MAX_RECORD_SIZE,
                          min_len=1))


# /qvac/shard/1.0.0 -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ManifestRequest(_Message):
    """Ask for a model's manifest, by name or by the sha256 (lowercase hex) of its file."""

    tag: ClassVar[str] = "manq"
    model: str

    def __post_init__(self) -> None:
        _check_str("ManifestRequest.model", self.model, max_len=MAX_NAME_LEN, min_len=1)


@dataclasses.dataclass(frozen=True, slots=True)
class ManifestResponse(_Message):
    """A model manifest, opaque here (models/ builds and verifies it)."""

    tag: ClassVar[str] = "man"
    manifest: bytes

    def __post_init__(self) -> None:
        _set(self, "manifest",
             _check_bytes("ManifestResponse.manifest", self.manifest, max_len=MAX_MANIFEST_SIZE,
                          min_len=1))


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkRequest(_Message):
    """Ask for chunk `index` of the model file whose sha256 is `sha256`."""

    tag: ClassVar[str] = "chunkq"
    sha256: str
    index: int

    def __post_init__(self) -> None:
        _check_str("ChunkRequest.sha256", self.sha256, max_len=64)
        if not _SHA256_HEX.fullmatch(self.sha256):
            raise _range_error("ChunkRequest.sha256", "must be 64 lowercase hex digits")
        _check_int("ChunkRequest.index", self.index, 0, U32_MAX)


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkData(_Message):
    """One sub-frame of a chunk: `data` starts at byte `offset` within chunk `index`.

    Sub-frames come in order, contiguous, the last one with `last` true. Only the last
    may be empty (a zero-length chunk), so a peer cannot trickle empty frames forever.
    """

    tag: ClassVar[str] = "chunk"
    wire_required: ClassVar[frozenset[str]] = frozenset({"index", "offset", "data", "last"})

    index: int
    offset: int
    data: bytes
    last: bool = False

    def __post_init__(self) -> None:
        _check_int("ChunkData.index", self.index, 0, U32_MAX)
        _check_int("ChunkData.offset", self.offset, 0, U32_MAX)
        _set(self, "data", _check_bytes("ChunkData.data", self.data, max_len=MAX_CHUNK_PIECE))
        _check_bool("ChunkData.last", self.last)
        if not self.data and not self.last:
            raise _range_error("ChunkData.data", "may be empty only in the last sub-frame")


# /qvac/pair/1.0.0 ------------------------------------------------------------------------


def _check_roles(where: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise _type_error(where, "an array", value)
    if not 1 <= len(value) <= MAX_PAIR_ROLES:
        raise _range_error(where, f"must hold 1..{MAX_PAIR_ROLES} roles, got {len(value)}")
    for role in value:
        _check_str(f"{where} item", role, max_len=MAX_NAME_LEN, min_len=1)
    return tuple(value)


@dataclasses.dataclass(frozen=True, slots=True)
class PairStart(_Message):
    """The joiner's first SPAKE2 message for the offer numbered `offer` (the code's
    first part, which is not secret)."""

    tag: ClassVar[str] = "pairq"
    offer: int
    pake: bytes

    def __post_init__(self) -> None:
        _check_int("PairStart.offer", self.offer, 0, U32_MAX)
        _set(self, "pake", _check_bytes("PairStart.pake", self.pake, max_len=MAX_PAKE_MESSAGE,
                                        min_len=1))


@dataclasses.dataclass(frozen=True, slots=True)
class PairReply(_Message):
    """The offerer's SPAKE2 message, the roles it offers, and its key confirmation."""

    tag: ClassVar[str] = "pairs"
    pake: bytes
    roles: tuple[str, ...]
    confirm: bytes

    def __post_init__(self) -> None:
        _set(self, "pake", _check_bytes("PairReply.pake", self.pake, max_len=MAX_PAKE_MESSAGE,
                                        min_len=1))
        _set(self, "roles", _check_roles("PairReply.roles", self.roles))
        _set(self, "confirm", _check_mac("PairReply.confirm", self.confirm))


@dataclasses.dataclass(frozen=True, slots=True)
class PairConfirm(_Message):
    """The joiner's key confirmation, sent only after the offerer's verified."""

    tag: ClassVar[str] = "pairc"
    confirm: bytes

    def __post_init__(self) -> None:
        _set(self, "confirm", _check_mac("PairConfirm.confirm", self.confirm))


@dataclasses.dataclass(frozen=True, slots=True)
class PairDone(_Message):
    """The offerer verified the joiner's confirmation and trusts it with `roles`; an
    offerer that owns a mesh adds a membership certificate for the joiner (opaque here)."""

    tag: ClassVar[str] = "paird"
    roles: tuple[str, ...]
    certificate: str | None = None

    def __post_init__(self) -> None:
        _set(self, "roles", _check_roles("PairDone.roles", self.roles))
        if self.certificate is not None:
            _check_str("PairDone.certificate", self.certificate, max_len=MAX_CERTIFICATE_LEN,
                       min_len=1)


def _check_mac(where: str, value: object) -> bytes:
    mac = _check_bytes(where, value, max_len=PAIR_MAC_LEN)
    if len(mac) != PAIR_MAC_LEN:
        raise _range_error(where, f"must be {PAIR_MAC_LEN} bytes, got {len(mac)}")
    return mac


# /qvac/layers/1.0.0 ----------------------------------------------------------------------
#
# A split model's head asks a worker to hold some of its layers. The two frames below open
# the stream; after LayersReady the stream carries llama.cpp RPC bytes both ways
# (protocol/_layers.py checks the head's command headers on the worker).

MAX_LAYERS_MEMORY = 2**50  # a petabyte: a bound on the number, not a promise


@dataclasses.dataclass(frozen=True, slots=True)
class LayersHello(_Message):
    """The head's first frame: the llama.cpp RPC protocol version it speaks, the bytes of
    layers and KV it wants to place, and the model's sha256 (a worker that holds the file
    says so). `probe` true: only check, the head closes after LayersReady."""

    tag: ClassVar[str] = "lhello"
    rpc_major: int
    rpc_minor: int
    rpc_patch: int
    memory: int
    model_sha256: str | None = None
    probe: bool | None = None

    def __post_init__(self) -> None:
        for name in ("rpc_major", "rpc_minor", "rpc_patch"):
            _check_int(f"LayersHello.{name}", getattr(self, name), 0, 255)
        _check_int("LayersHello.memory", self.memory, 1, MAX_LAYERS_MEMORY)
        if self.model_sha256 is not None:
            _check_str("LayersHello.model_sha256", self.model_sha256, max_len=64)
            if not _SHA256_HEX.fullmatch(self.model_sha256):
                raise _range_error("LayersHello.model_sha256", "must be 64 lowercase hex digits")
        if self.probe is not None:
            _check_bool("LayersHello.probe", self.probe)


@dataclasses.dataclass(frozen=True, slots=True)
class LayersReady(_Message):
    """The worker's answer: its RPC version, the memory it grants (= the hello's), and
    whether it holds the model's file. RPC bytes may follow."""

    tag: ClassVar[str] = "lready"
    rpc_major: int
    rpc_minor: int
    rpc_patch: int
    memory: int
    holds_model: bool | None = None

    def __post_init__(self) -> None:
        for name in ("rpc_major", "rpc_minor", "rpc_patch"):
            _check_int(f"LayersReady.{name}", getattr(self, name), 0, 255)
        _check_int("LayersReady.memory", self.memory, 1, MAX_LAYERS_MEMORY)
        if self.holds_model is not None:
            _check_bool("LayersReady.holds_model", self.holds_model)


Message: TypeAlias = (
    InferRequest
    | Accepted
    | Error
    | Token
    | Done
    | CapacityRequest
    | CapacityResponse
    | ManifestRequest
    | ManifestResponse
    | ChunkRequest
    | ChunkData
    | PairStart
    | PairReply
    | PairConfirm
    | PairDone
    | LayersHello
    | LayersReady
)

MESSAGE_TYPES: Mapping[str, type[Message]] = {
    cls.tag: cls
    for cls in (
        InferRequest,
        Accepted,
        Error,
        Token,
        Done,
        CapacityRequest,
        CapacityResponse,
        ManifestRequest,
        ManifestResponse,
        ChunkRequest,
        ChunkData,
        PairStart,
        PairReply,
        PairConfirm,
        PairDone,
        LayersHello,
        LayersReady,
    )
}

# Which messages may appear on which protocol's streams (Error on all of them).
PROTOCOL_MESSAGES: Mapping[str, frozenset[type[Message]]] = {
    INFER_PROTOCOL: frozenset({InferRequest, Accepted, Error, Token, Done}),
    CAPACITY_PROTOCOL: frozenset({CapacityRequest, CapacityResponse, Error}),
    SHARD_PROTOCOL: frozenset(
        {ManifestRequest, ManifestResponse, ChunkRequest, ChunkData, Error}
    ),
    PAIR_PROTOCOL: frozenset({PairStart, PairReply, PairConfirm, PairDone, Error}),
    LAYERS_PROTOCOL: frozenset({LayersHello, LayersReady, Error}),
}


def limits_for(protocol_id: str) -> Limits:
    """The decoder limits for streams of `protocol_id` (shard streams carry big frames)."""
    if protocol_id == SHARD_PROTOCOL:
        return SHARD_LIMITS
    if protocol_id == PAIR_PROTOCOL:
        return PAIR_LIMITS
    if protocol_id in _REGISTERED_LIMITS:
        return _REGISTERED_LIMITS[protocol_id]
    if protocol_id in PROTOCOL_MESSAGES:
        return DEFAULT_LIMITS
    raise ValueError(f"unknown protocol id {protocol_id!r}")


_REGISTERED_LIMITS: dict[str, Limits] = {}


def register_protocol(protocol_id: str, messages: tuple[type[_Message], ...],
                      limits: Limits) -> None:
    """Add a protocol whose messages live in a module of their own (protocol/_embed.py):
    that module imports this one for the base class and checks, so this one cannot import
    it back; it registers its tags here, at import, for parse_message and limits_for."""
    for cls in messages:
        if cls.tag in MESSAGE_TYPES:
            raise ValueError(f"message tag {cls.tag!r} is taken")
        MESSAGE_TYPES[cls.tag] = cls  # type: ignore[index]
    PROTOCOL_MESSAGES[protocol_id] = frozenset({*messages, Error})  # type: ignore[index]
    _REGISTERED_LIMITS[protocol_id] = limits


def parse_message(wire: object) -> Message:
    """The typed message for a decoded wire map, dispatching on its `t` key."""
    if not isinstance(wire, dict):
        raise _type_error("a frame", "a map", wire)
    if "t" not in wire:
        raise ProtocolError(ErrorCode.PROTOCOL, "message has no 't' (type) key")
    tag = wire["t"]
    if type(tag) is not str:
        raise _type_error("message type 't'", "a str", tag)
    cls = MESSAGE_TYPES.get(tag)
    if cls is None:
        shown = tag if len(tag) <= 40 else tag[:40] + "..."
        raise ProtocolError(ErrorCode.PROTOCOL, f"unknown message type {shown!r}")
    return cls.from_wire(wire)
