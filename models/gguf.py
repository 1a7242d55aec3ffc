"""Read and validate the header of a GGUF file without loading it.

We parse the header ourselves (instead of asking llama.cpp) so that `models add` can
reject a corrupt or truncated file with a clear message before anything is imported,
and so the memory estimate is known without loading weights.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# Bounds: a header is a few MB at most (vocabularies are the big part). Anything beyond
# these is a corrupt file, not a model.
_MAX_KV = 1 << 16
_MAX_TENSORS = 1 << 20
_MAX_STRING = 1 << 24
_MAX_ARRAY = 1 << 24
_MAX_DIMS = 8

# GGML tensor types: type id -> (elements per block, bytes per block).
_GGML_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 36),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
}

# general.file_type -> quantization name (llama.cpp's LLAMA_FTYPE enum).
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4_MOE",
}

# GGUF value types.
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL = range(8)
_STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = 8, 9, 10, 11, 12
_SCALARS = {
    _UINT8: "<B", _INT8: "<b", _UINT16: "<H", _INT16: "<h", _UINT32: "<I", _INT32: "<i",
    _FLOAT32: "<f", _BOOL: "<?", _UINT64: "<Q", _INT64: "<q", _FLOAT64: "<d",
}


class GGUFError(ValueError):
    """The file is not a usable GGUF model; the message says why."""


@dataclass(frozen=True)
class GGUFInfo:
    """What we need to know about a model without loading it."""

    version: int
    architecture: str
    name: str | None
    parameters: int
    quantization: str
    context_length: int
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    key_length: int
    value_length: int
    has_chat_template: bool
    tensor_bytes: int
    file_size: int
    metadata: dict[str, Any] = field(repr=False, compare=False)
    # bytes of the repeating blocks' tensors (blk.N.*): what a split moves layer by layer;
    # the rest (embeddings, output) stays on the head
    block_tensor_bytes: int = 0
    # (name, absolute file offset, bytes) of every tensor of a known type: where a split's
    # worker that holds the same file reads a tensor instead of receiving it
    tensor_extents: tuple[tuple[str, int, int], ...] = field(default=(), repr=False,
                                                              compare=False)

    def kv_cache_bytes(self, n_ctx: int) -> int:
        """f16 K and V for every layer at n_ctx tokens (llama.cpp's default cache type)."""
        per_token = self.n_layers * self.n_head_kv * (self.key_length + self.value_length) * 2
        return per_token * n_ctx

    def memory_estimate(self, n_ctx: int) -> int:
        """Weights + KV cache + a compute-buffer allowance. Deliberately a little high."""
        compute = max(64 << 20, self.n_embd * n_ctx * 4 * 4)
        return self.tensor_bytes + self.kv_cache_bytes(n_ctx) + compute

    def summary(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "parameters": self.parameters,
            "quantization": self.quantization,
            "context_length": self.context_length,
            "n_layers": self.n_layers,
            "has_chat_template": self.has_chat_template,
        }


_U64 = struct.Struct("<Q")


class _Reader:
    def __init__(self, f: BinaryIO, path: Path) -> None:
        self.f = f
        self.path = path

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise GGUFError(f"{self.path}: truncated GGUF header (file ends early)")
        return data

    def scalar(self, vtype: int) -> Any:
        fmt = _SCALARS[vtype]
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def u32(self) -> int:
        return self.scalar(_UINT32)

    def u64(self) -> int:
        return self.scalar(_UINT64)

    def string(self) -> str:
        n = self.u64()
        if n > _MAX_STRING:
            raise GGUFError(f"{self.path}: corrupt GGUF header (string of {n} bytes)")
        try:
            return self.read(n).decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{self.path}: corrupt GGUF header (invalid UTF-8)") from e

    def skip_strings(self, n: int) -> None:
        """Skip `n` length-prefixed strings without decoding them.

        why: the vocabulary (262k strings in Gemma 3) took 0.4 s to decode one by one
        only to be dropped; walking the lengths in 1 MiB blocks takes a tenth of that.
        A string running past the end of the file is caught by the next read."""
        buf, pos = b"", 0
        for _ in range(n):
            if pos + 8 > len(buf):
                buf, pos = buf[pos:] + self.f.read(1 << 20), 0
                if len(buf) < 8:
                    raise GGUFError(f"{self.path}: truncated GGUF header (file ends early)")
            (length,) = _U64.unpack_from(buf, pos)
            if length > _MAX_STRING:
                raise GGUFError(f"{self.path}: corrupt GGUF header (string of {length} bytes)")
            pos += 8 + length
            if pos > len(buf):  # the string runs past the block: seek over the rest
                self.f.seek(pos - len(buf), 1)
                buf, pos = b"", 0
        if pos < len(buf):
            self.f.seek(pos - len(buf), 1)  # give back what was read ahead

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(vtype)
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY and depth == 0:
            etype = self.u32()
            n = self.u64()
            if n > _MAX_ARRAY:
                raise GGUFError(f"{self.path}: corrupt GGUF header (array of {n} items)")
            if etype in _SCALARS:
                size = struct.calcsize(_SCALARS[etype])
                raw = self.read(size * n)
                # Large numeric arrays (token scores, types) are not needed: keep their length.
                if n > 64:
                    return _ArrayLen(n)
                return list(struct.unpack("<" + _SCALARS[etype][1] * n, raw))
            if etype == _STRING and n > 64:
                self.skip_strings(n)
                return _ArrayLen(n)
            items = [self.value(etype, depth + 1) for _ in range(n)]
            return _ArrayLen(n) if n > 64 else items
        raise GGUFError(f"{self.path}: corrupt GGUF header (unknown value type {vtype})")


class _ArrayLen(int):
    """Stands in for a large metadata array we skipped; its value is the length."""


def read_gguf(path: str | Path) -> GGUFInfo:
    """Parse and sanity-check a GGUF file; raises GGUFError with a one-line reason."""
    path = Path(path)
    try:
        file_size = path.stat().st_size
        f = path.open("rb")
    except OSError as e:
        raise GGUFError(f"{path}: cannot read file ({e.strerror})") from e
    with f:
        r = _Reader(f, path)
        if f.read(4) != GGUF_MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (bad magic); convert it to GGUF first")
        version = r.u32()
        if version not in (2, 3):
            raise GGUFError(f"{path}: unsupported GGUF version {version} (need 2 or 3)")
        n_tensors = r.u64()
        n_kv = r.u64()
        if n_tensors > _MAX_TENSORS or n_kv > _MAX_KV:
            raise GGUFError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            meta[key] = r.value(r.u32())
        tensors: list[tuple[int, int, int]] = []  # (offset, elements, type)
        in_block: list[bool] = []  # blk.N.* tensors
        names: list[str] = []
        n_params = 0
        for _ in range(n_tensors):
            names.append(r.string())
            in_block.append(names[-1].startswith("blk."))
            n_dims = r.u32()
            if n_dims > _MAX_DIMS:
                raise GGUFError(f"{path}: corrupt GGUF tensor info ({n_dims} dimensions)")
            elements = 1
            for _ in range(n_dims):
                elements *= r.u64()
            ttype = r.u32()
            offset = r.u64()
            tensors.append((offset, elements, ttype))
            n_params += elements
        header_end = f.tell()

    alignment = int(meta.get("general.alignment", DEFAULT_ALIGNMENT) or DEFAULT_ALIGNMENT)
    data_start = -(-header_end // alignment) * alignment
    data_end = data_start
    block_bytes = 0
    extents = []
    for (offset, elements, ttype), is_block, name in zip(tensors, in_block, names, strict=True):
        block = _GGML_BLOCKS.get(ttype)
        if block is None:
            continue  # unknown quant type: cannot size it, llama.cpp will judge at load
        per, nbytes = block
        data_end = max(data_end, data_start + offset + -(-elements // per) * nbytes)
        extents.append((name, data_start + offset, -(-elements // per) * nbytes))
        if is_block:
            block_bytes += -(-elements // per) * nbytes
    if data_end > file_size:
        raise GGUFError(
            f"{path}: truncated GGUF (tensor data needs {data_end} bytes, file has {file_size});"
            " copy the file again"
        )
    if not tensors:
        raise GGUFError(f"{path}: GGUF file holds no tensors; it is not a model")

    arch = str(meta.get("general.architecture", "unknown"))

    def a(key: str, default: int = 0) -> int:
        v = meta.get(f"{arch}.{key}", default)
        if isinstance(v, list):  # per-layer arrays (e.g. head_count_kv): take the max
            v = max(v) if v else default
        return int(v)

    n_embd = a("embedding_length")
    n_head = a("attention.head_count", 1) or 1
    head_dim = n_embd // n_head if n_head else 0
    ftype = meta.get("general.file_type")
    quant = _FILE_TYPES.get(int(ftype), f"type{ftype}") if ftype is not None else "unknown"
    return GGUFInfo(
        version=version,
        architecture=arch,
        name=meta.get("general.name") if isinstance(meta.get("general.name"), str) else None,
        parameters=n_params,
        quantization=quant,
        context_length=a("context_length"),
        n_layers=a("block_count"),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=a("attention.head_count_kv", n_head) or n_head,
        key_length=a("attention.key_length", head_dim) or head_dim,
        value_length=a("attention.value_length", head_dim) or head_dim,
        has_chat_template="tokenizer.chat_template" in meta,
        tensor_bytes=data_end - data_start,
        file_size=file_size,
        metadata={k: v for k, v in meta.items() if not isinstance(v, _ArrayLen)},
        block_tensor_bytes=block_bytes,
        tensor_extents=tuple(extents),
    )
