"""PeerGuard scoring: decay, thresholds, doubling bans, trusted peers and shared IPs."""

from __future__ import annotations

import socket

import pytest

from peers import sockfilter
from peers.guard import GuardConfig, PeerGuard


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(trusted: set[str] = frozenset(), trusted_ips: set[str] = frozenset(),
         **cfg: float) -> tuple[PeerGuard, Clock, list[str]]:
    clock, bans = Clock(), []
    g = PeerGuard(lambda p: p in trusted, trusted_ips=lambda: set(trusted_ips),
                  config=GuardConfig(**cfg), on_ban=bans.append, clock=clock)
    return g, clock, bans


def test_a_flood_is_banned_and_the_ban_expires():
    g, clock, bans = make(threshold=10, decay_per_s=1, ban_s=60)
    hits = [g.offence("rate_limited", peer="evil", ip="10.0.0.9") for _ in range(10)]
    assert hits == [False] * 9 + [True]
    assert bans == ["evil"]
    assert g.peer_banned("evil") and g.ip_banned("10.0.0.9")
    assert not g.allow_peer("evil") and not g.allow_inbound_ip("10.0.0.9")
    assert g.refused_total == 2
    assert g.allow_inbound_ip("10.0.0.10") and g.allow_peer("someone")
    clock.t += 61
    assert not g.peer_banned("evil") and g.allow_inbound_ip("10.0.0.9")


def test_offences_spread_out_decay_and_are_never_banned():
    g, clock, bans = make(threshold=10, decay_per_s=1)
    for _ in range(100):  # one refusal a second against a decay of one a second
        assert not g.offence("rate_limited", peer="eager", ip="10.0.0.5")
        clock.t += 1.0
    assert bans == [] and not g.peer_banned("eager")


def test_a_repeat_offender_is_banned_twice_as_long_up_to_the_cap():
    g, clock, _ = make(threshold=4, ban_s=10, max_ban_s=25)
    lengths = []
    for _ in range(3):
        while not g.offence("protocol", peer="evil"):
            pass
        start = clock.t
        while g.peer_banned("evil"):
            clock.t += 1
        lengths.append(clock.t - start)
    assert lengths == [10, 20, 25]


def test_trusted_peers_and_their_ips_are_never_banned():
    g, _, bans = make(trusted={"friend"}, trusted_ips={"10.0.0.7"}, threshold=4)
    for _ in range(50):
        g.offence("protocol", peer="friend", ip="10.0.0.3")
        g.offence("handshake", ip="10.0.0.7")  # garbage from behind a friend's NAT
    assert bans == [] and not g.peer_banned("friend")
    assert not g.ip_banned("10.0.0.3") and not g.ip_banned("10.0.0.7")
    # A stranger behind the same NAT as the friend: the stranger is banned, the IP not.
    while not g.offence("protocol", peer="stranger", ip="10.0.0.7"):
        pass
    assert g.peer_banned("stranger") and not g.ip_banned("10.0.0.7")


def test_memory_stays_bounded_under_many_identities():
    g, clock, _ = make(max_tracked=64, threshold=1000)
    for i in range(10_000):
        g.offence("busy", peer=f"p{i}", ip=f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
        clock.t += 0.001
    assert len(g._peers) <= 64 and len(g._ips) <= 64


@pytest.mark.skipif(not sockfilter.supported(), reason="socket filters are Linux only")
def test_kernel_filter_drops_banned_sources_before_accept():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    port = srv.getsockname()[1]

    def connects_from(src: str) -> bool:
        c = socket.socket()
        c.bind((src, 0))
        c.settimeout(0.5)
        try:
            c.connect(("127.0.0.1", port))
            return True
        except OSError:
            return False
        finally:
            c.close()

    try:
        assert connects_from("127.0.0.2")
        sockfilter.attach(srv, ["127.0.0.2", "10.9.9.9"])
        assert not connects_from("127.0.0.2")  # the SYN was dropped: connect timed out
        assert connects_from("127.0.0.1") and connects_from("127.0.0.3")
        sockfilter.attach(srv, [])  # ban lifted
        assert connects_from("127.0.0.2")
    finally:
        srv.close()
