"""Decides where a generation runs: on this device, or on a trusted peer.

The API only sees `RoutedGeneration`: an async iterator of text pieces, the list of
nodes that served it (more than one after a failover), and the final result.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from models.engine import EngineError, GenerationRequest, GenerationResult

from .local_engine import LocalEngine


class RoutedGeneration:
    def __init__(self, served_by: list[str], where: str, result: GenerationResult) -> None:
        self.served_by = served_by
        self.where = where  # "local" or "peer": a metrics label
        self.result = result
        self._pieces: AsyncIterator[str] | None = None

    def __aiter__(self) -> AsyncIterator[str]:
        assert self._pieces is not None
        return self._pieces


class RemoteGenerator(Protocol):
    """What the router needs of the peer side (qvacd.delegation.RemoteInference)."""

    def has_candidates(self, model: str) -> bool: ...

    def generate(self, req: GenerationRequest, *, local_reason: EngineError | None = None
                 ) -> AbstractAsyncContextManager[RoutedGeneration]: ...


class Router:
    def __init__(self, node_id: str, engine: LocalEngine, *, delegate: str = "auto",
                 overflow: bool = True, remote: RemoteGenerator | None = None) -> None:
        self.node_id = node_id
        self.engine = engine
        self.delegate = delegate
        self.overflow = overflow
        # The peer side plugs in here (qvacd.delegation.RemoteInference) once the
        # network runs; without it every request is local.
        self.remote = remote

    def _local_ok(self, req: GenerationRequest, local_only: bool) -> tuple[bool, EngineError | None]:
        """Can and should this device run the request? (False, why) when not."""
        try:
            entry = self.engine.resolve(req.model)
            self.engine.check_fits(entry)
        except EngineError as e:
            return False, e
        if local_only or self.remote is None or self.delegate == "never":
            return True, None
        if self.delegate == "always":
            return False, None
        if self.overflow and not self.engine.slot_free(entry) and self.remote.has_candidates(req.model):
            return False, None
        return True, None

    @contextlib.asynccontextmanager
    async def generate(self, req: GenerationRequest, *, local_only: bool = False
                       ) -> AsyncIterator[RoutedGeneration]:
        ok, why = self._local_ok(req, local_only)
        if ok:
            async with self.engine.generate(req) as gen:
                routed = RoutedGeneration([self.node_id], "local", gen.result)
                routed._pieces = gen.__aiter__()
                yield routed
            return
        if local_only or self.remote is None or self.delegate == "never":
            assert why is not None
            raise why
        async with self.remote.generate(req, local_reason=why) as routed:
            yield routed
