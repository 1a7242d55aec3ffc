"""What the dashboard shows of this node's traffic: requests in flight and recent ones
(who served them, tokens, tokens/s), and tokens/s over the last minutes.

The HTTP API calls `begin`/`end` around each inference it runs (qvacd/api.py,
InferenceResponse), so the numbers are the ones its clients saw, wherever the answer
was generated. `run` samples once a second into a ring buffer for the chart: the
tokens delivered to this node's clients in that second, and the engine's own
aggregate rate (which includes work done for peers).
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

RECENT = 50  # finished requests kept
HISTORY_S = 300  # seconds of tokens/s kept for the chart


@dataclass
class RequestRecord:
    """One inference request through this node's API."""

    id: int
    endpoint: str
    model: str
    stream: bool
    started: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.monotonic)
    first_token: float | None = None  # monotonic
    ended: float | None = None  # monotonic
    tokens: int = 0
    served_by: list[str] = field(default_factory=list)
    where: str | None = None  # "local" or "remote", once routed
    status: int | None = None
    outcome: str = "running"  # running | done | cancelled | error
    error: str | None = None

    def tokens_per_s(self, now: float | None = None) -> float | None:
        """Generation speed as the client saw it: tokens after the first over the time
        since the first (the prompt's processing is time to first token, not speed)."""
        if self.first_token is None or self.tokens < 2:
            return None
        end = self.ended if self.ended is not None else (now or time.monotonic())
        span = end - self.first_token
        return round((self.tokens - 1) / span, 2) if span > 0 else None

    def to_json(self, now: float) -> dict[str, Any]:
        end = self.ended if self.ended is not None else now
        return {
            "id": self.id, "endpoint": self.endpoint, "model": self.model,
            "stream": self.stream, "started": self.started,
            "elapsed_s": round(end - self.t0, 3),
            "ttft_s": None if self.first_token is None else round(self.first_token - self.t0, 3),
            "tokens": self.tokens, "tokens_per_s": self.tokens_per_s(now),
            "served_by": list(self.served_by), "where": self.where,
            "status": self.status, "outcome": self.outcome, "error": self.error,
        }


class ActivityRecorder:
    """In-flight and recent requests, and a once-a-second tokens/s history."""

    def __init__(self, recent: int = RECENT, history_s: int = HISTORY_S) -> None:
        self._ids = itertools.count(1)
        self.in_flight: dict[int, RequestRecord] = {}
        self.recent: collections.deque[RequestRecord] = collections.deque(maxlen=recent)
        # (unix time, tokens/s delivered to clients, engine aggregate tokens/s)
        self.history: collections.deque[tuple[float, float, float]] = \
            collections.deque(maxlen=history_s)
        self._delivered = 0  # tokens delivered to clients since start, all requests

    # -- the API's side --

    def begin(self, endpoint: str, model: str, *, stream: bool) -> RequestRecord:
        rec = RequestRecord(next(self._ids), endpoint, model, stream)
        self.in_flight[rec.id] = rec
        return rec

    def routed(self, rec: RequestRecord, served_by: list[str], where: str) -> None:
        # The router's own list: a failover appends to it, and the page shows that.
        rec.served_by, rec.where = served_by, where

    def token(self, rec: RequestRecord) -> None:
        if rec.first_token is None:
            rec.first_token = time.monotonic()
        rec.tokens += 1
        self._delivered += 1

    def end(self, rec: RequestRecord, status: int, *, completed: bool,
            completion_tokens: int | None = None, error: str | None = None) -> None:
        """`completed`: the answer ended on its own (stop, length); otherwise a 200
        that ended early is a client that went away."""
        if rec.ended is not None:
            return
        rec.ended = time.monotonic()
        rec.status = status
        if completion_tokens is not None and completion_tokens > rec.tokens:
            self._delivered += completion_tokens - rec.tokens
            rec.tokens = completion_tokens
        rec.error = error
        rec.outcome = ("done" if completed else "cancelled") if status == 200 else "error"
        self.in_flight.pop(rec.id, None)
        self.recent.appendleft(rec)

    # -- the chart's side --

    def sample(self, engine_tokens_per_s: float, *, now: float | None = None,
               delivered_since_last: int | None = None) -> None:
        """One point of the history (called once a second by `run`): tokens/s delivered
        to clients since the last point, and the engine's own rate."""
        self.history.append((time.time() if now is None else now,
                             float(delivered_since_last or 0), float(engine_tokens_per_s)))

    async def run(self, engine_tokens_per_s: Callable[[], float], *, interval_s: float = 1.0,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sample once per `interval_s` until cancelled (the node's nursery owns it)."""
        last = self._delivered
        task_status.started()
        next_at = prev = trio.current_time()
        while True:
            # A loop that fell behind (a blocked event loop) skips ticks instead of
            # firing a burst of them to catch up; each point still covers its real span.
            next_at = max(next_at + interval_s, trio.current_time())
            await trio.sleep_until(next_at)
            now = trio.current_time()
            span, prev = max(now - prev, 1e-3), now
            delivered, last = self._delivered - last, self._delivered
            self.sample(engine_tokens_per_s(), delivered_since_last=round(delivered / span))

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "in_flight": [r.to_json(now) for r in self.in_flight.values()],
            "recent": [r.to_json(now) for r in self.recent],
            "history": {"interval_s": 1.0,
                        "points": [[round(t, 1), d, round(e, 2)] for t, d, e in self.history]},
        }


__all__ = ["ActivityRecorder", "RequestRecord"]
