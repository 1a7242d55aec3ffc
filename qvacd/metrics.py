"""Prometheus metrics of one node (own registry, so tests and several nodes in one
process never collide)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "qvacd_requests", "HTTP inference requests", ["endpoint", "status"], registry=r
        )
        self.tokens = Counter(
            "qvacd_tokens_generated", "Tokens streamed to clients", ["model", "served_by"],
            registry=r,
        )
        self.ttft = Histogram(
            "qvacd_time_to_first_token_seconds", "Time from request to first token",
            ["model", "where"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.queue_length = Gauge("qvacd_queue_length", "Requests waiting for a slot", registry=r)
        self.slots_free = Gauge("qvacd_slots_free", "Free parallel sequences", registry=r)
        self.sequences = Gauge("qvacd_parallel_sequences",
                               "Parallel sequences of the models known to the engine", registry=r)
        self.aggregate_tps = Gauge("qvacd_aggregate_tokens_per_second",
                                   "Tokens/s generated over the last 10 s, all sequences",
                                   registry=r)
        self.peer_requests = Counter(
            "qvacd_peer_requests", "Requests delegated to peers", ["peer", "outcome"], registry=r
        )
        self.peer_served = Counter(
            "qvacd_p2p_served", "Inference streams served to peers", ["peer", "outcome"],
            registry=r,
        )
        self.failovers = Counter("qvacd_failovers", "Mid-stream failovers", registry=r)
        # A gauge mirroring the network's own counters (they live in peers/).
        self.records_rejected = Gauge(
            "qvacd_records_rejected_total", "Capacity records rejected, by reason", ["reason"],
            registry=r,
        )
        self._before_scrape: list[Callable[[], None]] = []

    def on_scrape(self, fn: Callable[[], None]) -> None:
        self._before_scrape.append(fn)

    def render(self) -> bytes:
        for fn in self._before_scrape:
            fn()
        return generate_latest(self.registry)
