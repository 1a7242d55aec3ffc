"""Fix for py-libp2p 0.8.1's inbound-connection leak (see /shared/py-libp2p-0.8.1.md).

`Swarm._handle_inbound_connection` takes a slot from `Swarm._inbound_limiter` (250 by
default) and gives it back only when `_do_handle_inbound_connection` returns. After a
successful upgrade that function "keeps the handler alive" with
`await self.manager.wait_finished()`, which returns only when the whole swarm stops; so
every inbound connection ever accepted keeps its slot (and its task) until shutdown, and
the 251st connection is refused forever.

The fix replaces `_do_handle_inbound_connection` on one swarm *instance* (not the class,
so nothing else in the process changes) with a version that waits for the connection's
own close instead: the muxer's `event_closed` (yamux sets it on local close, remote
GO_AWAY, EOF and read errors alike), or the swarm's stop, whichever comes first. Then
the slot is released and the task ends with the connection. Everything else (connection
gate, pre-muxed transports, the upgrade itself) is delegated to the library unchanged.
"""

from __future__ import annotations

import logging
import types
from typing import Any, Protocol

import trio
from libp2p.abc import IMuxedConn, INetwork
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.swarm import Swarm

log = logging.getLogger("qvacd.peers.swarm_fix")

_ORIGINAL = Swarm._do_handle_inbound_connection
# Attribute of a patched swarm holding the admission policy (an InboundPolicy).
POLICY_ATTR = "_qvac_inbound_policy"


class InboundPolicy(Protocol):
    """What the patched accept path asks before and after the handshake (peers.guard)."""

    def allow_inbound_ip(self, ip: str) -> bool: ...

    def allow_peer(self, peer: str) -> bool: ...

    def offence(self, kind: str, *, peer: str | None = None, ip: str | None = None) -> bool: ...


def _remote_ip(read_write_closer: Any) -> str | None:
    try:
        addr = read_write_closer.get_remote_address()
    except Exception:
        return None
    return addr[0] if addr else None

_MARK = "_qvac_inbound_fix"


async def wait_conn_closed(swarm: Swarm, muxed_conn: IMuxedConn) -> None:
    """Return when `muxed_conn` has closed, or when the swarm stops."""
    closed: trio.Event | None = getattr(muxed_conn, "event_closed", None)
    async with trio.open_nursery() as nursery:

        async def _first(waiter: Any) -> None:
            await waiter()
            nursery.cancel_scope.cancel()

        nursery.start_soon(_first, swarm.manager.wait_finished)
        if isinstance(closed, trio.Event):
            nursery.start_soon(_first, closed.wait)
        else:  # why: a muxer without the event; poll its flag (none we build lacks it)

            async def _poll() -> None:
                while not muxed_conn.is_closed:
                    await trio.sleep(0.5)

            nursery.start_soon(_first, _poll)


async def _do_handle_inbound_connection(
    self: Swarm, read_write_closer: Any, maddr: Any, failure_event: Any
) -> None:
    # Pre-multiplexed transports (QUIC, WebTransport) are not built by make_host; keep
    # the library's own path for them.
    if isinstance(read_write_closer, IMuxedConn):
        await _ORIGINAL(self, read_write_closer, maddr, failure_event)
        return

    # Our admission policy (peers.guard): a banned IP costs only accept + close here.
    policy = getattr(self, POLICY_ATTR, None)
    ip = _remote_ip(read_write_closer)
    if policy is not None and ip is not None and not policy.allow_inbound_ip(ip):
        try:
            await read_write_closer.close()
        except Exception:
            pass
        return

    remote_maddr = self._build_remote_multiaddr(read_write_closer)
    if remote_maddr is not None and not await self.connection_gate.is_allowed(remote_maddr):
        log.debug("inbound connection from %s denied by connection gate", remote_maddr)
        try:
            await read_write_closer.close()
        except Exception:
            pass
        return

    raw_conn = RawConnection(read_write_closer, False)
    try:
        muxed_conn = await self.upgrade_inbound_raw_conn(raw_conn, maddr)
    except Exception as exc:
        log.debug("inbound upgrade on %s failed: %s", maddr, exc)
        if policy is not None and ip is not None:
            policy.offence("handshake", ip=ip)
        try:
            await raw_conn.close()
        except Exception:
            pass
        return
    peer = getattr(muxed_conn, "peer_id", None)
    if policy is not None and peer is not None and not policy.allow_peer(peer.to_base58()):
        try:
            await muxed_conn.close()
        except Exception:
            pass
        return
    # The fix: hold the inbound slot only while this connection lives.
    await wait_conn_closed(self, muxed_conn)


def apply_inbound_slot_fix(swarm: INetwork) -> None:
    """Patch one swarm instance; idempotent. Logs and does nothing on an unknown swarm."""
    if getattr(swarm, _MARK, False):
        return
    if not isinstance(swarm, Swarm) or not hasattr(swarm, "_inbound_limiter"):
        log.warning(
            "swarm %s has no _inbound_limiter; inbound-slot fix not applied",
            type(swarm).__name__,
        )
        return
    swarm._do_handle_inbound_connection = types.MethodType(  # type: ignore[method-assign]
        _do_handle_inbound_connection, swarm
    )
    setattr(swarm, _MARK, True)


def set_inbound_policy(swarm: INetwork, policy: InboundPolicy) -> None:
    """Install an admission policy on a patched swarm (see POLICY_ATTR)."""
    setattr(swarm, POLICY_ATTR, policy)
