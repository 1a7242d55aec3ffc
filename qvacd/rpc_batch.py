"""Head side of a layer tunnel: llama.cpp's RPC bytes read in batches that end where the
client waits for an answer.

llama.cpp's RPC client writes each command as it comes (one socket write or two per
command): per generated token about a dozen (the worker's inputs as SET_TENSORs, a
GRAPH_RECOMPUTE, then a GET_TENSOR for its output), and only the last one is answered.
Forwarded one read at a time, each became its own libp2p write (a yamux frame, a Noise
message) and its own forward on the worker, both daemons waking for each: measured with
strace on gemma3-270m, about 11 writes per token from the head and as many on the worker.

Commands that get no answer (below) change nothing the client can see until it sends a
command that is answered, on the same connection, so holding them until then is safe and
costs the client no time: `RpcBatchReader.receive` returns what arrived once it holds a
byte of an answered command (or of any command it does not know), once it holds
`max_bytes`, at end of stream, or HOLD_S after its first byte, whichever comes first.
"""

from __future__ import annotations

import struct

import trio

# ggml-rpc.cpp (protocol 7): the commands rpc_serve_client answers with nothing
RPC_NO_REPLY = frozenset({
    4,   # FREE_BUFFER
    5,   # BUFFER_CLEAR
    6,   # SET_TENSOR
    10,  # GRAPH_COMPUTE
    12,  # INIT_TENSOR
    16,  # GRAPH_RECOMPUTE
    17,  # MEMSET_TENSOR
})
HOLD_S = 0.02  # a bound only: every step of the client ends with an answered command
_HEADER = 9  # command u8 | size u64


class RpcBatchReader:
    def __init__(self, tcp: trio.SocketStream, max_bytes: int, hold_s: float = HOLD_S
                 ) -> None:
        self.tcp = tcp
        self.max_bytes = max_bytes
        self.hold_s = hold_s
        self.reads = 0  # socket reads, and batches returned: what the holding saves
        self.batches = 0
        self._eof = False
        self._header = bytearray()
        self._left = 0  # bytes of the current command's payload still to come
        self._answered = False  # the current command is one the client awaits

    async def receive(self) -> bytes:
        """The next batch; b"" at end of stream."""
        buf = bytearray()
        deadline = float("inf")
        while not self._eof:
            data = b""
            with trio.move_on_at(deadline):
                data = await self.tcp.receive_some(self.max_bytes - len(buf))
                if not data:
                    self._eof = True
            if not data:  # end of stream, or held HOLD_S
                break
            self.reads += 1
            buf += data
            if self._scan(data) or len(buf) >= self.max_bytes:
                break
            if deadline == float("inf"):
                deadline = trio.current_time() + self.hold_s
        if buf:
            self.batches += 1
        return bytes(buf)

    def _scan(self, data: bytes) -> bool:
        """Follow the command framing over `data`; True if any of it belongs to a command
        the client awaits an answer to."""
        urgent = False
        pos, n = 0, len(data)
        while pos < n:
            if self._left:
                take = min(self._left, n - pos)
                self._left -= take
                pos += take
                urgent = urgent or self._answered
                continue
            need = _HEADER - len(self._header)
            self._header += data[pos:pos + need]
            pos += min(need, n - pos)
            self._answered = self._header[0] not in RPC_NO_REPLY
            urgent = urgent or self._answered
            if len(self._header) == _HEADER:
                (self._left,) = struct.unpack_from("<Q", self._header, 1)
                self._header.clear()
        return urgent
