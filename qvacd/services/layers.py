"""The worker side of a split model: `/qvac/layers/1.0.0`, llama.cpp RPC for trusted heads.

Order of checks, all before any RPC byte reaches a server:
1. this node offers memory for layers at all (`--layers-memory`);
2. the peer holds the `layers` role (checked on the connection's authenticated peer id,
   before a byte of the stream is read; `--public-donor` does not extend to layers: a
   split places code-adjacent state, tensors and graphs, in this process's memory);
3. streams per peer;
4. a `LayersHello` within HELLO_TIMEOUT_S (bounded frame: LAYERS_LIMITS);
5. the same llama.cpp RPC major version and a minor no newer than ours (one line
   otherwise), and the memory asked for inside what is still free of the offer.

Then the head's RPC server process (`python -m qvacd.layer_worker`, one per head, on a
loopback port, its memory capped at the grant), `LayersReady`, and the bytes pumped
both ways, the head's side checked by `RpcCommandGuard`. When this node holds the model
file the hello names (`model_file`), LayersReady says so and the head may send
SET_TENSOR_FROM_FILE instead of a tensor's bytes: the guard checks its bounds, the bytes
are read from our copy in a thread, their sha256 checked against the head's, and the RPC
server gets the SET_TENSOR it stands for (a mismatch ends that session, not others).
The session ends on either side
closing, a bad command, or `idle_timeout` seconds without a byte; ggml's server frees
that connection's buffers then. The process itself is ended SERVER_LINGER_S after its
head's last session, and on shutdown (`run` belongs to the node's nursery).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from peers import peer_ended_stream, short_peer_id
from protocol import (
    LAYERS_LIMITS,
    Error,
    ErrorCode,
    FrameDecoder,
    LayersHello,
    LayersReady,
    ProtocolError,
    RpcCommandGuard,
    TensorFromFile,
    encode_frame,
)

from ..layer_worker import LOOPBACK, REBUILD_HINT, free_loopback_port, rpc_available
from ..p2p_io import Stream, StreamEnded, close_stream, read_some

log = logging.getLogger("qvacd.layers")

HELLO_TIMEOUT_S = 10.0
SERVER_START_TIMEOUT_S = 30.0
SERVER_LINGER_S = 30.0  # an RPC server process outlives its head's last session this long
_PUMP_READ = 256 * 1024


async def library_rpc_version() -> tuple[int, int, int]:
    """The RPC protocol version of this machine's llama.cpp (from a HELLO to a server of
    its own, in a short-lived child: the library exports no version number)."""
    global _VERSION
    if _VERSION is None:
        if not rpc_available():
            raise RuntimeError(REBUILD_HINT)
        done = await trio.run_process(
            [sys.executable, "-m", "qvacd.layer_worker", "--version"], capture_stdout=True,
            capture_stderr=True, check=False, env=child_env())
        # the server thread's banner shares the pipe (even a line: C and Python buffers)
        found = re.search(r"rpc-version (\d+)\.(\d+)\.(\d+)",
                          done.stdout.decode(errors="replace"))
        try:
            assert found is not None
            major, minor, patch = (int(x) for x in found.groups())
        except (AssertionError, ValueError):
            out = (done.stderr or done.stdout).decode(errors="replace").strip()
            raise RuntimeError(f"cannot read the llama.cpp RPC version (exit"
                               f" {done.returncode}): {out[-300:]}") from None
        _VERSION = (major, minor, patch)
    return _VERSION


_VERSION: tuple[int, int, int] | None = None


def child_env() -> dict[str, str]:
    """The environment of our Python children: this source tree importable from any cwd."""
    import os

    root = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def version_refusal(head: tuple[int, int, int], ours: tuple[int, int, int]) -> str | None:
    """None if a head speaking `head` may use a server speaking `ours` (llama.cpp's own
    rule: same major, server minor not older than the client's), else the one line."""
    if head[0] == ours[0] and head[1] <= ours[1]:
        return None
    return (f"llama.cpp RPC protocol mismatch: the head speaks {'.'.join(map(str, head))},"
            f" this worker {'.'.join(map(str, ours))}; install the same llama-cpp-python"
            " version on both nodes")


class _Busy(Exception):
    pass


@dataclass
class _Server:
    proc: trio.Process
    port: int
    memory: int  # its cap, reserved from the offer while it runs
    sessions: int = 0
    idle_since: float = 0.0


class LayersService:
    def __init__(self, *, is_authorized: Callable[[str], bool], offered: int,
                 cache_dir: Path, model_file: Callable[[str], Path | None],
                 n_threads: int = 1,
                 idle_timeout: float = 600.0, max_streams_per_peer: int = 2) -> None:
        self.is_authorized = is_authorized
        self.offered = offered
        self.cache_dir = cache_dir
        self.model_file = model_file  # sha256 -> this node's verified copy, or None
        self.n_threads = max(1, n_threads)
        self.idle_timeout = idle_timeout
        self.max_streams_per_peer = max_streams_per_peer
        self.reserved = 0
        self.sessions: dict[str, int] = defaultdict(int)
        self.bytes_in = 0  # head -> worker RPC bytes, all sessions (the tests count them)
        self.bytes_out = 0
        self.bytes_from_file = 0  # tensor bytes read from our own model file instead
        self.server_pids: set[int] = set()
        self._servers: dict[str, _Server] = {}
        # (head, sha256) whose SET_TENSOR_FROM_FILE did not match our copy: that head gets
        # no holds_model for it again (our copy may be damaged, or the head lies; either
        # way its next load sends the bytes, and other heads are not affected)
        self._copy_refused: set[tuple[str, str]] = set()
        self.on_offence: Callable[[str, Any, str], object] = lambda kind, stream, peer: None
        self.on_change: Callable[[], None] = lambda: None  # the free offer changed

    def status(self) -> dict[str, Any]:
        return {"offered": self.offered, "reserved": self.reserved,
                "sessions": sum(self.sessions.values()), "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "bytes_from_file": self.bytes_from_file,
                "server_pids": sorted(self.server_pids)}

    @property
    def free(self) -> int:
        return max(0, self.offered - self.reserved)

    async def handle(self, stream: Stream, peer_id: str) -> None:
        outcome = "ok"
        try:
            outcome = await self._serve(stream, peer_id)
        except ProtocolError as e:
            outcome = "protocol"
            log.info("peer %s sent a bad layers frame: %s", short_peer_id(peer_id), e)
            await _try_send(stream, Error.from_exception(e))
        except Exception as e:
            if peer_ended_stream(e) is not None or isinstance(e, StreamEnded):
                outcome = "gone"
                log.info("layer session of %s ended: the head went away",
                         short_peer_id(peer_id))
            else:
                log.exception("layers handler failed for peer %s", short_peer_id(peer_id))
                await _try_send(stream, Error(ErrorCode.INTERNAL, "worker error"))
        finally:
            if outcome in ("protocol", "unauthorized"):
                self.on_offence(outcome, stream, peer_id)
            # a refusal was answered in a frame: a clean close lets it arrive (a reset may
            # drop it); a bad RPC command or a vanished head is reset
            await close_stream(stream, reset=outcome not in ("ok", "refused", "unauthorized"))

    async def _serve(self, stream: Stream, peer: str) -> str:
        if self.offered <= 0:
            await _send(stream, Error(ErrorCode.UNAVAILABLE, "this node offers no memory for"
                                      " layers (its owner can set --layers-memory)"))
            return "refused"
        if not self.is_authorized(peer):
            # before reading a byte: nothing an untrusted peer sends is even parsed
            await _send(stream, Error(ErrorCode.UNAUTHORIZED, f"peer {peer} may not place"
                                      " layers here; its owner can run `qvacd trust add"
                                      f" {peer} --roles layers`"))
            log.info("refused layers from %s: no layers role", short_peer_id(peer))
            return "unauthorized"
        if self.sessions[peer] >= self.max_streams_per_peer:
            await _send(stream, Error(ErrorCode.BUSY, f"{self.sessions[peer]} layer sessions"
                                      " of yours are open here already", retry_after=5.0))
            return "refused"
        self.sessions[peer] += 1
        try:
            return await self._session(stream, peer)
        finally:
            self.sessions[peer] -= 1
            if not self.sessions[peer]:
                del self.sessions[peer]

    async def _session(self, stream: Stream, peer: str) -> str:
        decoder = FrameDecoder(LAYERS_LIMITS)
        hello = None
        with trio.move_on_after(HELLO_TIMEOUT_S):
            while hello is None:
                data = await read_some(stream)
                if not data:
                    decoder.feed_eof()
                else:
                    decoder.feed(data)
                hello = decoder.next_message()
                if hello is None and not data:
                    return "gone"
        if hello is None:
            await _send(stream, Error(ErrorCode.DEADLINE, "no LayersHello within"
                                      f" {HELLO_TIMEOUT_S:.0f} s"))
            return "refused"
        if not isinstance(hello, LayersHello):
            raise ProtocolError(ErrorCode.PROTOCOL, "the first frame on /qvac/layers must be"
                                " a LayersHello")
        if decoder.buffered:
            raise ProtocolError(ErrorCode.PROTOCOL, "RPC bytes sent before LayersReady")
        try:
            ours = await library_rpc_version()
        except RuntimeError as e:
            await _send(stream, Error(ErrorCode.UNAVAILABLE, str(e)[:4000]))
            return "refused"
        head = (hello.rpc_major, hello.rpc_minor, hello.rpc_patch)
        why = version_refusal(head, ours)
        if why is not None:
            log.warning("refused layers from %s: %s", short_peer_id(peer), why)
            await _send(stream, Error(ErrorCode.BAD_REQUEST, why))
            return "refused"
        server = self._servers.get(peer)
        held = server.memory if server is not None else 0  # this head's grant, reusable
        if hello.memory > self.free + held:
            await _send(stream, Error(
                ErrorCode.TOO_LARGE, f"{_mib(hello.memory)} asked for layers, {_mib(self.free)}"
                f" of the {_mib(self.offered)} offered here is free"))
            return "refused"
        sha = hello.model_sha256
        path = self.model_file(sha) if sha and (peer, sha) not in self._copy_refused else None
        if hello.probe:
            await _send(stream, LayersReady(*ours, memory=hello.memory,
                                            holds_model=path is not None))
            return "ok"
        model_fd = None
        if path is not None:
            try:
                model_fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                log.warning("cannot open our copy of %s (%s): the head %s sends the weights",
                            path, e, short_peer_id(peer))
        try:
            return await self._place(stream, peer, hello, LayersReady(
                *ours, memory=hello.memory, holds_model=model_fd is not None), model_fd)
        finally:
            if model_fd is not None:
                os.close(model_fd)

    async def _place(self, stream: Stream, peer: str, hello: LayersHello, ready: LayersReady,
                     model_fd: int | None) -> str:
        try:
            server = await self._server_for(peer, hello.memory)
        except _Busy as e:
            await _send(stream, Error(ErrorCode.BUSY, str(e), retry_after=5.0))
            return "refused"
        server.sessions += 1
        try:
            tcp = await trio.open_tcp_stream(LOOPBACK, server.port)
            async with tcp:
                await _send(stream, ready)
                log.info("layer session of %s: %s granted, RPC server pid %d",
                         short_peer_id(peer), _mib(server.memory), server.proc.pid)
                return await self._pump(stream, tcp, peer, server.memory, model_fd,
                                        hello.model_sha256)
        finally:
            server.sessions -= 1
            server.idle_since = trio.current_time()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Owns the RPC server processes: ends one that outlived its head's sessions by
        SERVER_LINGER_S, and all of them when cancelled (shutdown)."""
        try:
            task_status.started()
            while True:
                await trio.sleep(1)
                now = trio.current_time()
                for peer, sv in list(self._servers.items()):
                    if sv.proc.poll() is not None or (
                            not sv.sessions and now - sv.idle_since > SERVER_LINGER_S):
                        await self._stop_server(peer)
        finally:
            with trio.CancelScope(shield=True):
                for peer in list(self._servers):
                    await self._stop_server(peer)

    async def _server_for(self, peer: str, memory: int) -> _Server:
        """This head's RPC server process, started (or restarted with a larger cap) as
        needed. One per head: llama.cpp opens several short connections while it loads
        and ggml's server serves them one after the other, each with fresh state."""
        sv = self._servers.get(peer)
        if sv is not None and sv.proc.poll() is None and sv.memory >= memory:
            return sv
        if sv is not None:
            if sv.sessions:
                raise _Busy("a layer session of yours with a smaller grant is still open"
                            " here")
            await self._stop_server(peer)
        port = free_loopback_port()
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "qvacd.layer_worker", "--port", str(port),
             "--cache-dir", str(self.cache_dir), "--threads", str(self.n_threads),
             "--memory", str(memory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env())
        sv = self._servers[peer] = _Server(proc, port, memory, idle_since=trio.current_time())
        self.reserved += memory
        self.server_pids.add(proc.pid)
        self.on_change()
        try:
            with trio.fail_after(SERVER_START_TIMEOUT_S):
                while not _listening(port):
                    if proc.poll() is not None:
                        raise RuntimeError(f"the RPC server exited ({proc.returncode})")
                    await trio.sleep(0.05)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._stop_server(peer)
            raise
        return sv

    async def _stop_server(self, peer: str) -> None:
        sv = self._servers.pop(peer, None)
        if sv is None:
            return
        self.reserved -= sv.memory
        self.server_pids.discard(sv.proc.pid)
        with contextlib.suppress(ProcessLookupError, OSError):
            sv.proc.kill()
        with trio.move_on_after(5):
            await sv.proc.wait()
        self.on_change()

    async def _pump(self, stream: Stream, tcp: trio.SocketStream, peer: str,
                    granted: int, model_fd: int | None, sha: str | None) -> str:
        guard = RpcCommandGuard(max_command=granted, file_size=None if model_fd is None
                                else os.fstat(model_fd).st_size)
        idle = trio.CancelScope(deadline=trio.current_time() + self.idle_timeout)
        result = "ok"

        def touch() -> None:
            idle.deadline = trio.current_time() + self.idle_timeout

        async def head_to_server() -> None:
            nonlocal result
            try:
                while True:
                    data = await read_some(stream)
                    if not data:
                        break
                    items = guard.feed(data)
                    self.bytes_in += len(data)
                    touch()
                    for item in items:
                        if isinstance(item, TensorFromFile):
                            assert model_fd is not None  # the guard refuses it otherwise
                            try:
                                tensor = await trio.to_thread.run_sync(_read_tensor, model_fd,
                                                                       item)
                            except ProtocolError:
                                assert sha is not None
                                self._copy_refused.add((peer, sha))
                                log.warning("head %s sent a SET_TENSOR_FROM_FILE that our copy"
                                            " of %s does not match; its next load gets the"
                                            " weights over the network (if our copy is"
                                            " damaged, delete and pull the model again)",
                                            short_peer_id(peer), sha[:12])
                                raise
                            await tcp.send_all(item.set_tensor_header())
                            await tcp.send_all(tensor)
                            self.bytes_from_file += item.size
                        else:
                            await tcp.send_all(item)
            except ProtocolError as e:
                log.warning("layer session of %s ended: %s", short_peer_id(peer), e)
                result = "protocol"  # the stream is reset: RPC bytes cannot carry an Error
            nursery.cancel_scope.cancel()

        async def server_to_head() -> None:
            while True:
                data = await tcp.receive_some(_PUMP_READ)
                if not data:
                    break
                self.bytes_out += len(data)
                touch()
                await stream.write(data)
            nursery.cancel_scope.cancel()

        with idle:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(head_to_server)
                nursery.start_soon(server_to_head)
        if idle.cancelled_caught:
            log.info("layer session of %s idle for %.0f s; ended it", short_peer_id(peer),
                     self.idle_timeout)
        return result


def _read_tensor(fd: int, t: TensorFromFile) -> bytes:
    """The bytes SET_TENSOR_FROM_FILE names, from our copy, if they are what the head
    hashed (blocking: run in a thread). ProtocolError otherwise."""
    data = os.pread(fd, t.size, t.file_offset)
    if len(data) != t.size:
        raise ProtocolError(ErrorCode.PROTOCOL, f"SET_TENSOR_FROM_FILE reads past the end of"
                            f" the model file ({len(data)} of {t.size} bytes at"
                            f" {t.file_offset})")
    if hashlib.sha256(data).digest() != t.sha256:
        raise ProtocolError(ErrorCode.PROTOCOL, f"SET_TENSOR_FROM_FILE: the {t.size} bytes at"
                            f" file offset {t.file_offset} do not have the sha256 the head"
                            " sent")
    return data


def _listening(port: int) -> bool:
    """Is something listening on 127.0.0.1:port? Read /proc rather than connect: a probe
    connection would be the RPC server's one client for a moment."""
    want = f"0100007F:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 3 and parts[1] == want and parts[3] == "0A":
                    return True
    except OSError:
        pass
    return False


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


async def _send(stream: Stream, msg: Any) -> None:
    await stream.write(encode_frame(msg, LAYERS_LIMITS))


async def _try_send(stream: Stream, msg: Any) -> None:
    with contextlib.suppress(Exception):
        with trio.move_on_after(2):
            await _send(stream, msg)
