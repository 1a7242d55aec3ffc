"""Misbehaviour, put into effect on this host: score an offence seen on a stream, close a
banned peer's connections, and keep the kernel's drop filter equal to the banned IPs.

peers/guard.py decides (scores, thresholds, ban lengths) and knows nothing of libp2p;
this module is where its verdicts meet the swarm: which IP a stream came from, which
IPs our trusted peers connect from, which listening sockets to filter.
"""

from __future__ import annotations

import logging
import socket
from collections import Counter

import trio
from libp2p.abc import IHost, INetStream

from peers.guard import PeerGuard
from peers.identity import as_id
from peers.reachability import is_relayed
from peers.sockfilter import attach as attach_kernel_filter
from peers.sockfilter import supported as kernel_filter_supported
from peers.table import PeerTable

log = logging.getLogger("qvacd.peers.network")


def score_offence(guard: PeerGuard, kind: str, stream: INetStream, peer: str) -> bool:
    """Score one offence by `peer` (and its IP) on `stream`; True if it is now banned."""
    ip = None
    # why not on a relayed stream: its remote address is the relay's, and banning it
    # would cut every peer behind that relay
    if not is_relayed(stream):
        try:
            addr = stream.get_remote_address()
            ip = addr[0] if addr else None
        except Exception:
            pass
    return guard.offence(kind, peer=peer, ip=ip)


def trusted_ips(libp2p: IHost, table: PeerTable) -> set[str]:
    """The IPs our trusted peers are connected from (never banned by IP)."""
    ips: set[str] = set()
    for pid, conns in list(libp2p.get_network().connections.items()):
        if not table.is_trusted(pid.to_base58()):
            continue
        for conn in conns if isinstance(conns, (list, tuple, set)) else [conns]:
            try:
                addr = conn.muxed_conn.get_remote_address()
            except Exception:
                continue
            if addr:
                ips.add(addr[0])
    return ips


async def close_peer(libp2p: IHost, peer: str) -> None:
    with trio.move_on_after(2):
        try:
            await libp2p.get_network().close_peer(as_id(peer))
        except Exception as exc:
            log.debug("closing banned peer %s failed: %s", peer, exc)


async def kernel_filter_loop(libp2p: IHost, guard: PeerGuard, counters: Counter[str]) -> None:
    """Keep the listening sockets' kernel filter equal to the banned IPs (see
    peers.sockfilter): new bans go in at once, expired ones leave within 2 s."""
    if not kernel_filter_supported():
        return
    installed: frozenset[str] = frozenset()
    while True:
        with trio.move_on_after(2.0):
            await guard.ip_banned_event().wait()
        want = frozenset(guard.banned_ips())
        if want == installed:
            continue
        socks = []
        for listener in list(libp2p.get_network().listeners.values()):
            for sl in getattr(listener, "listeners", ()):
                sock = getattr(sl, "socket", None)
                if sock is not None and sock.family == socket.AF_INET:
                    socks.append(sock)
        try:
            for sock in socks:
                attach_kernel_filter(sock, want)
            installed = want
            counters["kernel_filter_updates"] += 1
            log.info("kernel drops TCP from %d banned addresses", len(want))
        except OSError as exc:  # not permitted here: the userland refusal still works
            log.warning(
                "cannot install the kernel filter for banned addresses: %s; stopped trying, "
                "banned addresses are still refused after accept", exc,
            )
            return
