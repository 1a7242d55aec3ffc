"""`/qvac/layers/1.0.0` after its opening frames: llama.cpp RPC bytes, checked on the worker.

Once the worker answered `LayersReady`, the stream carries the byte stream of llama.cpp's
RPC protocol (ggml-rpc.cpp, protocol 7.x) unchanged in both directions: the libp2p
stream is already framed, encrypted and bound to both peer ids, so qvacd adds no frames
of its own (each extra copy costs tokens/s: the decode waits on a round trip per token).

The worker does not pass those bytes on blindly: `RpcCommandGuard` parses the head's
side as RPC commands, `| cmd: u8 | size: u64 little-endian | size bytes |`, and refuses,
before a byte of the offending command reaches the RPC server:
- a first command that is not HELLO with its fixed 24-byte request,
- an unknown command number, or a second HELLO,
- a command whose declared size is over `max_command` (the memory the worker granted:
  nothing the head may send is larger than what it may place).
The server's answers are passed back as they come (the head's own llama.cpp checks them).
"""

from __future__ import annotations

import struct

from ._errors import ErrorCode, ProtocolError
from ._limits import Limits

__all__ = [
    "LAYERS_LIMITS",
    "RPC_CMD_COUNT",
    "RPC_CMD_HELLO",
    "RPC_HELLO_SIZE",
    "RpcCommandGuard",
]

# ggml-rpc.cpp, enum rpc_cmd: ALLOC_BUFFER = 0 ... MEMSET_TENSOR = 17, NONE = 18, COUNT = 19
RPC_CMD_HELLO = 14
RPC_CMD_NONE = 18
RPC_CMD_COUNT = 19
RPC_HELLO_SIZE = 24  # sizeof(rpc_msg_hello_req): RPC_CONN_CAPS_SIZE bytes of capabilities
_HEADER = 9

# The opening frames are a few small maps, from peers not yet known to be allowed.
LAYERS_LIMITS = Limits(max_frame_size=8 * 1024, max_str_len=4096, max_bin_len=64,
                       max_array_len=8, max_map_len=16, max_containers=4)


class RpcCommandGuard:
    """Sans-IO check of the head -> worker RPC byte stream. `feed(data)` raises
    ProtocolError(PROTOCOL or TOO_LARGE) at the first bad command header; the bytes fed
    before the failing call are fine to forward, the failing call's bytes are not."""

    def __init__(self, max_command: int) -> None:
        self.max_command = max_command
        self.commands = 0
        self.bytes = 0
        self._header = bytearray()
        self._payload_left = 0
        self._error: ProtocolError | None = None

    def feed(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        try:
            self._feed(memoryview(data))
        except ProtocolError as e:
            self._error = e
            raise
        self.bytes += len(data)

    def _feed(self, view: memoryview) -> None:
        pos, n = 0, len(view)
        while pos < n:
            if self._payload_left:
                take = min(self._payload_left, n - pos)
                self._payload_left -= take
                pos += take
                continue
            take = min(_HEADER - len(self._header), n - pos)
            self._header += view[pos:pos + take]
            pos += take
            if len(self._header) < _HEADER:
                return
            cmd = self._header[0]
            (size,) = struct.unpack_from("<Q", self._header, 1)
            self._header.clear()
            self._check(cmd, size)
            self.commands += 1
            self._payload_left = size

    def _check(self, cmd: int, size: int) -> None:
        if self.commands == 0:
            if cmd != RPC_CMD_HELLO or size != RPC_HELLO_SIZE:
                raise ProtocolError(ErrorCode.PROTOCOL,
                                    f"the first RPC command must be HELLO ({RPC_CMD_HELLO}) of"
                                    f" {RPC_HELLO_SIZE} bytes, got command {cmd} of {size}")
            return
        if cmd >= RPC_CMD_NONE:
            raise ProtocolError(ErrorCode.PROTOCOL, f"unknown RPC command {cmd}")
        if cmd == RPC_CMD_HELLO:
            raise ProtocolError(ErrorCode.PROTOCOL, "a second RPC HELLO on one stream")
        if size > self.max_command:
            raise ProtocolError(ErrorCode.TOO_LARGE,
                                f"RPC command {cmd} of {size} bytes exceeds the"
                                f" {self.max_command} bytes granted")
