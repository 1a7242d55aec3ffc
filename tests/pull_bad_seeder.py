"""A dishonest seeder for tests: the real ShardService with one behaviour broken.

Modes:
    corrupt   every chunk has one byte flipped (fails its sha256 check)
    short     every chunk ends early: the last sub-frame comes 1 KiB short
    stall     sends the first sub-frame of a chunk, then nothing, keeping the stream open
    manifest  serves a manifest whose hash for chunk 0 is false (same file sha256), so it
              disagrees with honest seeders; its chunks are honest
    onechunk  honest, but answers one request per stream and closes it, as seeders did
              before a stream could carry several chunk requests
"""

from __future__ import annotations

import hashlib
from typing import Any

import trio

from models.manifest import Manifest
from models.store import ModelEntry
from protocol import SHARD_LIMITS, ChunkData
from qvacd.p2p_io import write_frame
from qvacd.services.shard import ShardService


class BadShardService(ShardService):
    def __init__(self, *args: Any, mode: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if mode not in ("corrupt", "short", "stall", "manifest", "onechunk"):
            raise ValueError(f"unknown bad-seeder mode {mode!r}")
        self.mode = mode

    def read_chunk(self, entry: ModelEntry, manifest: Manifest, index: int) -> bytes:
        data = super().read_chunk(entry, manifest, index)
        if self.mode == "corrupt":
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
        elif self.mode == "short":
            data = data[: max(1, len(data) - 1024)]
        return data

    async def manifest_for(self, entry: ModelEntry) -> tuple[Manifest, bytes]:
        m, data = await super().manifest_for(entry)
        if self.mode != "manifest":
            return m, data
        lie = hashlib.sha256(b"not chunk 0").digest()
        false = Manifest(sha256=m.sha256, size=m.size, chunk_size=m.chunk_size,
                         chunk_hashes=lie + m.chunk_hashes[32:], gguf=m.gguf)
        return false, false.encode()

    async def _handle_one(self, *args: Any) -> tuple[bool, bool]:
        again, reset = await super()._handle_one(*args)
        return (again and self.mode != "onechunk"), reset

    async def _send_chunk(self, stream: Any, index: int, data: bytes) -> None:
        if self.mode != "stall":
            await super()._send_chunk(stream, index, data)
            return
        await write_frame(stream, ChunkData(index=index, offset=0, data=data[: 64 * 1024],
                                            last=False), SHARD_LIMITS)
        await trio.sleep(3600)  # the service's own chunk timeout ends this eventually
