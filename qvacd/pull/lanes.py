"""How many lanes (kept chunk streams, shard_client.ChunkLane) each provider of a pull runs.

Lanes take chunks from one shared queue, each asking for the next when it finishes, so a
faster provider takes more of them (work stealing). What this decides is how many lanes
there are. Every lane costs CPU on both ends (one more yamux stream read in smaller
pieces, more window updates, more wake-ups), and when what limits the pull is this
node's CPU (loopback, a LAN faster than Python's Noise and yamux) more lanes and more
providers add only that cost: measured on 2 cores, 3 seeders at 4 lanes each took 5.7 CPU
seconds per 253 MB pull (puller and seeders together) against 4.1 for 1 seeder at 4, and
3 seeders at 1 lane each 4.4; the 3-seeder pull was the slower one. When what limits it is
each provider's uplink, another provider adds its whole rate, and one or two lanes fill it.

So a pull starts with the lanes of one provider (`streams_per_provider`) spread over its
providers, every provider getting at least one: each is tried at once (a liar or a staller
is found and dropped as before, and a working one is a warm fallback), but three
providers cost about what one does. Then, once per window, the puller tries one more lane
on the provider delivering the most per lane, and keeps it only if the pull's aggregate
rate grew by at least half of what one lane carried on average (`gain` at the least:
window-to-window noise); a lane that added nothing is taken back and nothing more is
tried for `cooldown_s`. A provider that is dropped (stalled, lying, gone) hands its lanes to the
others, so the pull keeps its width. Pure logic, no I/O: tests/test_pull_lanes.py drives
it with a fake clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class _Trial:
    peer: str  # the provider that got one more lane
    base_rate: float  # the aggregate rate of the window before it
    base_lanes: int  # lanes in all before it


class LanePlan:
    """Lanes wanted per provider, steered by the aggregate delivery rate."""

    def __init__(self, providers: Sequence[str], *, start_lanes: int, max_per_provider: int,
                 max_total: int, now: float, window_s: float = 1.0,
                 min_window_bytes: int = 16 << 20, max_window_s: float = 4.0,
                 gain: float = 0.05, cooldown_s: float = 8.0) -> None:
        self.max_per_provider = max(1, max_per_provider)
        self.max_total = max(len(providers), max_total)
        self.window_s = window_s
        self.min_window_bytes = min_window_bytes
        self.max_window_s = max_window_s
        self.gain = gain
        self.cooldown_s = cooldown_s
        self.want: dict[str, int] = {p: 1 for p in providers}
        # the rest of the starting lanes, one at a time in provider order
        extra = min(max(start_lanes, len(providers)), self.max_total) - len(providers)
        while extra > 0 and providers:
            grew = False
            for p in providers:
                if extra > 0 and self.want[p] < self.max_per_provider:
                    self.want[p] += 1
                    extra -= 1
                    grew = True
            if not grew:
                break
        self.window_start = now
        self.window_bytes = 0
        self.by_peer: dict[str, int] = dict.fromkeys(providers, 0)  # bytes this window
        self.last_rate = 0.0  # aggregate bytes/s of the last closed window
        self.trial: _Trial | None = None
        self.hold_until = now  # no trial before this (after one that added nothing)
        self.kept = 0  # trials kept, for the log and the tests
        self.taken_back = 0

    # -- what the lanes ask ------------------------------------------------------------

    def lanes(self, peer: str) -> int:
        return self.want.get(peer, 0)

    def total(self) -> int:
        return sum(self.want.values())

    def summary(self) -> str:
        """One line for the log: lanes per provider (the end of its id), the trials."""
        lanes = ", ".join(f"{p[-8:]}: {n}" for p, n in self.want.items())
        return (f"lanes {{{lanes}}} at {self.last_rate / 1e6:.1f} MB/s in the last window;"
                f" {self.kept} added lane(s) kept, {self.taken_back} taken back as they"
                " added no rate")

    # -- what happens ------------------------------------------------------------------

    def delivered(self, peer: str, n: int) -> None:
        """`n` bytes of chunk data arrived from `peer`."""
        self.window_bytes += n
        if peer in self.by_peer:
            self.by_peer[peer] += n

    def drop(self, peer: str) -> None:
        """`peer` left the pull: its lanes go to the others, best per lane first."""
        lost = self.want.pop(peer, 0)
        self.by_peer.pop(peer, None)
        if self.trial is not None and self.trial.peer == peer:
            self.trial = None
        for _ in range(lost):
            best = self._best(self.want)
            if best is None:
                break
            self.want[best] += 1

    def tick(self, now: float) -> bool:
        """Close the window when it is long enough; judge the last trial, maybe start one.
        True when the lanes wanted changed."""
        span = now - self.window_start
        if span < self.window_s or (self.window_bytes < self.min_window_bytes
                                    and span < self.max_window_s):
            return False
        rate = self.window_bytes / span
        per_lane = {p: self.by_peer.get(p, 0) / span / n for p, n in self.want.items() if n}
        self.window_start, self.window_bytes = now, 0
        self.by_peer = dict.fromkeys(self.want, 0)
        self.last_rate = rate
        changed = False
        if self.trial is not None:
            trial, self.trial = self.trial, None
            need = max(self.gain, 0.5 / max(trial.base_lanes, 1))
            if rate < trial.base_rate * (1 + need):
                # the lane added nothing: take it back, and let the pull run a while
                if self.want.get(trial.peer, 0) > 1:
                    self.want[trial.peer] -= 1
                    changed = True
                self.taken_back += 1
                self.hold_until = now + self.cooldown_s
                return changed
            self.kept += 1
        if now < self.hold_until or rate <= 0 or self.total() >= self.max_total:
            return changed
        best = self._best({p: n for p, n in self.want.items() if per_lane.get(p, 0) > 0},
                          per_lane)
        if best is None:
            return changed
        self.want[best] += 1
        self.trial = _Trial(best, rate, self.total() - 1)
        return True

    def _best(self, among: dict[str, int], per_lane: dict[str, float] | None = None
              ) -> str | None:
        """The provider below its lane cap that delivered the most per lane (ties, and
        no measurement yet: the one with the fewest lanes, then the first)."""
        rates = per_lane or {}
        open_ = [p for p, n in among.items() if n < self.max_per_provider]
        if not open_:
            return None
        return max(open_, key=lambda p: (rates.get(p, 0.0), -self.want[p]))


__all__ = ["LanePlan"]
