"""Prometheus metrics of the puller (the seeder's are in qvacd/services/shard.py).

Registered once per registry: a test process that builds several pullers on one node's
registry, or replaces the node's puller, must not register the same names twice.
"""

from __future__ import annotations

import weakref

from prometheus_client import CollectorRegistry, Counter, Gauge


class PullMetrics:
    def __init__(self, r: CollectorRegistry) -> None:
        self.pull_bytes = Counter("qvacd_pull_bytes", "Verified model bytes fetched from peers",
                                  registry=r)
        self.pull_resumed_bytes = Counter(
            "qvacd_pull_resumed_bytes", "Bytes found already verified in a partial download",
            registry=r)
        self.pull_chunks = Counter("qvacd_pull_chunks", "Chunk fetches by outcome", ["outcome"],
                                   registry=r)
        self.pull_dropped = Counter("qvacd_pull_peers_dropped", "Providers dropped from a pull",
                                    ["reason"], registry=r)
        self.pulls = Counter("qvacd_pulls", "Finished pulls by outcome", ["outcome"], registry=r)
        self.pull_active = Gauge("qvacd_pull_active", "Pulls in progress", registry=r)
        self.pull_total = Gauge("qvacd_pull_total_bytes", "Size of the model being pulled",
                                ["model"], registry=r)
        self.pull_completed = Gauge("qvacd_pull_completed_bytes",
                                    "Verified bytes of the model being pulled", ["model"],
                                    registry=r)
        self.pull_rate = Gauge("qvacd_pull_rate_bytes_per_second", "Current pull rate",
                               ["model"], registry=r)
        self.pull_sources = Gauge("qvacd_pull_sources", "Providers in use by a pull", ["model"],
                                  registry=r)


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, PullMetrics] = \
    weakref.WeakKeyDictionary()


def pull_metrics(registry: CollectorRegistry | None) -> PullMetrics:
    """The PullMetrics of `registry` (a private one when None); created on first use."""
    if registry is None:
        registry = CollectorRegistry()
    m = _METRICS.get(registry)
    if m is None:
        m = _METRICS[registry] = PullMetrics(registry)
    return m


__all__ = ["PullMetrics", "pull_metrics"]
