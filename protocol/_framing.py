"""Frames: an unsigned LEB128 length, then one msgpack map. Sans-IO: bytes in, messages out."""

from __future__ import annotations

from typing import Any

import msgpack

from ._errors import ErrorCode, ProtocolError
from ._limits import DEFAULT_LIMITS, Limits
from ._messages import Message, parse_message

__all__ = ["FrameDecoder", "decode_frame", "encode_frame", "encode_varint"]

_LEAF_TYPES = frozenset({type(None), bool, int, float, str, bytes})


def encode_varint(value: int) -> bytes:
    """Unsigned LEB128, minimal length: 7 bits a byte, low group first, high bit = more."""
    if value < 0:
        raise ValueError(f"varint must be non-negative, got {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_frame(msg: Message, limits: Limits | None = None) -> bytes:
    """The frame for `msg`. Deterministic: same message, same bytes.

    Keys go in declaration order with `t` first, integers in their shortest msgpack form,
    floats always as float64, bytes as bin. With `limits`, a frame the peer would reject
    raises ProtocolError(TOO_LARGE) here instead of being sent.
    """
    body = msgpack.packb(msg.to_wire(), use_bin_type=True, use_single_float=False,
                         strict_types=True)
    if limits is not None and len(body) > limits.max_frame_size:
        raise ProtocolError(
            ErrorCode.TOO_LARGE,
            f"frame of {len(body)} bytes exceeds the {limits.max_frame_size}-byte limit",
        )
    return encode_varint(len(body)) + body


class _ExtRejected(Exception):
    pass


class _TooManyContainers(Exception):
    pass


def _reject_ext(code: int, data: bytes) -> Any:
    raise _ExtRejected(code)


def _unpack_body(body: bytes, limits: Limits) -> Any:
    containers = 0

    def count(container: Any) -> Any:
        # Called by msgpack for every map and array as it is built: stops the count early.
        nonlocal containers
        containers += 1
        if containers > limits.max_containers:
            raise _TooManyContainers
        return container

    try:
        return msgpack.unpackb(
            body,
            raw=False,  # str must be valid UTF-8
            strict_map_key=True,  # only str/bin keys; bin keys are rejected by _check_tree
            use_list=True,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bin_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            ext_hook=_reject_ext,
            object_hook=count,
            list_hook=count,
        )
    except _TooManyContainers:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"frame holds over {limits.max_containers} maps and arrays"
        ) from None
    except _ExtRejected as exc:
        raise ProtocolError(ErrorCode.PROTOCOL, f"ext type {exc.args[0]} is not allowed") from None
    except UnicodeDecodeError:
        raise ProtocolError(ErrorCode.PROTOCOL, "string is not valid UTF-8") from None
    except msgpack.ExtraData as exc:
        extra = len(exc.extra)  # type: ignore[attr-defined]
        raise ProtocolError(
            ErrorCode.PROTOCOL, f"frame has {extra} stray byte(s) after its msgpack map"
        ) from None
    except msgpack.StackError:
        raise ProtocolError(ErrorCode.PROTOCOL, "msgpack nesting too deep") from None
    except ValueError as exc:
        text = str(exc) or type(exc).__name__
        if "for map key" in text:  # strict_map_key refused an int/float/... key
            raise ProtocolError(ErrorCode.PROTOCOL, f"map keys must be str ({text})") from None
        # msgpack reports its size limits as ValueError("... exceeds max_str_len(...)").
        if "exceeds max_" in text:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"msgpack value too large: {text}") from None
        raise ProtocolError(ErrorCode.PROTOCOL, f"malformed msgpack: {text}") from None
    except Exception as exc:
        # The C unpacker reports everything as ValueError subclasses; this is for msgpack's
        # pure-Python fallback (PyPy, no compiler) and future versions: never let one out.
        raise ProtocolError(
            ErrorCode.PROTOCOL, f"malformed msgpack ({type(exc).__name__}: {exc})"
        ) from None


def _describe(obj: object) -> str:
    names = {type(None): "nil", bool: "a bool", int: "an int", float: "a float",
             str: "a str", bytes: "a bin", list: "an array"}
    return names.get(type(obj), type(obj).__name__)


def _check_tree(obj: object, max_depth: int) -> None:
    """Depth, key types and value types of a decoded frame, walked without recursion.

    msgpack itself bounds sizes but not depth (beyond its own stack), and it decodes the
    timestamp extension without asking ext_hook, so both are checked here.
    """
    if not isinstance(obj, dict):
        raise ProtocolError(
            ErrorCode.PROTOCOL, f"frame holds {_describe(obj)}; a frame must hold a map"
        )
    stack: list[tuple[object, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            for key in node:
                if type(key) is not str:
                    kind = type(key).__name__
                    raise ProtocolError(
                        ErrorCode.PROTOCOL, f"map key of type {kind}; keys must be str"
                    )
            children = node.values()
        else:
            children = node  # type: ignore[assignment]
        kinds = set(map(type, children))  # C-speed pass; most arrays hold only leaves
        if kinds.issubset(_LEAF_TYPES):
            continue
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > max_depth:
                    raise ProtocolError(
                        ErrorCode.PROTOCOL, f"nesting deeper than {max_depth} levels"
                    )
                stack.append((child, depth + 1))
            elif type(child) not in _LEAF_TYPES:
                raise ProtocolError(
                    ErrorCode.PROTOCOL, f"value of type {type(child).__name__} is not allowed"
                )


def _decode_body(body: bytes, limits: Limits) -> Message:
    obj = _unpack_body(body, limits)
    _check_tree(obj, limits.max_depth)
    return parse_message(obj)


class FrameDecoder:
    """Turns a byte stream into messages; sans-IO, like h11's Connection.

    Feed it whatever arrived with `feed`, then call `next_message` until it returns None
    (more bytes needed). A declared length over the limit is rejected as soon as the
    length prefix is read. After a ProtocolError the decoder stays failed: every later call
    raises the same error, since the stream is no longer in sync.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._buf = bytearray()
        self._pos = 0  # start of unconsumed bytes in _buf
        self._body_len: int | None = None  # set once a prefix was read
        self._eof = False
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages (prefix included)."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        """Add received bytes. Cheap: parsing happens in next_message."""
        if self._error is not None:
            raise self._error
        if self._eof:
            raise ProtocolError(ErrorCode.PROTOCOL, "bytes fed after the end of the stream")
        self._buf += data

    def feed_eof(self) -> None:
        """The peer closed its side; a half-received frame is now an error."""
        self._eof = True

    def next_message(self) -> Message | None:
        """The next complete message, or None until more bytes are fed."""
        if self._error is not None:
            raise self._error
        try:
            return self._next_message()
        except ProtocolError as exc:
            self._error = exc
            raise

    def _next_message(self) -> Message | None:
        if self._body_len is None:
            self._body_len = self._read_prefix()
            if self._body_len is None:
                self._check_eof()
                return None
        end = self._pos + self._body_len
        if len(self._buf) < end:
            self._check_eof()
            return None
        body = bytes(self._buf[self._pos : end])
        self._pos = end
        self._body_len = None
        # Drop consumed bytes once they are at least half the buffer: amortised O(1).
        if self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        return _decode_body(body, self.limits)

    def _check_eof(self) -> None:
        if self._eof and self.buffered:
            raise ProtocolError(
                ErrorCode.PROTOCOL,
                f"stream ended inside a frame ({self.buffered} bytes of it received)",
            )

    def _read_prefix(self) -> int | None:
        """Parse the length prefix at _pos; None if incomplete. Advances past it."""
        limits = self.limits
        value = 0
        pos = self._pos
        for i in range(limits.max_varint_bytes):
            if pos + i >= len(self._buf):
                return None
            byte = self._buf[pos + i]
            value |= (byte & 0x7F) << (7 * i)
            if byte & 0x80:
                # The length is at least value + 2**(7*(i+1)) (minimal encodings end with a
                # non-zero byte), so an oversized frame is refused before its prefix ends.
                if value + (1 << (7 * (i + 1))) > limits.max_frame_size:
                    raise self._too_large(f"at least {value + (1 << (7 * (i + 1)))}")
                continue
            if byte == 0 and i > 0:
                raise ProtocolError(ErrorCode.PROTOCOL, "length prefix is not minimally encoded")
            if value == 0:
                raise ProtocolError(ErrorCode.PROTOCOL, "frame of 0 bytes; a frame holds a map")
            if value > limits.max_frame_size:
                raise self._too_large(str(value))
            self._pos = pos + i + 1
            return value
        # Unreachable while Limits keeps max_frame_size < 2**(7*max_varint_bytes): the size
        # check above fires first. Kept so the loop bound alone guarantees termination.
        raise ProtocolError(
            ErrorCode.PROTOCOL, f"length prefix longer than {limits.max_varint_bytes} bytes"
        )

    def _too_large(self, size: str) -> ProtocolError:
        return ProtocolError(
            ErrorCode.TOO_LARGE,
            f"frame of {size} bytes exceeds the {self.limits.max_frame_size}-byte limit",
        )


def decode_frame(data: bytes, limits: Limits = DEFAULT_LIMITS) -> tuple[Message, int]:
    """Decode the one frame at the start of `data`: (message, bytes it took).

    For a complete buffer; an incomplete frame raises ProtocolError(PROTOCOL). Streams
    should use FrameDecoder.
    """
    decoder = FrameDecoder(limits)
    decoder.feed(data)
    decoder.feed_eof()
    msg = decoder.next_message()
    if msg is None:  # only when data is empty
        raise ProtocolError(ErrorCode.PROTOCOL, "no frame: the buffer is empty")
    return msg, len(data) - decoder.buffered

