"""The seeder: serves this node's models to peers over `/qvac/shard/1.0.0`.

`ShardService` serves a model's manifest (by name or sha256) and its chunks by index, in
sub-frames of at most 1 MiB read straight from the store blob. A fetcher may ask for one
chunk after another on one stream (each after the previous answer ended): the stream is
served until the fetcher closes it or sends nothing for `request_timeout_s`. Only peers with the
`seeder` role (or anyone, on a public donor) are served; concurrent uploads and the
upload rate are capped. Blob reads and manifest builds run in worker threads, so a slow
disk never stalls the event loop. The puller, the other side, is qvacd/pull/.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import weakref
from collections.abc import Callable

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge

from models.manifest import Manifest, ManifestError, load_or_build_manifest
from models.store import ModelEntry, ModelStore
from peers import short_peer_id
from protocol import (
    MAX_CHUNK_PIECE,
    SHARD_LIMITS,
    SHARD_PROTOCOL,
    ChunkData,
    ChunkRequest,
    Error,
    ErrorCode,
    FrameDecoder,
    ManifestRequest,
    ManifestResponse,
    Message,
    ProtocolError,
)

from ..p2p_io import Stream, StreamEnded, close_stream, read_some, write_frame

# The logger keeps the name it had before the seeder moved here: operators grep for it.
log = logging.getLogger("qvacd.shards")


class SeederMetrics:
    """Prometheus metrics of the seeder (the puller's are in qvacd/pull/metrics.py)."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.upload_bytes = Counter("qvacd_shard_upload_bytes", "Model bytes sent to peers",
                                    registry=r)
        self.uploads_active = Gauge("qvacd_shard_uploads_active", "Chunk uploads in progress",
                                    registry=r)
        self.shard_requests = Counter("qvacd_shard_requests", "Shard requests served",
                                      ["kind", "outcome"], registry=r)
        self.shard_streams = Counter("qvacd_shard_streams", "Shard streams peers opened"
                                     " (each may carry several chunk requests)", registry=r)


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, SeederMetrics] = \
    weakref.WeakKeyDictionary()


def seeder_metrics(registry: CollectorRegistry | None) -> SeederMetrics:
    """The SeederMetrics of `registry` (a private one when None); created on first use:
    a test seeder that replaces the node's must not register the names twice."""
    if registry is None:
        registry = CollectorRegistry()
    m = _METRICS.get(registry)
    if m is None:
        m = _METRICS[registry] = SeederMetrics(registry)
    return m


async def _write(stream: Stream, msg: Message) -> None:
    await write_frame(stream, msg, SHARD_LIMITS)


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

_ENDED = object()  # no further request on a stream that already carried one
# Outcomes after which the answer was whole, so the stream can carry another request.
_WHOLE_ANSWERS = frozenset({"ok", "busy", "not_found", "bad_request"})
_CUT_SHORT = frozenset({"gone", "timeout", "error"})  # outcomes whose stream is reset


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
        self.on_offence: Callable[[str, Stream, str], object] = \
            lambda kind, stream, peer: False
        self.max_uploads = max(1, int(max_uploads))
        self.rate = _RateLimiter(upload_rate)
        self.request_timeout_s = request_timeout_s
        self.chunk_timeout_s = chunk_timeout_s
        self.metrics = seeder_metrics(registry)
        self.active = 0
        self._manifests: dict[str, tuple[Manifest, bytes]] = {}
        self._build_locks: dict[str, trio.Lock] = collections.defaultdict(trio.Lock)

    def _count(self, kind: str, outcome: str) -> None:
        self.metrics.shard_requests.labels(kind, outcome).inc()

    async def handle(self, stream: Stream, peer_id: str) -> None:
        """Requests on one stream, one after another, until the fetcher closes it, goes
        quiet, or an answer was not whole (then the stream is reset)."""
        self.metrics.shard_streams.inc()
        decoder = FrameDecoder(SHARD_LIMITS)
        reset = False
        try:
            first = True
            while not reset:
                again, reset = await self._handle_one(stream, peer_id, decoder, first)
                if not again:
                    break
                first = False
        finally:
            # A reset tells the fetcher the answer was cut short; everything else, even a
            # refusal, was a whole answer and ends cleanly.
            await close_stream(stream, reset=reset)

    async def _handle_one(self, stream: Stream, peer_id: str, decoder: FrameDecoder,
                          first: bool) -> tuple[bool, bool]:
        """One request and its answer: (serve another on this stream?, reset it?)."""
        kind, outcome = "unknown", "error"
        try:
            msg = await self._read_request(stream, decoder, first)
            if msg is _ENDED:
                outcome = ""  # the fetcher closed or went quiet between requests: routine
                return False, False
            if msg is None:
                outcome = "timeout"
                await _write(stream, Error(ErrorCode.DEADLINE, "no request within"
                                           f" {self.request_timeout_s:.0f} s of opening the stream"))
                return False, True
            assert isinstance(msg, Message)
            kind = "manifest" if isinstance(msg, ManifestRequest) else "chunk"
            if not isinstance(msg, ManifestRequest | ChunkRequest):
                kind, outcome = "unknown", "protocol"
                await _write(stream, Error(ErrorCode.PROTOCOL, f"{SHARD_PROTOCOL} expects a"
                                           f" manifest or chunk request, got {msg.tag!r}"))
                return False, False
            if not self.is_authorized(peer_id):
                outcome = "unauthorized"
                await _write(stream, Error(ErrorCode.UNAUTHORIZED, f"this node does not trust"
                                           f" peer {peer_id} with the seeder role; on this node"
                                           f" run `qvacd trust add {peer_id} --roles seeder`"))
                return False, False
            if isinstance(msg, ManifestRequest):
                outcome = await self._serve_manifest(stream, msg, peer_id)
            else:
                outcome = await self._serve_chunk(stream, msg, peer_id)
            # a whole chunk, or a refusal the fetcher may follow with another request
            return (outcome in _WHOLE_ANSWERS and isinstance(msg, ChunkRequest),
                    outcome in _CUT_SHORT)
        except ProtocolError as e:
            outcome = "protocol"
            log.info("shard request from %s was malformed: %s", peer_id, e)
            with contextlib.suppress(Exception), trio.move_on_after(1):
                await _write(stream, Error.from_exception(e))
        except StreamEnded:
            outcome = "gone"
        except Exception as e:
            if type(e).__module__.startswith("libp2p") or isinstance(e, OSError):
                outcome = "gone"  # the peer reset or went away mid-chunk
                log.debug("shard stream to %s ended: %s", peer_id, e)
            else:
                log.exception("shard handler failed for peer %s; answered INTERNAL and reset"
                              " the stream", short_peer_id(peer_id))
                with contextlib.suppress(Exception), trio.move_on_after(1):
                    await _write(stream, Error(ErrorCode.INTERNAL, "seeder error; try another"
                                               " peer"))
        finally:
            if outcome:
                self._count(kind, outcome)
            if outcome in ("protocol", "unauthorized"):
                self.on_offence(outcome, stream, peer_id)
        return False, outcome in _CUT_SHORT

    async def _read_request(self, stream: Stream, decoder: FrameDecoder, first: bool
                            ) -> Message | object | None:
        """The next request; None if the first did not come in time; _ENDED when the
        fetcher closed the stream or sent nothing for a while after an earlier one."""
        with trio.move_on_after(self.request_timeout_s):
            while True:
                msg = decoder.next_message()
                if msg is not None:
                    return msg
                try:
                    data = await read_some(stream)
                except StreamEnded:
                    if first or decoder.buffered:
                        raise
                    return _ENDED  # reset between requests: the fetcher is done with it
                if not data:
                    if not first and not decoder.buffered:
                        return _ENDED
                    decoder.feed_eof()
                    msg = decoder.next_message()
                    if msg is None:
                        raise ProtocolError(ErrorCode.PROTOCOL, "stream ended before a request")
                    return msg
                decoder.feed(data)
        return None if first else _ENDED

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

    async def _serve_manifest(self, stream: Stream, msg: ManifestRequest, peer: str) -> str:
        entry = self._resolve(msg.model)
        if entry is None:
            await _write(stream, Error(ErrorCode.NOT_FOUND, f"no model {msg.model!r} here"))
            return "not_found"
        try:
            _, data = await self.manifest_for(entry)
        except ManifestError as e:
            log.error("cannot serve the manifest of %s to peer %s: %s; answered INTERNAL"
                      " (try another peer), the next request builds it again", entry.name,
                      short_peer_id(peer), e)
            await _write(stream, Error(ErrorCode.INTERNAL, f"the seeder's copy of {entry.name}"
                                       " is unusable; try another peer"))
            return "internal"
        await _write(stream, ManifestResponse(manifest=data))
        return "ok"

    async def _serve_chunk(self, stream: Stream, msg: ChunkRequest, peer: str) -> str:
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
                log.error("cannot read chunk %d of %s for peer %s: %s; answered INTERNAL"
                          " (try another peer)", msg.index, entry.name, short_peer_id(peer), e)
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

    async def _send_chunk(self, stream: Stream, index: int, data: bytes) -> None:
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


__all__ = ["SeederMetrics", "ShardService", "seeder_metrics"]
