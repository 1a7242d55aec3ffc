"""Consumer side of /qvac/embed/1.0.0: embeddings from a trusted peer that holds the
model, when this node lacks it or cannot fit it (or with `--delegate always`).

Peers are chosen exactly as for generation (`RemoteInference.candidates`: an unexpired
signed capacity record listing the model, trusted with the `provider` role, not backing
off, best first). One request is one stream; any failure (cannot open, refused, broken,
garbage, past the deadline) goes to the next candidate with the same request, since an
embedding has no partial answer worth keeping. Two refusals end it at once instead: an
input too long (the client's to fix, the same on every peer).

A peer that predates this protocol refuses it in multistream-select, which is answered
at once: that peer is skipped for embeddings for LACKS_PROTOCOL_S (it keeps serving
generation; no failure is recorded against it), the next candidate is tried, and with
none left the client gets one line saying the peers holding the model are too old.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING

import numpy as np
import trio

from models.embedding import EmbeddingResult
from models.engine import BAD_REQUEST, EngineError
from peers import short_peer_id
from protocol import (
    EMBED_LIMITS,
    EMBED_PROTOCOL,
    EmbedClientState,
    EmbedDone,
    EmbedRequest,
    EmbedVectors,
    Error,
    ErrorCode,
    ProtocolError,
)

from .delegation import PeerFailed
from .p2p_io import FrameStream, StreamGone

if TYPE_CHECKING:
    from .delegation import Candidate, DelegationNetwork, RemoteInference
    from .metrics import Metrics

log = logging.getLogger("qvacd.remote_embed")

DEADLINE_S = 300.0  # the whole delegated request, every attempt together
OPEN_TIMEOUT_S = 5.0
LACKS_PROTOCOL_S = 600.0  # skip a peer that refused the protocol this long (it may upgrade)


class RemoteEmbedder:
    def __init__(self, network: DelegationNetwork, remote: RemoteInference, *,
                 metrics: Metrics | None = None, deadline_s: float = DEADLINE_S) -> None:
        self.network = network
        self.remote = remote  # its candidates() and explain(): the same choice of peers
        self.metrics = metrics
        self.deadline_s = deadline_s
        self._lacks_protocol: dict[str, float] = {}  # peer -> until (monotonic)

    def candidates(self, model: str, exclude: AbstractSet[str] = frozenset()) -> list[Candidate]:
        now = time.monotonic()
        skip = {p for p, until in self._lacks_protocol.items() if until > now}
        return self.remote.candidates(model, exclude=set(exclude) | skip)

    async def embed(self, model: str, inputs: list[str], *, truncate: bool,
                    local_reason: EngineError | None = None) -> tuple[EmbeddingResult, str]:
        """The vectors and the peer that served them. EngineError when no peer could:
        BAD_REQUEST (the provider's own words), NOT_FOUND, BUSY or UNAVAILABLE."""
        deadline = time.monotonic() + self.deadline_s
        tried: set[str] = set()
        refusals: list[str] = []
        busy: list[float] = []
        old: list[str] = []
        while time.monotonic() < deadline:
            cands = self.candidates(model, exclude=tried)
            if not cands:
                break
            peer = cands[0].peer_id
            tried.add(peer)
            await self.remote.ensure_fresh(peer)
            req = EmbedRequest(model=model, inputs=tuple(inputs), truncate=truncate,
                               deadline_ms=max(1, int((deadline - time.monotonic()) * 1000)))
            try:
                with trio.fail_after(max(0.1, deadline - time.monotonic())):
                    result = await self._ask(peer, req)
            except trio.TooSlowError:
                e = PeerFailed(peer, f"no answer within {self.deadline_s:.0f}s",
                               misbehaved=True)
            except _LacksProtocol:
                self._lacks_protocol[peer] = time.monotonic() + LACKS_PROTOCOL_S
                old.append(peer)
                refusals.append(f"{short_peer_id(peer)}: does not speak {EMBED_PROTOCOL}"
                                " (an older qvacd)")
                log.info("peer %s does not speak %s; skipping it for embeddings for %.0fs",
                         short_peer_id(peer), EMBED_PROTOCOL, LACKS_PROTOCOL_S)
                continue
            except PeerFailed as failed:
                e = failed
            else:
                self.network.table.record_success(peer)
                if self.metrics is not None:
                    self.metrics.peer_requests.labels(peer, "served").inc()
                return result, peer
            self.remote.note_failure(e, "an embedding")
            if e.refused is not None and e.refused.code == ErrorCode.BAD_REQUEST:
                raise EngineError(BAD_REQUEST, e.refused.message)
            refusals.append(f"{short_peer_id(peer)}: {e.reason}")
            if e.refused is not None and e.refused.code == ErrorCode.BUSY:
                busy.append(max(1.0, e.refused.retry_after or 1.0))
        if busy and len(busy) == len(refusals):
            raise EngineError("BUSY", "every peer holding the model is busy; retry shortly"
                              f" ({'; '.join(refusals[:3])})", retry_after=min(busy))
        if old and len(old) == len(refusals):
            raise EngineError("UNAVAILABLE", f"the peers holding {model} run a qvacd without"
                              f" embeddings over the mesh ({EMBED_PROTOCOL}); upgrade them,"
                              f" or pull {model} here (qvacd pull {model})")
        msg = self.remote.explain(model, local_reason)
        if refusals:
            msg += "; tried: " + "; ".join(refusals[:3])
        code = "NOT_FOUND" if (local_reason and local_reason.code == "NOT_FOUND"
                               and not refusals) else "UNAVAILABLE"
        raise EngineError(code, msg)

    async def _ask(self, peer: str, req: EmbedRequest) -> EmbeddingResult:
        try:
            stream = await self.network.open_stream(peer, EMBED_PROTOCOL, timeout=OPEN_TIMEOUT_S)
        except Exception as e:
            if _refused_protocol(e):
                raise _LacksProtocol() from e
            raise PeerFailed(peer, f"cannot open a stream: {e or type(e).__name__}") from e
        io = FrameStream(stream, EMBED_LIMITS)
        state = EmbedClientState(len(req.inputs))
        runs: list[np.ndarray] = []
        try:
            await io.send(req)
            while True:
                try:
                    msg = await io.recv()
                    if msg is None:
                        state.receive_eof()
                        raise AssertionError("unreachable: eof before done")  # pragma: no cover
                    state.receive(msg)
                except StreamGone as e:
                    raise PeerFailed(peer, f"connection lost: {e}") from e
                except ProtocolError as e:
                    if e.code is ErrorCode.UNAVAILABLE:  # closed before the answer ended
                        raise PeerFailed(peer, e.message) from e
                    raise PeerFailed(peer, f"sent garbage: {e}", misbehaved=True) from e
                if isinstance(msg, Error):
                    raise PeerFailed(peer, f"{msg.code}: {msg.message}", refused=msg)
                if isinstance(msg, EmbedVectors):
                    runs.append(np.frombuffer(msg.data, dtype="<f4").reshape(-1, msg.dims))
                elif isinstance(msg, EmbedDone):
                    vectors = np.concatenate(runs)
                    if not np.all(np.isfinite(vectors)):
                        raise PeerFailed(peer, "sent vectors that are not finite numbers",
                                         misbehaved=True)
                    return EmbeddingResult(vectors.astype(np.float64).tolist(),
                                           msg.prompt_tokens)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await io.reset()  # done or not, nothing more is wanted on this stream


class _LacksProtocol(Exception):
    """The peer's multistream-select refused /qvac/embed/1.0.0."""


def _refused_protocol(e: BaseException) -> bool:
    """Did opening the stream fail because the peer does not speak the protocol (as
    opposed to being unreachable)? py-libp2p words it in its MultiselectClientError,
    which StreamFailure and PeerNetwork.open_stream wrap."""
    seen: BaseException | None = e
    for _ in range(8):
        if seen is None:
            break
        # MultiselectClientError also covers timeouts and broken reads: only the
        # peer's "na" answer (ProtocolNotSupportedError's text) means it lacks it.
        if "not supported" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False
