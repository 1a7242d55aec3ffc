"""The puller's knobs: fan-out, memory, and how long a provider may take before it
counts as stalled. Defaults suit a LAN; tests and benches shrink the timeouts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PullOptions:
    # the most concurrent chunk streams (lanes) to one provider; a pull starts with this
    # many in all, spread over its providers, and adds more only while they add rate
    # (lanes.py)
    streams_per_provider: int = 4
    max_providers: int = 8  # providers used at once
    max_inflight: int = 16  # chunks in memory at once, all providers together
    open_timeout_s: float = 10.0  # dial + protocol negotiation
    manifest_timeout_s: float = 15.0
    stall_timeout_s: float = 15.0  # no bytes for this long: the provider is stalled
    min_rate: float = 64 * 1024  # slower than this over a whole chunk: stalled too
    dht_timeout_s: float = 5.0  # DHT provider lookup when no record lists the model
    max_busy_s: float = 120.0  # a provider busy for longer than this is dropped
    transient_retries: int = 3  # broken streams / failed dials in a row before a drop
    progress_interval_s: float = 0.25

    def chunk_deadline(self, length: int) -> float:
        """The longest one chunk of `length` bytes may take before its provider counts
        as stalled (also what a relayed circuit must have left to start one)."""
        return self.stall_timeout_s + self.open_timeout_s + length / self.min_rate


__all__ = ["PullOptions"]
