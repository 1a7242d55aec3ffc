"""PeerNetwork on real libp2p hosts over 127.0.0.1 (one trio process, mDNS off).

Topology for the mesh tests: A starts alone; B and C both bootstrap to A only, so B and C
must find each other through A (DHT self-lookup) and then fetch capacity directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import msgpack
import multiaddr
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.peerinfo import info_from_p2p_addr
from test_network_support import DEVICE, LOOPBACK, FakeCapacity, make_net, raw_exchange, wait_until

from peers.dht import placement_target
from peers.host import make_host
from peers.identity import Identity
from peers import CapacityError, NetworkLimits, PeerNetwork, PeerUnavailable
from peers.records import CapacityRecord, capacity_key, sign_record
from protocol import (
    CapacityRequest,
    CapacityResponse,
    Error,
    ErrorCode,
    encode_frame,
    encode_varint,
)

SHA_A = "a" * 64
SHA_B = "b" * 64


@pytest.fixture(autouse=True)
def _quiet_libp2p(caplog: pytest.LogCaptureFixture) -> None:
    # why: py-libp2p logs every normally-closed DHT stream at WARNING
    caplog.set_level(logging.ERROR, logger="libp2p")


def sees(observer: PeerNetwork, other: PeerNetwork) -> bool:
    entry = observer.table.get(other.peer_id_str)
    return entry is not None and entry.connected and entry.is_fresh(30)


@asynccontextmanager
async def mesh(
    n_followers: int = 2, **kw: object
) -> AsyncIterator[list[tuple[PeerNetwork, FakeCapacity]]]:
    """A, then followers bootstrapping to A, all running until the block exits."""
    async with AsyncExitStack() as stack:
        a = make_net(**kw)  # type: ignore[arg-type]
        await stack.enter_async_context(a[0])
        nodes = [a]
        for _ in range(n_followers):
            f = make_net(a[0].listen_addrs(), **kw)  # type: ignore[arg-type]
            nodes.append(f)
        for f in nodes[1:]:
            await stack.enter_async_context(f[0])
        yield nodes


async def test_three_nodes_see_each_other_and_capacity_within_2s() -> None:
    a, _ = make_net()
    async with a:
        b, _ = make_net(a.listen_addrs())
        c, _ = make_net(a.listen_addrs())
        started = time.monotonic()
        async with b, c:
            nets = [a, b, c]
            await wait_until(lambda: all(sees(x, y) for x in nets for y in nets if x is not y), 2.0)
            elapsed = time.monotonic() - started
            assert elapsed < 2.0
            # B learnt C (and C learnt B) through A, not from configuration.
            assert b.table.get(c.peer_id_str) is not None
            for x in nets:
                for y in nets:
                    if x is y:
                        continue
                    entry = x.table.get(y.peer_id_str)
                    assert entry.record is not None and entry.record.peer_id == y.peer_id_str
                    assert entry.rtt_ms is not None and entry.rtt_ms > 0
            assert b.table.get(a.peer_id_str).source == "bootstrap"
            assert a.table.get(b.peer_id_str).source == "inbound"
            snap = a.table.snapshot()
            assert {p["peer_id"] for p in snap} == {b.peer_id_str, c.peer_id_str}
            assert all(p["fresh"] and p["capacity"]["device"]["kind"] == "cpu" for p in snap)


async def test_capacity_change_reaches_peers_within_2s() -> None:
    async with mesh() as nodes:
        (a, _), (b, b_src), (c, _) = nodes
        await wait_until(lambda: sees(a, b) and sees(c, b), 2.0)
        before = a.table.get(b.peer_id_str).record.seq
        b_src.add_model(SHA_A)
        started = time.monotonic()
        b.capacity_changed()

        def has_model(obs: PeerNetwork) -> bool:
            rec = obs.table.get(b.peer_id_str).record
            return rec is not None and any(m.sha256 == SHA_A for m in rec.models)

        await wait_until(lambda: has_model(a) and has_model(c), 2.0)
        assert time.monotonic() - started < 2.0
        assert a.table.get(b.peer_id_str).record.seq > before


async def test_dht_lookup_of_capacity_record_and_model_providers() -> None:
    async with mesh() as nodes:
        (a, _), (b, b_src), (c, c_src) = nodes
        await wait_until(lambda: sees(c, b) and sees(b, c), 2.0)
        b_src.add_model(SHA_B)
        b.capacity_changed()
        c_src.add_model(SHA_B)  # C holds it too: it must still find B, not only itself
        c.capacity_changed()

        # The record: found in the DHT (not from C's table), with the new model.
        async def lookup_has_model() -> bool:
            rec = await c.dht.lookup_record(b.peer_id_str)
            return rec is not None and any(m.sha256 == SHA_B for m in rec[0].models)

        # Puts are at most every 5 s (min_dht_publish_interval_s), B's start-up put may
        # have just gone out: allow two intervals.
        deadline = time.monotonic() + 10
        while not await lookup_has_model():
            assert time.monotonic() < deadline, "B's new record never showed up in the DHT"
            await trio.sleep(0.1)
        rec = await c.lookup_capacity(b.peer_id_str)
        assert rec is not None and rec.peer_id == b.peer_id_str
        # A knows B's record through the DHT as well (it is one of the closest peers).
        assert await a.lookup_capacity(b.peer_id_str) is not None

        # Providers: only from the DHT here, the table is left out on purpose.
        deadline = time.monotonic() + 5
        while b.peer_id_str not in await c.find_model_providers(SHA_B, include_table=False):
            assert time.monotonic() < deadline, "B never became a DHT provider of its model"
            await trio.sleep(0.1)
        assert await c.find_model_providers("c" * 64, include_table=False) == []

        # Staleness: a provider whose fresh record no longer lists the model is dropped.
        b_src.models.clear()
        b.capacity_changed()
        await wait_until(lambda: not c.table.get(b.peer_id_str).record.models, 2.0)
        assert b.peer_id_str not in await c.find_model_providers(SHA_B)


async def test_flooding_peer_is_refused_then_banned_while_another_is_served() -> None:
    limits = NetworkLimits(capacity_rate_per_s=10, capacity_burst=20)
    async with mesh(1, limits=limits) as nodes:
        (a, _), (c, _) = nodes
        await wait_until(lambda: sees(c, a), 2.0)
        flooder = make_host(create_new_key_pair(), LOOPBACK)
        async with flooder.run():
            await flooder.libp2p.connect(
                info_from_p2p_addr(multiaddr.Multiaddr(a.listen_addrs()[0]))
            )
            replies: list[object] = []

            async def one() -> None:
                try:
                    replies.append(
                        await raw_exchange(flooder, a.peer_id, encode_frame(CapacityRequest()))
                    )
                except Exception as exc:  # a reset stream also counts as refused
                    replies.append(exc)

            served_other = 0
            async with trio.open_nursery() as nursery:
                for _ in range(60):
                    nursery.start_soon(one)
                for _ in range(5):  # meanwhile an honest peer keeps being served
                    await c.fetch_capacity(a.peer_id_str, timeout=3)
                    served_other += 1
            ok = [r for r in replies if isinstance(r, CapacityResponse)]
            busy = [r for r in replies if isinstance(r, Error) and r.code == ErrorCode.BUSY]
            assert served_other == 5
            # At most the burst (20) plus a little refill is served; the rest is refused
            # (BUSY) until the ban cuts the flooder off and its streams die with it.
            assert len(ok) <= 30, len(ok)
            assert len(ok) + len(busy) < 60
            assert a.counters["capacity_rate_limited"] + a.counters["capacity_busy"] >= 30
            # 40 refusals at once is abuse, not a burst: the flooder is banned. Its
            # connection is closed, a new one is refused, and the honest peer is served.
            await wait_until(lambda: not a.is_connected(flooder.peer_id), 2.0)
            await wait_until(
                lambda: not flooder.libp2p.get_network().connections.get(a.peer_id), 2.0)
            assert a.counters["peers_banned"] == 1
            banned = a.guard.banned()
            assert [b["peer_id"] for b in banned["peers"]] == [flooder.peer_id.to_base58()]
            assert banned["ips"][0]["ip"] == "127.0.0.1"
            with pytest.raises(Exception):  # noqa: B017, PT011 - any refusal will do
                with trio.fail_after(3):
                    await flooder.libp2p.connect(
                        info_from_p2p_addr(multiaddr.Multiaddr(a.listen_addrs()[0])))
                    await raw_exchange(flooder, a.peer_id, encode_frame(CapacityRequest()))
            # Refused in the kernel (the SYN dropped) where a socket filter can be set,
            # else in Python at accept.
            assert a.counters["kernel_filter_updates"] >= 1 or a.guard.refused_total >= 1
            assert (await c.fetch_capacity(a.peer_id_str)).peer_id == a.peer_id_str


async def test_peer_slightly_over_the_rate_is_refused_but_not_banned() -> None:
    limits = NetworkLimits(capacity_rate_per_s=10, capacity_burst=20)
    async with mesh(0, limits=limits) as nodes:
        ((a, _),) = nodes
        eager = make_host(create_new_key_pair(), LOOPBACK)
        async with eager.run():
            await eager.libp2p.connect(
                info_from_p2p_addr(multiaddr.Multiaddr(a.listen_addrs()[0]))
            )
            replies = [await raw_exchange(eager, a.peer_id, encode_frame(CapacityRequest()))
                       for _ in range(30)]
            refused = [r for r in replies if isinstance(r, Error)]
            assert refused and all(r.code == ErrorCode.BUSY and r.retry_after is not None
                                   for r in refused)
            # A few refusals are forgiven: still connected, and served after waiting.
            assert a.is_connected(eager.peer_id) and a.counters["peers_banned"] == 0
            await trio.sleep(0.3)
            again = await raw_exchange(eager, a.peer_id, encode_frame(CapacityRequest()))
            assert isinstance(again, CapacityResponse)


async def test_garbage_and_oversized_frames_get_errors_and_node_keeps_serving() -> None:
    limits = NetworkLimits(capacity_read_timeout_s=0.5)
    async with mesh(1, limits=limits) as nodes:
        (a, _), (c, _) = nodes
        client = make_host(create_new_key_pair(), LOOPBACK)
        async with client.run():
            await client.libp2p.connect(
                info_from_p2p_addr(multiaddr.Multiaddr(a.listen_addrs()[0]))
            )
            cases = [
                (b"\x05hello", ErrorCode.PROTOCOL),  # not a msgpack map
                (encode_varint(100 << 20) + b"x" * 10, ErrorCode.TOO_LARGE),  # 100 MiB frame
                (b"\xff\xff\xff\xff\xff\xff", ErrorCode.TOO_LARGE),  # runaway varint
                (encode_frame(Error(code=ErrorCode.BUSY, message="?")), ErrorCode.PROTOCOL),
                (encode_varint(3) + msgpack.packb({"t": 1}), ErrorCode.PROTOCOL),
                (encode_varint(50), ErrorCode.DEADLINE),  # half a frame, then silence
            ]
            for payload, code in cases:
                reply = await raw_exchange(client, a.peer_id, payload)
                assert isinstance(reply, Error), (payload[:8], reply)
                assert reply.code == code, (payload[:8], reply)
            assert a.counters["capacity_protocol_errors"] == len(cases)
            assert a.is_connected(client.peer_id)
            # Still serving: the same client and an honest peer both get the record.
            reply = await raw_exchange(client, a.peer_id, encode_frame(CapacityRequest()))
            assert isinstance(reply, CapacityResponse)
            assert (await c.fetch_capacity(a.peer_id_str)).peer_id == a.peer_id_str


async def test_forged_records_are_rejected_and_counted() -> None:
    async with mesh(1) as nodes:
        (a, _), (c, _) = nodes
        await wait_until(lambda: sees(a, c), 2.0)
        mallory_id = Identity.generate()
        mallory = make_host(mallory_id.keypair, LOOPBACK)
        async with mallory.run():
            await mallory.libp2p.connect(
                info_from_p2p_addr(multiaddr.Multiaddr(a.listen_addrs()[0]))
            )
            # Mallory's own record, pushed by Mallory: accepted, it is hers to publish.
            fake = CapacityRecord.issue(mallory_id.peer_id_str, 10**15, DEVICE)
            signed = sign_record(fake, mallory_id)
            reply = await raw_exchange(
                mallory, a.peer_id, encode_frame(CapacityResponse(record=signed))
            )
            assert isinstance(reply, CapacityResponse)
            # C's genuine record pushed by Mallory: refused, the stream's peer did not sign it.
            c_rec = a.table.get(c.peer_id_str).record
            _, c_bytes = c.current_record()
            reply = await raw_exchange(
                mallory, a.peer_id, encode_frame(CapacityResponse(record=c_bytes))
            )
            assert isinstance(reply, Error) and reply.code == ErrorCode.BAD_REQUEST
            assert a.rejected["key-mismatch"] == 1
            # A tampered body (one bit flipped just before the signature) fails the signature.
            tampered = bytearray(signed)
            tampered[-80] ^= 0x01
            reply = await raw_exchange(
                mallory, a.peer_id, encode_frame(CapacityResponse(record=bytes(tampered)))
            )
            assert isinstance(reply, Error) and reply.code == ErrorCode.BAD_REQUEST
            assert a.rejected["bad-signature"] == 1
            assert a.table.get(c.peer_id_str).record == c_rec

            # Via the DHT: Mallory stores her record under C's key at A.
            kad = KadDHT(mallory.libp2p, DHTMode.CLIENT)
            key = capacity_key(c.peer_id_str).encode()
            before = a.rejected["key-mismatch"]
            stored = await kad.value_store._store_at_peer(a.peer_id, key, signed)
            assert stored is False
            assert a.rejected["key-mismatch"] == before + 1
            # A's lookup of C still returns C's genuine record.
            rec = await a.lookup_capacity(c.peer_id_str)
            assert rec is not None and rec.peer_id == c.peer_id_str
            assert placement_target(key)[:2] == b"\x12\x20"


async def test_fetch_from_unknown_peer_times_out_with_clear_error() -> None:
    net, _ = make_net()
    async with net:
        stranger = Identity.generate()
        with pytest.raises(CapacityError, match="capacity exchange|did not answer"):
            await net.fetch_capacity(stranger.peer_id_str, timeout=1)


async def test_open_stream_and_custom_handler() -> None:
    async with mesh(1) as nodes:
        (a, _), (c, _) = nodes
        seen: list[str] = []

        async def echo(stream, peer: str) -> None:  # type: ignore[no-untyped-def]
            seen.append(peer)
            await stream.write(await stream.read(100))
            await stream.close()

        async def broken(stream, peer: str) -> None:  # type: ignore[no-untyped-def]
            raise RuntimeError("handler bug")

        a.set_stream_handler("/qvac-test/echo/1", echo)
        a.set_stream_handler("/qvac-test/broken/1", broken)
        await wait_until(lambda: sees(c, a), 2.0)
        # the stream is reset, maybe while still negotiating ...
        with pytest.raises((PeerUnavailable, StreamError)):
            s = await c.open_stream(a.peer_id_str, "/qvac-test/broken/1", timeout=3)
            await s.read(10)
        assert a.is_connected(c.peer_id)  # ... the connection is not
        s = await c.open_stream(a.peer_id_str, "/qvac-test/echo/1", timeout=3)
        await s.write(b"ping")
        assert await s.read(100) == b"ping"
        await s.close()
        assert seen == [c.peer_id_str]
        assert a.peer_id_str in c.connected_peers()
        assert all("/p2p/" + a.peer_id_str in x for x in a.listen_addrs())


async def test_untrusted_peers_listed_but_flagged(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from peers.trust import TrustStore

    trust = TrustStore.in_dir(tmp_path)
    async with mesh(2, trust_store=trust) as nodes:
        (a, _), (b, _), (c, _) = nodes
        await wait_until(lambda: sees(a, b) and sees(a, c), 2.0)
        trust.add(b.peer_id_str, ["provider"])  # evaluated live: no refresh needed
        snap = {p["peer_id"]: p for p in a.table.snapshot()}
        assert snap[b.peer_id_str]["trusted"] and snap[b.peer_id_str]["roles"] == ["provider"]
        assert not snap[c.peer_id_str]["trusted"] and snap[c.peer_id_str]["roles"] == []
        assert a.metrics()["peers_trusted"] == 1


async def test_port_in_use_and_bad_addresses_are_one_line_errors() -> None:
    import socket

    from peers.host import HostError
    from peers import NetworkError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        net = PeerNetwork(
            Identity.generate(),
            capacity_source=FakeCapacity(),
            listen_addrs=[f"/ip4/127.0.0.1/tcp/{port}"],
            mdns=False,
        )
        with pytest.raises(HostError, match="could not listen on .* pick another --listen"):
            async with net:
                pass
    with pytest.raises(NetworkError, match="bad bootstrap address"):
        PeerNetwork(
            Identity.generate(),
            capacity_source=FakeCapacity(),
            bootstrap=["/ip4/127.0.0.1/tcp/4001"],
            mdns=False,
        )
    with pytest.raises(HostError, match="only TCP"):
        make_host(create_new_key_pair(), ["/ip4/127.0.0.1/udp/4001"])


async def test_broken_capacity_source_is_a_clear_startup_error() -> None:
    from peers import NetworkError

    def broken() -> CapacityRecord:
        raise RuntimeError("engine not ready")

    net = PeerNetwork(
        Identity.generate(), capacity_source=broken, listen_addrs=LOOPBACK, mdns=False
    )
    with pytest.raises(NetworkError, match="cannot sign an initial capacity record"):
        async with net:
            pass
