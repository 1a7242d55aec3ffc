"""Helpers for the peers/ network tests (no tests here): capacity sources, raw clients."""

from __future__ import annotations

import time
from collections.abc import Callable

import trio
from libp2p.custom_types import TProtocol

from peers.device import DeviceInfo
from peers.host import Host
from peers.identity import Identity
from peers import NetworkLimits, PeerNetwork
from peers._streams import read_message
from peers.records import CapacityRecord, ModelInfo
from protocol import CAPACITY_PROTOCOL, FrameDecoder, Message, limits_for

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
DEVICE = DeviceInfo("cpu", "test-cpu", 8 << 30, 6 << 30)


class FakeCapacity:
    """A mutable capacity source, like the daemon's: models can be added at runtime."""

    def __init__(self) -> None:
        self.models: list[ModelInfo] = []

    def add_model(self, sha256: str, name: str = "m.gguf") -> None:
        self.models.append(ModelInfo(sha256, name, 1 << 20, False, 2 << 20))

    def __call__(self) -> CapacityRecord:
        # peer_id, seq and times are placeholders: the network fills them in and signs.
        return CapacityRecord.issue(
            "",
            0,
            DEVICE,
            models=tuple(self.models),
            slots_total=2,
            slots_free=2,
            roles=("provider",),
            version="test",
        )


def make_net(
    bootstrap: list[str] | None = None,
    *,
    limits: NetworkLimits | None = None,
    trust_store: object | None = None,
    source: FakeCapacity | None = None,
) -> tuple[PeerNetwork, FakeCapacity]:
    source = source or FakeCapacity()
    net = PeerNetwork(
        Identity.generate(),
        capacity_source=source,
        listen_addrs=LOOPBACK,
        bootstrap=bootstrap or [],
        mdns=False,
        trust_store=trust_store,  # type: ignore[arg-type]
        limits=limits,
    )
    return net, source


async def wait_until(pred: Callable[[], bool], timeout: float) -> float:
    """Seconds until `pred()` held; AssertionError after `timeout`."""
    start = time.monotonic()
    with trio.move_on_after(timeout):
        while not pred():
            await trio.sleep(0.01)
        return time.monotonic() - start
    raise AssertionError(f"condition not met within {timeout} s")


async def raw_exchange(client: Host, server_peer, payload: bytes, timeout: float = 5) -> Message:  # type: ignore[no-untyped-def]
    """Open a capacity stream from a bare libp2p host, send raw bytes, read one message."""
    with trio.fail_after(timeout):
        stream = await client.libp2p.new_stream(server_peer, [TProtocol(CAPACITY_PROTOCOL)])
        try:
            if payload:
                await stream.write(payload)
            return await read_message(stream, FrameDecoder(limits_for(CAPACITY_PROTOCOL)))
        finally:
            try:
                await stream.close()
            except Exception:
                pass
