"""Provider side of /qvac/infer/1.0.0: serve generations to trusted consumers.

Order of checks (cheapest and most important first, all before any model work):
request well-formed -> caller authorized (trust role `consumer`, or public donor)
-> per-peer quota (concurrent streams, tokens per minute) -> model known and fits ->
queue admission. Generation runs on *this* engine only: a provider never re-delegates,
so two nodes can never bounce a request between them.

While tokens stream out, a watcher reads the inbound side: the consumer closing or
resetting the stream cancels the generation within one token.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import trio

from models.engine import EngineError, GenerationRequest
from protocol import (
    DEFAULT_MIN_P,
    DEFAULT_REPEAT_PENALTY,
    DEFAULT_TOP_K,
    Accepted,
    Done,
    Error,
    ErrorCode,
    InferRequest,
    Token,
)

from ..local_engine import LocalEngine
from ..p2p_io import FrameStream, cancel_on_inbound_close, error_code, try_send
from ._provider import first_request, run_handler

if TYPE_CHECKING:
    from ..metrics import Metrics

log = logging.getLogger("qvacd.infer")



class PeerQuota:
    """Concurrent streams and tokens per minute, per peer id."""

    def __init__(self, max_streams: int, tokens_per_minute: int) -> None:
        self.max_streams = max_streams
        self.tokens_per_minute = tokens_per_minute
        self.active: dict[str, int] = defaultdict(int)
        self._tokens: dict[str, deque[tuple[float, int]]] = defaultdict(deque)

    def tokens_last_minute(self, peer: str, now: float) -> int:
        q = self._tokens[peer]
        while q and q[0][0] < now - 60:
            q.popleft()
        return sum(n for _, n in q)

    def check(self, peer: str, now: float) -> Error | None:
        if self.active[peer] >= self.max_streams:
            return Error(ErrorCode.BUSY, f"you already have {self.active[peer]} streams here"
                         f" (limit {self.max_streams}); retry when one ends", retry_after=1.0)
        used = self.tokens_last_minute(peer, now)
        if used >= self.tokens_per_minute:
            wait = 60 - (now - self._tokens[peer][0][0]) if self._tokens[peer] else 60
            return Error(ErrorCode.BUSY, f"you generated {used} tokens here in the last minute"
                         f" (limit {self.tokens_per_minute})", retry_after=max(1.0, wait))
        return None

    def spend(self, peer: str, n: int, now: float) -> None:
        if n:
            self._tokens[peer].append((now, n))


MAX_TOKENS_PER_WRITE = 64


async def _pending_batches(pieces: AsyncIterator[str],
                           nursery: trio.Nursery) -> AsyncIterator[list[str]]:
    """The pieces, each batch holding every piece that arrived while the last write
    went out. A piece is never held back for company (no added latency); pieces that
    queued behind a slow write (a loaded CPU, a full yamux window) go out in one write,
    one encryption and one TCP segment, instead of one each. `pieces` is read by a task
    in `nursery`, whose errors (an engine failure mid-answer) rise through it as before."""
    queued, pending = trio.open_memory_channel[str](math.inf)

    async def pump() -> None:
        async with queued:
            async for piece in pieces:
                queued.send_nowait(piece)

    nursery.start_soon(pump)
    async with pending:
        async for piece in pending:
            batch = [piece]
            with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                while len(batch) < MAX_TOKENS_PER_WRITE:
                    batch.append(pending.receive_nowait())
            yield batch


class InferService:
    def __init__(self, engine: LocalEngine, *, is_authorized: Callable[[str], bool],
                 quota: PeerQuota, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.is_authorized = is_authorized  # (peer_id) -> bool
        self.quota = quota
        self.metrics = metrics
        # (kind, stream, peer) -> banned?: misbehaviour goes to the network's guard
        self.on_offence: Callable[[str, Any, str], bool] = lambda kind, stream, peer: False

    def _count(self, peer: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.peer_served.labels(peer, outcome).inc()

    async def handle(self, stream: Any, peer_id: str) -> None:
        await run_handler(FrameStream(stream), stream, peer_id, self._serve, what="infer",
                          count=self._count, on_offence=self.on_offence)

    async def _serve(self, io: FrameStream, peer: str) -> str:
        msg, outcome = await first_request(
            io, InferRequest, "the first frame on /qvac/infer must be a request", peer,
            self.is_authorized)
        if msg is None:
            return outcome
        now = time.monotonic()
        refusal = self.quota.check(peer, now)
        if refusal is not None:
            await io.send(refusal)
            return "quota"
        req = GenerationRequest(
            model=msg.model,
            prompt=msg.prompt or "",
            messages=tuple({"role": m.role, "content": m.content} for m in msg.messages)
            if msg.messages else None,
            max_tokens=msg.max_tokens,
            temperature=msg.temperature,
            top_p=msg.top_p,
            top_k=DEFAULT_TOP_K if msg.top_k is None else msg.top_k,
            min_p=DEFAULT_MIN_P if msg.min_p is None else msg.min_p,
            repeat_penalty=DEFAULT_REPEAT_PENALTY if msg.repeat_penalty is None
            else msg.repeat_penalty,
            seed=msg.seed,
            stop=tuple(msg.stop),
            resume=msg.resume or "",
            grammar=msg.grammar,
        )
        self.quota.active[peer] += 1
        produced = 0
        try:
            with trio.move_on_after(msg.deadline_ms / 1000) as deadline:
                async with self.engine.generate(req) as gen:
                    await io.send(Accepted(queue_position=0,
                                           grammar=True if msg.grammar is not None else None,
                                           sampling=True if msg.sets_sampling else None))
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(cancel_on_inbound_close, io, nursery.cancel_scope)
                        async with contextlib.aclosing(_pending_batches(gen, nursery)) as out:
                            async for batch in out:
                                await io.send_all([Token(text=piece) for piece in batch])
                                produced += len(batch)
                        nursery.cancel_scope.cancel()
                    if gen.result.finish_reason == "cancelled" or io.eof:
                        return "cancelled"
                    await io.send(Done(finish_reason=gen.result.finish_reason,
                                       prompt_tokens=gen.result.prompt_tokens,
                                       completion_tokens=gen.result.completion_tokens))
                    produced = gen.result.completion_tokens
            if deadline.cancelled_caught:
                await try_send(io, Error(ErrorCode.DEADLINE, f"deadline of {msg.deadline_ms} ms"
                                          " passed"))
                return "deadline"
            return "served"
        except EngineError as e:
            await io.send(Error(error_code(e.code), e.message, retry_after=e.retry_after))
            return e.code.lower()
        finally:
            self.quota.active[peer] -= 1
            self.quota.spend(peer, produced, time.monotonic())
