"""Bounds applied while decoding, so a hostile peer cannot make us buffer or build much."""

from __future__ import annotations

import dataclasses

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_CHUNK_PIECE",
    "MAX_FRAME_SIZE",
    "MAX_MANIFEST_SIZE",
    "MAX_RECORD_SIZE",
    "MAX_SHARD_FRAME_SIZE",
    "PAIR_LIMITS",
    "SHARD_LIMITS",
    "Limits",
]

KiB = 1024
MiB = 1024 * KiB

MAX_FRAME_SIZE = 1 * MiB  # control frames: requests, tokens, errors, capacity
MAX_SHARD_FRAME_SIZE = 4 * MiB  # shard streams carry manifests and chunk data
MAX_RECORD_SIZE = 64 * KiB  # a signed capacity record
MAX_CHUNK_PIECE = 1 * MiB  # data bytes in one `chunk` sub-frame
MAX_MANIFEST_SIZE = MAX_SHARD_FRAME_SIZE - 1 * KiB  # leaves room for the frame's own header


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """Decoder bounds. Every one is checked before the memory it guards is spent."""

    max_frame_size: int = MAX_FRAME_SIZE  # body bytes after the length prefix
    max_varint_bytes: int = 5  # length prefix bytes; 5 LEB128 bytes hold 35 bits
    max_depth: int = 8  # nesting of maps/arrays; the top-level map is depth 1
    max_str_len: int = MAX_FRAME_SIZE  # bytes of one UTF-8 string
    max_bin_len: int = MAX_FRAME_SIZE  # bytes of one bin value
    max_array_len: int = 4096  # elements of one array
    max_map_len: int = 64  # pairs of one map
    # maps+arrays in one frame: bounds the per-container work of checking a frame, so a
    # frame of a million empty arrays is refused cheaply (a chat of 4096 turns needs 4098)
    max_containers: int = 8192

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if type(value) is not int or value < 1:
                raise ValueError(f"Limits.{field.name} must be a positive int, got {value!r}")
        if self.max_frame_size >= 1 << (7 * self.max_varint_bytes):
            raise ValueError(
                f"max_frame_size {self.max_frame_size} does not fit in "
                f"{self.max_varint_bytes} varint bytes"
            )


DEFAULT_LIMITS = Limits()
# Shard streams: a sub-frame holds up to MAX_CHUNK_PIECE data bytes, a manifest up to
# MAX_MANIFEST_SIZE, so both the frame and bin bounds are larger than for control frames.
SHARD_LIMITS = Limits(max_frame_size=MAX_SHARD_FRAME_SIZE, max_bin_len=MAX_SHARD_FRAME_SIZE)
# Pairing streams come from peers we do not trust yet: a few small frames (SPAKE2
# messages, 32-byte MACs, a handful of roles, or an Error of up to 4096 characters).
PAIR_LIMITS = Limits(max_frame_size=8 * KiB, max_str_len=4 * KiB, max_bin_len=256,
                     max_array_len=8, max_map_len=16, max_containers=8)
