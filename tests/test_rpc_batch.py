"""qvacd/rpc_batch.py: the head's RPC bytes held until a command the client awaits."""

from __future__ import annotations

import struct

import trio

from qvacd.rpc_batch import RpcBatchReader

SET_TENSOR, GRAPH_RECOMPUTE, GET_TENSOR = 6, 16, 8


def cmd(number: int, payload: bytes) -> bytes:
    return bytes([number]) + struct.pack("<Q", len(payload)) + payload


async def _pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def test_unanswered_commands_wait_for_the_answered_one() -> None:
    client, server = await _pair()
    reader = RpcBatchReader(server, 1 << 20, hold_s=10)
    token = [cmd(SET_TENSOR, b"x" * 300) for _ in range(10)] + [cmd(GRAPH_RECOMPUTE, b"\0" * 4)]
    get = cmd(GET_TENSOR, b"g" * 312)
    async with trio.open_nursery() as nursery:
        async def write() -> None:
            for piece in token:  # one write each, as llama.cpp's client does
                await client.send_all(piece)
                await trio.sleep(0.01)
            await client.send_all(get[:5])  # an answered command cut in two writes
            await trio.sleep(0.01)
            await client.send_all(get[5:])
        nursery.start_soon(write)
        with trio.fail_after(5):
            first = await reader.receive()
            rest = b""
            if first != b"".join(token) + get:
                rest = await reader.receive()  # the answered command's tail, not held
    assert first + rest == b"".join(token) + get
    assert first.startswith(b"".join(token) + get[:5])
    assert reader.reads >= 12 and reader.batches <= 2


async def test_held_bytes_go_after_hold_s_and_at_end_of_stream() -> None:
    client, server = await _pair()
    reader = RpcBatchReader(server, 1 << 20, hold_s=0.05)
    await client.send_all(cmd(SET_TENSOR, b"a" * 10))
    t0 = trio.current_time()
    with trio.fail_after(5):
        assert await reader.receive() == cmd(SET_TENSOR, b"a" * 10)
    assert trio.current_time() - t0 >= 0.04
    await client.send_all(cmd(SET_TENSOR, b"b" * 10))
    await client.aclose()
    with trio.fail_after(5):
        assert await reader.receive() == cmd(SET_TENSOR, b"b" * 10)
        assert await reader.receive() == b""


async def test_a_batch_is_at_most_max_bytes_and_unknown_commands_are_not_held() -> None:
    client, server = await _pair()
    reader = RpcBatchReader(server, 4096, hold_s=10)
    big = cmd(SET_TENSOR, b"w" * 10000) + cmd(GET_TENSOR, b"g" * 312)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, big)
        with trio.fail_after(5):  # hold_s 10: only the size limit and the GET end batches
            got = b""
            while len(got) < len(big):
                part = await reader.receive()
                assert 0 < len(part) <= 4096
                got += part
    assert got == big
    await client.send_all(cmd(0xF0, b"z" * 20))  # not a ggml command it knows: goes at once
    with trio.fail_after(5):
        assert await reader.receive() == cmd(0xF0, b"z" * 20)
