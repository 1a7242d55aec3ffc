"""A reachability dial-back must not cost the connection it was asked on.

py-libp2p keeps one connection per peer (peers/host.py, max_connections_per_peer=1) and,
when a second registers, trims the older one, whatever streams it carries: a dial-back
that went through the swarm closed every open stream between the two peers (a split
model's layer session, a delegated answer) every `interval_s` (120 s).
"""

from __future__ import annotations

import logging

import pytest
import trio
from libp2p.network.config import GRACE_PERIOD
from test_network_support import make_net, wait_until

from peers.reachability import PUBLIC

ECHO = "/qvac-test/echo/1.0.0"


@pytest.fixture(autouse=True)
def _quiet_libp2p(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="libp2p")


def conns(net, other) -> int:  # type: ignore[no-untyped-def]
    from peers.identity import as_id
    return len(net.host.libp2p.get_network().connections.get(as_id(other.peer_id_str), []))


async def test_dialback_keeps_the_connection_and_its_open_stream() -> None:
    server, _ = make_net()
    async with server:

        async def echo(stream, _peer: str) -> None:  # type: ignore[no-untyped-def]
            while True:
                data = await stream.read(1024)
                if not data:
                    return
                await stream.write(data)

        server.set_stream_handler(ECHO, echo)
        client, _ = make_net(server.listen_addrs())
        async with client:
            await wait_until(lambda: client.is_connected(server.peer_id_str), 10)
            stream = await client.open_stream(server.peer_id_str, ECHO)
            await stream.write(b"before")
            with trio.fail_after(5):
                assert await stream.read(1024) == b"before"
            # py-libp2p never trims a connection younger than its grace period: ours must
            # be as old as a real one when the dial-back comes
            await trio.sleep(GRACE_PERIOD + 1)

            with trio.fail_after(20):
                state = await client.reachability.check()
            assert state == PUBLIC  # the server did reach our listen port
            assert server.reachability.counters["dialbacks_served"] >= 1

            await trio.sleep(1.0)  # a trim of the older connection runs in the background
            assert conns(client, server) == 1 and conns(server, client) == 1
            await stream.write(b"after")
            with trio.fail_after(5):
                assert await stream.read(1024) == b"after"
            await stream.close()

            # and it still proves something: a port nobody listens on is not reachable
            from harness import free_port
            from peers.identity import as_id
            assert not await server.reachability._dial_back(
                as_id(client.peer_id_str), "127.0.0.1", [free_port()])
