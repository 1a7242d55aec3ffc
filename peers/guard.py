"""Bans untrusted peers, and the addresses they come from, that keep misbehaving.

Rate limits alone do not protect a node on a LAN: every refused capacity request, every
malformed frame and every garbage handshake still costs a stream, a multistream-select
round and some msgpack, in Python. A hostile node flooding at full speed took a trusted
node's tokens/s to 0.37x in the mesh lab. So misbehaviour is scored, and past a
threshold the peer is cut off where it is cheapest:

- its connections are closed and its peer id refused right after the handshake;
- its IP is refused at TCP accept, before Noise (a key per connection does not help an
  attacker then), unless a trusted peer is connected from that IP (NAT, shared hosts);
- we stop dialling it.

Scores decay, so an honest peer that once sent a burst is never banned, and a ban lasts
`ban_s`, doubling for a repeat offender up to `max_ban_s`. Trusted peers (any role) are
never banned: their owner vouched for them, and their own limits still apply.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from peers.identity import short_peer_id

if TYPE_CHECKING:
    import trio

log = logging.getLogger("qvacd.peers.guard")

# Offence weights: how much each kind of misbehaviour adds to a score.
OFFENCES: dict[str, float] = {
    "rate_limited": 1.0,  # a request refused by a rate limit (bursts are allowed first)
    "busy": 0.5,  # refused because too many of its streams are open
    "protocol": 4.0,  # a malformed frame or an unexpected message
    "unauthorized": 2.0,  # asked for something its roles do not allow
    "handshake": 3.0,  # a TCP connection that did not complete a libp2p handshake
    # a pairing attempt that failed (wrong code) or was refused (no such offer): one
    # online guess at a code each, so a flood of them is banned within a few tries
    "pairing": 5.0,
}


@dataclass
class GuardConfig:
    threshold: float = 30.0  # score that triggers a ban
    decay_per_s: float = 2.0  # score forgiven per second
    ban_s: float = 60.0  # first ban; doubles for each repeat, up to max_ban_s
    max_ban_s: float = 3600.0
    max_tracked: int = 4096  # peers and IPs scored at once (bounded memory)


class _Score:
    __slots__ = ("value", "stamp", "banned_until", "bans")

    def __init__(self, now: float) -> None:
        self.value = 0.0
        self.stamp = now
        self.banned_until = 0.0
        self.bans = 0


class PeerGuard:
    """Scores offences by peer id and by IP; answers whether either is banned."""

    def __init__(
        self,
        is_trusted: Callable[[str], bool],
        trusted_ips: Callable[[], set[str]] = set,
        config: GuardConfig | None = None,
        on_ban: Callable[[str], None] = lambda peer: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.is_trusted = is_trusted
        self.trusted_ips = trusted_ips
        self.config = config or GuardConfig()
        self.on_ban = on_ban  # called with a banned peer id: close its connections
        self.clock = clock
        self._peers: dict[str, _Score] = {}
        self._ips: dict[str, _Score] = {}
        self.bans_total = 0
        self.refused_total = 0
        self._ip_ban = _Signal()

    # -- scoring ----------------------------------------------------------------------

    def offence(self, kind: str, *, peer: str | None = None, ip: str | None = None) -> bool:
        """Count one offence; True when it put the peer (or IP) under a ban."""
        weight = OFFENCES[kind]
        now = self.clock()
        banned = False
        if peer is not None and not self.is_trusted(peer):
            if self._add(self._peers, peer, weight, now):
                banned = True
                log.warning("banned peer %s for %.0f s after repeated %s offences; closing"
                            " its connections", short_peer_id(peer),
                            self._peers[peer].banned_until - now, kind)
                self.on_ban(peer)
        # why the IP exceptions: behind NAT a trusted peer may share the offender's address
        trusted_peer = peer is not None and self.is_trusted(peer)
        if ip is not None and not trusted_peer and ip not in self.trusted_ips():
            if self._add(self._ips, ip, weight, now):
                banned = True
                log.warning("refusing connections from %s for %.0f s after repeated %s"
                            " offences", ip, self._ips[ip].banned_until - now, kind)
                self._ip_ban.fire()
        return banned

    def _add(self, table: dict[str, _Score], key: str, weight: float, now: float) -> bool:
        s = table.get(key)
        if s is None:
            if len(table) >= self.config.max_tracked:
                self._evict(table, now)
            s = table[key] = _Score(now)
        if s.banned_until > now:
            return False  # already banned; nothing more to do
        s.value = max(0.0, s.value - (now - s.stamp) * self.config.decay_per_s) + weight
        s.stamp = now
        if s.value < self.config.threshold:
            return False
        s.bans += 1
        s.value = 0.0
        s.banned_until = now + min(self.config.max_ban_s,
                                   self.config.ban_s * 2 ** (s.bans - 1))
        self.bans_total += 1
        return True

    def _evict(self, table: dict[str, _Score], now: float) -> None:
        """Drop entries that carry no state worth keeping; if none, the oldest quarter."""
        idle = [k for k, s in table.items()
                if s.banned_until <= now and s.value - (now - s.stamp) * self.config.decay_per_s <= 0]
        if len(idle) < len(table) // 4:
            idle = sorted(table, key=lambda k: table[k].stamp)[: max(1, len(table) // 4)]
        for k in idle:
            del table[k]

    # -- questions --------------------------------------------------------------------

    def peer_banned(self, peer: str) -> bool:
        s = self._peers.get(peer)
        if s is None or s.banned_until <= self.clock() or self.is_trusted(peer):
            return False
        return True

    def ip_banned(self, ip: str) -> bool:
        s = self._ips.get(ip)
        if s is None or s.banned_until <= self.clock():
            return False
        return ip not in self.trusted_ips()

    def allow_inbound_ip(self, ip: str) -> bool:
        """At TCP accept, before any handshake work."""
        if self.ip_banned(ip):
            self.refused_total += 1
            return False
        return True

    def allow_peer(self, peer: str) -> bool:
        """After the handshake, once the peer id is known (inbound and outbound)."""
        if self.peer_banned(peer):
            self.refused_total += 1
            return False
        return True

    def banned_ips(self) -> list[str]:
        """IPs under a ban now (trusted peers' IPs excepted)."""
        now = self.clock()
        safe = self.trusted_ips()
        return [k for k, s in self._ips.items() if s.banned_until > now and k not in safe]

    def ip_banned_event(self) -> trio.Event:
        """A trio.Event set at the next IP ban (a new one after each)."""
        return self._ip_ban.event()

    def banned(self) -> dict[str, list[dict[str, float | str]]]:
        """Current bans, for status and tests."""
        now = self.clock()
        return {
            "peers": [{"peer_id": k, "remaining_s": round(s.banned_until - now, 1)}
                      for k, s in self._peers.items() if s.banned_until > now],
            "ips": [{"ip": k, "remaining_s": round(s.banned_until - now, 1)}
                    for k, s in self._ips.items() if s.banned_until > now],
        }


class _Signal:
    """A re-armable trio.Event, created lazily (the guard is built outside trio)."""

    def __init__(self) -> None:
        self._event: trio.Event | None = None

    def event(self) -> trio.Event:
        import trio

        if self._event is None or self._event.is_set():
            self._event = trio.Event()
        return self._event

    def fire(self) -> None:
        if self._event is not None:
            self._event.set()
