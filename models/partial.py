"""A model file being downloaded to this device, and its record of verified chunks.

`<partial>/<sha>.part` holds chunks at their offsets; `<sha>.state` is a header, then the
u32 index of every chunk that was verified against the manifest and written. The state is
appended to as chunks land and fsynced (every second and at the end, see `sync`), so a
killed pull resumes. On resume, claimed chunks are re-hashed (one read of what is on
disk, ~0.3 s per 250 MB) rather than trusted, so a torn state file or a damaged partial
can never slip a bad byte through.

The whole-file sha256 is fed while the download runs (chunks mostly land in order, and a
few early arrivals are held in memory), so only the tail is left to hash at the end.

Blocking file I/O only: the puller (qvacd/pull/) calls it from worker threads. Lives in
`models/` beside the store and the manifests because it is about a file on this device,
not about peers.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import struct
import threading
from pathlib import Path

from .manifest import Manifest

_HOLD_CHUNKS = 8  # chunks kept in memory until the in-order whole-file hash reaches them
_STATE_MAGIC = b"QVACPRT1"
_STATE_HEADER = struct.Struct("<8sQII")  # magic, size, chunk_size, n_chunks


class PartialFile:
    """`<partial>/<sha>.part` (chunks at their offsets) and `<sha>.state` (a header, then
    the u32 index of every chunk verified and fsynced). Blocking methods: call them from
    worker threads."""

    def __init__(self, directory: Path, manifest: Manifest) -> None:
        self.dir = directory
        self.manifest = manifest
        self.path = directory / f"{manifest.sha256}.part"
        self.state_path = directory / f"{manifest.sha256}.state"
        self._fd: int | None = None
        self._state_fd: int | None = None
        self._lock = threading.Lock()
        self._whole = hashlib.sha256()
        self._whole_lock = threading.Lock()
        self._hashed = 0  # chunks fed into _whole, in order
        self._held: dict[int, list[bytes]] = {}  # stored, not yet hashed, still in memory

    def _header(self) -> bytes:
        m = self.manifest
        # why no chunk hashes: claims are re-hashed against whichever manifest is in use,
        # so chunks verified under a manifest that turned out false are kept if they match
        return _STATE_HEADER.pack(_STATE_MAGIC, m.size, m.chunk_size, m.n_chunks)

    def claimed(self) -> list[int]:
        """The chunks the state file claims (not yet re-hashed): what a resume may keep."""
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            return []
        header = self._header()
        if not raw.startswith(header):
            return []  # another chunk size, or a torn header: nothing is claimed
        body = raw[len(header):]
        body = body[: len(body) - len(body) % 4]  # a torn last append is ignored
        n = self.manifest.n_chunks
        return sorted({i for (i,) in struct.iter_unpack("<I", body) if i < n})

    def open(self) -> set[int]:
        """Open (creating) both files, reserve the disk space, and return the chunks that
        are already on disk and still hash right."""
        m = self.manifest
        self.dir.mkdir(parents=True, exist_ok=True)
        claimed = self.claimed()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size > m.size:
                os.ftruncate(fd, m.size)
            try:
                # why: fail now, with a clear error, rather than at 90 % when the disk fills
                os.posix_fallocate(fd, 0, m.size)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                os.ftruncate(fd, max(os.fstat(fd).st_size, m.size))  # no fallocate here
            verified = set()
            for i in claimed:
                data = os.pread(fd, m.chunk_length(i), m.chunk_offset(i))
                if hashlib.sha256(data).digest() == m.chunk_hash(i):
                    verified.add(i)
            tmp = self.state_path.with_suffix(".state-new")
            with open(tmp, "wb") as f:
                f.write(self._header() + b"".join(struct.pack("<I", i) for i in sorted(verified)))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_path)
            self._state_fd = os.open(self.state_path, os.O_WRONLY | os.O_APPEND)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return verified

    def store_chunk(self, index: int, pieces: list[bytes]) -> bool:
        """Verify chunk `index` against the manifest; if good, write it and record it in
        the state file. False (nothing written) when the hash does not match.

        No fsync here: a killed process loses nothing that reached the page cache, and
        `sync()` (every second, and at the end) bounds what a power cut can lose; claims
        are re-hashed on resume, so a claim whose bytes were lost is simply re-fetched.
        """
        m = self.manifest
        h = hashlib.sha256()
        n = 0
        for p in pieces:
            h.update(p)
            n += len(p)
        if n != m.chunk_length(index) or h.digest() != m.chunk_hash(index):
            return False
        assert self._fd is not None and self._state_fd is not None
        offset = m.chunk_offset(index)
        for p in pieces:
            written = os.pwrite(self._fd, p, offset)
            if written != len(p):
                raise OSError(errno.EIO, "short write to the partial file")
            offset += written
        with self._lock:
            os.write(self._state_fd, struct.pack("<I", index))
        with self._whole_lock:
            # Chunks mostly land in order: feed the whole-file hash from memory while
            # they are hot, keeping a few early arrivals, instead of re-reading the file.
            if index >= self._hashed and len(self._held) < _HOLD_CHUNKS:
                self._held[index] = pieces
            while (held := self._held.pop(self._hashed, None)) is not None:
                for p in held:
                    self._whole.update(p)
                self._hashed += 1
        return True

    def sync(self) -> None:
        """Data first, then the state that claims it."""
        if self._fd is not None and self._state_fd is not None:
            os.fdatasync(self._fd)
            os.fsync(self._state_fd)

    def hash_upto(self, end: int) -> None:
        """Feed chunks up to `end` (all on disk) into the whole-file sha256, from memory
        where held, else from the file. Lets the whole-file hash run during the download."""
        assert self._fd is not None
        m = self.manifest
        with self._whole_lock:
            while self._hashed < end:
                held = self._held.pop(self._hashed, None)
                if held is None:
                    i = self._hashed
                    held = [os.pread(self._fd, m.chunk_length(i), m.chunk_offset(i))]
                for p in held:
                    self._whole.update(p)
                self._hashed += 1

    @property
    def hashed(self) -> int:
        return self._hashed

    def whole_sha256(self) -> str:
        """Finish the whole-file sha256 (everything must be on disk now)."""
        self.hash_upto(self.manifest.n_chunks)
        return self._whole.hexdigest()

    def close(self) -> None:
        for fd in (self._fd, self._state_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._state_fd = None

    def discard(self) -> None:
        self.close()
        for p in (self.path, self.state_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


__all__ = ["PartialFile"]
