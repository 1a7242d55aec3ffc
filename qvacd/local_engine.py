"""What qvacd needs of the engine on this device (models.engine.Engine), as Protocols.

The engine is rewritten on its own schedule (continuous batching today); qvacd's router,
HTTP API and infer service are typed against these Protocols instead, so a new engine
only has to keep these methods, and mypy checks it where qvacd.node hands the real
Engine over. The engine's own request and result types (GenerationRequest,
GenerationResult, EngineError) are data, imported from models.engine as they are.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from models.engine import GenerationRequest, GenerationResult
from models.store import ModelEntry


class TextGeneration(Protocol):
    """One running generation: iterate it for text pieces; `result` fills in as it runs."""

    @property
    def result(self) -> GenerationResult: ...

    def __aiter__(self) -> AsyncIterator[str]: ...


class LocalEngine(Protocol):
    """Resolve, fit, load and run models on this device (EngineError when it cannot)."""

    on_change: Callable[[], None]  # called when capacity changes (a load, an unload)

    def resolve(self, name: str) -> ModelEntry: ...

    def check_fits(self, entry: ModelEntry) -> None: ...

    def fits(self, entry: ModelEntry) -> bool: ...

    def slot_free(self, entry: ModelEntry) -> bool: ...

    def memory_needed(self, entry: ModelEntry) -> int: ...

    def loaded(self) -> set[str]: ...

    def tokens_per_s(self) -> dict[str, float]: ...

    def status(self) -> dict[str, Any]: ...

    async def preload(self, name: str) -> None: ...

    def generate(self, req: GenerationRequest) -> AbstractAsyncContextManager[TextGeneration]:
        """Admit, queue, load and run one generation; EngineError before yielding when it
        cannot run."""
        ...
