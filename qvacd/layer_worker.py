"""The worker side's RPC server: llama.cpp's `ggml_backend_rpc_start_server` in a process
of its own, on loopback only.

Run as `python -m qvacd.layer_worker --port P --cache-dir D --threads N --memory BYTES`
by `qvacd.services.layers.LayersService`, one process per authorized layer session:
ggml's server serves one client at a time and keeps that client's buffers until it
leaves, so a process per session gives each head its own memory cap (RLIMIT_DATA, the
memory the worker granted plus this process's own baseline) and frees everything when
the session ends, whatever state the RPC server was left in.

Why loopback only: llama.cpp's RPC server trusts whoever connects ("never run the RPC
server on an open network"); the only way in from another machine is the authenticated
`/qvac/layers/1.0.0` stream that qvacd forwards to this port after checking the peer.
ggml's endpoint parser takes "host:port" (TCP only, no unix sockets), so the host is
pinned to 127.0.0.1 here and nothing else is accepted.

`--version` prints the RPC protocol version of the installed llama.cpp and exits: it
starts a server on a loopback port in a thread and reads the version from its HELLO
reply (the library exports no version function), so both ends of a layer stream can
compare versions before any layer is placed.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import socket
import struct
import sys
import threading
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"
RPC_CMD_HELLO = 14
RPC_CONN_CAPS_SIZE = 24  # ggml-rpc transport.h: the HELLO request is this many zero bytes
_BASELINE_SLACK = 96 * 1024 * 1024  # allocator and thread stacks above the measured baseline
GGML_BACKEND_DEVICE_TYPE_CPU = 0


class RpcUnavailable(Exception):
    """This llama-cpp-python was built without the RPC backend (one line says how to fix)."""


REBUILD_HINT = (
    "llama-cpp-python was built without the RPC backend (no libggml-rpc.so in llama_cpp/lib);"
    " rebuild it: pip cache remove llama_cpp_python; CMAKE_ARGS=\"<the README's flags>"
    " -DGGML_RPC=on\" pip install --force-reinstall --no-deps --no-binary llama-cpp-python"
    " llama-cpp-python==0.3.36")


def llama_lib_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise RpcUnavailable("llama-cpp-python is not installed; pip install -e '.[model]'")
    return Path(spec.origin).parent / "lib"


def rpc_available() -> bool:
    try:
        return (llama_lib_dir() / "libggml-rpc.so").exists()
    except RpcUnavailable:
        return False


def _load_libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    lib_dir = llama_lib_dir()
    rpc_path = lib_dir / "libggml-rpc.so"
    if not rpc_path.exists():
        raise RpcUnavailable(REBUILD_HINT)
    mode = ctypes.RTLD_GLOBAL

    def so(name: str) -> str:  # the soname copy (.so.0): the one the libraries link
        p = lib_dir / f"{name}.so.0"
        return str(p if p.exists() else lib_dir / f"{name}.so")

    ctypes.CDLL(so("libggml-base"), mode=mode)
    ggml = ctypes.CDLL(so("libggml"), mode=mode)
    rpc = ctypes.CDLL(so("libggml-rpc"), mode=mode)
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    rpc.ggml_backend_rpc_start_server.restype = None
    rpc.ggml_backend_rpc_start_server.argtypes = [
        ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_void_p)]
    return ggml, rpc


def serve(port: int, cache_dir: str | None, n_threads: int) -> None:
    """Blocks serving this machine's CPU on 127.0.0.1:port (returns only if it cannot bind)."""
    ggml, rpc = _load_libs()
    cpu = ggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    if not cpu:
        raise RuntimeError("ggml has no CPU device")
    devices = (ctypes.c_void_p * 1)(cpu)
    endpoint = f"{LOOPBACK}:{port}".encode()
    cache = cache_dir.encode() if cache_dir else None
    rpc.ggml_backend_rpc_start_server(endpoint, cache, n_threads, 1, devices)


def rpc_hello(port: int, timeout: float = 5.0) -> tuple[int, int, int]:
    """Connect to a local RPC server, send HELLO, return its (major, minor, patch)."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        s.sendall(bytes([RPC_CMD_HELLO]) + struct.pack("<Q", RPC_CONN_CAPS_SIZE)
                  + bytes(RPC_CONN_CAPS_SIZE))
        head = _recv_exact(s, 8)
        (size,) = struct.unpack("<Q", head)
        if size < 3 or size > 64:
            raise RuntimeError(f"RPC server answered HELLO with {size} bytes")
        body = _recv_exact(s, size)
        return body[0], body[1], body[2]


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        got = s.recv(n - len(out))
        if not got:
            raise RuntimeError("RPC server closed the connection")
        out += got
    return out


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _data_in_use() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _print_version() -> int:
    port = free_loopback_port()
    t = threading.Thread(target=serve, args=(port, None, 1), daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while True:
        try:
            major, minor, patch = rpc_hello(port)
            break
        except (OSError, RuntimeError):
            if time.monotonic() > deadline or not t.is_alive():
                print("the RPC server did not start", file=sys.stderr)
                return 1
            time.sleep(0.05)
    # the server thread prints its own banner lines on stdout too: a marked line
    print(f"rpc-version {major}.{minor}.{patch}", flush=True)
    sys.stdout.flush()
    os._exit(0)  # the server thread blocks in accept() forever


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qvacd.layer_worker")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory", type=int, default=0,
                   help="bytes the session may allocate (0: no cap)")
    p.add_argument("--version", action="store_true")
    a = p.parse_args(argv)
    try:
        if a.version:
            return _print_version()
        if not 0 < a.port < 65536:
            print("--port is required", file=sys.stderr)
            return 2
        _load_libs()  # fail with the rebuild hint before any cap applies
        if a.memory > 0:
            # the buffers a head allocates are anonymous mappings, counted in RLIMIT_DATA
            cap = _data_in_use() + a.memory + _BASELINE_SLACK
            resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
        if a.cache_dir:
            os.makedirs(a.cache_dir, exist_ok=True)
        serve(a.port, a.cache_dir, max(1, a.threads))
    except RpcUnavailable as e:
        print(str(e), file=sys.stderr)
        return 3
    print(f"cannot listen on {LOOPBACK}:{a.port}", file=sys.stderr)
    return 4


if __name__ == "__main__":
    sys.exit(main())
