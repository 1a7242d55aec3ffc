"""Model manifests: what a peer needs to fetch a model file in verified chunks.

A model is identified by the sha256 of its file. Its manifest says how the file is cut
(size, chunk size) and what each chunk must hash to, plus a summary of the GGUF header,
so a fetcher can check every chunk on arrival, long before the whole-file hash is known.

Wire form (version 1): one msgpack map, keys in this order, nothing else:

    v           int    1
    sha256      str    64 lowercase hex digits: the whole file's sha256
    size        int    file size in bytes, 1..MAX_MODEL_SIZE
    chunk_size  int    MIN_CHUNK_SIZE..MAX_CHUNK_SIZE
    chunks      bin    32 * ceil(size / chunk_size) bytes: each chunk's sha256, in order
    gguf        map    architecture, name (optional), parameters, quantization,
                       context_length, n_layers, has_chat_template

Encoding is canonical (integers shortest, keys in the order above, optional keys omitted
when absent) and `parse_manifest` accepts only canonical bytes, so one manifest has one
encoding and its sha256 (`Manifest.id`) names it. Manifests are built once per model and
cached in `<store>/manifests/<sha256>.msgpack`; a missing or unreadable cache is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from .gguf import GGUFError, GGUFInfo, read_gguf
from .store import ModelEntry, ModelStore

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MANIFEST_VERSION",
    "MAX_CHUNKS",
    "MAX_CHUNK_SIZE",
    "MAX_MANIFEST_BYTES",
    "MAX_MODEL_SIZE",
    "MIN_CHUNK_SIZE",
    "Manifest",
    "ManifestError",
    "build_manifest",
    "choose_chunk_size",
    "gguf_summary",
    "load_or_build_manifest",
    "manifest_path",
    "parse_manifest",
    "save_manifest",
]

MANIFEST_VERSION = 1
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
# 4 MiB measured best on loopback (bench/pull_throughput.py --chunk-size): smaller chunks
# pay a stream open (~3-10 ms in py-libp2p) too often, larger ones balance badly across
# seeders and cost more memory per in-flight request.
DEFAULT_CHUNK_SIZE = 4 * MiB
MIN_CHUNK_SIZE = 64 * KiB
MAX_CHUNK_SIZE = 64 * MiB  # a fetcher holds a whole chunk in memory before verifying it
MAX_CHUNKS = 1 << 16  # 2 MiB of hashes: well inside one shard frame
MAX_MODEL_SIZE = 1 << 42  # 4 TiB: MAX_CHUNKS chunks of MAX_CHUNK_SIZE
# Same bound as the wire's ManifestResponse.manifest (protocol.MAX_MANIFEST_SIZE); models/
# does not import protocol/, so it is repeated here.
MAX_MANIFEST_BYTES = 4 * MiB - 1 * KiB
_HASH_LEN = 32
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_MAX_TEXT = 256
_U63 = (1 << 63) - 1
_READ_BLOCK = 4 * MiB

# gguf summary keys: (type, required, max length for str / max value for int)
_GGUF_FIELDS: dict[str, tuple[type, bool, int]] = {
    "architecture": (str, True, _MAX_TEXT),
    "name": (str, False, _MAX_TEXT),
    "parameters": (int, True, _U63),
    "quantization": (str, True, 64),
    "context_length": (int, True, _U63),
    "n_layers": (int, True, _U63),
    "has_chat_template": (bool, True, 0),
}
_TOP_KEYS = ("v", "sha256", "size", "chunk_size", "chunks", "gguf")


class ManifestError(ValueError):
    """A manifest is malformed, inconsistent, or does not match its model; one line."""


@dataclass(frozen=True)
class Manifest:
    sha256: str
    size: int
    chunk_size: int
    chunk_hashes: bytes  # 32 bytes per chunk, concatenated
    gguf: Mapping[str, Any] = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    def __post_init__(self) -> None:
        _check_layout(self.sha256, self.size, self.chunk_size, self.chunk_hashes)
        object.__setattr__(self, "gguf", _check_gguf(self.gguf))

    # -- layout ----------------------------------------------------------------------

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_hashes) // _HASH_LEN

    def chunk_hash(self, index: int) -> bytes:
        if not 0 <= index < self.n_chunks:
            raise IndexError(f"chunk {index} out of range 0..{self.n_chunks - 1}")
        return self.chunk_hashes[index * _HASH_LEN : (index + 1) * _HASH_LEN]

    def chunk_offset(self, index: int) -> int:
        return index * self.chunk_size

    def chunk_length(self, index: int) -> int:
        """Bytes in chunk `index`: chunk_size, except possibly the last one."""
        if not 0 <= index < self.n_chunks:
            raise IndexError(f"chunk {index} out of range 0..{self.n_chunks - 1}")
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def layout_key(self) -> tuple[str, int, int, bytes]:
        """What two manifests must share for their chunks to be interchangeable. The gguf
        summary is left out: it is informational, re-read from the finished file."""
        return (self.sha256, self.size, self.chunk_size, self.chunk_hashes)

    # -- encoding --------------------------------------------------------------------

    def encode(self) -> bytes:
        gguf = {k: self.gguf[k] for k in _GGUF_FIELDS if k in self.gguf}
        return msgpack.packb(
            {"v": self.version, "sha256": self.sha256, "size": self.size,
             "chunk_size": self.chunk_size, "chunks": self.chunk_hashes, "gguf": gguf},
            use_bin_type=True, strict_types=True,
        )

    @property
    def id(self) -> str:
        """sha256 (hex) of the canonical encoding: names this exact manifest."""
        return hashlib.sha256(self.encode()).hexdigest()

    def summary(self) -> dict[str, Any]:
        """For `qvacd models show`: everything but the chunk hashes themselves."""
        return {"id": self.id, "version": self.version, "sha256": self.sha256,
                "size": self.size, "chunk_size": self.chunk_size, "chunks": self.n_chunks,
                "gguf": dict(self.gguf)}


def _n_chunks(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def _check_layout(sha256: object, size: object, chunk_size: object, hashes: object) -> None:
    if type(sha256) is not str or not _SHA_RE.fullmatch(sha256):
        raise ManifestError("manifest sha256 must be 64 lowercase hex digits")
    if type(size) is not int or not 1 <= size <= MAX_MODEL_SIZE:
        raise ManifestError(f"manifest size must be an int in 1..{MAX_MODEL_SIZE}")
    if type(chunk_size) is not int or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ManifestError(
            f"manifest chunk_size must be an int in {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
    n = _n_chunks(size, chunk_size)
    if n > MAX_CHUNKS:
        raise ManifestError(f"manifest has {n} chunks, over the {MAX_CHUNKS} limit")
    if type(hashes) is not bytes or len(hashes) != n * _HASH_LEN:
        got = len(hashes) if isinstance(hashes, bytes) else type(hashes).__name__
        raise ManifestError(
            f"manifest lists {got} bytes of chunk hashes; {size} bytes in chunks of"
            f" {chunk_size} need {n} hashes ({n * _HASH_LEN} bytes)")


def _check_gguf(gguf: object) -> dict[str, Any]:
    if not isinstance(gguf, Mapping):
        raise ManifestError("manifest gguf summary must be a map")
    unknown = [k for k in gguf if k not in _GGUF_FIELDS]
    if unknown:
        raise ManifestError(f"manifest gguf summary has unknown key {str(unknown[0])[:40]!r}")
    out: dict[str, Any] = {}
    for key, (typ, required, bound) in _GGUF_FIELDS.items():
        if key not in gguf or gguf[key] is None:
            if required:
                raise ManifestError(f"manifest gguf summary lacks {key!r}")
            continue
        value = gguf[key]
        if type(value) is not typ:  # bool is not an int here, and no Timestamp ext
            raise ManifestError(f"manifest gguf.{key} must be {typ.__name__}")
        if typ is str and len(value) > bound:
            raise ManifestError(f"manifest gguf.{key} is over {bound} characters")
        if typ is int and not 0 <= value <= bound:
            raise ManifestError(f"manifest gguf.{key} is out of range")
        out[key] = value
    return out


def _reject_ext(code: int, data: bytes) -> Any:
    raise ManifestError(f"manifest holds msgpack ext type {code}")


def parse_manifest(data: bytes, expected_sha256: str | None = None) -> Manifest:
    """The manifest in `data`, checked: bounded, typed, consistent and canonical.

    With `expected_sha256`, the manifest must describe that file. Raises ManifestError
    (never anything else) on any problem.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ManifestError("manifest must be bytes")
    data = bytes(data)
    if not data:
        raise ManifestError("manifest is empty")
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest of {len(data)} bytes is over {MAX_MANIFEST_BYTES}")
    try:
        obj = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, ext_hook=_reject_ext,
            max_str_len=_MAX_TEXT * 4, max_bin_len=MAX_CHUNKS * _HASH_LEN,
            max_array_len=16, max_map_len=16,
        )
    except ManifestError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as e:  # ExtraData is a ValueError
        raise ManifestError(f"manifest is not valid msgpack ({type(e).__name__})") from None
    except Exception as e:  # noqa: BLE001 - msgpack's pure-Python fallback raises others
        raise ManifestError(f"manifest is not valid msgpack ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise ManifestError("manifest must be a msgpack map")
    if obj.get("v") != MANIFEST_VERSION or type(obj.get("v")) is not int:
        raise ManifestError(f"manifest version {str(obj.get('v'))[:20]} is not supported"
                            f" (this node reads version {MANIFEST_VERSION})")
    unknown = [k for k in obj if k not in _TOP_KEYS]
    if unknown:
        raise ManifestError(f"manifest has unknown key {str(unknown[0])[:40]!r}")
    missing = [k for k in _TOP_KEYS if k not in obj]
    if missing:
        raise ManifestError(f"manifest lacks {missing[0]!r}")
    m = Manifest(sha256=obj["sha256"], size=obj["size"], chunk_size=obj["chunk_size"],
                 chunk_hashes=obj["chunks"], gguf=obj["gguf"])
    if m.encode() != data:
        # why: one manifest, one encoding, so its hash (the manifest id) is unambiguous
        raise ManifestError("manifest is not canonically encoded")
    if expected_sha256 is not None and m.sha256 != expected_sha256:
        raise ManifestError(f"manifest is for sha256 {m.sha256}, not {expected_sha256}")
    return m


# -- building ------------------------------------------------------------------------


def choose_chunk_size(size: int) -> int:
    """DEFAULT_CHUNK_SIZE, doubled until the file fits in MAX_CHUNKS chunks."""
    chunk = DEFAULT_CHUNK_SIZE
    while _n_chunks(size, chunk) > MAX_CHUNKS and chunk < MAX_CHUNK_SIZE:
        chunk *= 2
    return chunk


def gguf_summary(info: GGUFInfo) -> dict[str, Any]:
    """The manifest's view of a GGUF header: fixed keys, bounded values."""
    out: dict[str, Any] = {
        "architecture": info.architecture[:_MAX_TEXT],
        "parameters": max(0, min(int(info.parameters), _U63)),
        "quantization": info.quantization[:64],
        "context_length": max(0, min(int(info.context_length), _U63)),
        "n_layers": max(0, min(int(info.n_layers), _U63)),
        "has_chat_template": bool(info.has_chat_template),
    }
    if info.name:
        out["name"] = info.name[:_MAX_TEXT]
    return out


def build_manifest(
    path: Path,
    *,
    expected_sha256: str | None = None,
    chunk_size: int | None = None,
    info: GGUFInfo | None = None,
    progress: Callable[[int], None] | None = None,
) -> Manifest:
    """Hash `path` once: every chunk and the whole file. Blocking: run it in a thread.

    With `expected_sha256`, a file that does not hash to it raises ManifestError (a
    corrupt blob must not be offered to peers).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if info is None:
            info = read_gguf(path)
    except (OSError, GGUFError) as e:
        raise ManifestError(f"cannot build a manifest for {path}: {e}") from e
    if size < 1 or size > MAX_MODEL_SIZE:
        raise ManifestError(f"cannot build a manifest for {path}: size {size} is out of range")
    chunk = chunk_size or choose_chunk_size(size)
    whole = hashlib.sha256()
    hashes = bytearray()
    done = 0
    try:
        with path.open("rb") as f:
            while done < size:
                block = f.read(min(chunk, size - done))
                if not block:
                    break
                whole.update(block)
                hashes += hashlib.sha256(block).digest()
                done += len(block)
                if progress is not None:
                    progress(len(block))
    except OSError as e:
        raise ManifestError(f"cannot read {path}: {e.strerror or e}") from e
    if done != size:
        raise ManifestError(f"{path} changed while its manifest was built")
    sha = whole.hexdigest()
    if expected_sha256 is not None and sha != expected_sha256:
        raise ManifestError(f"{path} hashes to {sha}, not {expected_sha256}: the stored"
                            " file is corrupt; remove and re-add the model")
    return Manifest(sha256=sha, size=size, chunk_size=chunk, chunk_hashes=bytes(hashes),
                    gguf=gguf_summary(info))


def manifest_path(store: ModelStore, sha256: str) -> Path:
    return store.root / "manifests" / f"{sha256}.msgpack"


def save_manifest(store: ModelStore, manifest: Manifest) -> Path:
    """Write the manifest cache file atomically (temp file, fsync, rename)."""
    path = manifest_path(store, manifest.sha256)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".manifest-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(manifest.encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def load_or_build_manifest(store: ModelStore, entry: ModelEntry) -> Manifest:
    """The cached manifest of `entry`, or a fresh one (built, verified, cached).

    Blocking (a build reads the whole file): the daemon calls it in a worker thread.
    """
    path = manifest_path(store, entry.sha256)
    try:
        m = parse_manifest(path.read_bytes(), expected_sha256=entry.sha256)
        if m.size == entry.size:
            return m
    except (OSError, ManifestError):
        pass  # missing or damaged cache: rebuild below
    try:
        info = store.info(entry)
    except GGUFError as e:
        raise ManifestError(f"cannot build a manifest for {entry.name}: {e}") from e
    m = build_manifest(entry.path, expected_sha256=entry.sha256, info=info)
    with contextlib.suppress(OSError):  # a read-only store still serves, just rebuilds
        save_manifest(store, m)
    return m
