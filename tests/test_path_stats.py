"""The router's per-path numbers (issue 8): RTT and delegated tokens/s are kept per peer
and per path (direct, relayed), shown in /qvac/peers, and the score uses the current
path's numbers, direct before relayed. A real PeerTable and RemoteInference; only the
network (which path each peer is on) is a stand-in."""

from __future__ import annotations

import json
import time

from test_network_support import DEVICE

from peers.records import CapacityRecord, ModelInfo
from peers.table import PeerTable
from qvacd.delegation import RemoteInference, _Attempt

SHA = "ab" * 32
MODEL = ModelInfo(sha256=SHA, name="gemma3-270m", size=1, loaded=True, memory=1)
P1, P2 = "12D3KooWPeerOne", "12D3KooWPeerTwo"


class Roles:
    def roles_of(self, peer_id: str) -> frozenset[str]:
        return frozenset({"provider"})


class Net:
    def __init__(self) -> None:
        self.table = PeerTable(Roles())
        self.paths: dict[str, str | None] = {}

    def peer_path(self, peer: str) -> tuple[str | None, str | None]:
        return self.paths.get(peer), "R" if self.paths.get(peer) == "relayed" else None

    def stream_path(self, stream: FakeStream) -> str:
        return "relayed" if self.paths.get(stream.peer) == "relayed" else "direct"


class FakeStream:
    """A stream to `peer`; Net says which path it runs over."""

    def __init__(self, peer: str) -> None:
        self.peer = peer


class FakeFrames:
    """Stands in for the FrameStream of an attempt: only its `stream` is looked at."""

    def __init__(self, peer: str) -> None:
        self.stream = FakeStream(peer)


def setup(tps1: float, tps2: float) -> tuple[Net, RemoteInference]:
    net = Net()
    now = time.time()
    for peer, tps in ((P1, tps1), (P2, tps2)):
        rec = CapacityRecord.issue(peer, 1, DEVICE, now=now, ttl_s=60, models=(MODEL,),
                                   slots_total=1, slots_free=1, tokens_per_s={SHA: tps})
        net.table.update_record(peer, rec, now=now)
    return net, RemoteInference("me", net)


def order(ri: RemoteInference) -> list[str]:
    return [c.peer_id for c in ri.candidates("gemma3-270m")]


def test_direct_before_relayed_whatever_the_speed() -> None:
    net, ri = setup(50.0, 40.0)
    net.paths = {P1: "direct", P2: "direct"}
    assert order(ri) == [P1, P2]  # the faster advertised rate wins on equal paths
    net.paths[P1] = "relayed"
    assert order(ri) == [P2, P1]  # ... but direct comes first
    net.paths[P1] = None  # not connected: a dial prefers direct, so not ranked as relayed
    assert order(ri) == [P1, P2]


def test_score_uses_the_current_paths_measured_numbers() -> None:
    net, ri = setup(50.0, 40.0)
    net.paths = {P1: "direct", P2: "direct"}
    # P1 delegated slowly over the direct path: its measured rate replaces the advertised
    net.table.record_path(P1, "direct", tokens_per_s=10.0)
    assert order(ri) == [P2, P1]
    # a fast measurement on another path does not count while the path is direct
    net.table.record_path(P1, "relayed", tokens_per_s=500.0)
    assert order(ri) == [P2, P1]
    # equal rates: the current path's RTT decides
    net.table.record_path(P1, "direct", tokens_per_s=70.0)  # EWMA: (10 + 70) / 2 = 40
    assert net.table.path_stats(P1, "direct").tokens_per_s == 40.0
    net.table.record_path(P1, "direct", rtt_ms=2.0)
    net.table.record_path(P2, "direct", rtt_ms=9.0)
    net.table.record_path(P2, "relayed", rtt_ms=1.0)  # not P2's current path
    assert order(ri) == [P1, P2]
    net.table.record_path(P1, "direct", rtt_ms=30.0)  # (2 + 30) / 2 = 16 > 9
    assert order(ri) == [P2, P1]


def test_paths_are_shown_and_bounded_to_known_paths() -> None:
    net, _ = setup(1.0, 1.0)
    t = net.table
    t.record_path(P1, "relayed", rtt_ms=12.3456, tokens_per_s=33.333)
    t.record_path(P1, "direct", rtt_ms=0.5)
    t.record_path(P1, None, rtt_ms=1.0)  # no connection: nothing to file it under
    t.record_path(P1, "carrier-pigeon", rtt_ms=1.0)
    t.record_path("12D3KooWUnknown", "direct", rtt_ms=1.0)  # not in the table: ignored
    t.record_path(P1, "direct", tokens_per_s=0.0)  # no rate: not a sample
    snap = {p["peer_id"]: p for p in json.loads(json.dumps(t.snapshot()))}
    assert snap[P1]["paths"] == {
        "relayed": {"rtt_ms": 12.346, "tokens_per_s": 33.33, "rtt_samples": 1, "streams": 1},
        "direct": {"rtt_ms": 0.5, "tokens_per_s": None, "rtt_samples": 1, "streams": 0},
    }
    assert snap[P2]["paths"] == {}
    assert "12D3KooWUnknown" not in snap


def test_decode_rate_of_a_stream_is_filed_under_its_path() -> None:
    net, ri = setup(1.0, 1.0)
    a = _Attempt(P1, io=FakeFrames(P1), state=None)  # type: ignore[arg-type]
    assert a.decode_rate() is None  # no tokens
    a.tokens, a.first_token, a.last_token = 3, 10.0, 11.0
    assert a.decode_rate() is None  # too short to tell
    a.tokens, a.last_token = 21, 12.0
    assert a.decode_rate() == 10.0  # 20 gaps in 2 s
    net.paths[P1] = "relayed"
    ri._record_rate(a)
    ri._record_rate(_Attempt(P1, io=None, state=None))  # type: ignore[arg-type] # no rate
    assert net.table.path_stats(P1, "relayed").tokens_per_s == 10.0
    assert net.table.path_stats(P1, "relayed").streams == 1
    assert net.table.path_stats(P1, "direct") is None
