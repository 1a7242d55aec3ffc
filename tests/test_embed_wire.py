"""/qvac/embed/1.0.0: the consumer's state machine and the provider's framing (sans-IO),
then a real daemon from a raw libp2p client: bad frames get protocol errors and the
daemon keeps serving; an untrusted caller is refused before any model work; trusted, it
gets the same vectors as the daemon's own HTTP API; an over-long text with truncate
false is refused with both lengths."""

from __future__ import annotations

import struct
from pathlib import Path

import httpx
import msgpack
import multiaddr
import numpy as np
import pytest
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr

from peers.host import make_host
from peers.identity import Identity, load_or_create_identity
from peers.trust import TrustStore
from protocol import (
    EMBED_LIMITS,
    EMBED_PROTOCOL,
    MAX_EMBED_PIECE,
    EmbedClientState,
    EmbedDone,
    EmbedRequest,
    EmbedVectors,
    Error,
    ErrorCode,
    FrameDecoder,
    ProtocolError,
    StreamState,
    Token,
    decode_frame,
    encode_frame,
    encode_varint,
    limits_for,
)
from qvacd.services.embed import vector_frames
from tests.harness import Daemon, clone_data_dir, free_port

MODEL = "gemma3-270m"
N_EMBD = 640


def vectors(n: int, dims: int) -> list[list[float]]:
    rng = np.random.default_rng(n * 7 + dims)
    return rng.standard_normal((n, dims)).astype(np.float32).astype(np.float64).tolist()


# --- sans-IO ------------------------------------------------------------------------------


def test_limits_are_the_embed_ones() -> None:
    assert limits_for(EMBED_PROTOCOL) == EMBED_LIMITS
    assert EMBED_LIMITS.max_bin_len == MAX_EMBED_PIECE


def test_big_answer_is_many_bounded_frames_that_reassemble() -> None:
    vecs = vectors(700, N_EMBD)  # 1.8 MB of float32: more than one frame
    frames = vector_frames(vecs)
    assert len(frames) >= 2 and all(len(f.data) <= MAX_EMBED_PIECE for f in frames)
    state = EmbedClientState(700)
    got = []
    for f in frames:
        wire = encode_frame(f, EMBED_LIMITS)
        msg, _ = decode_frame(wire, EMBED_LIMITS)
        state.receive(msg)
        got.append(np.frombuffer(msg.data, dtype="<f4").reshape(-1, msg.dims))
    state.receive(EmbedDone(count=700, prompt_tokens=5))
    assert state.state is StreamState.DONE
    assert np.array_equal(np.concatenate(got), np.asarray(vecs, dtype=np.float32))


def test_float32_is_little_endian_on_the_wire() -> None:
    (f,) = vector_frames([[1.0, -2.0]])
    assert f.data == struct.pack("<2f", 1.0, -2.0) and f.dims == 2 and f.count == 1


def run(state: EmbedClientState, *msgs) -> None:
    for m in msgs:
        state.receive(m)


V2 = struct.pack("<2f", 0.6, 0.8)


@pytest.mark.parametrize("msgs,why", [
    ([EmbedVectors(first=1, dims=2, data=V2)], "vectors from 1, expected 0"),
    ([EmbedVectors(first=0, dims=2, data=V2), EmbedVectors(first=1, dims=1, data=V2[:4])],
     "vectors of 1 floats after 2"),
    ([EmbedVectors(first=0, dims=2, data=V2 * 3)], "more than the 2 vectors asked for"),
    ([EmbedVectors(first=0, dims=2, data=V2), EmbedDone(count=1)],
     "done with 1 vectors (1 received), expected 2"),
    ([EmbedDone(count=2)], "done with 2 vectors (0 received), expected 2"),
    ([Token(text="x")], "embed stream got Token while awaiting_reply"),
    ([Error(ErrorCode.BUSY, "x"), EmbedDone(count=2)], "embed stream got EmbedDone while failed"),
])
def test_consumer_state_refuses_a_broken_answer(msgs, why) -> None:
    state = EmbedClientState(2)
    with pytest.raises(ProtocolError) as info:
        run(state, *msgs)
    assert info.value.code is ErrorCode.PROTOCOL and info.value.message == why
    assert state.state is StreamState.BROKEN


def test_consumer_state_legal_answers() -> None:
    ok = EmbedClientState(2)
    run(ok, EmbedVectors(first=0, dims=2, data=V2), EmbedVectors(first=1, dims=2, data=V2),
        EmbedDone(count=2, prompt_tokens=4))
    assert ok.state is StreamState.DONE and ok.received == 2
    failed_midway = EmbedClientState(2)
    run(failed_midway, EmbedVectors(first=0, dims=2, data=V2), Error(ErrorCode.INTERNAL, "x"))
    assert failed_midway.finished
    cut = EmbedClientState(2)
    run(cut, EmbedVectors(first=0, dims=2, data=V2))
    with pytest.raises(ProtocolError) as info:
        cut.receive_eof()
    assert info.value.code is ErrorCode.UNAVAILABLE and "1 of 2 vectors" in info.value.message


def test_answer_bytes_are_bounded_whatever_the_dims() -> None:
    state = EmbedClientState(2048)
    piece = EmbedVectors(first=0, dims=65536, data=b"\0" * MAX_EMBED_PIECE)  # 4 vectors
    for i in range(64):  # 64 MiB: the limit
        state.receive(EmbedVectors(first=4 * i, dims=65536, data=piece.data))
    with pytest.raises(ProtocolError, match="answer limit"):
        state.receive(EmbedVectors(first=256, dims=65536, data=piece.data))


def test_request_bounds() -> None:
    with pytest.raises(ProtocolError) as info:
        EmbedRequest(model="m", inputs=("x",) * 2049, deadline_ms=1)
    assert info.value.code is ErrorCode.BAD_REQUEST
    with pytest.raises(ProtocolError) as info:
        EmbedRequest(model="m", inputs=("é" * (1 << 20), "é" * (1 << 20), "x"), deadline_ms=1)
    assert info.value.code is ErrorCode.TOO_LARGE and "bytes" in info.value.message
    with pytest.raises(ProtocolError) as info:
        EmbedVectors(first=2047, dims=1, data=b"\0" * 8)  # vectors 2047 and 2048
    assert info.value.code is ErrorCode.BAD_REQUEST


# --- a real daemon, a raw libp2p client ------------------------------------------------------


async def exchange(client, peer_id, payload: bytes) -> list:
    """Send raw bytes on a fresh embed stream; the decoded reply frames until the end."""
    stream = await client.libp2p.new_stream(peer_id, [EMBED_PROTOCOL])
    await stream.write(payload)
    dec = FrameDecoder(EMBED_LIMITS)
    out: list = []
    with trio.fail_after(300):
        while True:
            try:
                data = await stream.read(65536)
            except Exception:
                break
            if not data:
                break
            dec.feed(data)
            while (msg := dec.next_message()) is not None:
                out.append(msg)
            if out and isinstance(out[-1], (EmbedDone, Error)):
                break
    await stream.close()
    return out


async def test_wire_against_a_real_daemon(tmp_path: Path, model_template: Path):
    data = clone_data_dir(model_template, tmp_path / "provider")
    provider_id = load_or_create_identity(data).peer_id_str
    port = free_port()
    daemon = Daemon(data, "--no-preload", "--ctx-size", "256",
                    "--listen", f"/ip4/127.0.0.1/tcp/{port}")
    daemon.start()
    try:
        me = Identity.generate()
        client = make_host(me.keypair, ["/ip4/127.0.0.1/tcp/0"])
        async with client.run():
            info = info_from_p2p_addr(
                multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port}/p2p/{provider_id}"))
            await client.libp2p.connect(info)
            pid = info.peer_id
            bad = [
                (b"\x05hello", ErrorCode.PROTOCOL),
                (encode_varint(8 << 20) + b"x" * 16, ErrorCode.TOO_LARGE),
                (encode_varint(30) + msgpack.packb(
                    {"t": "embq", "model": MODEL, "inputs": "not a list", "deadline_ms": 5}),
                 ErrorCode.PROTOCOL),
                (encode_frame(Token(text="not a request")), ErrorCode.PROTOCOL),
            ]
            for payload, code in bad:
                reply = await exchange(client, pid, payload)
                assert len(reply) == 1 and isinstance(reply[0], Error), (payload[:10], reply)
                assert reply[0].code == code, reply
            texts = ("The cat sat on the mat.", "Bonjour tout le monde", "x")
            req = EmbedRequest(model=MODEL, inputs=texts, deadline_ms=60_000)
            reply = await exchange(client, pid, encode_frame(req, EMBED_LIMITS))
            assert reply[0].code == ErrorCode.UNAUTHORIZED, reply
            assert "trust add" in reply[0].message and "consumer" in reply[0].message
            # Refused before any work: nothing was loaded for the stranger.
            assert "for embeddings" not in daemon.log()

            TrustStore.in_dir(data).add(me.peer_id_str, ["consumer"])
            reply = await exchange(client, pid, encode_frame(req, EMBED_LIMITS))
            state = EmbedClientState(len(texts))
            for m in reply:
                state.receive(m)
            assert state.state is StreamState.DONE and state.dims == N_EMBD
            got = np.concatenate([np.frombuffer(m.data, dtype="<f4").reshape(-1, m.dims)
                                  for m in reply if isinstance(m, EmbedVectors)])
            assert reply[-1].prompt_tokens > 6
            local = httpx.post(f"{daemon.api}/api/embed", timeout=300,
                               json={"model": MODEL, "input": list(texts)}).json()
            assert np.max(np.abs(got - np.asarray(local["embeddings"]))) < 1e-6
            assert reply[-1].prompt_tokens == local["prompt_eval_count"]

            long_text = "word " * 600  # past the 256-token context
            too_long = EmbedRequest(model=MODEL, inputs=("short", long_text), truncate=False,
                                    deadline_ms=60_000)
            reply = await exchange(client, pid, encode_frame(too_long, EMBED_LIMITS))
            assert len(reply) == 1 and reply[0].code == ErrorCode.BAD_REQUEST, reply
            assert "input[1]" in reply[0].message and "256" in reply[0].message
            missing = EmbedRequest(model="no-such-model", inputs=("x",), deadline_ms=5000)
            reply = await exchange(client, pid, encode_frame(missing, EMBED_LIMITS))
            assert reply[0].code == ErrorCode.NOT_FOUND and MODEL in reply[0].message
        assert daemon.proc.poll() is None  # none of it crashed the daemon
    finally:
        daemon.stop()
