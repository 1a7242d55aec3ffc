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

A worker that holds the model file (`LayersReady.holds_model`) reads the weights from its
own copy: the head's bytes go through `protocol.SetTensorScanner`, which holds back each
big SET_TENSOR whose data may be a tensor of the file (`ModelFileIndex`, built once per
tunnel from the GGUF's tensor table); when the bytes match the file, 353 bytes of
SET_TENSOR_FROM_FILE go instead of the tensor. ggml's own cache by hash does not do this
for a small model: it only looks at tensors over 10 MiB.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Protocol

import trio

from models.gguf import GGUFError, read_gguf
from peers import short_peer_id
from protocol import (
    FROM_FILE_MIN_DATA,
    FROM_FILE_PREFIX,
    LAYERS_LIMITS,
    LAYERS_PROTOCOL,
    Error,
    FrameDecoder,
    LayersHello,
    LayersReady,
    ProtocolError,
    SetTensor,
    SetTensorScanner,
    TensorFromFile,
    encode_frame,
)

from .p2p_io import Stream, StreamEnded, close_stream, read_some
from .rpc_batch import RpcBatchReader

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


class ModelFileIndex:
    """Where the model file's big tensors are, keyed on (size, first FROM_FILE_PREFIX
    bytes): a few bytes read per tensor, not the whole file hashed. `find` (blocking: call
    it in a thread) compares a SET_TENSOR's data with the file's bytes at each candidate
    offset and says SET_TENSOR_FROM_FILE for the one that is equal."""

    def __init__(self, path: str | Path) -> None:
        extents = read_gguf(path).tensor_extents
        self._fd = os.open(path, os.O_RDONLY)
        self._where: dict[tuple[int, bytes], list[int]] = {}
        try:
            for _name, offset, size in extents:
                if size >= FROM_FILE_MIN_DATA:
                    key = (size, os.pread(self._fd, FROM_FILE_PREFIX, offset))
                    self._where.setdefault(key, []).append(offset)
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return sum(len(v) for v in self._where.values())

    def is_candidate(self, size: int, prefix: bytes) -> bool:
        return (size, prefix) in self._where

    def find(self, st: SetTensor) -> TensorFromFile | None:
        data = bytes(st.data)  # bytes == bytes is a memcmp; against a memoryview, 10x slower
        for offset in self._where.get((len(data), data[:FROM_FILE_PREFIX]), ()):
            if os.pread(self._fd, len(data), offset) == data:
                return TensorFromFile(st.head, offset, len(data), hashlib.sha256(data).digest())
        return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


class LayerTunnel:
    """One worker behind 127.0.0.1:`port`. `run` in a nursery: cancelling it ends the
    tunnel (and so the split process's connection). With `model_path` (the head's copy of
    the file `hello.model_sha256` names), a worker that holds the same file is sent where
    the weights are in it rather than the weights."""

    def __init__(self, network: StreamOpener, peer: str, hello: LayersHello,
                 model_path: str | Path | None = None) -> None:
        self.network = network
        self.peer = peer
        self.hello = hello
        self.model_path = model_path
        self.port = 0
        self.bytes_up = 0  # head -> worker, what crossed the network
        self.bytes_from_file = 0  # tensor bytes the worker read from its own file instead
        self.bytes_down = 0
        self._index: ModelFileIndex | None = None
        self._index_failed = False
        self._index_lock = trio.Lock()
        self.failure: str | None = None  # set when the worker side failed first
        self.connections = 0
        self.connected = trio.Event()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        listener = listeners[0]
        self.port = listener.socket.getsockname()[1]
        try:
            async with listener, trio.open_nursery() as nursery:
                task_status.started(self.port)
                for _ in range(MAX_CONNECTIONS):
                    tcp = await listener.accept()
                    self.connections += 1
                    nursery.start_soon(self._serve, tcp)
                # no more: a further local client must not ride on this node's authority
                await listener.aclose()
        finally:
            if self._index is not None:
                self._index.close()

    async def _file_index(self) -> ModelFileIndex | None:
        """The index of the head's model file, built once (in a thread); None without one
        (the weights then cross the network as llama.cpp sends them)."""
        async with self._index_lock:
            if self._index is None and not self._index_failed and self.model_path:
                try:
                    self._index = await trio.to_thread.run_sync(ModelFileIndex,
                                                                self.model_path)
                except (OSError, GGUFError) as e:
                    self._index_failed = True
                    log.warning("cannot index %s, so the worker %s gets every weight over the"
                                " network: %s", self.model_path, short_peer_id(self.peer), e)
            return self._index

    async def _serve(self, tcp: trio.SocketStream) -> None:
        async with tcp:
            try:
                stream, ready = await open_layers(self.network, self.peer, self.hello)
            except LayerRefused as e:
                self.failure = str(e)
                log.warning("%s", e)
                return
            self.connected.set()
            try:
                index = await self._file_index() if ready.holds_model else None
                await self._pump(stream, tcp, index)
            finally:
                await close_stream(stream, reset=self.failure is not None)

    async def _from_file(self, index: ModelFileIndex, st: SetTensor) -> bytes:
        """What to send for a held-back SET_TENSOR: SET_TENSOR_FROM_FILE when its data is
        the file's, else the command unchanged."""
        try:
            found = await trio.to_thread.run_sync(index.find, st)
        except OSError as e:  # the head's own file: send the bytes, say so once
            if not self._index_failed:
                self._index_failed = True
                log.warning("cannot read %s (%s); sending its tensors to %s as they are",
                            self.model_path, e, short_peer_id(self.peer))
            return st.command
        if found is None:
            return st.command
        self.bytes_from_file += found.size
        return found.encode()

    async def _pump(self, stream: Stream, tcp: trio.SocketStream,
                    index: ModelFileIndex | None) -> None:
        who = short_peer_id(self.peer)
        scanner = (SetTensorScanner(index.is_candidate, max_hold=self.hello.memory)
                   if index is not None else None)

        batches = RpcBatchReader(tcp, _PUMP_READ)  # a token's commands in one write

        async def up() -> None:
            while True:
                data = await batches.receive()
                if not data:
                    break
                try:
                    for item in [data] if scanner is None else scanner.feed(data):
                        if isinstance(item, SetTensor):
                            assert index is not None
                            item = await self._from_file(index, item)
                        self.bytes_up += len(item)
                        await stream.write(item)
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
