"""ggml-RPC-shaped traffic for tests/test_lab_split_capture.py (a fake: it frames commands
as ggml-rpc.cpp does, and computes nothing).

    python tests/lab_rpc_fake.py server IP PORT          answers GET_TENSOR with its size
    python tests/lab_rpc_fake.py relay LPORT IP PORT     127.0.0.1:LPORT -> IP:PORT (a tunnel)
    python tests/lab_rpc_fake.py client LPORT TOKENS     per token: SET_TENSOR + GRAPH_RECOMPUTE
                                                         + GET_TENSOR, then waits for the answer;
                                                         prints each answer's monotonic time

Each prints "ready" once listening (server, relay); every socket has a 30 s timeout.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time

ANSWER = 2560  # a 640-wide float32 hidden state, as gemma3-270m's
SET_TENSOR, GET_TENSOR, GRAPH_RECOMPUTE = 6, 8, 16


def _exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        got = s.recv(n - len(buf))
        if not got:
            raise EOFError
        buf += got
    return buf


def server(ip: str, port: int) -> None:
    lst = socket.create_server((ip, port))
    print("ready", flush=True)
    conn, _ = lst.accept()
    conn.settimeout(30)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            cmd, size = struct.unpack("<BQ", _exact(conn, 9))
            payload = _exact(conn, size)
            if cmd == GET_TENSOR:
                n = struct.unpack_from("<Q", payload, 304)[0]
                conn.sendall(struct.pack("<Q", n) + bytes(n))
    except EOFError:
        pass


def relay(lport: int, ip: str, port: int) -> None:
    lst = socket.create_server(("127.0.0.1", lport))
    print("ready", flush=True)
    a, _ = lst.accept()
    b = socket.create_connection((ip, port), timeout=30)
    for s in (a, b):
        s.settimeout(30)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        dst.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=pump, args=(b, a), daemon=True)
    t.start()
    pump(a, b)
    t.join(30)


def client(lport: int, tokens: int) -> None:
    s = socket.create_connection(("127.0.0.1", lport), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(tokens):
        set_tensor = bytes(296 + 1 + 8) + bytes(64)
        recompute = struct.pack("<I", 0)
        get = bytes(296) + struct.pack("<QQ", 0, ANSWER)
        s.sendall(b"".join(struct.pack("<BQ", c, len(p)) + p for c, p in (
            (SET_TENSOR, set_tensor), (GRAPH_RECOMPUTE, recompute), (GET_TENSOR, get))))
        n = struct.unpack("<Q", _exact(s, 8))[0]
        _exact(s, n)
        print(time.monotonic(), flush=True)
        time.sleep(0.05)
    s.close()


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "server":
        server(rest[0], int(rest[1]))
    elif mode == "relay":
        relay(int(rest[0]), rest[1], int(rest[2]))
    else:
        client(int(rest[0]), int(rest[1]))
