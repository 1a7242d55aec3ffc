"""The head side of `/qvac/layers/1.0.0`: a loopback port per worker, forwarded over an
authenticated peer stream.

llama.cpp's RPC client only speaks TCP to "host:port". For each worker of a split the
head opens a listener on 127.0.0.1 (port chosen by the OS) and hands "127.0.0.1:PORT"
to the split process (models/split_load.py). The first connection to it opens a
`/qvac/layers/1.0.0` stream to the worker (dialling through the usual paths, relays
included), sends `LayersHello`, waits for `LayersReady`, then copies bytes both ways
until either side ends. llama.cpp connects twice (once to list the endpoint's devices,
then for the model's life); the listener takes MAX_CONNECTIONS and closes, so no other
local process can ride on this node's authority for long, and ends with the split.

`probe` asks a worker the same question without placing anything (`probe` flag): the
plan is checked, version mismatch and refusals found, before the model loads.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Protocol

import trio

from peers import short_peer_id
from protocol import (
    LAYERS_LIMITS,
    LAYERS_PROTOCOL,
    Error,
    FrameDecoder,
    LayersHello,
    LayersReady,
    ProtocolError,
    encode_frame,
)

from .p2p_io import Stream, StreamEnded, close_stream, read_some

log = logging.getLogger("qvacd.split")

READY_TIMEOUT_S = 30.0  # the worker starts an RPC server process before answering
# llama.cpp opens short connections while it loads (device list, memory queries), then
# one for the model's life: each connection is a layer session of its own (one RPC
# server process per head serves them in turn). Past this many, the listener closes.
MAX_CONNECTIONS = 64
_PUMP_READ = 256 * 1024


class StreamOpener(Protocol):
    async def open_stream(self, peer_id: str, protocol_id: str, timeout: float = 10.0,
                          first: bytes | None = None) -> Any: ...


class LayerRefused(Exception):
    """The worker refused or could not be reached; the message is one line naming it."""


async def open_layers(network: StreamOpener, peer: str, hello: LayersHello
                      ) -> tuple[Stream, LayersReady]:
    """A layers stream to `peer`, past its LayersReady. LayerRefused otherwise."""
    who = short_peer_id(peer)
    try:
        stream = await network.open_stream(peer, LAYERS_PROTOCOL,
                                           first=encode_frame(hello, LAYERS_LIMITS))
    except Exception as e:
        raise LayerRefused(f"worker {who} cannot be reached: {type(e).__name__}: {e}"[:300]
                           ) from None
    ok = False
    try:
        decoder = FrameDecoder(LAYERS_LIMITS)
        msg = None
        with trio.move_on_after(READY_TIMEOUT_S):
            while msg is None:
                data = await read_some(stream)
                if data:
                    decoder.feed(data)
                else:
                    decoder.feed_eof()
                msg = decoder.next_message()
                if msg is None and not data:
                    raise LayerRefused(f"worker {who} closed the layers stream unanswered")
        if msg is None:
            raise LayerRefused(f"worker {who} did not answer within {READY_TIMEOUT_S:.0f} s")
        if isinstance(msg, Error):
            raise LayerRefused(f"worker {who} refused: {msg.message}")
        if not isinstance(msg, LayersReady) or decoder.buffered:
            raise LayerRefused(f"worker {who} answered out of protocol")
        ok = True
        return stream, msg
    except ProtocolError as e:
        raise LayerRefused(f"worker {who} sent a bad frame: {e}") from None
    except StreamEnded as e:
        raise LayerRefused(f"worker {who} reset the layers stream: {e}") from None
    finally:
        if not ok:
            await close_stream(stream, reset=True)


async def probe(network: StreamOpener, peer: str, hello: LayersHello) -> LayersReady:
    stream, ready = await open_layers(network, peer, LayersHello(
        hello.rpc_major, hello.rpc_minor, hello.rpc_patch, hello.memory, hello.model_sha256,
        probe=True))
    await close_stream(stream)
    return ready


class LayerTunnel:
    """One worker behind 127.0.0.1:`port`. `run` in a nursery: cancelling it ends the
    tunnel (and so the split process's connection)."""

    def __init__(self, network: StreamOpener, peer: str, hello: LayersHello) -> None:
        self.network = network
        self.peer = peer
        self.hello = hello
        self.port = 0
        self.bytes_up = 0  # head -> worker
        self.bytes_down = 0
        self.failure: str | None = None  # set when the worker side failed first
        self.connections = 0
        self.connected = trio.Event()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        listener = listeners[0]
        self.port = listener.socket.getsockname()[1]
        async with listener, trio.open_nursery() as nursery:
            task_status.started(self.port)
            for _ in range(MAX_CONNECTIONS):
                tcp = await listener.accept()
                self.connections += 1
                nursery.start_soon(self._serve, tcp)
            # no more: a further local client must not ride on this node's authority
            await listener.aclose()

    async def _serve(self, tcp: trio.SocketStream) -> None:
        async with tcp:
            try:
                stream, _ready = await open_layers(self.network, self.peer, self.hello)
            except LayerRefused as e:
                self.failure = str(e)
                log.warning("%s", e)
                return
            self.connected.set()
            try:
                await self._pump(stream, tcp)
            finally:
                await close_stream(stream, reset=self.failure is not None)

    async def _pump(self, stream: Stream, tcp: trio.SocketStream) -> None:
        who = short_peer_id(self.peer)

        async def up() -> None:
            while True:
                data = await tcp.receive_some(_PUMP_READ)
                if not data:
                    break
                self.bytes_up += len(data)
                try:
                    await stream.write(data)
                except Exception as e:  # noqa: BLE001 - libp2p raises many types
                    self.failure = f"worker {who} went away: {type(e).__name__}"
                    break
            nursery.cancel_scope.cancel()

        async def down() -> None:
            while True:
                try:
                    data = await read_some(stream)
                except StreamEnded as e:
                    self.failure = f"worker {who} went away: {e}"
                    break
                if not data:
                    self.failure = self.failure or f"worker {who} ended the layer session"
                    break
                self.bytes_down += len(data)
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await tcp.send_all(data)
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(up)
            nursery.start_soon(down)
