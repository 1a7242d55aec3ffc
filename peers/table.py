"""Who is on the mesh, as this node sees it: one entry per peer id.

Pure state, no I/O and no trio: the network writes it (discovery, capacity fetches,
connection events), the router reads it (records, RTT, back-off), the API shows it.
Trust is not copied into entries; it is read from the trust store every time it is asked
for, so `qvacd trust add` takes effect without anything being refreshed.

Times are wall-clock seconds (`time.time()`), because record expiry is wall-clock too;
every method takes an optional `now` so tests need no clock tricks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from peers.identity import short_peer_id
from peers.records import CapacityRecord

log = logging.getLogger("qvacd.peers.table")

SOURCES = ("bootstrap", "mdns", "dht", "inbound", "outbound", "manual")

BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 300.0
MAX_ADDRS = 16
PATHS = ("direct", "relayed")
PATH_EWMA = 0.5  # weight of a new sample in a path's RTT and tokens/s


@dataclass
class PathStats:
    """What one path (direct or relayed) to a peer measured: capacity round trips and
    the decode rate of streams delegated over it, as moving averages."""

    rtt_ms: float | None = None
    tokens_per_s: float | None = None
    rtt_samples: int = 0
    streams: int = 0  # delegated streams measured

    def to_json(self) -> dict[str, Any]:
        return {
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 3),
            "tokens_per_s": None if self.tokens_per_s is None else round(self.tokens_per_s, 2),
            "rtt_samples": self.rtt_samples,
            "streams": self.streams,
        }


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - PATH_EWMA) * old + PATH_EWMA * new


class RoleSource(Protocol):
    def roles_of(self, peer_id: str) -> frozenset[str]: ...


@dataclass
class PeerEntry:
    peer_id: str
    source: str  # how we first heard of it, one of SOURCES
    first_seen: float
    last_seen: float
    addrs: list[str] = field(default_factory=list)
    connected: bool = False
    record: CapacityRecord | None = None
    verified_at: float | None = None  # when `record` last passed verification
    rtt_ms: float | None = None
    failures: int = 0  # consecutive; reset by a success
    backoff_until: float = 0.0
    last_error: str = ""
    # "network" when the last failure was a dial or capacity fetch (cleared as soon as
    # the peer answers again), "request" when a real request failed (cleared only by a
    # request that succeeds, so a peer that answers pings but fails work stays backed off).
    failure_kind: str = ""
    served: int = 0  # requests this peer completed for us
    failed: int = 0  # requests to this peer that failed (total, not consecutive)
    paths: dict[str, PathStats] = field(default_factory=dict)  # "direct" / "relayed"

    def available(self, now: float | None = None) -> bool:
        """False while the peer is backing off after failures."""
        now = time.time() if now is None else now
        return now >= self.backoff_until

    def is_fresh(self, max_age_s: float, now: float | None = None) -> bool:
        """A verified, unexpired record checked within the last `max_age_s` seconds."""
        now = time.time() if now is None else now
        return (
            self.record is not None
            and self.verified_at is not None
            and now - self.verified_at <= max_age_s
            and not self.record.is_expired(now)
        )


class PeerTable:
    """Peer entries keyed by peer id string, bounded to `max_peers`."""

    def __init__(self, trust: RoleSource | None = None, *, max_peers: int = 1024) -> None:
        self.trust = trust
        self.max_peers = max_peers
        self._peers: dict[str, PeerEntry] = {}

    # -- reading -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._peers

    def __iter__(self) -> Iterator[PeerEntry]:
        return iter(list(self._peers.values()))

    def get(self, peer_id: str) -> PeerEntry | None:
        return self._peers.get(peer_id)

    def roles_of(self, peer_id: str) -> frozenset[str]:
        """Roles from the trust store, now (empty if there is no store or it fails)."""
        if self.trust is None:
            return frozenset()
        try:
            return frozenset(self.trust.roles_of(peer_id))
        except Exception as exc:  # why: a broken trust file must not break listing peers
            log.warning("trust lookup for peer %s failed: %s; treating it as untrusted",
                        short_peer_id(peer_id), exc)
            return frozenset()

    def is_trusted(self, peer_id: str, role: str | None = None) -> bool:
        roles = self.roles_of(peer_id)
        return bool(roles) if role is None else role in roles

    def is_fresh(self, peer_id: str, max_age_s: float, now: float | None = None) -> bool:
        entry = self._peers.get(peer_id)
        return entry is not None and entry.is_fresh(max_age_s, now)

    def available(self, now: float | None = None) -> list[PeerEntry]:
        """Entries not currently backing off."""
        now = time.time() if now is None else now
        return [e for e in self._peers.values() if e.available(now)]

    def with_model(self, sha256: str, max_age_s: float, now: float | None = None) -> list[str]:
        """Peers whose fresh verified record lists model `sha256`."""
        now = time.time() if now is None else now
        return [
            e.peer_id
            for e in self._peers.values()
            if e.is_fresh(max_age_s, now)
            and e.record is not None
            and any(m.sha256 == sha256 for m in e.record.models)
        ]

    # -- writing -------------------------------------------------------------------------

    def upsert(
        self,
        peer_id: str,
        *,
        source: str,
        addrs: Iterable[str] = (),
        now: float | None = None,
    ) -> PeerEntry:
        """The entry for `peer_id`, created if new; `addrs` are merged (newest first)."""
        if source not in SOURCES:
            raise ValueError(f"unknown peer source {source!r}; one of {', '.join(SOURCES)}")
        now = time.time() if now is None else now
        entry = self._peers.get(peer_id)
        if entry is None:
            self._evict_if_full()
            entry = PeerEntry(peer_id=peer_id, source=source, first_seen=now, last_seen=now)
            self._peers[peer_id] = entry
            log.info("peer discovered peer_id=%s source=%s", peer_id, source)
        entry.last_seen = now
        new = [str(a) for a in addrs]
        if new:
            merged = new + [a for a in entry.addrs if a not in new]
            entry.addrs = merged[:MAX_ADDRS]
        return entry

    def set_connected(self, peer_id: str, connected: bool, now: float | None = None) -> None:
        entry = self._peers.get(peer_id)
        if entry is not None:
            entry.connected = connected
            entry.last_seen = time.time() if now is None else now

    def update_record(
        self,
        peer_id: str,
        record: CapacityRecord,
        *,
        rtt_ms: float | None = None,
        source: str = "outbound",
        now: float | None = None,
    ) -> PeerEntry:
        """Store a record that has *already been verified* for `peer_id`.

        Never replaces a newer record with an older one (DHT reads can be stale).
        """
        if record.peer_id != peer_id:
            raise ValueError(f"record of {record.peer_id} offered for {peer_id}")
        now = time.time() if now is None else now
        entry = self.upsert(peer_id, source=source, addrs=record.addrs, now=now)
        if entry.record is None or record.seq >= entry.record.seq:
            entry.record = record
            entry.verified_at = now
        if rtt_ms is not None:
            entry.rtt_ms = rtt_ms
        return entry

    def record_success(
        self, peer_id: str, *, rtt_ms: float | None = None, now: float | None = None
    ) -> None:
        entry = self._peers.get(peer_id)
        if entry is None:
            return
        entry.failures = 0
        entry.backoff_until = 0.0
        entry.failure_kind = ""
        entry.served += 1
        entry.last_seen = time.time() if now is None else now
        if rtt_ms is not None:
            entry.rtt_ms = rtt_ms

    def record_reachable(
        self, peer_id: str, *, rtt_ms: float | None = None, now: float | None = None
    ) -> None:
        """The peer answered at the network level (dial, capacity); not a served request."""
        entry = self._peers.get(peer_id)
        if entry is None:
            return
        entry.last_seen = time.time() if now is None else now
        if rtt_ms is not None:
            entry.rtt_ms = rtt_ms
        if entry.failure_kind == "network":
            entry.failures, entry.backoff_until, entry.failure_kind = 0, 0.0, ""

    def record_failure(
        self,
        peer_id: str,
        error: str = "",
        *,
        kind: str = "request",
        now: float | None = None,
    ) -> float:
        """Count a failure; returns the back-off deadline (1 s, 2 s, 4 s ... 300 s).

        `kind` is "request" (the router: a request failed) or "network" (a dial or
        capacity fetch failed).
        """
        now = time.time() if now is None else now
        entry = self._peers.get(peer_id)
        if entry is None:
            return now
        entry.failures += 1
        entry.failed += 1
        entry.last_error = error[:200]
        if kind == "request" or entry.failure_kind != "request":
            entry.failure_kind = kind
        delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (entry.failures - 1))
        entry.backoff_until = now + delay
        return entry.backoff_until

    def record_path(
        self,
        peer_id: str,
        path: str | None,
        *,
        rtt_ms: float | None = None,
        tokens_per_s: float | None = None,
    ) -> None:
        """A measurement over `path` ("direct" or "relayed"; others are ignored): a
        capacity round trip, or the decode rate of a delegated stream."""
        entry = self._peers.get(peer_id)
        if entry is None or path not in PATHS:
            return
        stats = entry.paths.setdefault(path, PathStats())
        if rtt_ms is not None and rtt_ms >= 0:
            stats.rtt_ms = _ewma(stats.rtt_ms, rtt_ms)
            stats.rtt_samples += 1
        if tokens_per_s is not None and tokens_per_s > 0:
            stats.tokens_per_s = _ewma(stats.tokens_per_s, tokens_per_s)
            stats.streams += 1

    def path_stats(self, peer_id: str, path: str | None) -> PathStats | None:
        entry = self._peers.get(peer_id)
        return None if entry is None or path is None else entry.paths.get(path)

    def remove(self, peer_id: str) -> None:
        self._peers.pop(peer_id, None)

    def _evict_if_full(self) -> None:
        # why: inbound connections can come from anyone; keep the table bounded by
        # dropping the longest-unseen peer that is neither connected nor trusted.
        while len(self._peers) >= self.max_peers:
            candidates = [
                e for e in self._peers.values() if not e.connected and not self.roles_of(e.peer_id)
            ] or list(self._peers.values())
            victim = min(candidates, key=lambda e: e.last_seen)
            del self._peers[victim.peer_id]

    # -- showing -------------------------------------------------------------------------

    def snapshot(
        self, now: float | None = None, *, max_age_s: float = 30.0
    ) -> list[dict[str, Any]]:
        """JSON-ready list for GET /qvac/peers and `qvacd peers`, trusted peers first."""
        now = time.time() if now is None else now
        out = []
        for e in self._peers.values():
            roles = sorted(self.roles_of(e.peer_id))
            rec = e.record
            out.append(
                {
                    "peer_id": e.peer_id,
                    "addrs": list(e.addrs),
                    "source": e.source,
                    "connected": e.connected,
                    "trusted": bool(roles),
                    "roles": roles,
                    "fresh": e.is_fresh(max_age_s, now),
                    "verified_age_s": None
                    if e.verified_at is None
                    else round(now - e.verified_at, 3),
                    "rtt_ms": None if e.rtt_ms is None else round(e.rtt_ms, 3),
                    "paths": {p: st.to_json() for p, st in e.paths.items()},
                    "failures": e.failures,
                    "backoff_s": round(max(0.0, e.backoff_until - now), 3),
                    "available": e.available(now),
                    "last_error": e.last_error,
                    "failure_kind": e.failure_kind,
                    "served": e.served,
                    "failed": e.failed,
                    "first_seen": e.first_seen,
                    "last_seen": e.last_seen,
                    "capacity": None if rec is None else record_to_json(rec, now),
                }
            )
        out.sort(key=lambda d: (not d["trusted"], not d["connected"], d["peer_id"]))
        return out


def record_to_json(rec: CapacityRecord, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    return {
        "seq": rec.seq,
        "issued_at": rec.issued_at,
        "expires_at": rec.expires_at,
        "expired": rec.is_expired(now),
        "device": {
            "kind": rec.device.kind,
            "name": rec.device.name,
            "memory_total": rec.device.memory_total,
            "memory_free": rec.device.memory_free,
        },
        "memory_budget": rec.memory_budget,
        "models": [
            {
                "sha256": m.sha256,
                "name": m.name,
                "size": m.size,
                "loaded": m.loaded,
                "memory": m.memory,
            }
            for m in rec.models
        ],
        "slots_total": rec.slots_total,
        "slots_free": rec.slots_free,
        "queue_len": rec.queue_len,
        "tokens_per_s": dict(rec.tokens_per_s),
        "aggregate_tokens_per_s": rec.aggregate_tokens_per_s,
        "addrs": list(rec.addrs),
        "roles": list(rec.roles),
        "version": rec.version,
    }
