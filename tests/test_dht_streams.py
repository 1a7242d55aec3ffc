"""Kademlia streams end with their query (peers/_dht_streams.py), the library's
auto-connector stays off (peers/_dial.py), and a peer that dialled us reaches our routing
table once its record arrives (PeerNetwork._learn_addrs). Real PeerNetworks on loopback."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack

import pytest
import trio
from libp2p.kad_dht.common import PROTOCOL_ID
from libp2p.network.stream.exceptions import StreamEOF

from peers import NetworkLimits, PeerNetwork
from peers._dht_streams import DhtHost, guard_inbound
from peers.device import DeviceInfo
from peers.dht import model_key
from peers.identity import Identity
from peers.records import CapacityRecord, ModelInfo

pytestmark = pytest.mark.trio

DEVICE = DeviceInfo("cpu", "test", 8 << 30, 4 << 30)
# why slow refreshes: nothing but the code under test should add peers to routing tables
QUIET = NetworkLimits(refresh_interval_s=600.0, discovery_max_interval_s=600.0)


def _source() -> CapacityRecord:
    return CapacityRecord.issue("", 0, DEVICE, slots_total=1, slots_free=1)


def _net(*boot: PeerNetwork) -> PeerNetwork:
    return PeerNetwork(
        Identity.generate(),
        capacity_source=_source,
        listen_addrs=["/ip4/127.0.0.1/tcp/0"],
        bootstrap=[b.listen_addrs()[0] for b in boot],
        mdns=False,
        limits=QUIET,
    )


async def _until(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.05)


def _busy(net: PeerNetwork) -> int:
    """Inbound DHT handler slots in use (py-libp2p has 12)."""
    return int(net.dht.kad._inbound_limiter.borrowed_tokens)


async def _pair(stack: AsyncExitStack) -> tuple[PeerNetwork, PeerNetwork]:
    b = await stack.enter_async_context(_net())
    a = await stack.enter_async_context(_net(b))
    await _until(lambda: a.is_connected(b.peer_id))
    return a, b


async def test_cancelled_query_frees_the_remote_handler_slot() -> None:
    """A query cancelled after its stream opened (a lookup past its quorum, a deadline)
    resets the stream, so the remote's handler ends at once. The library's own close was
    cancelled too and never sent anything: 16 such queries held all 12 slots of the remote
    until the connection closed."""
    async with AsyncExitStack() as stack:
        a, b = await _pair(stack)
        host = DhtHost(a.host.libp2p)
        for _ in range(16):
            with trio.CancelScope() as scope:
                stream = await host.new_stream(b.peer_id, [PROTOCOL_ID])
                await _until(lambda: _busy(b) >= 1)  # b's handler is waiting for a request
                scope.cancel()
                await stream.close()  # as the library's `finally` calls it, cancelled
            await _until(lambda: _busy(b) == 0, timeout=3.0)  # far below the idle limit
        # and b still answers
        kad = a.dht.kad
        with trio.fail_after(10):
            closer = await kad.peer_routing._query_peer_for_closest(
                b.peer_id, kad.local_peer_id.to_bytes()
            )
        assert isinstance(closer, list)
        assert b.counters["dht_inbound_refused"] == 0


async def test_silent_inbound_stream_is_closed_after_the_idle_limit() -> None:
    """A peer that opens a Kademlia stream and sends nothing loses it after the idle
    limit; its slot comes back and it reads end-of-stream."""
    async with AsyncExitStack() as stack:
        a, b = await _pair(stack)
        guard_inbound(b.dht.kad, b.host.libp2p, b.counters, idle_s=0.5)
        stream = await a.host.libp2p.new_stream(b.peer_id, [PROTOCOL_ID])
        await _until(lambda: _busy(b) == 1)
        start = time.monotonic()
        with trio.fail_after(5), pytest.raises(StreamEOF):
            await stream.read(1)  # b closed its side
        assert time.monotonic() - start >= 0.4
        await _until(lambda: _busy(b) == 0, timeout=3.0)
        await stream.reset()


async def test_one_peer_holds_at_most_its_share_of_the_slots() -> None:
    async with AsyncExitStack() as stack:
        a, b = await _pair(stack)
        guard_inbound(b.dht.kad, b.host.libp2p, b.counters, idle_s=30.0, per_peer=3)
        streams = []
        for _ in range(6):
            try:
                streams.append(await a.host.libp2p.new_stream(b.peer_id, [PROTOCOL_ID]))
            except Exception:
                pass  # why: a refused stream may be reset before its negotiation ends
        # why at least / at most: a's own discovery queries to b count against a's cap too
        await _until(lambda: b.counters["dht_inbound_refused"] >= 3)
        assert _busy(b) <= 3
        for s in streams:
            await s.reset()
        await _until(lambda: _busy(b) == 0, timeout=3.0)


async def test_library_auto_connector_never_starts_and_a_lost_peer_wakes_discovery() -> None:
    async with AsyncExitStack() as stack:
        a, b = await _pair(stack)
        for net in (a, b):
            assert net.host.libp2p.get_network().auto_connector._started is False
        await trio.sleep(0.2)
        a._dht_wiring._wake_discovery = trio.Event()
        await b.host.libp2p.get_network().close_peer(a.peer_id)
        await _until(lambda: not a.is_connected(b.peer_id))
        await _until(lambda: a._dht_wiring._wake_discovery.is_set(), timeout=3.0)
        # bootstrap_loop still redials b, as before
        await _until(lambda: a.is_connected(b.peer_id), timeout=10.0)


async def test_a_peer_that_dialled_us_enters_the_routing_table_with_its_record() -> None:
    """a dials b; b learns a's addresses from a's record (fetched on every new
    connection) and adds a to its routing table then, not at the next refresh (600 s)."""
    async with AsyncExitStack() as stack:
        a, b = await _pair(stack)
        await _until(lambda: (e := b.table.get(a.peer_id_str)) is not None
                     and e.record is not None)
        await _until(lambda: b.dht.kad.routing_table.peer_in_table(a.peer_id), timeout=5.0)


async def test_a_model_is_announced_again_to_close_peers_met_after_joining() -> None:
    """a announces its model on joining, when it knows only b; c, d and e join later and
    enter a's routing table. a's next publish round announces the model to them, not
    only at the 300 s re-announce: lookups ask the closest peers they know, and entries
    left at whoever a met first were missed (bench/dht_lookup.py --diag)."""
    sha = "ab" * 32
    key = bytes.fromhex(model_key(sha))

    def holding() -> CapacityRecord:
        return CapacityRecord.issue("", 0, DEVICE, models=(ModelInfo(sha, "m", 1, True, 1),),
                                    slots_total=1, slots_free=1)

    def holds_a(net: PeerNetwork, a: PeerNetwork) -> bool:
        return any(p.peer_id == a.host.libp2p.get_id()
                   for p in net.dht.kad.provider_store.get_providers(key))

    async with AsyncExitStack() as stack:
        b = await stack.enter_async_context(_net())
        a = PeerNetwork(Identity.generate(), capacity_source=holding,
                        listen_addrs=["/ip4/127.0.0.1/tcp/0"], bootstrap=[b.listen_addrs()[0]],
                        mdns=False, limits=QUIET)
        await stack.enter_async_context(a)
        await _until(lambda: holds_a(b, a), timeout=20.0)
        late = [await stack.enter_async_context(_net(a)) for _ in range(3)]
        await _until(lambda: all(a.dht.kad.routing_table.peer_in_table(n.host.libp2p.get_id())
                                 for n in late), timeout=20.0)
        assert not any(holds_a(n, a) for n in late)  # nothing announced to them yet
        a.capacity_changed()
        await _until(lambda: all(holds_a(n, a) for n in late), timeout=20.0)
