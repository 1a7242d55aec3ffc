"""A TCP relay on loopback with a bandwidth cap: a slower link between two local daemons.

`ShapedLink(target_port)` listens on 127.0.0.1 and forwards every connection to
127.0.0.1:`target_port`, each direction paced to at most `rate` bytes per second
(None: as fast as loopback goes). The rate can be changed while it runs, so one pair of
daemons can be measured at several link speeds. It counts the bytes it carried.

Why a relay and not `tc`: the machine is shared, and shaping the loopback interface
would slow every other process on it; this shapes only what is dialled through it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

_READ = 64 * 1024


class ShapedLink:
    def __init__(self, target_port: int, rate: float | None = None) -> None:
        self.target_port = target_port
        self.rate = rate  # bytes/s each way; None: no cap
        self.carried = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        due = time.monotonic()  # when the bytes sent so far may have left at `rate`
        try:
            while True:
                data = src.recv(_READ)
                if not data:
                    break
                rate = self.rate
                if rate:
                    due = max(due, time.monotonic()) + len(data) / rate
                    wait = due - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                dst.sendall(data)
                with self._lock:
                    self.carried += len(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()
