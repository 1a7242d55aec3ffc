"""Provider side of /qvac/embed/1.0.0: embed texts for trusted consumers.

Checks before any model work, cheapest first: the request well-formed (bounded by
EMBED_LIMITS while decoding) -> the caller authorized: the same rule as generation
(`consumer` role, or a public donor), because an embedding costs this node the same
kind of work and memory as a prompt -> the per-peer stream limit shared with
/qvac/infer (PeerQuota; embeddings are not counted in its tokens per minute, which
meters generated tokens) -> the engine (model known, fits, input lengths). Embedding
runs on *this* engine only: a provider never re-delegates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import trio

from models.embedding import EmbeddingResult
from models.engine import EngineError
from protocol import (
    EMBED_LIMITS,
    MAX_EMBED_PIECE,
    EmbedDone,
    EmbedRequest,
    EmbedVectors,
    Error,
    ErrorCode,
)

from ..p2p_io import FrameStream, cancel_on_inbound_close, error_code, try_send
from ._provider import first_request, run_handler

if TYPE_CHECKING:
    from ..metrics import Metrics
    from .infer import PeerQuota

log = logging.getLogger("qvacd.embed")



class EmbeddingEngine(Protocol):
    """What this service needs of models.engine.Engine."""

    async def embed(self, model: str, inputs: list[str], *,
                    truncate: bool = True) -> EmbeddingResult: ...


def vector_frames(vectors: list[list[float]]) -> list[EmbedVectors]:
    """The answer as runs of whole little-endian float32 vectors, each frame's data at
    most MAX_EMBED_PIECE bytes."""
    if not vectors:
        return []
    packed = np.asarray(vectors, dtype="<f4")
    dims = packed.shape[1]
    per_frame = max(1, MAX_EMBED_PIECE // (4 * dims))
    return [EmbedVectors(first=i, dims=dims, data=packed[i:i + per_frame].tobytes())
            for i in range(0, len(packed), per_frame)]


class EmbedService:
    def __init__(self, engine: EmbeddingEngine, *, is_authorized: Callable[[str], bool],
                 quota: PeerQuota, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.is_authorized = is_authorized  # (peer_id) -> bool
        self.quota = quota
        self.metrics = metrics
        # (kind, stream, peer) -> banned?: misbehaviour goes to the network's guard
        self.on_offence: Callable[[str, Any, str], bool] = lambda kind, stream, peer: False

    async def handle(self, stream: Any, peer_id: str) -> None:
        await run_handler(FrameStream(stream, EMBED_LIMITS), stream, peer_id, self._serve,
                          what="embed", count=self._count, on_offence=self.on_offence)

    def _count(self, peer: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.peer_served.labels(peer, f"embed_{outcome}").inc()

    async def _serve(self, io: FrameStream, peer: str) -> str:
        msg, outcome = await first_request(
            io, EmbedRequest, "the first frame on /qvac/embed must be an embed request", peer,
            self.is_authorized)
        if msg is None:
            return outcome
        refusal = self.quota.check(peer, time.monotonic())
        if refusal is not None:
            await io.send(refusal)
            return "quota"
        self.quota.active[peer] += 1
        try:
            with trio.move_on_after(msg.deadline_ms / 1000) as deadline:
                done: list[EmbeddingResult | EngineError] = []

                async def work() -> None:
                    # The EngineError is kept, not raised: out of a nursery it would come
                    # wrapped in an exception group.
                    try:
                        done.append(await self.engine.embed(
                            msg.model, list(msg.inputs), truncate=msg.truncate))
                    except EngineError as e:
                        done.append(e)
                    nursery.cancel_scope.cancel()

                async with trio.open_nursery() as nursery:
                    # The consumer closing or resetting its side gives up the request.
                    nursery.start_soon(cancel_on_inbound_close, io, nursery.cancel_scope)
                    nursery.start_soon(work)
                if not done:
                    return "cancelled"
                if isinstance(done[0], EngineError):
                    raise done[0]
                result = done[0]
                for frame in vector_frames(result.vectors):
                    await io.send(frame)
                await io.send(EmbedDone(count=len(result.vectors),
                                        prompt_tokens=result.prompt_tokens))
            if deadline.cancelled_caught:
                await try_send(io, Error(ErrorCode.DEADLINE,
                                          f"deadline of {msg.deadline_ms} ms passed"))
                return "deadline"
            return "served"
        except EngineError as e:
            await io.send(Error(error_code(e.code), e.message, retry_after=e.retry_after))
            return e.code.lower()
        finally:
            self.quota.active[peer] -= 1
