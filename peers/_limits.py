"""NetworkLimits: every rate, timeout and bound of the peer network in one frozen value.

One dataclass (re-exported from `peers`) so a node, a test or a bench changes a limit in
one place; each private module reads only the fields it needs.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class NetworkLimits:
    capacity_rate_per_s: float = 10.0  # inbound capacity streams per peer, sustained
    capacity_burst: int = 20  # ... and in a burst
    max_capacity_streams: int = 64  # inbound capacity handlers at once, all peers
    max_capacity_streams_per_peer: int = 4  # ... and from one peer
    capacity_timeout_s: float = 3.0  # our fetch/push: whole round trip
    capacity_read_timeout_s: float = 5.0  # serving: wait for the request frame
    refresh_interval_s: float = 5.0  # re-fetch connected peers' capacity
    republish_interval_s: float = 30.0  # re-sign and put our record in the DHT
    # Coalesce bursts of capacity_changed() (the engine calls it on every request start
    # and end): the first change goes out at once, later ones at most this often. A
    # push costs ~8 ms CPU per connected peer.
    min_push_interval_s: float = 1.0
    min_dht_publish_interval_s: float = 5.0
    reprovide_interval_s: float = 300.0  # re-announce held models (provider records)
    record_ttl_s: float = 300.0  # lifetime of our signed record
    dial_timeout_s: float = 5.0
    lookup_timeout_s: float = 5.0
    max_auto_connect: int = 64  # connect to discovered peers until this many are up
    max_parallel_fetches: int = 32
    # why 5 min: new nodes walk toward themselves on joining and so connect to us; our own
    # walk only heals (go-libp2p refreshes every 10 min); each costs ~20 streams
    discovery_max_interval_s: float = 300.0
    min_discovery_interval_s: float = 2.0
    fresh_max_age_s: float = 30.0  # "fresh" in the table snapshot / provider filtering
