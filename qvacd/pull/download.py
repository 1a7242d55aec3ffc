"""One download in progress, shared by every `pull` of the same model, and its progress.

Progress goes out as Ollama-style events (status, digest, total, completed, plus our
sources, rate, resumed, fetched, dropped) to every subscriber; pull_api.py turns them
into NDJSON lines.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from models.store import ModelEntry

from .errors import PullError

plog = logging.getLogger("qvacd.pull")


@dataclass
class Download:
    """One model download: who waits for it, how to cancel it, and its progress."""

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
    # (when, bytes) of recent verified chunks, for rate()
    samples: collections.deque = field(default_factory=lambda: collections.deque(maxlen=64))

    def rate(self) -> float:
        """Bytes/s over the last ~3 s of verified chunks."""
        now = time.monotonic()
        while self.samples and now - self.samples[0][0] > 3.0:
            self.samples.popleft()
        if not self.samples:
            return 0.0
        span = max(now - self.samples[0][0], 0.25)
        return sum(n for _, n in self.samples) / span

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
                plog.exception("pull of %s: a progress subscriber failed; the download goes"
                               " on and keeps calling it", self.name or self.target)


__all__ = ["Download"]
