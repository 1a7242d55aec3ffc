"""Consumer side of /qvac/infer/1.0.0: pick the best trusted peer, stream from it, and
fail over to the next one, mid-stream included, without losing or repeating text.

Failover design: every piece of text already sent to the client is kept. When the
serving peer dies (reset, EOF before Done, garbage frames, or silence past the stall
timeout), the next candidate gets the same request plus `resume` = that text, and
continues after it; its own `max_tokens` is what remains. The client sees one stream.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import trio

from models.engine import EngineError, GenerationRequest, GenerationResult, fmt_bytes
from models.store import normalize_name
from peers import ProtocolRefused, short_peer_id
from protocol import (
    DEFAULT_MIN_P,
    DEFAULT_REPEAT_PENALTY,
    DEFAULT_TOP_K,
    INFER_PROTOCOL,
    Accepted,
    ChatMessage,
    Done,
    Error,
    ErrorCode,
    InferClientState,
    InferRequest,
    ProtocolError,
    Token,
    encode_frame,
)

from .p2p_io import FrameStream, StreamGone
from .router import RoutedGeneration

if TYPE_CHECKING:
    from peers import PeerTable
    from peers.records import CapacityRecord, ModelInfo

    from .metrics import Metrics

log = logging.getLogger("qvacd.delegation")

FRESH_S = 8.0  # a record of a peer we are not connected to: re-fetch when older
# Connected peers push every change, so their record holds; past this (longer than the
# 60 s safety-net refresh) it is fetched again before use.
CONNECTED_FRESH_S = 90.0
ACCEPT_TIMEOUT_S = 30.0  # peer must accept (or refuse) within this (it may be loading)
STALL_TIMEOUT_S = 5.0  # silence between frames after acceptance counts as a failure
# ... or, on a peer that has been slow on this stream (a saturated CPU, a phone), silence
# for this many times its slowest gap so far: slow is not dead (the lab saw 2-4 s gaps).
STALL_GAP_FACTOR = 4.0
STALL_TIMEOUT_MAX_S = 30.0
# ... and while its path answers pings (peers/_liveness.py): alive, so slow (a long
# prefill beside other clients' prompts was silent 5+ s in the lab), not yet hung
STALL_ALIVE_S = 20.0
DEFAULT_DEADLINE_MS = 10 * 60 * 1000


MIN_RATE_TOKENS = 4  # a delegated stream's tokens/s is kept per path from this many tokens
MISBEHAVIOUR_BACKOFF_S = 60.0  # garbage or a stall is no accident: keep away longer


class PeerFailed(Exception):
    def __init__(self, peer: str, reason: str, *, refused: Error | None = None,
                 misbehaved: bool = False) -> None:
        super().__init__(reason)
        self.peer = peer
        self.reason = reason
        self.refused = refused  # an Error frame: the peer answered, it did not break
        self.misbehaved = misbehaved  # garbage frames or a stall, not a crash


class DelegationNetwork(Protocol):
    """What delegation needs of the peer network (peers.PeerNetwork)."""

    @property
    def table(self) -> PeerTable: ...

    def peer_path(self, peer: str) -> tuple[str | None, str | None]:
        """("direct" | "relayed" | None, relay peer id) of our connection to `peer`."""
        ...

    def stream_path(self, stream: Any) -> str:
        """"direct" or "relayed": the connection this stream runs over."""
        ...

    async def open_stream(self, peer_id: str, protocol_id: str, timeout: float = ...,
                          first: bytes | None = ...) -> Any: ...

    def watch_path(self, stream: Any) -> contextlib.AbstractAsyncContextManager[Any]:
        """Ping the connection `stream` runs over while inside; the probe's `dead` says
        it stopped answering (peers/_liveness.py)."""
        ...

    async def fetch_capacity(self, peer_id: str, timeout: float | None = ...) -> Any: ...


@dataclass
class Candidate:
    peer_id: str
    score: tuple
    record: CapacityRecord


class _Attempt:
    """One open infer stream that has been accepted."""

    def __init__(self, peer: str, io: FrameStream, state: InferClientState) -> None:
        self.peer = peer
        self.io = io
        self.state = state
        self.tokens = 0  # Token frames received
        self.first_token: float | None = None  # monotonic time of the first / last one
        self.last_token: float | None = None

    def decode_rate(self) -> float | None:
        """Tokens/s between the first and last Token frame (the decode phase, as the
        consumer sees it over this path); None for streams too short to tell."""
        if self.tokens < MIN_RATE_TOKENS or self.first_token is None or self.last_token is None:
            return None
        took = self.last_token - self.first_token
        return (self.tokens - 1) / took if took > 0 else None


class RemoteInference:
    def __init__(self, node_id: str, network: DelegationNetwork, *,
                 metrics: Metrics | None = None, stall_timeout: float = STALL_TIMEOUT_S) -> None:
        self.node_id = node_id
        self.network = network
        self.metrics = metrics
        self.stall_timeout = stall_timeout

    # ---- choosing peers ---------------------------------------------------------------

    def _holds(self, record: CapacityRecord, model: str) -> ModelInfo | None:
        want = normalize_name(model)
        for m in record.models:
            if normalize_name(m.name) == want or m.sha256 == want:
                return m
        return None

    def candidates(self, model: str, exclude: AbstractSet[str] = frozenset()) -> list[Candidate]:
        table = self.network.table
        now = time.time()
        out = []
        for e in table:
            if e.peer_id in exclude or e.record is None or e.record.is_expired(now):
                continue
            if not e.available(now) or not table.is_trusted(e.peer_id, "provider"):
                continue
            m = self._holds(e.record, model)
            r = e.record
            if m is None or (r.memory_budget and m.memory > r.memory_budget):
                continue  # not there, or too big for that peer too
            tps = dict(r.tokens_per_s).get(m.sha256, 0.0) if r.tokens_per_s else 0.0
            # The current path's own numbers when it has any: tokens/s measured on
            # streams delegated over it, RTT of capacity exchanges over it.
            path = self._path(e.peer_id)
            stats = e.paths.get(path) if path else None
            rtt = e.rtt_ms
            if stats is not None:
                tps = stats.tokens_per_s or tps
                rtt = stats.rtt_ms if stats.rtt_ms is not None else rtt
            # Lower sorts first: warm, free slot, direct before relayed, short queue,
            # fast, near, reliable.
            score = (0 if m.loaded else 1, 0 if r.slots_free > 0 else 1,
                     1 if path == "relayed" else 0, r.queue_len,
                     -round(tps), rtt if rtt is not None else 1e3, e.failures)
            out.append(Candidate(e.peer_id, score, r))
        out.sort(key=lambda c: c.score)
        return out

    def _path(self, peer: str) -> str | None:
        """"direct", "relayed", or None (not connected yet: a dial prefers direct)."""
        return self.network.peer_path(peer)[0]

    def _record_rate(self, attempt: _Attempt) -> None:
        """Keep the decode rate a delegated stream had, under the path the stream itself
        ran over (one opened before a hole punch stays relayed)."""
        rate = attempt.decode_rate()
        if rate is None:
            return
        path = self.network.stream_path(attempt.io.stream)
        self.network.table.record_path(attempt.peer, path, tokens_per_s=rate)

    def has_candidates(self, model: str) -> bool:
        return bool(self.candidates(model))

    def explain(self, model: str, local_reason: EngineError | None) -> str:
        table = self.network.table
        now = time.time()
        entries = list(table)
        trusted = [e for e in entries if table.is_trusted(e.peer_id, "provider")]
        holding = [e for e in trusted if e.record is not None and not e.record.is_expired(now)
                   and self._holds(e.record, model)]
        backing = [e for e in holding if not e.available(now)]
        if local_reason is None:
            head = f"model {model} cannot run here"
        elif local_reason.code == "NOT_FOUND":  # keep "models here: ..."
            head = local_reason.message.split(" (add one")[0]
        else:  # keep the sizes, drop the local advice
            head = local_reason.message.rsplit(";", 1)[0]
        tail = f"{len(entries)} peers known, {len(trusted)} trusted as providers," \
               f" {len(holding)} of them hold {model}"
        if backing:
            tail += f" ({len(backing)} backing off after failures)"
        return f"{head}; {tail}"

    # ---- one attempt -------------------------------------------------------------------

    def _wire_request(self, req: GenerationRequest, resume: str, max_tokens: int | None,
                      deadline_ms: int) -> InferRequest:
        return InferRequest(
            model=req.model,
            prompt=None if req.messages is not None else req.prompt,
            messages=tuple(ChatMessage(role=m["role"], content=m["content"])
                           for m in req.messages) if req.messages is not None else None,
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            **_sampling_knobs(req),
            seed=req.seed,
            stop=tuple(s for s in req.stop if s)[:16],
            deadline_ms=deadline_ms,
            resume=resume or None,
            grammar=req.grammar,
        )

    async def _open(self, peer: str, wire: InferRequest) -> _Attempt:
        """Open a stream with the request, wait for Accepted. PeerFailed otherwise.

        The request goes out with the protocol negotiation (pipelined): one round trip
        to Accepted instead of three. A peer that does not serve the protocol refused
        cleanly: the next candidate, and no failure scored."""
        io = FrameStream(None)
        try:
            stream = await self.network.open_stream(peer, INFER_PROTOCOL, timeout=5.0,
                                                    first=encode_frame(wire, io.limits))
        except ProtocolRefused as e:
            raise PeerFailed(peer, f"does not serve {INFER_PROTOCOL}", refused=Error(
                ErrorCode.UNAVAILABLE, f"does not serve {INFER_PROTOCOL}")) from e
        except Exception as e:
            raise PeerFailed(peer, f"cannot open a stream: {e or type(e).__name__}") from e
        io.stream = stream
        state = InferClientState()
        ok = False
        try:
            with trio.move_on_after(ACCEPT_TIMEOUT_S) as waited:
                msg = await io.recv()
            if waited.cancelled_caught:
                raise PeerFailed(peer, f"no answer within {ACCEPT_TIMEOUT_S:.0f}s")
            if msg is None:
                raise PeerFailed(peer, "closed the stream before answering")
            state.receive(msg)
            if isinstance(msg, Error):
                raise PeerFailed(peer, f"{msg.code}: {msg.message}", refused=msg)
            assert isinstance(msg, Accepted)  # InferClientState: the first answer is acc or err
            if wire.grammar is not None and msg.grammar is not True:
                # a provider that predates InferRequest.grammar ignored it: its text would
                # not follow the grammar, so none is read (a refusal, not a failure)
                why = "does not enforce grammars (an older qvacd); asked another peer"
                raise PeerFailed(peer, why, refused=Error(ErrorCode.BAD_REQUEST, why))
            if wire.sets_sampling and msg.sampling is not True:
                # the same for top_k, min_p, repeat_penalty: it would sample with its own
                why = ("does not apply top_k, min_p or repeat_penalty (an older qvacd);"
                       " asked another peer")
                raise PeerFailed(peer, why, refused=Error(ErrorCode.BAD_REQUEST, why))
            ok = True
            return _Attempt(peer, io, state)
        except StreamGone as e:
            raise PeerFailed(peer, str(e)) from e
        except ProtocolError as e:
            raise PeerFailed(peer, f"sent garbage: {e}", misbehaved=True) from e
        finally:
            if not ok:
                await _shielded(io.reset)

    # ---- the routed generation -----------------------------------------------------------

    @contextlib.asynccontextmanager
    async def generate(self, req: GenerationRequest, *, local_reason: EngineError | None = None
                       ) -> AsyncIterator[RoutedGeneration]:
        deadline = time.monotonic() + DEFAULT_DEADLINE_MS / 1000
        tried: set[str] = set()
        refusals: list[str] = []
        busy: list[float] = []
        attempt = await self._first_attempt(req, tried, refusals, deadline, busy)
        if attempt is None:
            if busy and len(busy) == len(refusals):  # everyone is busy: say when to retry
                raise EngineError("BUSY", "every peer holding the model is busy; retry shortly"
                                  f" ({'; '.join(refusals[:3])})", retry_after=min(busy))
            msg = self.explain(req.model, local_reason)
            if refusals:
                msg += "; tried: " + "; ".join(refusals[:3])
            code = "NOT_FOUND" if (local_reason and local_reason.code == "NOT_FOUND"
                                   and not refusals) else "UNAVAILABLE"
            raise EngineError(code, msg)
        result = GenerationResult()
        routed = RoutedGeneration([attempt.peer], "peer", result)
        send, recv = trio.open_memory_channel[str](math.inf)
        routed._pieces = _drain(recv)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._produce, req, attempt, routed, send, tried, deadline)
            try:
                yield routed
            finally:
                nursery.cancel_scope.cancel()  # client gone: closing our stream stops the peer

    async def _first_attempt(self, req: GenerationRequest, tried: set[str], refusals: list[str],
                             deadline: float, busy: list[float]) -> _Attempt | None:
        max_tokens = req.max_tokens
        while time.monotonic() < deadline:
            cands = self.candidates(req.model, exclude=tried)
            if not cands:
                return None
            cand = cands[0]
            tried.add(cand.peer_id)
            await self.ensure_fresh(cand.peer_id)
            wire = self._wire_request(req, req.resume, max_tokens,
                                      int((deadline - time.monotonic()) * 1000))
            try:
                return await self._open(cand.peer_id, wire)
            except PeerFailed as e:
                self.note_failure(e)
                refusals.append(f"{e.peer[:12]}…: {e.reason}")
                if e.refused is not None and e.refused.code == ErrorCode.BUSY:
                    busy.append(max(1.0, e.refused.retry_after or 1.0))
        return None

    # Shared with RemoteEmbedder: one rule for when a peer's record is re-asked and how a
    # failure counts against it, whatever the peer was asked to do.
    async def ensure_fresh(self, peer: str) -> None:
        """Re-ask `peer` for its capacity (at most 1 s) when its record is stale."""
        entry = self.network.table.get(peer)
        if entry is not None and entry.is_fresh(CONNECTED_FRESH_S if entry.connected else FRESH_S):
            return
        with trio.move_on_after(1.0):
            with contextlib.suppress(Exception):
                await self.network.fetch_capacity(peer)

    def note_failure(self, e: PeerFailed, what: str = "a request") -> None:
        """Count `e` against its peer: a failure (not a refusal other than INTERNAL or
        PROTOCOL) in the table, back-off for misbehaviour, the per-peer metric."""
        log.info("peer %s failed %s: %s", short_peer_id(e.peer), what, e.reason)
        table = self.network.table
        if e.refused is None or e.refused.code in (ErrorCode.INTERNAL, ErrorCode.PROTOCOL):
            table.record_failure(e.peer, e.reason)
        entry = table.get(e.peer)
        if e.misbehaved and entry is not None:
            entry.backoff_until = max(entry.backoff_until, time.time() + MISBEHAVIOUR_BACKOFF_S)
        if self.metrics is not None:
            self.metrics.peer_requests.labels(e.peer, "refused" if e.refused else "failed").inc()

    async def _produce(self, req: GenerationRequest, attempt: _Attempt, routed: RoutedGeneration,
                       send: trio.MemorySendChannel, tried: set[str], deadline: float) -> None:
        result = routed.result
        emitted: list[str] = []
        first_provider = True
        async with send:
            while True:
                try:
                    done = await self._stream(attempt, send, emitted)
                    result.completion_tokens += done.completion_tokens
                    if first_provider:
                        result.prompt_tokens = done.prompt_tokens
                    result.finish_reason = str(done.finish_reason)
                    self.network.table.record_success(attempt.peer)
                    self._record_rate(attempt)
                    if self.metrics is not None:
                        self.metrics.peer_requests.labels(attempt.peer, "served").inc()
                    return
                except PeerFailed as e:
                    self.note_failure(e)
                    if self.metrics is not None:
                        self.metrics.failovers.inc()
                    # Token frames carry about one token each: the dead peer's share.
                    result.completion_tokens += len(attempt.state._pieces)
                finally:
                    await _shielded(attempt.io.reset)
                # Fail over: same request, resume after everything already sent.
                first_provider = False
                # max_tokens counts the whole answer: the provider subtracts the resume.
                remaining = req.max_tokens
                resume = req.resume + "".join(emitted)
                nxt = None
                while nxt is None and time.monotonic() < deadline:
                    cands = self.candidates(req.model, exclude=tried)
                    if not cands:
                        break
                    peer = cands[0].peer_id
                    tried.add(peer)
                    wire = self._wire_request(req, resume, remaining,
                                              int((deadline - time.monotonic()) * 1000))
                    try:
                        nxt = await self._open(peer, wire)
                    except PeerFailed as e2:
                        self.note_failure(e2)
                if nxt is None:
                    log.warning("peer %s failed mid-answer and no peer is left to resume %s"
                                " after %d characters; ended the client's stream with"
                                " finish_reason error", short_peer_id(attempt.peer),
                                req.model, len(resume))
                    result.finish_reason = "error"
                    result.error = (f"peer {short_peer_id(attempt.peer)} failed mid-answer after"
                                    f" {len(resume)} characters and no other peer can resume"
                                    f" {req.model}; retry the request")
                    return
                log.info("resuming on %s after %d characters", nxt.peer[:16], len(resume))
                routed.served_by.append(nxt.peer)
                attempt = nxt

    async def _stream(self, attempt: _Attempt, send: trio.MemorySendChannel,
                      emitted: list[str]) -> Done:
        """Forward Token frames until Done. PeerFailed on anything else."""
        async with self.network.watch_path(attempt.io.stream) as probe:
            return await self._forward(attempt, send, emitted, probe)

    async def _forward(self, attempt: _Attempt, send: trio.MemorySendChannel,
                       emitted: list[str], probe: Any) -> Done:
        """`_stream`'s loop. A path that stops answering pings fails within about a
        second (`probe.dead`: a cut link); a silent provider whose path still answers is
        slow, not dead: it gets STALL_ALIVE_S (or the longer stall limit) before it
        counts as hung. Without answered pings (an old or odd peer) the stall limit
        alone decides, as before."""
        peer, io, state = attempt.peer, attempt.io, attempt.state
        slowest, last = 0.0, time.monotonic()
        while True:
            limit = min(max(self.stall_timeout, STALL_GAP_FACTOR * slowest),
                        max(self.stall_timeout, STALL_TIMEOUT_MAX_S))
            now_t = trio.current_time()
            waited = trio.CancelScope(deadline=now_t + limit)
            with waited, probe.guarding(waited, now_t + max(limit, STALL_ALIVE_S)):
                try:
                    msg = await io.recv()
                except StreamGone as e:
                    raise PeerFailed(peer, f"connection lost: {e}") from e
                except ProtocolError as e:
                    raise PeerFailed(peer, f"sent garbage: {e}", misbehaved=True) from e
            if waited.cancelled_caught and probe.dead:
                raise PeerFailed(peer, f"path lost: no answer to pings for"
                                       f" {probe.silent_for():.1f}s")
            if waited.cancelled_caught:
                raise PeerFailed(peer, f"stalled for {time.monotonic() - last:.0f}s",
                                 misbehaved=True)
            probe.saw_traffic()
            now = time.monotonic()
            slowest, last = max(slowest, now - last), now
            if msg is None:
                raise PeerFailed(peer, "closed the stream mid-answer")
            try:
                state.receive(msg)
            except ProtocolError as e:
                raise PeerFailed(peer, f"broke the protocol: {e}", misbehaved=True) from e
            if isinstance(msg, Token):
                attempt.tokens += 1
                attempt.last_token = now
                if attempt.first_token is None:
                    attempt.first_token = now
                emitted.append(msg.text)
                send.send_nowait(msg.text)
            elif isinstance(msg, Done):
                return msg
            elif isinstance(msg, Error):
                raise PeerFailed(peer, f"{msg.code}: {msg.message}", refused=msg)
            elif isinstance(msg, Accepted):  # pragma: no cover - state machine refuses it
                raise PeerFailed(peer, "accepted twice")


def _sampling_knobs(req: GenerationRequest) -> dict[str, Any]:
    """InferRequest's top_k, min_p, repeat_penalty for `req`: only those that can change
    the answer, so a request that needs none of them is served by a provider that
    predates them too (it would sample the same way). A knob at its default is left out,
    and so are top_k and min_p at temperature 0: greedy takes the most likely token,
    which neither ever removes."""
    knobs: dict[str, Any] = {}
    if req.temperature > 0.0:
        if req.top_k != DEFAULT_TOP_K:
            knobs["top_k"] = req.top_k
        if req.min_p != DEFAULT_MIN_P:
            knobs["min_p"] = req.min_p
    if req.repeat_penalty != DEFAULT_REPEAT_PENALTY:
        knobs["repeat_penalty"] = req.repeat_penalty
    return knobs


async def _shielded(fn: Callable[[], Awaitable[None]]) -> None:
    """Close a stream even while being cancelled: an unclosed stream would keep the
    provider generating for nobody."""
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        await fn()


async def _drain(recv: trio.MemoryReceiveChannel) -> AsyncIterator[str]:
    async with recv:
        async for piece in recv:
            yield piece


def describe_budget(entry_need: int, budget: int) -> str:
    return f"needs {fmt_bytes(entry_need)}, budget {fmt_bytes(budget)}"
