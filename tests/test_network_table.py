"""PeerTable: pure state, no network."""

from __future__ import annotations

import json

import pytest
from test_network_support import DEVICE

from peers.records import CapacityRecord, ModelInfo
from peers.table import BACKOFF_MAX_S, PeerTable

P1 = "12D3KooWPeerOne"
P2 = "12D3KooWPeerTwo"


class Roles:
    def __init__(self) -> None:
        self.roles: dict[str, frozenset[str]] = {}

    def roles_of(self, peer_id: str) -> frozenset[str]:
        return self.roles.get(peer_id, frozenset())


def rec(peer: str, seq: int, now: float, models: tuple[ModelInfo, ...] = ()) -> CapacityRecord:
    return CapacityRecord.issue(peer, seq, DEVICE, now=now, ttl_s=60, models=models)


def test_backoff_is_exponential_and_capped_and_reset_by_success() -> None:
    t = PeerTable()
    t.upsert(P1, source="bootstrap", now=0)
    deadlines = [t.record_failure(P1, "boom", now=100) - 100 for _ in range(12)]
    assert deadlines[:5] == [1, 2, 4, 8, 16]
    assert deadlines[-1] == BACKOFF_MAX_S
    e = t.get(P1)
    assert not e.available(now=100 + 299) and e.available(now=100 + 300)
    assert e.failed == 12 and e.failures == 12
    t.record_success(P1, rtt_ms=3.5, now=101)
    assert e.available(now=101) and e.failures == 0 and e.served == 1 and e.rtt_ms == 3.5
    assert e.failed == 12  # the total stays


def test_network_failures_clear_on_answer_but_request_failures_do_not() -> None:
    t = PeerTable()
    t.upsert(P1, source="mdns", now=0)
    t.record_failure(P1, "dial failed", kind="network", now=10)
    t.record_reachable(P1, now=10.5)
    assert t.get(P1).available(now=10.5)
    t.record_failure(P1, "inference died", kind="request", now=20)
    t.record_failure(P1, "capacity timeout", kind="network", now=20)
    t.record_reachable(P1, now=20.1)  # answering a capacity request is not serving work
    assert not t.get(P1).available(now=20.1)


def test_records_freshness_and_no_downgrade() -> None:
    t = PeerTable()
    sha = "e" * 64
    t.update_record(P1, rec(P1, 5, 1000, (ModelInfo(sha, "m", 1, True, 1),)), now=1000)
    assert t.is_fresh(P1, 10, now=1005) and not t.is_fresh(P1, 10, now=1011)
    assert not t.is_fresh(P1, 1000, now=1061)  # the record itself expired
    assert t.with_model(sha, 30, now=1001) == [P1]
    t.update_record(P1, rec(P1, 4, 1001), now=1001)  # an older (stale DHT) copy
    assert t.get(P1).record.seq == 5
    with pytest.raises(ValueError):
        t.update_record(P2, rec(P1, 9, 1001))
    assert not t.is_fresh(P2, 10)


def test_snapshot_is_json_and_flags_untrusted_live() -> None:
    roles = Roles()
    t = PeerTable(roles)
    t.update_record(P1, rec(P1, 1, 1000), rtt_ms=1.25, source="inbound", now=1000)
    t.upsert(P2, source="dht", addrs=["/ip4/10.0.0.2/tcp/4001"], now=1000)
    snap = t.snapshot(now=1001)
    json.dumps(snap)
    assert [p["trusted"] for p in snap] == [False, False]
    roles.roles[P2] = frozenset({"provider", "seeder"})  # `qvacd trust add`, no refresh
    snap = t.snapshot(now=1001)
    assert snap[0]["peer_id"] == P2 and snap[0]["roles"] == ["provider", "seeder"]
    one = next(p for p in snap if p["peer_id"] == P1)
    assert one["fresh"] and one["rtt_ms"] == 1.25 and one["source"] == "inbound"
    assert one["capacity"]["seq"] == 1 and not one["trusted"]
    assert t.is_trusted(P2, "seeder") and not t.is_trusted(P1)


def test_table_is_bounded_and_keeps_connected_and_trusted() -> None:
    roles = Roles()
    roles.roles["keep-trusted"] = frozenset({"consumer"})
    t = PeerTable(roles, max_peers=3)
    t.upsert("keep-trusted", source="manual", now=0)
    t.upsert("keep-connected", source="inbound", now=1)
    t.set_connected("keep-connected", True, now=1)
    t.upsert("old", source="inbound", now=2)
    t.upsert("new", source="inbound", now=3)
    assert {e.peer_id for e in t} == {"keep-trusted", "keep-connected", "new"}
    with pytest.raises(ValueError):
        t.upsert("x", source="carrier-pigeon")
