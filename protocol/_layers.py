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

Weights from the worker's own file: ggml's cache by hash (SET_TENSOR_HASH) only covers
tensors over 10 MiB, and a small model's layer tensors are all under one, so without more
every weight crosses the network. When the worker said it holds the model file
(`LayersReady.holds_model`), the head's `SetTensorScanner` holds back each SET_TENSOR (6)
whose data may be a tensor of the file (at least FROM_FILE_MIN_DATA bytes, the first
FROM_FILE_PREFIX of them found in the head's index of the file), and qvacd sends
SET_TENSOR_FROM_FILE (0xF0, outside ggml's numbers) instead when the bytes match:
`| 0xF0 | 353 u64 | rpc_tensor (296) | cache_flag u8 | offset u64 | file_offset u64 |
size u64 | sha256 (32) |`. The worker's guard accepts it only on such a session, checks
its bounds (`TensorFromFile`), and the worker rewrites it into the SET_TENSOR it stands
for from its own copy, after checking the sha256 of what it read. Everything else passes
through at once: the decode waits on a round trip per token.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from ._errors import ErrorCode, ProtocolError
from ._limits import Limits

__all__ = [
    "FROM_FILE_MIN_DATA",
    "FROM_FILE_PREFIX",
    "LAYERS_LIMITS",
    "RPC_CMD_COUNT",
    "RPC_CMD_HELLO",
    "RPC_CMD_SET_TENSOR",
    "RPC_CMD_SET_TENSOR_FROM_FILE",
    "RPC_HELLO_SIZE",
    "RPC_TENSOR_SIZE",
    "RpcCommandGuard",
    "SetTensor",
    "SetTensorScanner",
    "TensorFromFile",
]

# ggml-rpc.cpp, enum rpc_cmd: ALLOC_BUFFER = 0 ... MEMSET_TENSOR = 17, NONE = 18, COUNT = 19
RPC_CMD_HELLO = 14
RPC_CMD_NONE = 18
RPC_CMD_COUNT = 19
RPC_HELLO_SIZE = 24  # sizeof(rpc_msg_hello_req): RPC_CONN_CAPS_SIZE bytes of capabilities
RPC_CMD_SET_TENSOR = 6  # | rpc_tensor | cache_flag u8 | offset u64 | data |, no answer
RPC_TENSOR_SIZE = 296  # sizeof(struct rpc_tensor), packed (GGML_MAX_DIMS 4, MAX_SRC 10)
RPC_CMD_SET_TENSOR_FROM_FILE = 0xF0  # qvacd's: the data is in the worker's model file
FROM_FILE_MIN_DATA = 64 * 1024  # smaller SET_TENSORs (activations, norms) pass at once
FROM_FILE_PREFIX = 16  # data bytes the head's index of the file is keyed on (with the size)
_HEADER = 9
_SET_HEAD = RPC_TENSOR_SIZE + 1 + 8  # rpc_tensor | cache_flag | offset: before the data
_FROM_FILE = struct.Struct("<QQ32s")  # file_offset, size, sha256, after the SET_TENSOR head
FROM_FILE_SIZE = _SET_HEAD + _FROM_FILE.size  # 353

# The opening frames are a few small maps, from peers not yet known to be allowed.
LAYERS_LIMITS = Limits(max_frame_size=8 * 1024, max_str_len=4096, max_bin_len=64,
                       max_array_len=8, max_map_len=16, max_containers=4)


class _Output:
    """The output of one feed: runs of forwarded bytes (joined), and whole commands."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.out: list = []
        self._run: list[bytes | memoryview] = []

    def forward(self, piece: bytes | memoryview) -> None:
        if len(piece):
            self._run.append(piece)

    def command(self, item: object) -> None:
        self.flush()
        self.out.append(item)

    def flush(self) -> None:
        if self._run:
            whole = (len(self._run) == 1 and not self.out and isinstance(self._run[0], memoryview)
                     and len(self._run[0]) == len(self.data))
            self.out.append(self.data if whole else b"".join(self._run))  # no copy if whole
            self._run = []

    def done(self) -> list:
        self.flush()
        return self.out


@dataclass(frozen=True)
class TensorFromFile:
    """SET_TENSOR_FROM_FILE: a SET_TENSOR whose `size` data bytes are the worker's model
    file from `file_offset`, their sha256 `sha256`. `head` is the SET_TENSOR's own first
    bytes (`rpc_tensor | cache_flag | offset`), passed on unchanged."""

    head: bytes
    file_offset: int
    size: int
    sha256: bytes

    def __post_init__(self) -> None:
        if len(self.head) != _SET_HEAD:
            raise ProtocolError(ErrorCode.PROTOCOL, f"SET_TENSOR_FROM_FILE head of"
                                f" {len(self.head)} bytes, not {_SET_HEAD}")
        if not 0 < self.size < 2**63 or not 0 <= self.file_offset < 2**63:
            raise ProtocolError(ErrorCode.PROTOCOL, f"SET_TENSOR_FROM_FILE of {self.size}"
                                f" bytes at file offset {self.file_offset}")
        if len(self.sha256) != 32:
            raise ProtocolError(ErrorCode.PROTOCOL, "SET_TENSOR_FROM_FILE digest must be"
                                " 32 bytes")

    def encode(self) -> bytes:
        """The whole command, header included."""
        return (bytes([RPC_CMD_SET_TENSOR_FROM_FILE]) + struct.pack("<Q", FROM_FILE_SIZE)
                + self.head + _FROM_FILE.pack(self.file_offset, self.size, self.sha256))

    @classmethod
    def from_payload(cls, payload: bytes) -> TensorFromFile:
        if len(payload) != FROM_FILE_SIZE:
            raise ProtocolError(ErrorCode.PROTOCOL, f"SET_TENSOR_FROM_FILE must be"
                                f" {FROM_FILE_SIZE} bytes, got {len(payload)}")
        file_offset, size, digest = _FROM_FILE.unpack_from(payload, _SET_HEAD)
        return cls(bytes(payload[:_SET_HEAD]), file_offset, size, digest)

    def set_tensor_header(self) -> bytes:
        """The SET_TENSOR this stands for, up to its data (the `size` bytes follow)."""
        return (bytes([RPC_CMD_SET_TENSOR]) + struct.pack("<Q", _SET_HEAD + self.size)
                + self.head)


@dataclass(frozen=True)
class SetTensor:
    """A whole SET_TENSOR command as llama.cpp sent it (held back by SetTensorScanner)."""

    command: bytes

    @property
    def head(self) -> bytes:
        return self.command[_HEADER:_HEADER + _SET_HEAD]

    @property
    def data(self) -> memoryview:
        return memoryview(self.command)[_HEADER + _SET_HEAD:]


class SetTensorScanner:
    """Sans-IO, head side: the head's RPC byte stream to a worker that holds the model file.
    `feed(data)` returns, in order, runs of bytes to forward as they are and a SetTensor
    for each SET_TENSOR held back whole: one with at least `min_data` data bytes (and at
    most `max_hold` in all) whose size and first FROM_FILE_PREFIX data bytes
    `is_candidate(size, prefix)` finds in the file. Any other command goes on as it
    arrives (only a command header cut between two reads waits for its last bytes)."""

    def __init__(self, is_candidate: Callable[[int, bytes], bool], *, max_hold: int,
                 min_data: int = FROM_FILE_MIN_DATA) -> None:
        self.is_candidate = is_candidate
        self.max_hold = max_hold
        self.min_data = max(min_data, FROM_FILE_PREFIX)
        self.held = 0  # SetTensors returned
        self._header = bytearray()
        self._pass_left = 0
        self._hold: bytearray | None = None
        self._hold_left = 0
        self._peeking = False

    def feed(self, data: bytes) -> list[bytes | SetTensor]:
        out, view = _Output(data), memoryview(data)
        pos, n = 0, len(view)
        while pos < n:
            if self._pass_left:
                take = min(self._pass_left, n - pos)
                out.forward(view[pos:pos + take])
                self._pass_left -= take
                pos += take
                continue
            if self._hold is not None:
                take = min(self._hold_left, n - pos)
                self._hold += view[pos:pos + take]
                self._hold_left -= take
                pos += take
                self._decide(out)
                continue
            take = min(_HEADER - len(self._header), n - pos)
            self._header += view[pos:pos + take]
            pos += take
            if len(self._header) < _HEADER:
                break
            cmd = self._header[0]
            (size,) = struct.unpack_from("<Q", self._header, 1)
            header = bytes(self._header)
            self._header.clear()
            if cmd == RPC_CMD_SET_TENSOR and _SET_HEAD + self.min_data <= size <= self.max_hold:
                self._hold, self._hold_left, self._peeking = bytearray(header), size, True
            else:
                out.forward(header)
                self._pass_left = size
        return out.done()

    def _decide(self, out: _Output) -> None:
        hold = self._hold
        assert hold is not None
        start = _HEADER + _SET_HEAD
        if self._peeking and len(hold) >= start + FROM_FILE_PREFIX:
            self._peeking = False
            size = len(hold) + self._hold_left - start
            if not self.is_candidate(size, bytes(hold[start:start + FROM_FILE_PREFIX])):
                out.forward(bytes(hold))  # not the file's: the rest streams as it comes
                self._pass_left, self._hold, self._hold_left = self._hold_left, None, 0
                return
        if not self._hold_left:
            self.held += 1
            out.command(SetTensor(bytes(hold)))
            self._hold = None


class RpcCommandGuard:
    """Sans-IO check of the head -> worker RPC byte stream. `feed(data)` returns what to
    send the RPC server, in order: runs of bytes as they came, and a TensorFromFile for each
    SET_TENSOR_FROM_FILE (the worker reads and checks its data, then sends
    `set_tensor_header()` and the data). It raises ProtocolError(PROTOCOL or TOO_LARGE) at
    the first bad command header; what earlier calls returned is fine to forward, the
    failing call's output is not. `file_size`: the model file this worker holds for the
    session, in bytes (None: it holds none, and SET_TENSOR_FROM_FILE is refused)."""

    def __init__(self, max_command: int, file_size: int | None = None) -> None:
        self.max_command = max_command
        self.file_size = file_size
        self.commands = 0
        self.bytes = 0
        self._header = bytearray()
        self._payload_left = 0
        self._from_file: bytearray | None = None  # a SET_TENSOR_FROM_FILE being read
        self._error: ProtocolError | None = None

    def feed(self, data: bytes) -> list[bytes | TensorFromFile]:
        if self._error is not None:
            raise self._error
        try:
            out = self._feed(data)
        except ProtocolError as e:
            self._error = e
            raise
        self.bytes += len(data)
        return out

    def _feed(self, data: bytes) -> list[bytes | TensorFromFile]:
        out, view = _Output(data), memoryview(data)
        pos, n = 0, len(view)
        while pos < n:
            if self._payload_left:
                take = min(self._payload_left, n - pos)
                if self._from_file is not None:
                    self._from_file += view[pos:pos + take]
                else:
                    out.forward(view[pos:pos + take])
                self._payload_left -= take
                pos += take
                if not self._payload_left and self._from_file is not None:
                    out.command(self._file_command(bytes(self._from_file)))
                    self._from_file = None
                continue
            take = min(_HEADER - len(self._header), n - pos)
            self._header += view[pos:pos + take]
            pos += take
            if len(self._header) < _HEADER:
                break  # a header's first bytes wait for the rest
            cmd = self._header[0]
            (size,) = struct.unpack_from("<Q", self._header, 1)
            header = bytes(self._header)
            self._header.clear()
            self._check(cmd, size)
            self.commands += 1
            self._payload_left = size
            if cmd == RPC_CMD_SET_TENSOR_FROM_FILE:
                self._from_file = bytearray()
            else:
                out.forward(header)
        return out.done()

    def _check(self, cmd: int, size: int) -> None:
        if self.commands == 0:
            if cmd != RPC_CMD_HELLO or size != RPC_HELLO_SIZE:
                raise ProtocolError(ErrorCode.PROTOCOL,
                                    f"the first RPC command must be HELLO ({RPC_CMD_HELLO}) of"
                                    f" {RPC_HELLO_SIZE} bytes, got command {cmd} of {size}")
            return
        if cmd == RPC_CMD_SET_TENSOR_FROM_FILE:
            if self.file_size is None:
                raise ProtocolError(ErrorCode.PROTOCOL, "SET_TENSOR_FROM_FILE on a session"
                                    " whose worker did not say it holds the model")
            if size != FROM_FILE_SIZE:
                raise ProtocolError(ErrorCode.PROTOCOL, f"SET_TENSOR_FROM_FILE must be"
                                    f" {FROM_FILE_SIZE} bytes, got {size}")
            return
        if cmd >= RPC_CMD_NONE:
            raise ProtocolError(ErrorCode.PROTOCOL, f"unknown RPC command {cmd}")
        if cmd == RPC_CMD_HELLO:
            raise ProtocolError(ErrorCode.PROTOCOL, "a second RPC HELLO on one stream")
        if size > self.max_command:
            raise ProtocolError(ErrorCode.TOO_LARGE,
                                f"RPC command {cmd} of {size} bytes exceeds the"
                                f" {self.max_command} bytes granted")

    def _file_command(self, payload: bytes) -> TensorFromFile:
        t = TensorFromFile.from_payload(payload)
        assert self.file_size is not None
        if t.file_offset + t.size > self.file_size:
            raise ProtocolError(ErrorCode.PROTOCOL, f"SET_TENSOR_FROM_FILE reads bytes"
                                f" {t.file_offset}..{t.file_offset + t.size} of a"
                                f" {self.file_size}-byte file")
        if _SET_HEAD + t.size > self.max_command:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"SET_TENSOR_FROM_FILE of {t.size} bytes"
                                f" exceeds the {self.max_command} bytes granted")
        return t
