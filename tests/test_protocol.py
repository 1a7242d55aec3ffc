"""Tests of the wire: frames, messages, limits, state machines, and the spec's vectors."""

from __future__ import annotations

import ast
import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol
from protocol import (
    DEFAULT_LIMITS,
    MAX_CHUNK_PIECE,
    MAX_GRAMMAR_LEN,
    MAX_MANIFEST_SIZE,
    MESSAGE_TYPES,
    SHARD_LIMITS,
    SHARD_PROTOCOL,
    Accepted,
    CapacityRequest,
    CapacityResponse,
    ChatMessage,
    ChunkClientState,
    ChunkData,
    ChunkRequest,
    Done,
    Error,
    ErrorCode,
    FinishReason,
    FrameDecoder,
    InferClientState,
    InferRequest,
    Limits,
    ManifestRequest,
    ManifestResponse,
    PairConfirm,
    PairDone,
    PairReply,
    PairStart,
    ProtocolError,
    StreamState,
    Token,
    decode_frame,
    encode_frame,
    encode_varint,
    limits_for,
    parse_message,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

EXAMPLES: list[protocol.Message] = [
    InferRequest(model="gemma3-270m", prompt="Hello", deadline_ms=1000),
    InferRequest(
        model="m",
        messages=(ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")),
        max_tokens=5,
        temperature=0.0,
        top_p=1.0,
        seed=2**64 - 1,
        stop=("\n", "END"),
        deadline_ms=60_000,
        resume="partial ",
    ),
    InferRequest(model="m", prompt="Yes or no?", deadline_ms=1000,
                 grammar='root ::= "yes" | "no"'),
    InferRequest(model="m", prompt="Once", temperature=1.0, top_k=0, min_p=1.0,
                 repeat_penalty=100.0, seed=7, deadline_ms=1000),
    Accepted(queue_position=0),
    Accepted(queue_position=7),
    Accepted(queue_position=0, grammar=True),
    Accepted(queue_position=0, sampling=True),
    Error(code=ErrorCode.BUSY, message="try later", retry_after=1.5),
    Error(code=ErrorCode.INTERNAL, message=""),
    Token(text="héllo"),
    Token(text=""),
    Done(finish_reason=FinishReason.LENGTH, prompt_tokens=10, completion_tokens=5),
    CapacityRequest(),
    CapacityResponse(record=b"\x00signed"),
    ManifestRequest(model=SHA),
    ManifestResponse(manifest=b"manifest"),
    ChunkRequest(sha256=SHA, index=0),
    ChunkData(index=3, offset=1024, data=b"\xff" * 100, last=False),
    ChunkData(index=3, offset=0, data=b"", last=True),
    PairStart(offer=7, pake=b"\x01" * 33),
    PairReply(pake=b"\x02" * 33, roles=("consumer", "provider"), confirm=b"\x03" * 32),
    PairConfirm(confirm=b"\x04" * 32),
    PairDone(roles=("seeder",)),
    PairDone(roles=("consumer",), certificate="qvac-cert-1:opaque"),
    protocol.EmbedRequest(model="m", inputs=("a", "b"), deadline_ms=1000),
    protocol.EmbedVectors(first=0, dims=1, data=b"\x00\x00\x80\x3f"),
    protocol.EmbedDone(count=1, prompt_tokens=3),
    protocol.LayersHello(rpc_major=7, rpc_minor=0, rpc_patch=0, memory=1 << 20,
                         model_sha256="a" * 64),
    protocol.LayersHello(rpc_major=7, rpc_minor=0, rpc_patch=0, memory=1, probe=True),
    protocol.LayersReady(rpc_major=7, rpc_minor=0, rpc_patch=0, memory=1 << 20,
                         holds_model=False),
]


def raw_frame(obj: Any, **pack_options: Any) -> bytes:
    """A frame around any msgpack value, bypassing the message classes."""
    body = msgpack.packb(obj, use_bin_type=True, **pack_options)
    return encode_varint(len(body)) + body


def decode_all(data: bytes, limits: Limits = DEFAULT_LIMITS) -> list[protocol.Message]:
    decoder = FrameDecoder(limits)
    decoder.feed(data)
    out = []
    while (msg := decoder.next_message()) is not None:
        out.append(msg)
    return out


def error_code(data: bytes, limits: Limits = DEFAULT_LIMITS) -> ErrorCode:
    with pytest.raises(ProtocolError) as info:
        decode_frame(data, limits)
    return info.value.code


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_examples(msg: protocol.Message) -> None:
    wire = msg.to_wire()
    assert list(wire)[0] == "t" and wire["t"] == msg.tag
    assert type(msg).from_wire(wire) == msg
    assert parse_message(wire) == msg
    frame = encode_frame(msg)
    assert decode_frame(frame) == (msg, len(frame))
    # The wire map is plain msgpack data: what msgpack hands back decodes the same.
    assert parse_message(msgpack.unpackb(frame[1:] if frame[0] < 0x80 else frame[2:])) == msg


names = st.text(min_size=1, max_size=12)
texts = st.text(max_size=40)
u32 = st.integers(0, 2**32 - 1)
chats = st.builds(ChatMessage, role=names, content=texts)


@st.composite
def infer_requests(draw: st.DrawFn) -> InferRequest:
    chat = draw(st.booleans())
    return InferRequest(
        model=draw(names),
        prompt=None if chat else draw(texts),
        messages=tuple(draw(st.lists(chats, min_size=1, max_size=3))) if chat else None,
        max_tokens=draw(st.none() | st.integers(1, 2**32 - 1)),
        temperature=draw(st.floats(0, 100)),
        top_p=draw(st.floats(0, 1)),
        top_k=draw(st.none() | st.integers(0, 2**31 - 1)),
        min_p=draw(st.none() | st.floats(0, 1)),
        repeat_penalty=draw(st.none() | st.floats(0.01, 100)),
        seed=draw(st.none() | st.integers(0, 2**64 - 1)),
        stop=tuple(draw(st.lists(names, max_size=3))),
        deadline_ms=draw(st.integers(1, 86_400_000)),
        resume=draw(st.none() | texts),
        grammar=draw(st.none() | st.text(min_size=1, max_size=200)),
    )


messages = st.one_of(
    infer_requests(),
    st.builds(Accepted, queue_position=u32, grammar=st.none() | st.just(True),
              sampling=st.none() | st.just(True)),
    st.builds(
        Error,
        code=st.sampled_from(ErrorCode),
        message=texts,
        retry_after=st.none() | st.floats(0, 86_400),
    ),
    st.builds(Token, text=texts),
    st.builds(Done, finish_reason=st.sampled_from(FinishReason), prompt_tokens=u32,
              completion_tokens=u32),
    st.just(CapacityRequest()),
    st.builds(CapacityResponse, record=st.binary(min_size=1, max_size=64)),
    st.builds(ManifestRequest, model=names),
    st.builds(ManifestResponse, manifest=st.binary(min_size=1, max_size=64)),
    st.builds(ChunkRequest, sha256=st.text("0123456789abcdef", min_size=64, max_size=64),
              index=u32),
    st.builds(ChunkData, index=u32, offset=u32, data=st.binary(min_size=1, max_size=64),
              last=st.booleans()),
)


@settings(max_examples=300, deadline=None)
@given(messages)
def test_round_trip_any_message(msg: protocol.Message) -> None:
    frame = encode_frame(msg)
    assert decode_frame(frame) == (msg, len(frame))
    assert encode_frame(decode_frame(frame)[0]) == frame  # canonical: re-encoding is stable


def test_floats_are_always_float64() -> None:
    as_int = InferRequest(model="m", prompt="p", temperature=1, top_p=1, deadline_ms=5)
    as_float = InferRequest(model="m", prompt="p", temperature=1.0, top_p=1.0, deadline_ms=5)
    assert type(as_int.temperature) is float
    assert encode_frame(as_int) == encode_frame(as_float)
    assert encode_frame(as_int).count(b"\xcb\x3f\xf0\x00\x00\x00\x00\x00\x00") == 2


def test_sampling_knobs_are_optional_and_flagged() -> None:
    bare = InferRequest(model="m", prompt="p", deadline_ms=5)
    assert (bare.top_k, bare.min_p, bare.repeat_penalty) == (None, None, None)
    assert not bare.sets_sampling
    assert not {"top_k", "min_p", "repeat_penalty"} & set(bare.to_wire())
    for knob, value in (("top_k", 0), ("min_p", 0), ("repeat_penalty", 1)):
        req = InferRequest(model="m", prompt="p", deadline_ms=5, **{knob: value})
        assert req.sets_sampling, knob
        assert req.to_wire()[knob] == value and type(req.to_wire()[knob]) is type(
            float(value) if knob != "top_k" else value)  # ints become floats for floats
    assert (protocol.DEFAULT_TOP_K, protocol.DEFAULT_MIN_P,
            protocol.DEFAULT_REPEAT_PENALTY) == (40, 0.05, 1.0)  # the doc table's defaults


def test_lists_are_normalised_to_tuples() -> None:
    msg = InferRequest(model="m", messages=[{"role": "user", "content": "hi"}], stop=["x"],
                       deadline_ms=5)
    assert msg.messages == (ChatMessage("user", "hi"),) and msg.stop == ("x",)
    hash(msg)  # frozen and hashable


# --- the spec's test vectors ------------------------------------------------------------------


def doc_blocks(kind: str) -> list[tuple[str, dict[str, Any]]]:
    """The ```<kind> fenced blocks of docs/protocol.md, as (title, {key: value})."""
    blocks = re.findall(rf"^```{re.escape(kind)}\n(.*?)^```", DOC.read_text(), re.M | re.S)
    parsed = []
    for block in blocks:
        title, fields, key = "", {}, None
        for line in block.splitlines():
            if line.startswith("# ->"):
                fields["reason"] = line[4:].strip()
            elif line.startswith("# ") and not title:
                title = line[2:]
            elif line.startswith("#"):
                continue
            elif m := re.match(r"(\w+):\s*(.*)$", line):
                key, fields[m[1]] = m[1], m[2]
            elif key is not None:
                fields[key] += " " + line.strip()
        parsed.append((title, fields))
    return parsed


CANONICAL = doc_blocks("qvac-vector")
LENIENT = doc_blocks("qvac-vector-lenient")
INVALID = doc_blocks("qvac-invalid")


def test_doc_has_vectors_for_every_message_type() -> None:
    tags = {ast.literal_eval(f["message"])["t"] for _, f in CANONICAL}
    assert tags == set(MESSAGE_TYPES)
    assert len(LENIENT) >= 5 and len(INVALID) >= 20


@pytest.mark.parametrize("title,fields", CANONICAL, ids=[t for t, _ in CANONICAL])
def test_canonical_vector(title: str, fields: dict[str, str]) -> None:
    frame = bytes.fromhex(fields["frame"])
    wire = ast.literal_eval(fields["message"])
    msg = parse_message(wire)
    assert decode_frame(frame) == (msg, len(frame))
    assert encode_frame(msg) == frame
    assert msg.to_wire() == wire and list(msg.to_wire()) == list(wire)  # same key order


@pytest.mark.parametrize("title,fields", LENIENT, ids=[t for t, _ in LENIENT])
def test_lenient_vector(title: str, fields: dict[str, str]) -> None:
    frame = bytes.fromhex(fields["frame"])
    msg = parse_message(ast.literal_eval(fields["message"]))
    assert decode_frame(frame) == (msg, len(frame))
    assert encode_frame(msg) != frame


@pytest.mark.parametrize("title,fields", INVALID, ids=[t for t, _ in INVALID])
def test_invalid_vector(title: str, fields: dict[str, str]) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_frame(bytes.fromhex(fields["frame"]))
    assert info.value.code is ErrorCode(fields["error"])
    assert info.value.message == fields["reason"]


# --- schema: types, required fields, ranges, unknown fields --------------------------------

# Wire kind of every field; "?" marks optional (nil/absent allowed). Mirrors the doc tables.
SCHEMA: dict[str, dict[str, str]] = {
    "req": {"model": "str", "prompt": "str?", "messages": "array?", "max_tokens": "int?",
            "temperature": "float?", "top_p": "float?", "top_k": "int?", "min_p": "float?",
            "repeat_penalty": "float?", "seed": "int?", "stop": "array?",
            "deadline_ms": "int", "resume": "str?", "grammar": "str?"},
    "acc": {"queue_position": "int", "grammar": "bool?", "sampling": "bool?"},
    "err": {"code": "str", "message": "str", "retry_after": "float?"},
    "tok": {"text": "str"},
    "done": {"finish_reason": "str", "prompt_tokens": "int", "completion_tokens": "int"},
    "capq": {},
    "cap": {"record": "bin"},
    "manq": {"model": "str"},
    "man": {"manifest": "bin"},
    "chunkq": {"sha256": "str", "index": "int"},
    "chunk": {"index": "int", "offset": "int", "data": "bin", "last": "bool"},
    "pairq": {"offer": "int", "pake": "bin"},
    "pairs": {"pake": "bin", "roles": "array", "confirm": "bin"},
    "pairc": {"confirm": "bin"},
    "paird": {"roles": "array", "certificate": "str?"},
    "embq": {"model": "str", "inputs": "array", "truncate": "bool?", "deadline_ms": "int"},
    "embv": {"first": "int", "dims": "int", "data": "bin"},
    "embd": {"count": "int", "prompt_tokens": "int"},
    "lhello": {"rpc_major": "int", "rpc_minor": "int", "rpc_patch": "int", "memory": "int",
               "model_sha256": "str?", "probe": "bool?"},
    "lready": {"rpc_major": "int", "rpc_minor": "int", "rpc_patch": "int", "memory": "int",
               "holds_model": "bool?"},
}
SAMPLES = {"str": "x", "int": 1, "float": 0.5, "bin": b"x", "bool": True, "array": ["x"],
           "map": {"x": 1}}
ACCEPTS = {"float": {"float", "int"}}  # an int is a valid float on the wire


def test_schema_table_matches_the_classes() -> None:
    for tag, cls in MESSAGE_TYPES.items():
        assert list(SCHEMA[tag]) == [f.name for f in dataclasses.fields(cls)], tag


def example_wire(tag: str) -> dict[str, Any]:
    return next(m for m in EXAMPLES if m.tag == tag).to_wire()


WRONG_TYPES = [
    (tag, field, kind)
    for tag, fields in SCHEMA.items()
    for field, spec in fields.items()
    for kind in SAMPLES
    if kind not in ACCEPTS.get(spec.rstrip("?"), {spec.rstrip("?")})
]


@pytest.mark.parametrize("tag,field,kind", WRONG_TYPES)
def test_wrong_type_is_a_protocol_error(tag: str, field: str, kind: str) -> None:
    wire = example_wire(tag)
    if tag == "req" and field == "messages":
        del wire["prompt"]  # so messages is the one prompt source
    wire[field] = SAMPLES[kind]
    with pytest.raises(ProtocolError) as info:
        decode_frame(raw_frame(wire))
    assert info.value.code is ErrorCode.PROTOCOL, info.value


REQUIRED = [(t, f) for t, fs in SCHEMA.items() for f, spec in fs.items() if "?" not in spec]


@pytest.mark.parametrize("tag,field", REQUIRED)
@pytest.mark.parametrize("how", ["absent", "nil"])
def test_missing_required_field(tag: str, field: str, how: str) -> None:
    wire = example_wire(tag)
    if how == "absent":
        wire.pop(field, None)
    else:
        wire[field] = None
    with pytest.raises(ProtocolError, match=f"missing required field '{field}'") as info:
        decode_frame(raw_frame(wire))
    assert info.value.code is ErrorCode.PROTOCOL


REQ = {"t": "req", "model": "m", "prompt": "p", "deadline_ms": 1000}
CHUNK = {"t": "chunk", "index": 0, "offset": 0, "data": b"x", "last": False}
OUT_OF_RANGE = [
    ({**REQ, "max_tokens": -1}, ErrorCode.BAD_REQUEST),
    ({**REQ, "max_tokens": 0}, ErrorCode.BAD_REQUEST),
    ({**REQ, "max_tokens": 2**32}, ErrorCode.BAD_REQUEST),
    ({**REQ, "temperature": math.nan}, ErrorCode.BAD_REQUEST),
    ({**REQ, "temperature": math.inf}, ErrorCode.BAD_REQUEST),
    ({**REQ, "temperature": -0.1}, ErrorCode.BAD_REQUEST),
    ({**REQ, "top_p": 1.5}, ErrorCode.BAD_REQUEST),
    ({**REQ, "seed": -1}, ErrorCode.BAD_REQUEST),
    ({**REQ, "top_k": -1}, ErrorCode.BAD_REQUEST),
    ({**REQ, "top_k": 2**31}, ErrorCode.BAD_REQUEST),
    ({**REQ, "top_k": True}, ErrorCode.PROTOCOL),
    ({**REQ, "min_p": -0.01}, ErrorCode.BAD_REQUEST),
    ({**REQ, "min_p": 1.01}, ErrorCode.BAD_REQUEST),
    ({**REQ, "min_p": math.nan}, ErrorCode.BAD_REQUEST),
    ({**REQ, "repeat_penalty": -1.0}, ErrorCode.BAD_REQUEST),
    ({**REQ, "repeat_penalty": 0.0}, ErrorCode.BAD_REQUEST),  # would make logits infinite
    ({**REQ, "repeat_penalty": 100.5}, ErrorCode.BAD_REQUEST),
    ({**REQ, "repeat_penalty": math.inf}, ErrorCode.BAD_REQUEST),
    ({**REQ, "repeat_penalty": "1.1"}, ErrorCode.PROTOCOL),
    ({**REQ, "deadline_ms": 0}, ErrorCode.BAD_REQUEST),
    ({**REQ, "deadline_ms": 86_400_001}, ErrorCode.BAD_REQUEST),
    ({**REQ, "model": ""}, ErrorCode.BAD_REQUEST),
    ({**REQ, "model": "m" * 257}, ErrorCode.TOO_LARGE),
    ({**REQ, "stop": [""]}, ErrorCode.BAD_REQUEST),
    ({**REQ, "stop": ["s"] * 17}, ErrorCode.BAD_REQUEST),
    ({**REQ, "stop": [1]}, ErrorCode.PROTOCOL),
    ({**REQ, "messages": [{"role": "user", "content": "x"}]}, ErrorCode.BAD_REQUEST),
    ({**REQ, "prompt": None}, ErrorCode.BAD_REQUEST),
    ({**REQ, "prompt": None, "messages": []}, ErrorCode.BAD_REQUEST),
    ({**REQ, "prompt": None, "messages": [{"role": "", "content": "x"}]}, ErrorCode.BAD_REQUEST),
    ({**REQ, "prompt": None, "messages": [{"role": "user"}]}, ErrorCode.PROTOCOL),
    ({**REQ, "prompt": None, "messages": ["user: hi"]}, ErrorCode.PROTOCOL),
    ({**REQ, "prompt": None, "messages": [5]}, ErrorCode.PROTOCOL),
    ({**REQ, "prompt": None, "messages": [None]}, ErrorCode.PROTOCOL),
    ({**REQ, "prompt": None, "messages": [[{"role": "user", "content": "x"}]]}, ErrorCode.PROTOCOL),
    ({**REQ, "messages": [b"x"]}, ErrorCode.PROTOCOL),
    ({"t": "acc", "queue_position": -1}, ErrorCode.BAD_REQUEST),
    ({"t": "err", "code": "BUSY", "message": "x"}, ErrorCode.PROTOCOL),
    ({"t": "err", "code": "busy", "message": "x", "retry_after": -1.0}, ErrorCode.BAD_REQUEST),
    ({"t": "err", "code": "busy", "message": "x" * 4097}, ErrorCode.TOO_LARGE),
    ({"t": "done", "finish_reason": "eos", "prompt_tokens": 0, "completion_tokens": 0},
     ErrorCode.PROTOCOL),
    ({"t": "done", "finish_reason": "stop", "prompt_tokens": -3, "completion_tokens": 0},
     ErrorCode.BAD_REQUEST),
    ({"t": "cap", "record": b""}, ErrorCode.BAD_REQUEST),
    ({"t": "cap", "record": b"r" * (64 * 1024 + 1)}, ErrorCode.TOO_LARGE),
    ({"t": "manq", "model": ""}, ErrorCode.BAD_REQUEST),
    ({"t": "chunkq", "sha256": SHA[:-1], "index": 0}, ErrorCode.BAD_REQUEST),
    ({"t": "chunkq", "sha256": SHA[:-1] + "g", "index": 0}, ErrorCode.BAD_REQUEST),
    ({"t": "chunkq", "sha256": SHA, "index": -1}, ErrorCode.BAD_REQUEST),
    ({**CHUNK, "offset": -1}, ErrorCode.BAD_REQUEST),
    ({**CHUNK, "data": b""}, ErrorCode.BAD_REQUEST),
    ({"t": "tok", "text": "x", "t2": 1, 3: 4}, ErrorCode.PROTOCOL),
    ({"t": "pairq", "offer": -1, "pake": b"x"}, ErrorCode.BAD_REQUEST),
    ({"t": "pairq", "offer": 1, "pake": b""}, ErrorCode.BAD_REQUEST),
    ({"t": "pairq", "offer": 1, "pake": b"x" * 65}, ErrorCode.TOO_LARGE),
    ({"t": "pairc", "confirm": b"x" * 31}, ErrorCode.BAD_REQUEST),
    ({"t": "pairc", "confirm": b"x" * 33}, ErrorCode.TOO_LARGE),
    ({"t": "paird", "roles": []}, ErrorCode.BAD_REQUEST),
    ({"t": "paird", "roles": ["r"] * 9}, ErrorCode.BAD_REQUEST),
    ({"t": "paird", "roles": [""]}, ErrorCode.BAD_REQUEST),
    ({"t": "paird", "roles": [1]}, ErrorCode.PROTOCOL),
    ({"t": "paird", "roles": ["r"], "certificate": ""}, ErrorCode.BAD_REQUEST),
    ({"t": "paird", "roles": ["r"], "certificate": "c" * 4097}, ErrorCode.TOO_LARGE),
    ({"t": "req", "model": "m", "prompt": "p", "deadline_ms": 1, "grammar": ""},
     ErrorCode.BAD_REQUEST),
    ({"t": "req", "model": "m", "prompt": "p", "deadline_ms": 1,
      "grammar": "g" * (MAX_GRAMMAR_LEN + 1)}, ErrorCode.TOO_LARGE),
]


@pytest.mark.parametrize("wire,code", OUT_OF_RANGE, ids=[str(i) for i in range(len(OUT_OF_RANGE))])
def test_values_out_of_range(wire: dict[Any, Any], code: ErrorCode) -> None:
    assert error_code(raw_frame(wire)) is code


def test_chunk_data_over_piece_limit() -> None:
    with pytest.raises(ProtocolError) as info:
        ChunkData(index=0, offset=0, data=b"x" * (MAX_CHUNK_PIECE + 1), last=True)
    assert info.value.code is ErrorCode.TOO_LARGE


def test_invalid_messages_cannot_be_built_locally() -> None:
    with pytest.raises(ProtocolError, match="Token.text must be a str, got int"):
        Token(5)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="exactly one of prompt and messages"):
        InferRequest(model="m")


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_unknown_fields_are_ignored(msg: protocol.Message) -> None:
    wire = {**msg.to_wire(), "future": {"nested": [1, 2.5, None, b"x"]}, "zz": "y"}
    assert decode_frame(raw_frame(wire))[0] == msg


@pytest.mark.parametrize("wire", [{}, {"t": None}, {"t": 1}, {"t": b"tok"}, {"t": "TOK"},
                                  {"t": "x" * 1000}])
def test_missing_or_unknown_type_tag(wire: dict[str, Any]) -> None:
    assert error_code(raw_frame(wire)) is ErrorCode.PROTOCOL


# --- framing and limits ---------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16383, 16384, 2**21, 2**35 - 1])
def test_varint_is_minimal_leb128(value: int) -> None:
    encoded = encode_varint(value)
    assert len(encoded) == max(1, math.ceil(value.bit_length() / 7))
    assert sum((b & 0x7F) << (7 * i) for i, b in enumerate(encoded)) == value
    assert all(b & 0x80 for b in encoded[:-1]) and not encoded[-1] & 0x80


@pytest.mark.parametrize(
    "declared", [DEFAULT_LIMITS.max_frame_size + 1, 5_000_000, 2**32 - 1, 2**35 - 1]
)
def test_huge_declared_length_is_refused_from_the_prefix_alone(declared: int) -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_varint(declared))  # no body at all
    with pytest.raises(ProtocolError) as info:
        decoder.next_message()
    assert info.value.code is ErrorCode.TOO_LARGE
    assert "exceeds the 1048576-byte limit" in info.value.message


def test_too_large_is_refused_before_the_prefix_ends() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\xff\xff\xff")  # at least 2**21 + ..., still incomplete
    with pytest.raises(ProtocolError) as info:
        decoder.next_message()
    assert info.value.code is ErrorCode.TOO_LARGE


def test_frame_of_exactly_the_limit_is_waited_for() -> None:
    decoder = FrameDecoder(SHARD_LIMITS)
    decoder.feed(encode_varint(SHARD_LIMITS.max_frame_size))
    assert decoder.next_message() is None
    decoder = FrameDecoder(SHARD_LIMITS)
    decoder.feed(encode_varint(SHARD_LIMITS.max_frame_size + 1))
    with pytest.raises(ProtocolError):
        decoder.next_message()


def test_overlong_prefix_is_refused() -> None:
    # Six bytes: refused as too large once the value certainly exceeds the limit.
    assert error_code(b"\x80\x80\x80\x80\x80\x01") is ErrorCode.TOO_LARGE
    # Non-minimal encodings are refused even when the frame behind them is valid.
    frame = encode_frame(Token("ok"))
    assert decode_frame(frame)[0] == Token("ok") and frame[0] < 0x80
    with pytest.raises(ProtocolError, match="not minimally encoded"):
        decode_frame(bytes([frame[0] | 0x80, 0]) + frame[1:])


def nested(depth: int) -> bytes:
    """A frame whose unknown field 'x' holds `depth` nested arrays, crafted by hand."""
    body = b"\x83\xa1t\xa3tok\xa4text\xa2hi\xa1x" + b"\x91" * depth + b"\xc0"
    return encode_varint(len(body)) + body


def test_deep_nesting_is_refused() -> None:
    assert error_code(nested(10_000)) is ErrorCode.PROTOCOL
    assert decode_frame(nested(7))[0] == Token("hi")  # depth 8 with the top-level map
    assert error_code(nested(8)) is ErrorCode.PROTOCOL
    chat = encode_frame(InferRequest(model="m", messages=[ChatMessage("user", "x")],
                                     deadline_ms=5))
    assert decode_frame(chat, Limits(max_depth=3))[0].tag == "req"
    with pytest.raises(ProtocolError, match="nesting deeper than 2"):
        decode_frame(chat, Limits(max_depth=2))


def test_many_containers_are_refused_cheaply() -> None:
    frame = raw_frame({"t": "tok", "text": "hi", "x": [[[]] * 4000] * 200})
    assert len(frame) < DEFAULT_LIMITS.max_frame_size
    assert error_code(frame) is ErrorCode.TOO_LARGE
    many_turns = [{"role": "user", "content": "x"}] * 4096
    msg = decode_frame(raw_frame({**REQ, "prompt": None, "messages": many_turns}))[0]
    assert len(msg.messages) == 4096


@pytest.mark.parametrize(
    "limits,wire",
    [
        (Limits(max_str_len=10), {"t": "tok", "text": "x" * 11}),
        (Limits(max_bin_len=10), {"t": "cap", "record": b"x" * 11}),
        (Limits(max_array_len=3), {**REQ, "stop": ["a", "b", "c", "d"]}),
        (Limits(max_map_len=3), {"t": "tok", "text": "x", "a": 1, "b": 2}),
        (Limits(max_frame_size=20), {"t": "tok", "text": "x" * 20}),
    ],
)
def test_size_limits(limits: Limits, wire: dict[str, Any]) -> None:
    assert decode_frame(raw_frame(wire))  # fine under the default limits
    assert error_code(raw_frame(wire), limits) is ErrorCode.TOO_LARGE


def test_shard_frames_need_shard_limits() -> None:
    big = ChunkData(index=0, offset=0, data=b"x" * MAX_CHUNK_PIECE, last=True)
    with pytest.raises(ProtocolError) as info:
        encode_frame(big, DEFAULT_LIMITS)
    assert info.value.code is ErrorCode.TOO_LARGE
    frame = encode_frame(big, SHARD_LIMITS)
    assert error_code(frame) is ErrorCode.TOO_LARGE
    assert decode_frame(frame, limits_for(SHARD_PROTOCOL))[0] == big
    manifest = ManifestResponse(manifest=b"m" * MAX_MANIFEST_SIZE)
    assert decode_frame(encode_frame(manifest, SHARD_LIMITS), SHARD_LIMITS)[0] == manifest


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        Limits(max_frame_size=0)
    with pytest.raises(ValueError):
        Limits(max_frame_size=2**35)  # cannot be written in 5 varint bytes
    with pytest.raises(ValueError):
        limits_for("/qvac/unknown/1.0.0")
    assert limits_for(protocol.INFER_PROTOCOL) == DEFAULT_LIMITS


def test_several_frames_in_one_feed_and_consumed_count() -> None:
    data = b"".join(encode_frame(m) for m in EXAMPLES)
    assert decode_all(data) == EXAMPLES
    first = encode_frame(EXAMPLES[0])
    assert decode_frame(first + encode_frame(EXAMPLES[1])) == (EXAMPLES[0], len(first))


def test_unexpected_msgpack_exceptions_become_protocol_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken_unpackb(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("unhashable type: 'list'")

    monkeypatch.setattr(msgpack, "unpackb", broken_unpackb)
    assert error_code(encode_frame(Token("x"))) is ErrorCode.PROTOCOL


def test_decoder_stays_failed_after_an_error() -> None:
    decoder = FrameDecoder()
    decoder.feed(raw_frame([1]) + encode_frame(Token("ok")))
    with pytest.raises(ProtocolError) as first:
        decoder.next_message()
    with pytest.raises(ProtocolError) as again:
        decoder.next_message()
    assert again.value is first.value
    with pytest.raises(ProtocolError):
        decoder.feed(b"more")


def test_eof() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(Token("a")))
    decoder.feed_eof()
    assert decoder.next_message() == Token("a")
    assert decoder.next_message() is None  # clean end between frames
    decoder = FrameDecoder()
    decoder.feed(encode_frame(Token("a"))[:-1])
    assert decoder.next_message() is None
    decoder.feed_eof()
    with pytest.raises(ProtocolError, match="stream ended inside a frame"):
        decoder.next_message()
    with pytest.raises(ProtocolError, match="empty"):
        decode_frame(b"")


# --- fuzzing: only messages, None or ProtocolError may come out ------------------------------


def drain(decoder: FrameDecoder) -> list[protocol.Message]:
    """Pull every message; a ProtocolError ends the stream, anything else fails the test."""
    out = []
    try:
        while (msg := decoder.next_message()) is not None:
            out.append(msg)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode) and exc.message
    return out


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    drain_all = FrameDecoder()
    drain_all.feed(data)
    drain(drain_all)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages, min_size=1, max_size=4), st.data())
def test_fuzz_mutated_frames(msgs: list[protocol.Message], data: st.DataObject) -> None:
    frames = bytearray(b"".join(encode_frame(m) for m in msgs))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(frames) - 1))
        action = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "flip":
            frames[pos] = data.draw(st.integers(0, 255))
        elif action == "insert":
            frames[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
        elif len(frames) > 1:
            del frames[pos]
    decoder = FrameDecoder()
    decoder.feed(bytes(frames))
    drain(decoder)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=10) | st.binary(max_size=10),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@st.composite
def near_valid_maps(draw: st.DrawFn) -> dict[str, Any]:
    """A real type tag with its real field names, each holding a random value."""
    tag = draw(st.sampled_from(sorted(SCHEMA)))
    fields = draw(st.lists(st.sampled_from(list(SCHEMA[tag]) or ["x"]), unique=True))
    base = example_wire(tag)
    return {**base, **{f: draw(msgpack_values) for f in fields}}


@settings(max_examples=400, deadline=None)
@given(near_valid_maps())
def test_fuzz_field_values(wire: dict[str, Any]) -> None:
    try:
        msg, _ = decode_frame(raw_frame(wire))
    except ProtocolError:
        return
    # Whatever is accepted must survive a round trip unchanged.
    assert decode_frame(encode_frame(msg))[0] == msg


@settings(max_examples=100, deadline=None)
@given(st.lists(messages, min_size=1, max_size=5))
def test_byte_by_byte_equals_whole(msgs: list[protocol.Message]) -> None:
    data = b"".join(encode_frame(m) for m in msgs)
    decoder = FrameDecoder()
    got = []
    for i in range(len(data)):
        decoder.feed(data[i : i + 1])
        while (msg := decoder.next_message()) is not None:
            got.append(msg)
    assert got == decode_all(data) == msgs
    assert decoder.buffered == 0


@settings(max_examples=100, deadline=None)
@given(messages, st.data())
def test_truncated_frames_need_more(msg: protocol.Message, data: st.DataObject) -> None:
    frame = encode_frame(msg)
    cut = data.draw(st.integers(0, len(frame) - 1))
    decoder = FrameDecoder()
    decoder.feed(frame[:cut])
    assert decoder.next_message() is None  # never an error, never a partial message
    decoder.feed(frame[cut:])
    assert decoder.next_message() == msg


# --- state machines --------------------------------------------------------------------------

DONE = Done(finish_reason=FinishReason.STOP, prompt_tokens=3, completion_tokens=2)
BUSY = Error(code=ErrorCode.BUSY, message="busy", retry_after=1.0)


@pytest.mark.parametrize(
    "sequence",
    [[Accepted(0), Token("a"), Token("b"), DONE], [Accepted(2), DONE], [BUSY],
     [Accepted(0), Token("a"), BUSY]],
)
def test_infer_client_accepts_legal_streams(sequence: list[protocol.Message]) -> None:
    state = InferClientState()
    for msg in sequence:
        assert state.receive(msg) is msg
    state.receive_eof()
    assert state.finished and state.result is sequence[-1]
    assert state.text == "".join(m.text for m in sequence if isinstance(m, Token))


@pytest.mark.parametrize(
    "sequence",
    [[Token("a")], [DONE], [Accepted(0), Accepted(0)], [Accepted(0), DONE, Token("late")],
     [BUSY, Accepted(0)], [Accepted(0), DONE, DONE], [InferRequest(model="m", prompt="p")],
     [Accepted(0), ChunkData(index=0, offset=0, data=b"x")], [Accepted(0), BUSY, Token("a")]],
)
def test_infer_client_refuses_illegal_streams(sequence: list[protocol.Message]) -> None:
    state = InferClientState()
    with pytest.raises(ProtocolError) as info:
        for msg in sequence:
            state.receive(msg)
    assert info.value.code is ErrorCode.PROTOCOL
    assert state.state is StreamState.BROKEN


def test_infer_client_eof_mid_stream_is_unavailable() -> None:
    state = InferClientState()
    state.receive(Accepted(0))
    state.receive(Token("Par"))
    with pytest.raises(ProtocolError) as info:
        state.receive_eof()
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert state.text == "Par"  # what a failover sends as `resume`


def test_chunk_client_state() -> None:
    req = ChunkRequest(sha256=SHA, index=4)
    state = ChunkClientState(req)
    state.receive(ChunkData(index=4, offset=0, data=b"abc"))
    state.receive(ChunkData(index=4, offset=3, data=b"de", last=True))
    state.receive_eof()
    assert state.finished and state.received == 5
    for bad in (
        [ChunkData(index=5, offset=0, data=b"x")],
        [ChunkData(index=4, offset=1, data=b"x")],
        [ChunkData(index=4, offset=0, data=b"x"), ChunkData(index=4, offset=0, data=b"x")],
        [ChunkData(index=4, offset=0, data=b"x", last=True), ChunkData(index=4, offset=1,
                                                                      data=b"x")],
        [BUSY, ChunkData(index=4, offset=0, data=b"x")],
        [Token("x")],
    ):
        state = ChunkClientState(req)
        with pytest.raises(ProtocolError):
            for msg in bad:
                state.receive(msg)
    for before in ([], [ChunkData(index=4, offset=0, data=b"x")]):  # an error may end it
        state = ChunkClientState(req)
        for msg in [*before, BUSY]:
            state.receive(msg)
        assert state.finished and state.error is BUSY
    state = ChunkClientState(req)
    state.receive(ChunkData(index=4, offset=0, data=b"x"))
    with pytest.raises(ProtocolError) as info:
        state.receive_eof()
    assert info.value.code is ErrorCode.UNAVAILABLE


# --- the package itself ----------------------------------------------------------------------


def test_error_from_exception() -> None:
    exc = ProtocolError(ErrorCode.BUSY, "x" * 5000, retry_after=2)
    err = Error.from_exception(exc)
    assert err.code is ErrorCode.BUSY and err.retry_after == 2.0 and len(err.message) == 4096
    assert str(ProtocolError(ErrorCode.DEADLINE, "too late")) == "deadline: too late"


def test_public_api_is_exported() -> None:
    for name in protocol.__all__:
        assert getattr(protocol, name) is not None


def test_protocol_imports_none_of_the_other_packages() -> None:
    code = (
        "import sys, protocol; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'qvacd', 'peers', 'models', 'trio', 'socket', 'asyncio'}); "
        "print(','.join(bad))"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""


# --- SET_TENSOR_FROM_FILE: the one RPC command of qvacd's own on /qvac/layers ------------------

from protocol import (  # this section's own names
    FROM_FILE_MIN_DATA,
    FROM_FILE_PREFIX,
    RPC_CMD_SET_TENSOR,
    RPC_CMD_SET_TENSOR_FROM_FILE,
    RPC_TENSOR_SIZE,
    RpcCommandGuard,
    SetTensor,
    SetTensorScanner,
    TensorFromFile,
)

RPC_VECTORS = doc_blocks("qvac-rpc-vector")
RPC_INVALID = doc_blocks("qvac-rpc-invalid")
RPC_HELLO_CMD = bytes([14]) + (24).to_bytes(8, "little") + bytes(24)
SET_HEAD = RPC_TENSOR_SIZE + 1 + 8  # rpc_tensor | cache_flag | offset
MiB = 2**20


def _rpc(cmd: int, payload: bytes) -> bytes:
    return bytes([cmd]) + len(payload).to_bytes(8, "little") + payload


def _set_tensor(data: bytes, name: bytes = b"t") -> bytes:
    return _rpc(RPC_CMD_SET_TENSOR, name.ljust(RPC_TENSOR_SIZE, b"\0") + b"\0" + bytes(8) + data)


def test_rpc_vectors_are_in_the_doc() -> None:
    assert len(RPC_VECTORS) == 1 and len(RPC_INVALID) >= 3


@pytest.mark.parametrize("title,fields", RPC_VECTORS, ids=[t for t, _ in RPC_VECTORS])
def test_set_tensor_from_file_vector(title: str, fields: dict[str, str]) -> None:
    command = bytes.fromhex(fields["command"])
    assert command[0] == RPC_CMD_SET_TENSOR_FROM_FILE == 0xF0
    assert int.from_bytes(command[1:9], "little") == len(command) - 9 == 353
    t = TensorFromFile.from_payload(command[9:])
    assert t.file_offset == int(fields["file_offset"]) and t.size == int(fields["data_size"])
    assert t.sha256.hex() == fields["sha256"] and b"blk.9.attn_q.weight\0" in t.head
    assert t.encode() == command
    # what the worker's RPC server gets: the SET_TENSOR it stands for, then the data
    assert t.set_tensor_header() == (bytes([RPC_CMD_SET_TENSOR])
                                     + (SET_HEAD + t.size).to_bytes(8, "little")
                                     + command[9:9 + SET_HEAD])
    for cut in range(1, len(command)):  # however the bytes arrive
        g = RpcCommandGuard(max_command=200 * MiB, file_size=2**31)
        out = g.feed(RPC_HELLO_CMD + command[:cut]) + g.feed(command[cut:])
        assert out == [RPC_HELLO_CMD, t] and g.commands == 2


@pytest.mark.parametrize("title,fields", RPC_INVALID, ids=[t for t, _ in RPC_INVALID])
def test_set_tensor_from_file_invalid(title: str, fields: dict[str, str]) -> None:
    command = bytes.fromhex(RPC_VECTORS[0][1]["command"] if fields["command"] ==
                            "the vector above" else fields["command"])
    size = None if fields["file_size"] == "none" else int(fields["file_size"])
    g = RpcCommandGuard(max_command=200 * MiB, file_size=size)
    assert g.feed(RPC_HELLO_CMD) == [RPC_HELLO_CMD]
    with pytest.raises(ProtocolError) as info:
        g.feed(command)
    assert info.value.code is ErrorCode(fields["error"])
    assert info.value.message == fields["reason"]
    with pytest.raises(ProtocolError):  # and the session stays failed
        g.feed(b"")


def test_set_tensor_from_file_within_the_grant() -> None:
    t = TensorFromFile(bytes(SET_HEAD), 0, 1000, bytes(32))
    g = RpcCommandGuard(max_command=SET_HEAD + 999, file_size=10_000)
    with pytest.raises(ProtocolError) as info:
        g.feed(RPC_HELLO_CMD + t.encode())
    assert info.value.code is ErrorCode.TOO_LARGE and "granted" in info.value.message
    ok = RpcCommandGuard(max_command=SET_HEAD + 1000, file_size=1000)
    assert ok.feed(RPC_HELLO_CMD + t.encode()) == [RPC_HELLO_CMD, t]


@pytest.mark.parametrize("kwargs", [{"head": bytes(304)}, {"size": 0}, {"file_offset": -1},
                                    {"sha256": bytes(31)}])
def test_tensor_from_file_fields_are_checked(kwargs: dict[str, Any]) -> None:
    base = {"head": bytes(SET_HEAD), "file_offset": 0, "size": 1, "sha256": bytes(32)}
    with pytest.raises(ProtocolError):
        TensorFromFile(**{**base, **kwargs})


def test_scanner_passes_small_commands_at_once_and_unchanged() -> None:
    """Nothing but a candidate SET_TENSOR is held: a command is out in the same feed."""
    big = _set_tensor(b"w" * FROM_FILE_MIN_DATA)
    s = SetTensorScanner(lambda size, prefix: False, max_hold=16 * MiB)
    for cmd in (RPC_HELLO_CMD, _rpc(10, b"g" * 5000), _set_tensor(b"a" * 2560), big,
                _rpc(8, b"q" * 40)):
        assert s.feed(cmd) == [cmd]
    # a big SET_TENSOR that is not the file's streams once its first data bytes are seen
    start = 9 + SET_HEAD + FROM_FILE_PREFIX
    assert s.feed(big[:start]) == [big[:start]]
    assert s.feed(big[start:]) == [big[start:]]
    assert s.held == 0


def test_scanner_holds_a_candidate_whole_and_nothing_else() -> None:
    data = bytes(range(256)) * (FROM_FILE_MIN_DATA // 256 + 1)
    seen: list[tuple[int, bytes]] = []

    def candidate(size: int, prefix: bytes) -> bool:
        seen.append((size, prefix))
        return prefix == data[:FROM_FILE_PREFIX]

    s = SetTensorScanner(candidate, max_hold=16 * MiB)
    cmd = _set_tensor(data)
    assert s.feed(RPC_HELLO_CMD + cmd[:1000]) == [RPC_HELLO_CMD]
    assert s.feed(cmd[1000:-1]) == []
    tail = _rpc(10, b"g" * 30)
    out = s.feed(cmd[-1:] + tail)
    assert out == [SetTensor(cmd), tail] and seen == [(len(data), data[:FROM_FILE_PREFIX])]
    assert out[0].head == cmd[9:9 + SET_HEAD] and bytes(out[0].data) == data
    # over max_hold, or under the minimum: not held
    s = SetTensorScanner(candidate, max_hold=len(cmd) - 10)
    assert s.feed(cmd) == [cmd]
    s = SetTensorScanner(candidate, max_hold=16 * MiB, min_data=len(data) + 1)
    assert s.feed(cmd) == [cmd]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(min_value=1, max_value=4000), min_size=1, max_size=40),
       seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_head_and_worker_together_rebuild_the_exact_stream(cuts: list[int], seed: int) -> None:
    """Scanner (head) + index + guard (worker) + the worker's file: the RPC server gets
    byte for byte what llama.cpp sent, however the stream is cut, and the network
    carries a fraction of it."""
    import hashlib
    import random

    rnd = random.Random(seed)
    tensors = [rnd.randbytes(FROM_FILE_MIN_DATA + rnd.randrange(3000)) for _ in range(4)]
    model = bytearray(rnd.randbytes(100))
    where: dict[tuple[int, bytes], list[int]] = {}
    for t in tensors:
        where.setdefault((len(t), t[:FROM_FILE_PREFIX]), []).append(len(model))
        model += t
    activations = rnd.randbytes(FROM_FILE_MIN_DATA + 7)  # big, but in no file
    same_prefix = tensors[0][:FROM_FILE_PREFIX] + rnd.randbytes(len(tensors[0]) - 16)
    stream = b"".join([RPC_HELLO_CMD, _rpc(0, bytes(8)), *(_set_tensor(t) for t in tensors),
                       _set_tensor(b"n" * 2560), _set_tensor(activations),
                       _set_tensor(same_prefix), _rpc(10, rnd.randbytes(9000))])

    scanner = SetTensorScanner(lambda size, prefix: (size, prefix) in where, max_hold=MiB)
    guard = RpcCommandGuard(max_command=MiB, file_size=len(model))
    wire, server = 0, bytearray()
    pos = 0
    for cut in [*cuts, len(stream)]:
        piece, pos = stream[pos:pos + cut], pos + cut
        if not piece:
            break
        for item in scanner.feed(piece):
            if isinstance(item, SetTensor):
                data = bytes(item.data)
                found = [o for o in where.get((len(data), data[:FROM_FILE_PREFIX]), [])
                         if model[o:o + len(data)] == data]
                item = (TensorFromFile(item.head, found[0], len(data),
                                       hashlib.sha256(data).digest()).encode()
                        if found else item.command)
            wire += len(item)
            for out in guard.feed(item):
                if isinstance(out, TensorFromFile):
                    read = bytes(model[out.file_offset:out.file_offset + out.size])
                    assert hashlib.sha256(read).digest() == out.sha256
                    server += out.set_tensor_header() + read
                else:
                    server += out
    assert bytes(server) == stream
    assert scanner.held == 5 and wire < len(stream) - sum(map(len, tensors)) + 4 * 400
