"""Model distribution over `/qvac/shard/1.0.0`: the seeder side and the puller.

Seeder (`ShardService`): serves a model's manifest (by name or sha256) and its chunks
by index, in sub-frames of at most 1 MiB read straight from the store blob. Only peers
with the `seeder` role (or anyone, on a public donor) are served; concurrent uploads and
the upload rate are capped. Blob reads and manifest builds run in worker threads.

Puller (`Puller.pull`): finds providers (peer-table records and DHT provider records),
keeps only peers this node trusts (any role: chunk bytes are verified by hash, so trust
on our side only decides whom we talk to; whether *they* serve *us* is their `seeder`
role), fetches and cross-checks manifests, then fetches chunks from every provider at
once, several streams each. Each chunk's sha256 is checked before it is written at its
offset in `models/partial/<sha>.part`; its index is then appended to
`<sha>.state` and fsynced, so a killed pull resumes. On resume, claimed chunks are
re-hashed (one read of what is on disk, ~0.3 s per 250 MB) rather than trusted, so a torn
state file or a damaged partial can never slip a bad byte through. A provider that sends
a bad chunk, a wrong manifest, a short chunk, garbage, or stalls is dropped for the pull
and named; its chunk goes to another provider. Only a file whose whole sha256 matches is
committed to the store, and the node then announces itself as a provider.

Through a relay: a provider whose only path is a relayed connection is limited by the
relay's per-circuit byte and duration limits (see `_RelayPlan` for the rule); a pull that
no provider path can carry fails before it fetches anything, and says why and what to do.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import logging
import os
import re
import struct
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge

from models.gguf import GGUFError, read_gguf
from models.manifest import (
    Manifest,
    ManifestError,
    load_or_build_manifest,
    manifest_path,
    parse_manifest,
    save_manifest,
)
from models.store import ModelEntry, ModelStore, StoreError, normalize_name
from protocol import (
    MAX_CHUNK_PIECE,
    SHARD_LIMITS,
    SHARD_PROTOCOL,
    ChunkClientState,
    ChunkData,
    ChunkRequest,
    Error,
    ErrorCode,
    FrameDecoder,
    ManifestRequest,
    ManifestResponse,
    Message,
    ProtocolError,
    encode_frame,
)

log = logging.getLogger("qvacd.shards")
plog = logging.getLogger("qvacd.pull")

# Bytes asked of the stream per read: larger means fewer awaits and yamux window updates
# per byte, but FrameDecoder compacts its buffer per frame, which costs more past ~256 KiB.
READ_SIZE = 256 << 10
_SHA_RE = re.compile(r"^(?:sha256[:-])?([0-9a-f]{64})$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._\-]{0,63}$")


# ---- metrics ---------------------------------------------------------------------------


class ShardMetrics:
    """Prometheus metrics of both sides, registered once per registry."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.upload_bytes = Counter("qvacd_shard_upload_bytes", "Model bytes sent to peers",
                                    registry=r)
        self.uploads_active = Gauge("qvacd_shard_uploads_active", "Chunk uploads in progress",
                                    registry=r)
        self.shard_requests = Counter("qvacd_shard_requests", "Shard requests served",
                                      ["kind", "outcome"], registry=r)
        self.pull_bytes = Counter("qvacd_pull_bytes", "Verified model bytes fetched from peers",
                                  registry=r)
        self.pull_resumed_bytes = Counter(
            "qvacd_pull_resumed_bytes", "Bytes found already verified in a partial download",
            registry=r)
        self.pull_chunks = Counter("qvacd_pull_chunks", "Chunk fetches by outcome", ["outcome"],
                                   registry=r)
        self.pull_dropped = Counter("qvacd_pull_peers_dropped", "Providers dropped from a pull",
                                    ["reason"], registry=r)
        self.pulls = Counter("qvacd_pulls", "Finished pulls by outcome", ["outcome"], registry=r)
        self.pull_active = Gauge("qvacd_pull_active", "Pulls in progress", registry=r)
        self.pull_total = Gauge("qvacd_pull_total_bytes", "Size of the model being pulled",
                                ["model"], registry=r)
        self.pull_completed = Gauge("qvacd_pull_completed_bytes",
                                    "Verified bytes of the model being pulled", ["model"],
                                    registry=r)
        self.pull_rate = Gauge("qvacd_pull_rate_bytes_per_second", "Current pull rate",
                               ["model"], registry=r)
        self.pull_sources = Gauge("qvacd_pull_sources", "Providers in use by a pull", ["model"],
                                  registry=r)


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, ShardMetrics] = \
    weakref.WeakKeyDictionary()


def shard_metrics(registry: CollectorRegistry | None) -> ShardMetrics:
    """The ShardMetrics of `registry` (a private one when None); created on first use."""
    if registry is None:
        registry = CollectorRegistry()
    m = _METRICS.get(registry)
    if m is None:
        m = _METRICS[registry] = ShardMetrics(registry)
    return m


# ---- stream helpers --------------------------------------------------------------------


class _StreamEnded(Exception):
    pass


async def _read_some(stream: Any) -> bytes:
    """Up to READ_SIZE bytes; b"" at a clean end. _StreamEnded on reset or other failure."""
    try:
        return await stream.read(READ_SIZE)
    except Exception as e:  # noqa: BLE001 - libp2p raises many types for a broken stream
        if type(e).__name__ == "StreamEOF" or isinstance(e, EOFError):
            return b""
        raise _StreamEnded(f"{type(e).__name__}: {e}"[:200]) from None


async def _close(stream: Any, *, reset: bool = False) -> None:
    with trio.move_on_after(1) as scope:
        scope.shield = True  # why: runs in finally blocks of cancelled tasks too
        with contextlib.suppress(Exception):
            await (stream.reset() if reset else stream.close())


async def _write(stream: Any, msg: Message) -> None:
    await stream.write(encode_frame(msg, SHARD_LIMITS))


class _RateLimiter:
    """Bytes per second across all uploads; 0 means unlimited. Whole frames go out at
    their scheduled time, so the average rate holds at frame granularity."""

    def __init__(self, rate: float) -> None:
        self.rate = float(rate)
        self._next = 0.0

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = trio.current_time()
        start = max(now, self._next)
        self._next = start + n / self.rate
        if start > now:
            await trio.sleep(start - now)


# ---- seeder ------------------------------------------------------------------------------


class ShardService:
    """Serves `/qvac/shard/1.0.0`. Register `handle` as the protocol's stream handler."""

    def __init__(
        self,
        store: ModelStore,
        *,
        is_authorized: Callable[[str], bool],
        max_uploads: int = 4,
        upload_rate: float = 0.0,  # bytes/s over all uploads; 0 = unlimited
        request_timeout_s: float = 5.0,
        chunk_timeout_s: float = 120.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.store = store
        self.is_authorized = is_authorized
        # (kind, stream, peer) -> banned?: misbehaviour goes to the network's guard
        self.on_offence: Callable[[str, Any, str], Any] = lambda kind, stream, peer: False
        self.max_uploads = max(1, int(max_uploads))
        self.rate = _RateLimiter(upload_rate)
        self.request_timeout_s = request_timeout_s
        self.chunk_timeout_s = chunk_timeout_s
        self.metrics = shard_metrics(registry)
        self.active = 0
        self._manifests: dict[str, tuple[Manifest, bytes]] = {}
        self._build_locks: dict[str, trio.Lock] = collections.defaultdict(trio.Lock)

    @classmethod
    def for_node(cls, node: Any) -> ShardService:
        cfg = node.config

        def authorized(peer: str) -> bool:
            return bool(cfg.public_donor) or node.trust.is_trusted(peer, "seeder")

        return cls(node.store, is_authorized=authorized,
                   max_uploads=getattr(cfg, "shard_max_uploads", 4),
                   upload_rate=getattr(cfg, "shard_upload_rate", 0),
                   registry=node.metrics.registry)

    def _count(self, kind: str, outcome: str) -> None:
        self.metrics.shard_requests.labels(kind, outcome).inc()

    async def handle(self, stream: Any, peer_id: str) -> None:
        kind, outcome = "unknown", "error"
        try:
            msg = await self._read_request(stream)
            if msg is None:
                outcome = "timeout"
                await _write(stream, Error(ErrorCode.DEADLINE, "no request within"
                                           f" {self.request_timeout_s:.0f} s of opening the stream"))
                return
            kind = "manifest" if isinstance(msg, ManifestRequest) else "chunk"
            if not isinstance(msg, ManifestRequest | ChunkRequest):
                kind, outcome = "unknown", "protocol"
                await _write(stream, Error(ErrorCode.PROTOCOL, f"{SHARD_PROTOCOL} expects a"
                                           f" manifest or chunk request, got {msg.tag!r}"))
                return
            if not self.is_authorized(peer_id):
                outcome = "unauthorized"
                await _write(stream, Error(ErrorCode.UNAUTHORIZED, f"this node does not trust"
                                           f" peer {peer_id} with the seeder role; on this node"
                                           f" run `qvacd trust add {peer_id} --roles seeder`"))
                return
            if isinstance(msg, ManifestRequest):
                outcome = await self._serve_manifest(stream, msg)
            else:
                outcome = await self._serve_chunk(stream, msg, peer_id)
        except ProtocolError as e:
            outcome = "protocol"
            log.info("shard request from %s was malformed: %s", peer_id, e)
            with contextlib.suppress(Exception), trio.move_on_after(1):
                await _write(stream, Error.from_exception(e))
        except _StreamEnded:
            outcome = "gone"
        except Exception as e:
            if type(e).__module__.startswith("libp2p") or isinstance(e, OSError):
                outcome = "gone"  # the peer reset or went away mid-chunk
                log.debug("shard stream to %s ended: %s", peer_id, e)
            else:
                log.exception("shard handler failed for %s", peer_id)
                with contextlib.suppress(Exception), trio.move_on_after(1):
                    await _write(stream, Error(ErrorCode.INTERNAL, "seeder error; try another"
                                               " peer"))
        finally:
            self._count(kind, outcome)
            if outcome in ("protocol", "unauthorized"):
                self.on_offence(outcome, stream, peer_id)
            # A reset tells the fetcher the answer was cut short; everything else, even a
            # refusal, was a whole answer and ends cleanly.
            await _close(stream, reset=outcome in ("gone", "timeout", "error"))

    async def _read_request(self, stream: Any) -> Message | None:
        decoder = FrameDecoder(SHARD_LIMITS)
        with trio.move_on_after(self.request_timeout_s):
            while True:
                msg = decoder.next_message()
                if msg is not None:
                    return msg
                data = await _read_some(stream)
                if not data:
                    decoder.feed_eof()
                    msg = decoder.next_message()
                    if msg is None:
                        raise ProtocolError(ErrorCode.PROTOCOL, "stream ended before a request")
                    return msg
                decoder.feed(data)
        return None

    def _resolve(self, name_or_sha: str) -> ModelEntry | None:
        entry = self.store.resolve(name_or_sha)
        if entry is None or not self.store.check_blob(entry):
            return None
        return entry

    async def manifest_for(self, entry: ModelEntry) -> tuple[Manifest, bytes]:
        """Cached in memory and on disk; built once in a worker thread otherwise."""
        got = self._manifests.get(entry.sha256)
        if got is not None:
            return got
        async with self._build_locks[entry.sha256]:
            got = self._manifests.get(entry.sha256)
            if got is None:
                m = await trio.to_thread.run_sync(load_or_build_manifest, self.store, entry)
                got = self._manifests[entry.sha256] = (m, m.encode())
        return got

    async def _serve_manifest(self, stream: Any, msg: ManifestRequest) -> str:
        entry = self._resolve(msg.model)
        if entry is None:
            await _write(stream, Error(ErrorCode.NOT_FOUND, f"no model {msg.model!r} here"))
            return "not_found"
        try:
            _, data = await self.manifest_for(entry)
        except ManifestError as e:
            log.error("cannot serve the manifest of %s: %s", entry.name, e)
            await _write(stream, Error(ErrorCode.INTERNAL, f"the seeder's copy of {entry.name}"
                                       " is unusable; try another peer"))
            return "internal"
        await _write(stream, ManifestResponse(manifest=data))
        return "ok"

    async def _serve_chunk(self, stream: Any, msg: ChunkRequest, peer: str) -> str:
        entry = self._resolve(msg.sha256)
        if entry is None or entry.sha256 != msg.sha256:
            await _write(stream, Error(ErrorCode.NOT_FOUND, f"no model {msg.sha256} here"))
            return "not_found"
        try:
            manifest, _ = await self.manifest_for(entry)
        except ManifestError:
            await _write(stream, Error(ErrorCode.INTERNAL, "the seeder's copy is unusable"))
            return "internal"
        if msg.index >= manifest.n_chunks:
            await _write(stream, Error(ErrorCode.BAD_REQUEST, f"chunk {msg.index} is out of"
                                       f" range; the model has {manifest.n_chunks} chunks"))
            return "bad_request"
        if self.active >= self.max_uploads:
            await _write(stream, Error(ErrorCode.BUSY, f"{self.active} uploads in progress"
                                       f" (limit {self.max_uploads})", retry_after=0.5))
            return "busy"
        self.active += 1
        self.metrics.uploads_active.inc()
        try:
            try:
                data = await trio.to_thread.run_sync(self.read_chunk, entry, manifest,
                                                     msg.index)
            except OSError as e:
                log.error("cannot read chunk %d of %s: %s", msg.index, entry.name, e)
                await _write(stream, Error(ErrorCode.INTERNAL, "the seeder cannot read its"
                                           " copy of the model; try another peer"))
                return "internal"
            with trio.move_on_after(self.chunk_timeout_s) as scope:
                await self._send_chunk(stream, msg.index, data)
            if scope.cancelled_caught:
                log.info("chunk %d to %s took over %.0f s; gave up", msg.index, peer,
                         self.chunk_timeout_s)
                return "timeout"
            return "ok"
        finally:
            self.active -= 1
            self.metrics.uploads_active.dec()

    def read_chunk(self, entry: ModelEntry, manifest: Manifest, index: int) -> bytes:
        """The bytes of chunk `index` (blocking; runs in a worker thread). Tests subclass
        the service and override this to play a dishonest seeder."""
        length = manifest.chunk_length(index)
        fd = os.open(entry.path, os.O_RDONLY)
        try:
            data = os.pread(fd, length, manifest.chunk_offset(index))
        finally:
            os.close(fd)
        if len(data) != length:
            raise OSError(errno.EIO, f"{entry.path} is shorter than its manifest says")
        return data

    async def _send_chunk(self, stream: Any, index: int, data: bytes) -> None:
        """Sub-frames of at most MAX_CHUNK_PIECE bytes, paced by the upload rate."""
        view = memoryview(data)
        total = len(data)
        offset = 0
        while True:
            piece = bytes(view[offset : offset + MAX_CHUNK_PIECE])
            last = offset + len(piece) >= total
            await self.rate.take(len(piece))
            await _write(stream, ChunkData(index=index, offset=offset, data=piece, last=last))
            self.metrics.upload_bytes.inc(len(piece))
            offset += len(piece)
            if last:
                return


# ---- the partial file ------------------------------------------------------------------

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

    def _claimed(self) -> list[int]:
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
        claimed = self._claimed()
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


# ---- the puller --------------------------------------------------------------------------


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


@contextlib.contextmanager
def _one_error() -> Any:
    """Nurseries wrap errors in groups; re-raise the one that says what went wrong."""
    try:
        yield
    except BaseExceptionGroup as eg:
        leaves = [e for e in _leaves(eg) if not isinstance(e, trio.Cancelled)]
        for kind in (PullError, _ManifestFalse):
            for e in leaves:
                if isinstance(e, kind):
                    raise e from None
        if len(leaves) == 1 and isinstance(leaves[0], Exception):
            raise leaves[0] from None
        raise


class PullError(Exception):
    """A pull failed. `status` is the HTTP status the API answers with; the message is
    one line that says what happened and what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _PeerFault(Exception):
    """This provider misbehaved or failed: drop it for this pull."""

    def __init__(self, reason: str, kind: str, code: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind  # metrics label: bad_chunk, short, stall, protocol, refused, ...
        self.code = code  # the peer's Error.code when it refused


_TRANSIENT = frozenset({"gone", "unreachable"})


class _AllFailed(PullError):
    """Every provider of one manifest failed; another manifest's providers may do."""


class _ManifestFalse(Exception):
    """The chunks of a manifest do not make up its model: whoever served it lied."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Relayed paths. The relay charges every byte it forwards on one circuit (one relayed
# connection, both directions, Noise and yamux framing included) to one budget, and cuts
# the whole connection when the budget or the circuit's duration runs out; it does not
# count circuits over time. So a pull *could* finish a large model by letting the relay
# cut it and reconnecting again and again. We do not: the limit is what the relay's owner
# agreed to carry per connection, and each cut kills every stream on that connection
# (a delegated answer included) and the chunks in flight. The rule:
#   - what a pull fetches from one provider over a relayed connection must fit in what
#     that circuit has left when the pull plans (bytes left minus _RELAY_RESERVE for the
#     other traffic on the connection, divided by 1 + _RELAY_OVERHEAD for framing), and a
#     chunk is only started with time for it at the slowest rate we accept (min_rate)
#     before the relay ends the circuit;
#   - providers with a direct path, or a relay that sets no limit, are unlimited; several
#     relayed providers each carry their own share over their own circuit;
#   - a pull none of whose providers can carry it, alone or together, fails before it
#     fetches a chunk, naming the model's size, the relay's limit and what to do;
#   - a provider whose share is spent stops taking chunks (the others finish); a
#     connection that went direct (hole punching) is unlimited from then on; one that
#     broke and came back over a new circuit (never a cut of ours) is planned afresh.
_RELAY_OVERHEAD = 0.02  # framing is ~0.1 % of a bulk transfer; the rest is headroom
_RELAY_RESERVE = 1 << 20  # bytes left to capacity pushes, pings and delegation


@dataclass
class _RelayPlan:
    """What one provider may carry for a pull over its relayed circuit."""

    circuit: Any  # peers.relay.Circuit
    allowance: int  # model bytes, whole chunks are charged against it
    charged: int = 0  # bytes of chunks fetched or in flight over it

    @staticmethod
    def carries(circuit: Any) -> int | None:
        """Model bytes `circuit` may still carry; None when the relay sets no byte limit."""
        left = circuit.bytes_left()
        if left is None:
            return None
        return max(0, int((left - _RELAY_RESERVE) / (1 + _RELAY_OVERHEAD)))


class _Busy(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__("busy")
        self.retry_after = retry_after


@dataclass
class PullOptions:
    streams_per_provider: int = 4  # concurrent chunk streams to one provider
    max_providers: int = 8  # providers used at once
    max_inflight: int = 16  # chunks in memory at once, all providers together
    open_timeout_s: float = 10.0  # dial + protocol negotiation
    manifest_timeout_s: float = 15.0
    stall_timeout_s: float = 15.0  # no bytes for this long: the provider is stalled
    min_rate: float = 64 * 1024  # slower than this over a whole chunk: stalled too
    dht_timeout_s: float = 5.0  # DHT provider lookup when no record lists the model
    max_busy_s: float = 120.0  # a provider busy for longer than this is dropped
    transient_retries: int = 3  # broken streams / failed dials in a row before a drop
    progress_interval_s: float = 0.25


@dataclass
class _Download:
    key: str
    target: str
    from_peer: str | None
    subscribers: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)
    waiters: int = 0
    done: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    result: ModelEntry | None = None
    error: PullError | None = None
    # progress
    status: str = "pulling manifest"
    sha256: str | None = None
    name: str | None = None
    total: int = 0
    completed: int = 0  # verified bytes on disk (resumed + fetched)
    resumed: int = 0  # found on disk at the start of this pull
    fetched: int = 0  # verified bytes received from peers in this pull
    sources: set[str] = field(default_factory=set)  # providers in use right now
    used: set[str] = field(default_factory=set)  # providers that delivered a chunk
    dropped: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    _samples: collections.deque = field(default_factory=lambda: collections.deque(maxlen=64))

    def rate(self) -> float:
        """Bytes/s over the last ~3 s of verified chunks."""
        now = time.monotonic()
        while self._samples and now - self._samples[0][0] > 3.0:
            self._samples.popleft()
        if not self._samples:
            return 0.0
        span = max(now - self._samples[0][0], 0.25)
        return sum(n for _, n in self._samples) / span

    def event(self) -> dict[str, Any]:
        ev: dict[str, Any] = {"status": self.status}
        if self.status in ("downloading", "verifying sha256 digest", "success"):
            sources = self.sources if self.status == "downloading" else self.used
            ev.update(digest=f"sha256:{self.sha256}", total=self.total,
                      completed=self.completed, sources=len(sources),
                      rate=round(self.rate()), resumed=self.resumed, fetched=self.fetched)
            if self.dropped:
                ev["dropped"] = dict(self.dropped)
        if self.status == "success" and self.result is not None:
            ev["model"] = self.result.name
        return ev

    def emit(self) -> None:
        ev = self.event()
        for fn in list(self.subscribers):
            try:
                fn(ev)
            except Exception:  # noqa: BLE001 - a broken subscriber must not stop the download
                plog.exception("pull progress subscriber failed")


def _human(n: int) -> str:
    """Bytes for people, in decimal units: 268.1 MB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _parse_sha(text: str) -> str | None:
    m = _SHA_RE.match(text.strip().lower())
    return m.group(1) if m else None


class Puller:
    """Pulls models from trusted peers. Start `run` in a nursery first (the node does),
    then call `pull` from anywhere; pulls of the same model share one download."""

    def __init__(
        self,
        store: ModelStore,
        network: Any,
        trust: Any,
        *,
        registry: CollectorRegistry | None = None,
        options: PullOptions | None = None,
    ) -> None:
        self.store = store
        self.network = network
        self.trust = trust
        self.options = options or PullOptions()
        self.metrics = shard_metrics(registry)
        self.partial_dir = store.root / "partial"
        self._active: dict[str, _Download] = {}
        self._by_sha: dict[str, _Download] = {}
        self._nursery: trio.Nursery | None = None

    @classmethod
    def for_node(cls, node: Any, options: PullOptions | None = None) -> Puller:
        return cls(node.store, node.network, node.trust, registry=node.metrics.registry,
                   options=options)

    async def run(self, *, task_status: trio.TaskStatus[Puller] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Owns the download tasks; returns (cancelling them) when cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                task_status.started(self)
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def active(self) -> list[dict[str, Any]]:
        return [{"target": d.target, **d.event()} for d in self._active.values()]

    # -- public entry point ------------------------------------------------------------

    async def pull(
        self,
        name_or_sha: str,
        *,
        from_peer: str | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> ModelEntry:
        """Fetch a model (name, alias or sha256) from trusted peers into the store.

        `progress(event)` gets Ollama-style dicts (status, digest, total, completed, plus
        sources, rate, resumed, fetched, dropped). Cancelling the last waiter of a
        download cancels it; its partial file stays for the next pull.
        """
        target = name_or_sha.strip()
        if not target or len(target) > 256:
            raise PullError(400, "give a model name or a sha256 to pull")
        if from_peer is not None:
            from_peer = self._check_peer_id(from_peer)
        if self._nursery is None:
            raise PullError(503, "the puller is not running; the daemon is starting or"
                            " stopping, try again")
        sha = _parse_sha(target)
        key = f"{sha or normalize_name(target)}@{from_peer or '*'}"
        dl = self._active.get(key)
        if dl is None:
            dl = _Download(key=key, target=sha or target, from_peer=from_peer)
            self._active[key] = dl
            self._nursery.start_soon(self._run_download, dl)
        dl.waiters += 1
        if progress is not None:
            dl.subscribers.append(progress)
            progress(dl.event())
        try:
            await dl.done.wait()  # bounded: every step of the download has a timeout
        finally:
            dl.waiters -= 1
            if progress is not None:
                with contextlib.suppress(ValueError):
                    dl.subscribers.remove(progress)
            if dl.waiters == 0 and not dl.done.is_set():
                plog.info("pull of %s cancelled: nobody is waiting for it", dl.target)
                dl.scope.cancel()
        if dl.error is not None:
            raise dl.error
        assert dl.result is not None
        return dl.result

    @staticmethod
    def _check_peer_id(peer: str) -> str:
        try:
            from libp2p.peer.id import ID

            return ID.from_base58(peer.strip()).to_base58()
        except Exception:  # noqa: BLE001 - ID.from_base58 raises several types
            raise PullError(400, f"{peer[:80]!r} is not a peer id (they look like"
                            " 12D3KooW...)") from None

    def _trusted(self, peer: str) -> bool:
        try:
            return bool(self.trust.roles_of(peer))
        except Exception:  # noqa: BLE001 - a broken trust file means: not trusted
            return False

    # -- one download ------------------------------------------------------------------

    async def _run_download(self, dl: _Download) -> None:
        self.metrics.pull_active.inc()
        outcome = "error"
        try:
            with dl.scope:
                dl.result = await self._download(dl)
                outcome = "success"
            if dl.result is None and dl.error is None:
                dl.error = PullError(499, f"the pull of {dl.target} was cancelled; pull again"
                                     " to resume")
                outcome = "cancelled"
        except PullError as e:
            dl.error = e
        except Exception as e:  # noqa: BLE001 - reported with its traceback, then as a 500
            plog.exception("pull of %s failed", dl.target)
            dl.error = PullError(500, f"pull of {dl.target} failed: {type(e).__name__}: {e}")
        finally:
            self.metrics.pull_active.dec()
            self.metrics.pulls.labels(outcome).inc()
            label = dl.name or dl.target
            for g in (self.metrics.pull_total, self.metrics.pull_completed,
                      self.metrics.pull_rate, self.metrics.pull_sources):
                with contextlib.suppress(KeyError):
                    g.remove(label)
            self._active.pop(dl.key, None)
            if dl.error is not None:
                plog.warning("pull of %s failed: %s", dl.target, dl.error.message)
            dl.done.set()

    def _local(self, target: str) -> ModelEntry | None:
        entry = self.store.resolve(target)
        if entry is not None and self.store.check_blob(entry):
            return entry
        return None

    async def _download(self, dl: _Download) -> ModelEntry:
        dl.emit()
        local = self._local(dl.target)
        if local is not None:
            return self._succeed(dl, local, None)
        groups, name, aliases = await self._resolve(dl)
        dl.name = name
        sha = groups[0][0].sha256
        while (other := self._by_sha.get(sha)) is not None:
            # The same file asked for by another name: one download, not two writers
            # of one partial file.
            entry = await self._follow(dl, other)
            if entry is not None:
                return self._succeed(dl, entry, None)
        self._by_sha[sha] = dl
        try:
            return await self._download_groups(dl, groups, name, aliases)
        finally:
            del self._by_sha[sha]

    async def _follow(self, dl: _Download, other: _Download) -> ModelEntry | None:
        """Wait for `other`, relaying its progress; None if it was cancelled."""
        def relay(ev: dict[str, Any]) -> None:
            for fn in list(dl.subscribers):
                fn(ev)

        other.subscribers.append(relay)
        other.waiters += 1
        try:
            await other.done.wait()  # bounded: the other download has its own timeouts
        finally:
            other.waiters -= 1
            other.subscribers.remove(relay)
            if other.waiters == 0 and not other.done.is_set():
                other.scope.cancel()
        if other.result is not None:
            # Report what the shared download did: sources, bytes, dropped peers.
            dl.used, dl.fetched, dl.resumed = set(other.used), other.fetched, other.resumed
            dl.dropped.update(other.dropped)
            return other.result
        assert other.error is not None
        if other.error.status == 499:
            return None
        raise PullError(other.error.status, other.error.message)

    async def _download_groups(self, dl: _Download, groups: list[tuple[Manifest, list[str]]],
                               name: str, aliases: tuple[str, ...]) -> ModelEntry:
        last: PullError | None = None
        for i, (manifest, peers) in enumerate(groups):
            local = self._local(manifest.sha256)
            if local is not None:  # held under another name already
                return self._succeed(dl, local, None)
            try:
                entry = await self._download_layout(dl, manifest, peers, name, aliases)
            except _ManifestFalse as e:
                for peer in peers:
                    self._drop(dl, peer, e.reason, "bad_manifest")
                last = PullError(502, f"the manifest from {', '.join(peers)} is false: {e.reason}")
                continue
            except _AllFailed as e:
                last = e
                continue
            for _, others in groups[i + 1:] + groups[:i]:
                for peer in others:
                    self._drop(dl, peer, "its manifest disagrees with the verified file",
                               "bad_manifest")
            return self._succeed(dl, entry, manifest)
        assert last is not None
        raise last

    async def _download_layout(self, dl: _Download, manifest: Manifest, providers: list[str],
                               name: str, aliases: tuple[str, ...]) -> ModelEntry:
        """One attempt with one manifest and the providers that agree on it."""
        dl.sha256, dl.total = manifest.sha256, manifest.size
        partial = PartialFile(self.partial_dir, manifest)
        # Before the partial file is made: a pull no path can carry fetches nothing.
        claimed = await trio.to_thread.run_sync(partial._claimed)
        needed = manifest.size - sum(manifest.chunk_length(i) for i in claimed)
        plans = self._plan_relays(dl, manifest, providers, name, needed)
        try:
            verified = await trio.to_thread.run_sync(partial.open)
        except OSError as e:
            partial.close()
            raise self._disk_error(e, manifest) from None
        try:
            resumed = sum(manifest.chunk_length(i) for i in verified)
            dl.completed = resumed
            dl.resumed = max(dl.resumed, resumed)
            if resumed:
                self.metrics.pull_resumed_bytes.inc(resumed)
                plog.info("pull of %s resumes with %d of %d chunks already verified", name,
                          len(verified), manifest.n_chunks)
            dl.status = "downloading"
            dl.emit()
            done = set(verified)
            missing = [i for i in range(manifest.n_chunks) if i not in done]
            try:
                with _one_error():
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._report, dl)
                        nursery.start_soon(self._hash_in_order, partial, done)
                        nursery.start_soon(self._sync_every_second, partial)
                        await self._fetch_chunks(dl, manifest, partial, providers, missing,
                                                 done, plans)
                        nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True), contextlib.suppress(OSError):
                    await trio.to_thread.run_sync(partial.sync)  # keep what was verified
            dl.emit()  # the last "downloading" line shows completed == total
            dl.status = "verifying sha256 digest"
            dl.emit()
            sha, info = await self._verify(partial)
            if sha != manifest.sha256:
                # Every chunk matched the manifest, so the manifest itself lied.
                partial.discard()
                raise _ManifestFalse(f"its chunks make a file that hashes to {sha}, not"
                                     f" {manifest.sha256}")
            if isinstance(info, GGUFError):
                partial.discard()
                raise _ManifestFalse(f"the file it describes is not a usable model: {info}")
            partial.close()
            try:
                entry = self.store.commit(partial.path, name, manifest.sha256, info,
                                          aliases=aliases)
            except (OSError, StoreError) as e:
                raise PullError(500, f"cannot add the pulled model to the store: {e}") from e
        finally:
            partial.close()
        with contextlib.suppress(FileNotFoundError):
            partial.path.unlink()  # only left if the blob already existed
        with contextlib.suppress(FileNotFoundError):
            partial.state_path.unlink()
        with contextlib.suppress(OSError):
            save_manifest(self.store, manifest)  # serve it onward without a rebuild
        return entry

    async def _hash_in_order(self, partial: PartialFile, done: set[int]) -> None:
        """Feed the whole-file hash with chunks as soon as they are contiguous, so only
        the tail is left to hash when the last chunk lands."""
        n = partial.manifest.n_chunks
        while partial.hashed < n:
            end = partial.hashed
            while end < n and end in done:
                end += 1
            if end > partial.hashed:
                await trio.to_thread.run_sync(partial.hash_upto, end)
            else:
                await trio.sleep(0.05)

    async def _sync_every_second(self, partial: PartialFile) -> None:
        while True:
            await trio.sleep(1.0)
            await trio.to_thread.run_sync(partial.sync)

    async def _verify(self, partial: PartialFile) -> tuple[str, Any]:
        """The whole file's sha256 and its GGUF header (or the GGUFError), side by side:
        the header parse is pure Python, the hash runs without the GIL."""
        out: dict[str, Any] = {}

        async def header() -> None:
            try:
                out["info"] = await trio.to_thread.run_sync(read_gguf, partial.path)
            except GGUFError as e:
                out["info"] = e

        async with trio.open_nursery() as nursery:
            nursery.start_soon(header)
            out["sha"] = await trio.to_thread.run_sync(partial.whole_sha256)
        return out["sha"], out["info"]

    def _succeed(self, dl: _Download, entry: ModelEntry, manifest: Manifest | None) -> ModelEntry:
        dl.result = entry
        dl.sha256, dl.total, dl.name = entry.sha256, entry.size, entry.name
        dl.completed = entry.size
        dl.status = "success"
        if manifest is not None:
            plog.info("pulled %s (sha256 %s, %d bytes: %d fetched, %d resumed) from %d peer(s)"
                      " in %.1f s%s", entry.name, entry.sha256, entry.size, dl.fetched,
                      dl.resumed, len(dl.used), time.monotonic() - dl.started,
                      f"; dropped {dl.dropped}" if dl.dropped else "")
            if self.network is not None:
                self.network.capacity_changed()  # announce: we can seed it now
        dl.emit()
        return entry

    def _disk_error(self, e: OSError, manifest: Manifest) -> PullError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return PullError(507, f"disk full: the model needs {manifest.size} bytes in"
                             f" {self.partial_dir}; free some space and pull again (the"
                             " partial download is kept and resumes)")
        return PullError(500, f"cannot write the partial download in {self.partial_dir}:"
                         f" {e.strerror or e}")

    async def _report(self, dl: _Download) -> None:
        label = dl.name or dl.target
        while True:
            self.metrics.pull_total.labels(label).set(dl.total)
            self.metrics.pull_completed.labels(label).set(dl.completed)
            self.metrics.pull_rate.labels(label).set(dl.rate())
            self.metrics.pull_sources.labels(label).set(len(dl.sources))
            dl.emit()
            await trio.sleep(self.options.progress_interval_s)

    # -- finding providers and the manifest --------------------------------------------

    def _from_records(self, sha: str | None, name: str | None) -> dict[str, str]:
        """peer -> model sha256, from unexpired capacity records listing the model."""
        out: dict[str, str] = {}
        if self.network is None:
            return out
        now = time.time()
        for entry in self.network.table:
            rec = entry.record
            if rec is None or rec.is_expired(now):
                continue
            for m in rec.models:
                if (sha is not None and m.sha256 == sha) or (name is not None and m.name == name):
                    out[entry.peer_id] = m.sha256
                    break
        return out

    def _record_name(self, sha: str) -> str | None:
        names = collections.Counter()
        if self.network is not None:
            for entry in self.network.table:
                if entry.record is not None:
                    names.update(m.name for m in entry.record.models if m.sha256 == sha)
        for name, _ in names.most_common():
            if _NAME_RE.match(name):
                return name
        return None

    async def _resolve(
        self, dl: _Download
    ) -> tuple[list[tuple[Manifest, list[str]]], str, tuple[str, ...]]:
        """Manifests offered by trusted providers, grouped by layout, best first; the
        name to store the model under; aliases to add."""
        if self.network is None:
            raise PullError(503, "this node runs without the peer-to-peer side (--no-p2p);"
                            " it cannot pull models")
        sha = _parse_sha(dl.target)
        name = None if sha else normalize_name(dl.target)
        opts = self.options
        known = {e.peer_id for e in self.network.table if e.record is not None}
        holders = self._from_records(sha, name)
        by_alias = False
        if dl.from_peer is not None:
            holders = {dl.from_peer: holders.get(dl.from_peer, sha or "")}
        elif sha is not None or holders:
            # DHT provider records, keyed by the file's sha256: peers beyond our table, or
            # holding the same file under another name. Short when records already answer.
            key = sha or collections.Counter(holders.values()).most_common(1)[0][0]
            wait = 1.0 if holders else opts.dht_timeout_s
            try:
                for peer in await self.network.find_model_providers(key, timeout=wait):
                    holders.setdefault(peer, key)
            except Exception as e:  # noqa: BLE001 - a DHT failure must not hide the table
                plog.info("DHT provider lookup for %s failed: %s", key, e)
        else:
            # The name may be an alias no record carries: ask trusted connected peers.
            holders = {p: "" for p in self.network.connected_peers() if self._trusted(p)}
            by_alias = True
        holders.pop(getattr(self.network, "peer_id_str", None), None)
        asked = len(known | set(holders))
        if not holders:
            raise PullError(404, f"no peer has model {dl.target!r}: asked {asked} peer(s);"
                            " check the name with `qvacd peers`, or pull by sha256")
        untrusted = [p for p in holders if not self._trusted(p)]
        trusted = [p for p in holders if p not in untrusted]
        if not trusted:
            raise PullError(403, f"model {dl.target!r} is only on peers this node does not"
                            f" trust ({', '.join(untrusted[:4])}); trust one with `qvacd"
                            " trust add PEER --roles provider`")
        # Prefer peers whose record lists the model, then the rest; cap the fan-out.
        trusted.sort(key=lambda p: (holders[p] == "", p))
        candidates = trusted[: opts.max_providers * 2]
        manifests: dict[str, Manifest] = {}
        failures: dict[str, str] = {}

        async def ask(peer: str) -> None:
            want = sha or holders.get(peer) or dl.target
            for attempt in range(opts.transient_retries + 1):
                try:
                    with trio.fail_after(opts.manifest_timeout_s):
                        manifests[peer] = await self._fetch_manifest(
                            peer, want, sha or holders.get(peer) or None)
                    failures.pop(peer, None)
                    return
                except trio.TooSlowError:
                    failures[peer] = _PeerFault(
                        f"no manifest within {opts.manifest_timeout_s:.0f} s", "stall")
                    return
                except _PeerFault as f:
                    failures[peer] = f
                    if f.kind not in _TRANSIENT:
                        return
                    # why: an idle connection can be dead without us knowing yet; the
                    # failed open drops it and the next one dials afresh
                    await trio.sleep(0.5 * (attempt + 1))
            plog.info("pull of %s: %s failed %d times: %s", dl.target, peer,
                      opts.transient_retries + 1, failures[peer].reason)

        with _one_error():
            async with trio.open_nursery() as nursery:
                for peer in candidates:
                    nursery.start_soon(ask, peer)
        if not manifests and by_alias:
            refused = [f"{p}: {f.reason}" for p, f in failures.items() if f.code != "not_found"]
            raise PullError(404, f"no peer has model {dl.target!r}: asked {asked} peer(s)"
                            + (f"; {len(refused)} could not answer ({'; '.join(refused)})"
                               if refused else ""))
        for peer, f in failures.items():
            self._drop(dl, peer, f.reason, f.kind)
        if not manifests:
            detail = "; ".join(f"{p}: {f.reason}" for p, f in failures.items())
            codes = {f.code for f in failures.values()}
            status = 403 if codes == {"unauthorized"} else 404 if codes == {"not_found"} else 502
            raise PullError(status, f"no trusted peer served {dl.target!r} (asked"
                            f" {len(candidates)} of {asked} peer(s)): {detail}")
        # Providers that agree on a layout form a group; the largest group is tried first
        # (ties: smallest peer id, for stable behaviour). A group whose chunks do not make
        # up the file is blamed and the next one tried, so a liar in a 1-1 tie cannot get
        # an honest peer dropped.
        by_layout: dict[tuple, list[str]] = collections.defaultdict(list)
        for peer in sorted(manifests):
            by_layout[manifests[peer].layout_key()].append(peer)
        ordered = sorted(by_layout.values(), key=lambda ps: (-len(ps), ps[0]))
        groups = [(manifests[ps[0]], ps[: opts.max_providers]) for ps in ordered]
        first = groups[0][0]
        model_name = (name if name and _NAME_RE.match(name) else None) \
            or self._record_name(first.sha256) \
            or f"sha256-{first.sha256[:12]}"
        aliases = tuple(a for a in (normalize_name(dl.target),)
                        if not sha and a != model_name)
        plog.info("pull of %s: sha256 %s, %d bytes in %d chunks; providers by manifest: %s",
                  model_name, first.sha256, first.size, first.n_chunks,
                  " | ".join(", ".join(ps) for _, ps in groups))
        return groups, model_name, aliases

    async def _fetch_manifest(self, peer: str, model: str, sha: str | None) -> Manifest:
        decoder = FrameDecoder(SHARD_LIMITS)
        stream = await self._open(peer)
        ok = False
        try:
            await _write(stream, ManifestRequest(model=model))
            reply = await self._read_message(stream, decoder, self.options.manifest_timeout_s)
            if isinstance(reply, Error):
                raise _PeerFault(f"refused the manifest: {reply.code.value}: {reply.message}",
                                 "refused", reply.code.value)
            if not isinstance(reply, ManifestResponse):
                raise _PeerFault(f"answered a manifest request with {reply.tag!r}", "protocol")
            try:
                m = parse_manifest(reply.manifest, expected_sha256=sha)
            except ManifestError as e:
                raise _PeerFault(f"sent a bad manifest: {e}", "bad_manifest") from None
            ok = True
            return m
        except _StreamEnded as e:
            raise _PeerFault(f"the manifest stream broke: {e}", "gone") from None
        except ProtocolError as e:
            raise _PeerFault(f"sent a malformed frame: {e}", "protocol") from None
        finally:
            await _close(stream, reset=not ok)

    async def _open(self, peer: str) -> Any:
        try:
            return await self.network.open_stream(peer, SHARD_PROTOCOL,
                                                  timeout=self.options.open_timeout_s)
        except Exception as e:  # noqa: BLE001 - any dial/negotiation failure: unreachable
            raise _PeerFault(f"unreachable: {e}"[:300], "unreachable") from None

    async def _read_message(self, stream: Any, decoder: FrameDecoder, stall: float) -> Message:
        while True:
            msg = decoder.next_message()
            if msg is not None:
                return msg
            data: bytes | None = None
            with trio.move_on_after(stall):
                data = await _read_some(stream)
            if data is None:
                raise _PeerFault(f"stalled: nothing for {stall:.0f} s", "stall")
            if data:
                decoder.feed(data)
                continue
            decoder.feed_eof()
            msg = decoder.next_message()
            if msg is None:
                raise _PeerFault("closed the stream without an answer", "gone")
            return msg

    # -- fetching chunks ---------------------------------------------------------------

    def _drop(self, dl: _Download, peer: str, reason: str, kind: str) -> None:
        if peer in dl.dropped:
            return
        dl.dropped[peer] = reason
        dl.sources.discard(peer)
        self.metrics.pull_dropped.labels(kind).inc()
        plog.warning("pull of %s: dropped provider %s: %s", dl.name or dl.target, peer, reason)

    async def _fetch_chunks(self, dl: _Download, manifest: Manifest, partial: PartialFile,
                            providers: list[str], missing: list[int], done: set[int],
                            plans: dict[str, _RelayPlan] | None = None) -> None:
        opts = self.options
        pending = collections.deque(missing)
        left = set(missing)
        changed = [trio.Event()]
        inflight = trio.Semaphore(opts.max_inflight)
        scopes: dict[str, trio.CancelScope] = {}
        plans = {} if plans is None else plans

        def notify() -> None:
            changed[0].set()
            changed[0] = trio.Event()

        def drop(peer: str, reason: str, kind: str) -> None:
            self._drop(dl, peer, reason, kind)
            if peer in scopes:
                scopes[peer].cancel()
            notify()

        async def worker(peer: str, busy_since: list[float | None], strikes: list[int]
                         ) -> None:
            while left:
                if not pending:
                    with trio.move_on_after(1.0):
                        await changed[0].wait()  # a chunk may come back if its peer fails
                    continue
                index = pending.popleft()
                finished = False
                plan, why = self._charge(plans, peer, manifest.chunk_length(index))
                if why is not None:
                    # Not a fault: this provider's relayed circuit cannot take another
                    # chunk. Its chunks in flight finish; the others take the rest.
                    pending.appendleft(index)
                    self._drop(dl, peer, why, "relay_limit")
                    notify()
                    return
                try:
                    async with inflight:
                        pieces = await self._fetch_chunk(peer, manifest, index)
                        good = await trio.to_thread.run_sync(partial.store_chunk, index, pieces)
                        # Book-keeping with no checkpoint in between: a cancel arriving now
                        # must not put a stored chunk back in the queue.
                        finished = good
                        if good and index in left:
                            n = manifest.chunk_length(index)
                            left.discard(index)
                            done.add(index)
                            dl.used.add(peer)
                            dl.completed += n
                            dl.fetched += n
                            dl._samples.append((time.monotonic(), n))
                            self.metrics.pull_bytes.inc(n)
                            self.metrics.pull_chunks.labels("ok").inc()
                    if not good:
                        raise _PeerFault(f"sent chunk {index} that failed its sha256 check",
                                         "bad_chunk")
                    busy_since[0] = None
                    strikes[0] = 0
                except _Busy as b:
                    self.metrics.pull_chunks.labels("busy").inc()
                    if plan is not None:
                        plan.charged -= manifest.chunk_length(index)  # nothing was sent
                    now = time.monotonic()
                    busy_since[0] = busy_since[0] or now
                    if now - busy_since[0] > opts.max_busy_s:
                        drop(peer, f"busy for over {opts.max_busy_s:.0f} s", "busy")
                        return
                    await trio.sleep(min(max(b.retry_after, 0.05), 5.0))
                except _PeerFault as f:
                    self.metrics.pull_chunks.labels(f.kind).inc()
                    if f.kind in _TRANSIENT and strikes[0] < opts.transient_retries:
                        # A broken stream or failed dial may be the network, not the peer
                        # (yamux resets a stream whose reader lagged ~5 s): retry a little.
                        strikes[0] += 1
                        plog.info("pull of %s: %s %s; retrying (%d/%d)", dl.name, peer,
                                  f.reason, strikes[0], opts.transient_retries)
                        await trio.sleep(0.5)
                        continue
                    drop(peer, f.reason, f.kind)
                    return
                except OSError as e:
                    raise self._disk_error(e, manifest) from None
                finally:
                    if not finished:
                        pending.appendleft(index)  # someone else fetches it
                    notify()

        async def provider(peer: str) -> None:
            busy_since: list[float | None] = [None]
            strikes = [0]  # transient failures in a row, all streams of this provider
            with trio.CancelScope() as scope, _one_error():
                scopes[peer] = scope
                dl.sources.add(peer)
                try:
                    async with trio.open_nursery() as nursery:
                        for _ in range(opts.streams_per_provider):
                            nursery.start_soon(worker, peer, busy_since, strikes)
                finally:
                    dl.sources.discard(peer)

        with _one_error():
            async with trio.open_nursery() as nursery:
                for peer in providers:
                    if peer not in dl.dropped:
                        nursery.start_soon(provider, peer)
        if left:
            detail = "; ".join(f"{p}: {r}" for p, r in dl.dropped.items()) or "none answered"
            raise _AllFailed(502, f"every provider of {dl.name} failed with {len(left)} of"
                            f" {manifest.n_chunks} chunks missing ({detail}); pull again to"
                            " resume from what was verified")

    def _chunk_deadline(self, length: int) -> float:
        """The longest one chunk may take before its provider counts as stalled."""
        opts = self.options
        return opts.stall_timeout_s + opts.open_timeout_s + length / opts.min_rate

    # -- relayed paths (the rule is above _RelayPlan) -----------------------------------

    def _circuit(self, peer: str) -> Any:
        """The relayed circuit our only path to `peer` goes over, or None (direct, none
        yet, or a relay that set no limits we know of)."""
        relay = getattr(self.network, "relay", None)
        if relay is None:
            return None
        try:
            return relay.circuit(peer)
        except Exception:  # noqa: BLE001 - a view; a failure must not stop a pull
            plog.debug("relay circuit of %s unknown", peer, exc_info=True)
            return None

    def _plan_relays(self, dl: _Download, manifest: Manifest, providers: list[str],
                     name: str, needed: int) -> dict[str, _RelayPlan]:
        """Each relayed provider's share; PullError(413) when no path can carry `needed`
        bytes. Providers that cannot carry one chunk are dropped for this pull."""
        plans: dict[str, _RelayPlan] = {}
        if needed <= 0:
            return plans
        chunk = manifest.chunk_size
        unusable: dict[str, str] = {}
        unlimited = False
        capacity = 0  # bytes, in whole chunks, the relayed providers can carry together
        for peer in providers:
            if peer in dl.dropped:
                continue
            c = self._circuit(peer)
            if c is None:
                unlimited = True
                continue
            plan = _RelayPlan(c, _RelayPlan.carries(c))
            secs = c.seconds_left()
            if secs is not None and secs < self._chunk_deadline(chunk):
                unusable[peer] = (f"its relayed connection through {c.relay} ends in"
                                  f" {secs:.0f} s (the relay limits a connection to"
                                  f" {c.limit_duration_s} s)")
            elif plan.allowance is not None and plan.allowance < min(chunk, needed):
                unusable[peer] = (f"its relayed connection through {c.relay} has"
                                  f" {_human(c.bytes_left() or 0)} left of the relay's"
                                  f" {_human(c.limit_bytes)} limit per connection")
            else:
                plans[peer] = plan
                if plan.allowance is None:
                    unlimited = True
                else:  # whole chunks: a share is never cut inside one
                    capacity += (plan.allowance if plan.allowance >= needed
                                 else plan.allowance // chunk * chunk)
        if not unlimited and capacity < needed:
            raise PullError(413, self._too_big(manifest, name, needed, providers, plans))
        for peer, why in unusable.items():
            self._drop(dl, peer, why, "relay_limit")
        for peer, plan in plans.items():
            c = plan.circuit
            plog.info("pull of %s: %s only through relay %s: may carry %s of %s (limit %s"
                      " per connection, %s used; %s)", name, peer, c.relay,
                      "all" if plan.allowance is None else _human(plan.allowance),
                      _human(needed), _human(c.limit_bytes) if c.limit_bytes else "none",
                      _human(c.used), "no time limit" if c.seconds_left() is None
                      else f"{c.seconds_left():.0f} s left")
        return plans

    def _too_big(self, manifest: Manifest, name: str, needed: int, providers: list[str],
                 plans: dict[str, _RelayPlan]) -> str:
        """The one-line refusal of a pull that no provider's path can carry."""
        circuits = [c for c in (self._circuit(p) for p in providers) if c is not None]
        best = max(circuits, key=lambda c: (c.bytes_left() or 0, c.seconds_left() or 0))
        relays = sorted({c.relay for c in circuits})
        still = "" if needed == manifest.size else f", {_human(needed)} of it still to fetch"
        what = (f"cannot pull {name}: the model is {_human(manifest.size)}"
                f" ({manifest.size} bytes{still}) and its {len(providers)} provider(s) can"
                f" be reached only through relay {', '.join(relays)}")
        if best.limit_bytes:
            what += (f", which carries at most {_human(best.limit_bytes)}"
                     f" ({best.limit_bytes} bytes) per connection")
            if (best.bytes_left() or 0) < best.limit_bytes:
                what += f" ({_human(best.bytes_left() or 0)} left on the one in use)"
        secs = best.seconds_left()
        if not plans and secs is not None and secs < self._chunk_deadline(manifest.chunk_size):
            what += (f"; it ends a connection after {best.limit_duration_s} s and the one in"
                     f" use has {secs:.0f} s left")
            todo = ("ask the relay's owner to raise --relay-circuit-duration, or pull again"
                    " once the connection is renewed")
        else:
            want = best.used + int(needed * (1 + _RELAY_OVERHEAD)) + _RELAY_RESERVE
            todo = ("ask the relay's owner to raise --relay-circuit-bytes to at least"
                    f" {-(-want // (1 << 20))}MiB")
        return (f"{what}; nothing was fetched: {todo}, or pull once a direct connection"
                " works (hole punching, i.e. without --no-hole-punch, or a reachable"
                " address), or pull from another peer with --from PEERID")

    def _charge(self, plans: dict[str, _RelayPlan], peer: str, length: int
                ) -> tuple[_RelayPlan | None, str | None]:
        """Charge one chunk of `length` bytes to `peer`'s relayed circuit, if it is
        relayed: (the plan charged or None, None) or (None, why it cannot take it)."""
        c = self._circuit(peer)
        if c is None:
            return None, None  # direct (now), or a relay without limits
        plan = plans.get(peer)
        if plan is None or plan.circuit is not c:
            # a path that was direct at the start, or a connection that broke and came
            # back over a new circuit: plan that circuit afresh
            plan = plans[peer] = _RelayPlan(c, _RelayPlan.carries(c))
        secs = c.seconds_left()
        if secs is not None and secs < self._chunk_deadline(length):
            return None, (f"its relayed connection through {c.relay} ends in {secs:.0f} s"
                          f" (the relay limits a connection to {c.limit_duration_s} s),"
                          " too soon for another chunk; pull again to go on over a new one")
        if plan.allowance is not None and plan.charged + length > plan.allowance:
            return None, (f"its share ({_human(plan.allowance)}) of what relay {c.relay}"
                          f" carries per connection ({_human(c.limit_bytes)}) is fetched")
        plan.charged += length
        return plan, None

    async def _fetch_chunk(self, peer: str, manifest: Manifest, index: int) -> list[bytes]:
        opts = self.options
        length = manifest.chunk_length(index)
        request = ChunkRequest(sha256=manifest.sha256, index=index)
        deadline = self._chunk_deadline(length)
        state = ChunkClientState(request)
        decoder = FrameDecoder(SHARD_LIMITS)
        pieces: list[bytes] = []
        stream = None
        ok = False
        try:
            with trio.move_on_after(deadline) as whole:
                stream = await self._open(peer)
                await stream.write(encode_frame(request, SHARD_LIMITS))
                while not state.finished:
                    msg = decoder.next_message()
                    if msg is None:
                        data = b""
                        with trio.move_on_after(opts.stall_timeout_s) as stalled:
                            data = await _read_some(stream)
                        if stalled.cancelled_caught:
                            raise _PeerFault(f"stalled: no data for {opts.stall_timeout_s:.0f}"
                                             f" s in chunk {index}", "stall")
                        if data:
                            decoder.feed(data)
                        else:
                            decoder.feed_eof()
                            if decoder.next_message() is None:
                                state.receive_eof()  # raises: ended before the last piece
                        continue
                    state.receive(msg)
                    if isinstance(msg, Error):
                        if msg.code == ErrorCode.BUSY:
                            ok = True
                            raise _Busy(msg.retry_after or 0.5)
                        raise _PeerFault(f"refused chunk {index}: {msg.code.value}:"
                                         f" {msg.message}", "refused", msg.code.value)
                    assert isinstance(msg, ChunkData)
                    if state.received > length:
                        raise _PeerFault(f"sent more than the {length} bytes of chunk {index}",
                                         "protocol")
                    pieces.append(msg.data)
            if whole.cancelled_caught:
                raise _PeerFault(f"too slow: chunk {index} took over {deadline:.0f} s", "stall")
            if state.received != length:
                raise _PeerFault(f"sent a short chunk {index}: {state.received} of {length}"
                                 " bytes", "short")
            ok = True
            return pieces
        except ProtocolError as e:
            if e.code == ErrorCode.UNAVAILABLE:  # ended before the last piece
                raise _PeerFault(f"the stream ended in chunk {index}: {e.message}",
                                 "gone") from None
            raise _PeerFault(f"broke the protocol in chunk {index}: {e}", "protocol") from None
        except _StreamEnded as e:
            raise _PeerFault(f"the stream broke in chunk {index}: {e}", "gone") from None
        finally:
            if stream is not None:
                await _close(stream, reset=not ok)


__all__ = [
    "PartialFile",
    "PullError",
    "PullOptions",
    "Puller",
    "ShardMetrics",
    "ShardService",
    "manifest_path",
    "shard_metrics",
]
