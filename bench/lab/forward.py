"""Unix socket -> 127.0.0.1:PORT forwarder, run inside a lab host's network namespace.

    ip netns exec NS python -m bench.lab.forward SOCKET_PATH PORT

Unix sockets live in the file system, not in a network namespace, so the lab (in the
host namespace) reaches the daemon's API, which listens on 127.0.0.1 inside NS, through
SOCKET_PATH, and that traffic never crosses the lab's impaired links. A connection made
while the daemon is down is closed at once (the client sees no response). Prints "ready"
once listening; exits when its stdin closes (the lab went away).
"""

from __future__ import annotations

import os
import sys

import trio


async def pump(src: trio.abc.Stream, dst: trio.abc.Stream) -> None:
    try:
        while data := await src.receive_some(65536):
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def handle(client: trio.SocketStream, port: int) -> None:
    async with client:
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            return
        # Either side closing closes both: a client that goes away must look, to the
        # daemon, like a client that went away (it stops generating).
        async with upstream, trio.open_nursery() as nursery:
            async def one_way(a: trio.abc.Stream, b: trio.abc.Stream) -> None:
                await pump(a, b)
                nursery.cancel_scope.cancel()

            nursery.start_soon(one_way, client, upstream)
            nursery.start_soon(one_way, upstream, client)


async def main(path: str, port: int) -> None:
    if os.path.exists(path):
        os.unlink(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(256)
    listener = trio.SocketListener(sock)
    async with trio.open_nursery() as nursery:
        async def serve() -> None:
            async with listener:
                while True:
                    conn = await listener.accept()
                    nursery.start_soon(handle, conn, port)

        async def watch_stdin() -> None:
            await trio.to_thread.run_sync(sys.stdin.buffer.read, abandon_on_cancel=True)
            nursery.cancel_scope.cancel()

        nursery.start_soon(serve)
        nursery.start_soon(watch_stdin)
        print("ready", flush=True)


if __name__ == "__main__":
    try:
        trio.run(main, sys.argv[1], int(sys.argv[2]))
    except KeyboardInterrupt:
        pass
