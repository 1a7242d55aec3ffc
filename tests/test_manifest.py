"""Manifests (models/manifest.py): built from the real default model, cached, and parsed
strictly (bounded, typed, consistent, canonical); garbage of any shape is a ManifestError.
Also the puller's partial file (models/partial.py): what survives a restart."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.manifest import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MAX_CHUNKS,
    MAX_MANIFEST_BYTES,
    MAX_MODEL_SIZE,
    MIN_CHUNK_SIZE,
    Manifest,
    ManifestError,
    build_manifest,
    choose_chunk_size,
    load_or_build_manifest,
    manifest_path,
    parse_manifest,
)
from models.store import ModelStore

GGUF = {"architecture": "gemma3", "name": "Gemma 3 270m", "parameters": 268098176,
        "quantization": "Q4_K_M", "context_length": 32768, "n_layers": 18,
        "has_chat_template": True}


def small(size: int = 300_000, chunk: int = MIN_CHUNK_SIZE, **over) -> Manifest:
    n = math.ceil(size / chunk)
    hashes = b"".join(hashlib.sha256(bytes([i % 256])).digest() for i in range(n))
    fields = {"sha256": "ab" * 32, "size": size, "chunk_size": chunk, "chunk_hashes": hashes,
              "gguf": GGUF, **over}
    return Manifest(**fields)


def wire(**over) -> dict:
    """A valid manifest as a dict in canonical key order, with fields replaced."""
    m = small()
    d = {"v": 1, "sha256": m.sha256, "size": m.size, "chunk_size": m.chunk_size,
         "chunks": m.chunk_hashes, "gguf": dict(GGUF)}
    d.update(over)
    return {k: v for k, v in d.items() if v is not _DROP}


_DROP = object()


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# ---- the real model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(model_template: Path) -> ModelStore:
    return ModelStore(model_template)


def test_manifest_of_the_default_model(store: ModelStore):
    entry = store.resolve("gemma3-270m")
    m = load_or_build_manifest(store, entry)
    assert m.sha256 == entry.sha256 and m.size == entry.size
    assert m.chunk_size == DEFAULT_CHUNK_SIZE
    assert m.n_chunks == math.ceil(entry.size / DEFAULT_CHUNK_SIZE)
    assert m.chunk_length(m.n_chunks - 1) == entry.size - (m.n_chunks - 1) * m.chunk_size
    with entry.path.open("rb") as f:
        for i in (0, 7, m.n_chunks - 1):
            f.seek(m.chunk_offset(i))
            assert hashlib.sha256(f.read(m.chunk_length(i))).digest() == m.chunk_hash(i)
    assert m.gguf["architecture"] == "gemma3" and m.gguf["quantization"] == store.info(
        entry).quantization
    # Cached: the file parses back to the same manifest, and its id names its bytes.
    path = manifest_path(store, entry.sha256)
    data = path.read_bytes()
    assert parse_manifest(data, expected_sha256=entry.sha256) == m
    assert m.id == hashlib.sha256(data).hexdigest()
    summary = m.summary()
    assert summary["chunks"] == m.n_chunks and summary["id"] == m.id
    json.dumps(summary)  # printable by `qvacd models show`
    # A damaged cache is rebuilt, not trusted.
    path.write_bytes(data[:-5])
    assert load_or_build_manifest(store, entry) == m
    assert path.read_bytes() == data


def test_corrupt_blob_gets_no_manifest(store: ModelStore):
    entry = store.resolve("gemma3-270m")
    with pytest.raises(ManifestError, match="corrupt"):
        build_manifest(entry.path, expected_sha256="0" * 64)


def test_chunk_size_grows_for_huge_models():
    assert choose_chunk_size(253_000_000) == DEFAULT_CHUNK_SIZE
    big = 2 * MAX_CHUNKS * DEFAULT_CHUNK_SIZE
    assert choose_chunk_size(big) == 2 * DEFAULT_CHUNK_SIZE
    assert math.ceil(MAX_MODEL_SIZE / choose_chunk_size(MAX_MODEL_SIZE)) <= MAX_CHUNKS


# ---- strict parsing --------------------------------------------------------------------


def test_round_trip_and_layout():
    m = small()
    assert parse_manifest(m.encode()) == m
    assert parse_manifest(m.encode(), expected_sha256="ab" * 32).id == m.id
    assert m.n_chunks == 5 and m.chunk_length(4) == 300_000 - 4 * MIN_CHUNK_SIZE
    with pytest.raises(IndexError):
        m.chunk_hash(5)
    assert small(gguf={k: v for k, v in GGUF.items() if k != "name"}).encode() != m.encode()


@pytest.mark.parametrize("data, match", [
    (b"", "empty"),
    (b"\x00" * (MAX_MANIFEST_BYTES + 1), "over"),
    (b"\xc1", "not valid msgpack"),
    (pack([1, 2]), "must be a msgpack map"),
    (pack(wire(v=2)), "version 2 is not supported"),
    (pack(wire(v=True)), "version"),
    (pack(wire(extra=1)), "unknown key 'extra'"),
    (pack(wire(gguf=_DROP)), "lacks 'gguf'"),
    (pack(wire(sha256="AB" * 32)), "64 lowercase hex"),
    (pack(wire(sha256="ab" * 31)), "64 lowercase hex"),
    (pack(wire(size=0)), "size"),
    (pack(wire(size=-1)), "size"),
    (pack(wire(size=MAX_MODEL_SIZE + 1)), "size"),
    (pack(wire(size=300_000.0)), "size"),
    (pack(wire(size=400_000)), "need 7 hashes"),  # more bytes than hashes cover
    (pack(wire(size=100)), "need 1 hashes"),
    (pack(wire(chunk_size=MIN_CHUNK_SIZE - 1)), "chunk_size"),
    (pack(wire(chunk_size=MAX_CHUNK_SIZE + 1)), "chunk_size"),
    (pack(wire(chunk_size=True)), "chunk_size"),
    (pack(wire(chunks="ab" * 80)), "chunk hashes"),
    (pack(wire(chunks=small().chunk_hashes[:-1])), "chunk hashes"),
    (pack(wire(gguf=[1])), "gguf summary must be a map"),
    (pack(wire(gguf={**GGUF, "n_layers": True})), "gguf.n_layers must be int"),
    (pack(wire(gguf={**GGUF, "has_chat_template": 1})), "has_chat_template must be bool"),
    (pack(wire(gguf={**GGUF, "parameters": -5})), "out of range"),
    (pack(wire(gguf={**GGUF, "name": "x" * 257})), "over 256"),
    (pack(wire(gguf={**GGUF, "evil": 1})), "unknown key 'evil'"),
    (pack(wire(gguf={k: v for k, v in GGUF.items() if k != "architecture"})),
     "lacks 'architecture'"),
    (pack(wire(gguf={**GGUF, "name": msgpack.ExtType(5, b"x")})), "ext type 5"),
    (pack(wire(gguf={**GGUF, "name": msgpack.Timestamp(1, 0)})), "gguf.name must be str"),
    (pack(wire()) + b"\x00", "not valid msgpack"),  # trailing bytes
    (pack(wire())[:-3], "not valid msgpack"),  # truncated
])
def test_bad_manifests_are_refused(data: bytes, match: str):
    with pytest.raises(ManifestError, match=match):
        parse_manifest(data)


def test_only_canonical_bytes_are_accepted():
    good = pack(wire())
    assert parse_manifest(good).encode() == good
    reordered = dict(reversed(list(wire().items())))
    with pytest.raises(ManifestError, match="canonical"):
        parse_manifest(pack(reordered))
    # The same size, but as a uint64 instead of the shortest int.
    wide = good.replace(b"\xa4size\xce" + struct.pack(">I", 300_000),
                        b"\xa4size\xcf" + struct.pack(">Q", 300_000))
    assert wide != good
    with pytest.raises(ManifestError, match="canonical"):
        parse_manifest(wide)


def test_wrong_model_is_refused():
    with pytest.raises(ManifestError, match="not " + "cd" * 32):
        parse_manifest(small().encode(), expected_sha256="cd" * 32)


def test_too_many_chunks_is_refused_before_hashing_anything():
    size = (MAX_CHUNKS + 1) * MIN_CHUNK_SIZE
    with pytest.raises(ManifestError, match="over the 65536 limit"):
        parse_manifest(pack(wire(size=size, chunk_size=MIN_CHUNK_SIZE, chunks=b"")))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes_never_crash(data: bytes):
    try:
        m = parse_manifest(data)
    except ManifestError:
        return
    assert m.encode() == data


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_manifests_are_refused_or_canonical(data):
    good = bytearray(small().encode())
    op = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
    pos = data.draw(st.integers(0, len(good) - 1))
    if op == "flip":
        good[pos] ^= data.draw(st.integers(1, 255))
    elif op == "truncate":
        del good[pos:]
    elif op == "insert":
        good[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    else:
        del good[pos]
    try:
        m = parse_manifest(bytes(good))
    except ManifestError:
        return
    assert m.encode() == bytes(good)  # a flip inside a hash or a name is still valid


_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                  st.floats(allow_nan=True), st.text(max_size=20), st.binary(max_size=40))
_value = st.recursive(_leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=12), kids, max_size=4)),
    max_leaves=12)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["v", "sha256", "size", "chunk_size", "chunks", "gguf",
                                        "x"]), _value, max_size=7))
def test_structured_garbage_is_a_manifest_error(obj: dict):
    try:
        parse_manifest(pack(obj))
    except ManifestError:
        pass


# ---- the partial file --------------------------------------------------------------------


def _pieces(data: bytes, m: Manifest, i: int) -> list[bytes]:
    chunk = data[m.chunk_offset(i): m.chunk_offset(i) + m.chunk_length(i)]
    return [chunk[:1000], chunk[1000:]]


def test_partial_file_keeps_only_verified_chunks_across_restarts(tmp_path: Path):
    from models.partial import PartialFile

    data = bytes(range(256)) * 1200  # 307200 bytes, 5 chunks
    size = len(data)
    chunk = MIN_CHUNK_SIZE
    hashes = b"".join(hashlib.sha256(data[o:o + chunk]).digest() for o in range(0, size, chunk))
    m = Manifest(sha256=hashlib.sha256(data).hexdigest(), size=size, chunk_size=chunk,
                 chunk_hashes=hashes, gguf=GGUF)
    p = PartialFile(tmp_path, m)
    assert p.open() == set()
    assert p.path.stat().st_size == size
    assert not p.store_chunk(1, [b"x" * m.chunk_length(1)])  # wrong bytes: not written
    assert not p.store_chunk(1, _pieces(data, m, 1)[:1])  # short: not written
    for i in (0, 1, 3):
        assert p.store_chunk(i, _pieces(data, m, i))
    p.sync()
    p.close()

    # A restart finds 0, 1, 3; a chunk damaged on disk is dropped, not trusted.
    p = PartialFile(tmp_path, m)
    assert p.open() == {0, 1, 3}
    p.close()
    with p.path.open("r+b") as f:
        f.seek(m.chunk_offset(3) + 10)
        f.write(b"\xff\xfe")
    with p.state_path.open("ab") as f:
        f.write(b"\x02\x00")  # a torn append: ignored
    p = PartialFile(tmp_path, m)
    assert p.open() == {0, 1}
    for i in (2, 3, 4):
        assert p.store_chunk(i, _pieces(data, m, i))
    assert p.whole_sha256() == m.sha256
    p.close()
    assert p.path.read_bytes() == data

    # Another chunk size: nothing is claimed.
    other = Manifest(sha256=m.sha256, size=size, chunk_size=2 * chunk,
                     chunk_hashes=b"".join(hashlib.sha256(data[o:o + 2 * chunk]).digest()
                                           for o in range(0, size, 2 * chunk)), gguf=GGUF)
    p2 = PartialFile(tmp_path, other)
    assert p2.open() == set()
    p2.discard()
    assert not p2.path.exists() and not p2.state_path.exists()
