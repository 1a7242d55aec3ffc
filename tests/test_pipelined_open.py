"""Pipelined protocol negotiation and path liveness, between real py-libp2p hosts
(PeerNetwork pairs on loopback, in one trio run).

- `open_stream(..., first=...)` sends multistream header, protocol id and the first
  request in one write; the handler gets the request, the caller the answer.
- A peer that does not serve the protocol ("na") is a clean `ProtocolRefused`: no
  stream left open on either side, nobody scored, the connection still usable; and
  delegation takes it as a refusal (next candidate, no failure recorded).
- Pings: a probe at its own pace is answered; a flood is cut off by the rate limit and
  scored; a provider that is silent for longer than the liveness window but whose path
  answers pings is not dropped.

The scripted providers here are test handlers (logic only); the network, streams,
muxer, negotiation and RemoteInference are the real ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from test_network_support import FakeCapacity, make_net, wait_until

from models.engine import EngineError, GenerationRequest
from peers import PeerNetwork, ProtocolRefused
from peers._liveness import LIVENESS_S, PING_BURST, PING_PROTOCOL, PathProbe
from peers._pipelined import encode_line, open_pipelined
from peers._streams import STREAM_GONE
from peers.trust import TrustStore
from protocol import (
    DEFAULT_LIMITS,
    INFER_PROTOCOL,
    Accepted,
    Done,
    FrameDecoder,
    InferRequest,
    Token,
    encode_frame,
)
from qvacd.delegation import RemoteInference
from qvacd.p2p_io import FrameStream

SHA = "ab" * 32
MODEL = "gemma3-270m"


@pytest.fixture(autouse=True)
def _quiet_libp2p(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="libp2p")


@asynccontextmanager
async def pair(tmp_path: Path) -> AsyncIterator[tuple[PeerNetwork, PeerNetwork]]:
    """(consumer, provider): the consumer trusts the provider as a provider and is
    connected to it with its capacity record (listing MODEL) in its table."""
    trust = TrustStore.in_dir(tmp_path)
    src = FakeCapacity()
    src.add_model(SHA, MODEL)
    async with AsyncExitStack() as stack:
        provider, _ = make_net(source=src)
        await stack.enter_async_context(provider)
        trust.add(provider.peer_id_str, ["provider"])
        consumer, _ = make_net(provider.listen_addrs(), trust_store=trust)
        await stack.enter_async_context(consumer)

        def ready() -> bool:
            e = consumer.table.get(provider.peer_id_str)
            return e is not None and e.connected and e.record is not None

        await wait_until(ready, 5.0)
        yield consumer, provider


def _streams(net: PeerNetwork, peer: str) -> int:
    swarm = net.host.libp2p.get_network()
    from peers.identity import as_id

    return sum(len(c.get_streams()) for c in swarm.get_connections(as_id(peer)))


def _request(text: str = "hi") -> InferRequest:
    return InferRequest(model=MODEL, prompt=text, max_tokens=4, deadline_ms=10_000)


def test_hello_bytes_are_multistream_messages() -> None:
    # golden: uvarint length (text + "\n"), text, "\n"
    assert encode_line("/multistream/1.0.0") == b"\x13/multistream/1.0.0\n"
    assert encode_line("na") == b"\x03na\n"
    assert encode_line("x" * 200)[:2] == b"\xc9\x01"


async def test_request_travels_with_the_negotiation(tmp_path: Path) -> None:
    async with pair(tmp_path) as (consumer, provider):
        got: list[object] = []

        async def handler(stream, peer: str) -> None:  # type: ignore[no-untyped-def]
            io = FrameStream(stream)
            got.append(await io.recv())
            await io.send(Accepted(queue_position=0))
            await io.send(Done(finish_reason="stop", prompt_tokens=1, completion_tokens=0))
            await io.close()

        provider.set_stream_handler(INFER_PROTOCOL, handler)
        wire = _request("pipelined")
        stream = await consumer.open_stream(provider.peer_id_str, INFER_PROTOCOL, timeout=5,
                                            first=encode_frame(wire, DEFAULT_LIMITS))
        io = FrameStream(stream)
        assert isinstance(await io.recv(), Accepted)
        assert isinstance(await io.recv(), Done)
        assert got == [wire]
        assert stream.get_protocol() == INFER_PROTOCOL
        await io.close()


async def test_refused_protocol_is_clean_and_scores_nobody(tmp_path: Path) -> None:
    async with pair(tmp_path) as (consumer, provider):
        p = provider.peer_id_str
        before = _streams(consumer, p)
        for size in (10, 5000):  # the server reads our request as its next message
            with pytest.raises(ProtocolRefused, match="does not serve /qvac-test/absent/1"):
                await consumer.open_stream(p, "/qvac-test/absent/1", timeout=5,
                                           first=encode_frame(_request("x" * size)))
        await wait_until(lambda: _streams(consumer, p) == before
                         and _streams(provider, consumer.peer_id_str) == before, 3.0)
        assert consumer.is_connected(p) and provider.is_connected(consumer.peer_id)
        assert provider.guard.banned() == {"peers": [], "ips": []}
        assert not provider.guard._peers and not consumer.guard._peers
        # the same connection still opens the protocols the peer does serve
        stream = await consumer.open_stream(p, PING_PROTOCOL, timeout=5, first=b"p" * 32)
        assert await stream.read(32) == b"p" * 32
        await stream.close()


async def test_delegation_takes_a_refusal_as_a_refusal(tmp_path: Path) -> None:
    """A provider that does not speak /qvac/infer (another version, another program):
    UNAVAILABLE naming why, no failure recorded, not backing off."""
    async with pair(tmp_path) as (consumer, provider):
        remote = RemoteInference(consumer.peer_id_str, consumer)
        assert remote.has_candidates(MODEL)
        with pytest.raises(EngineError, match="does not serve /qvac/infer/1.0.0") as exc:
            async with remote.generate(GenerationRequest(MODEL, "hi", max_tokens=4)):
                pass
        assert exc.value.code == "UNAVAILABLE"
        entry = consumer.table.get(provider.peer_id_str)
        assert entry is not None and entry.failures == 0 and entry.available(time.time())
        assert remote.has_candidates(MODEL)


async def test_slow_but_alive_provider_is_not_dropped(tmp_path: Path) -> None:
    """Silent for 6 s (over the 1 s liveness window and the 5 s stall limit of a peer
    whose path is not known to answer) with its path answering pings: the stream
    completes from that provider, which is not counted as failed."""
    async with pair(tmp_path) as (consumer, provider):
        async def slow(stream, peer: str) -> None:  # type: ignore[no-untyped-def]
            io = FrameStream(stream)
            await io.recv()
            await io.send(Accepted(queue_position=0))
            await io.send(Token(text=" one"))
            await trio.sleep(6.0)  # a long prefill, a saturated CPU
            await io.send(Token(text=" two"))
            await io.send(Done(finish_reason="stop", prompt_tokens=1, completion_tokens=2))
            await io.close()

        provider.set_stream_handler(INFER_PROTOCOL, slow)
        remote = RemoteInference(consumer.peer_id_str, consumer)
        async with remote.generate(GenerationRequest(MODEL, "hi", max_tokens=4)) as gen:
            text = "".join([p async for p in gen])
        assert text == " one two"
        assert gen.served_by == [provider.peer_id_str]
        assert consumer.table.get(provider.peer_id_str).failures == 0


async def open_idle_stream(consumer: PeerNetwork, provider: PeerNetwork) -> Any:
    """A stream to `provider` on which it never says anything: only the probe's pings
    cross the path."""
    async def idle(stream, peer: str) -> None:  # type: ignore[no-untyped-def]
        await trio.sleep(10)

    provider.set_stream_handler("/qvac-test/idle/1", idle)
    return await consumer.open_stream(provider.peer_id_str, "/qvac-test/idle/1", timeout=5,
                                      first=b"")


async def test_probe_is_answered_at_its_pace(tmp_path: Path) -> None:
    async with pair(tmp_path) as (consumer, provider):
        stream = await open_idle_stream(consumer, provider)
        async with consumer.watch_path(stream) as probe:
            assert isinstance(probe, PathProbe)
            await trio.sleep(3 * LIVENESS_S)
            assert probe.working and not probe.dead
            assert probe.pongs >= 6  # 4/s, less the open
            assert probe.rtt_s is not None and probe.rtt_s < 0.5
        assert provider.counters["ping_rate_limited"] == 0
        await stream.reset()


async def test_probe_stays_quiet_while_frames_flow(tmp_path: Path) -> None:
    """Frames every 50 ms (a 20 tokens/s stream) prove the path alive: after the first
    pong the probe sends no more pings (the old probe sent 4/s regardless); once the
    frames stop, pings resume at their pace and the quiet path is not judged dead."""
    async with pair(tmp_path) as (consumer, provider):
        stream = await open_idle_stream(consumer, provider)
        async with consumer.watch_path(stream) as probe:
            with trio.fail_after(5):
                while not probe.working:
                    probe.saw_traffic()
                    await trio.sleep(0.05)
            first = probe.pongs
            for _ in range(40):  # 2 s of frames
                probe.saw_traffic()
                await trio.sleep(0.05)
            flowing = probe.pongs - first
            await trio.sleep(1.5)
            assert not probe.dead
            quiet = probe.pongs - first - flowing
        # a loaded machine may stretch one 50 ms sleep past the ping interval: allow 2
        assert flowing <= 2, flowing
        assert quiet >= 3, quiet  # 4/s while nothing else is heard
        await stream.reset()


async def test_ping_flood_is_rate_limited_and_scored(tmp_path: Path) -> None:
    """A peer nobody trusts pinging flat out: answered for the burst, then its stream
    is reset and the guard scores it."""
    async with AsyncExitStack() as stack:
        a, _ = make_net()
        await stack.enter_async_context(a)
        b, _ = make_net(a.listen_addrs())
        await stack.enter_async_context(b)
        await wait_until(lambda: b.is_connected(a.peer_id), 5.0)
        swarm = b.host.libp2p.get_network()
        stream = await open_pipelined(swarm, a.peer_id, PING_PROTOCOL, b"")
        answered = 0
        with trio.fail_after(10):
            try:
                for _ in range(10 * PING_BURST):
                    await stream.write(b"f" * 32)
                    got = b""
                    while len(got) < 32:
                        data = await stream.read(32 - len(got))
                        if not data:
                            raise EOFError
                        got += data
                    answered += 1
            except (EOFError, *STREAM_GONE):  # reset by the rate limit
                pass
        assert PING_BURST <= answered < 10 * PING_BURST
        assert a.counters["ping_rate_limited"] == 1
        assert b.peer_id_str in a.guard._peers  # scored (untrusted)
        assert a.is_connected(b.peer_id)  # one offence is not a ban


def test_frame_decoder_sees_only_the_request_after_the_hello() -> None:
    """What the provider's handler reads after negotiation is exactly our frame."""
    from peers._pipelined import pipelined_hello

    wire = _request("golden")
    hello = pipelined_hello(INFER_PROTOCOL, encode_frame(wire))
    head = encode_line("/multistream/1.0.0") + encode_line(INFER_PROTOCOL)
    assert hello.startswith(head)
    dec = FrameDecoder(DEFAULT_LIMITS)
    dec.feed(hello[len(head):])
    assert dec.next_message() == wire


async def test_path_that_stops_answering_pings_fails_within_about_a_second(
        tmp_path: Path) -> None:
    """The provider's path answers two pings, then nothing (what a cut link looks like
    from here, in one process); its infer stream is silent too. The consumer gives up on
    it after the liveness window, not the 5 s stall limit, and not as misbehaviour."""
    async with pair(tmp_path) as (consumer, provider):
        async def pings_then_silence(stream, peer: str) -> None:  # type: ignore[no-untyped-def]
            for _ in range(2):
                got = b""
                while len(got) < 32:
                    got += await stream.read(32 - len(got))
                await stream.write(got)
            await trio.sleep(30)

        async def silent(stream, peer: str) -> None:  # type: ignore[no-untyped-def]
            io = FrameStream(stream)
            await io.recv()
            await io.send(Accepted(queue_position=0))
            await io.send(Token(text=" one"))
            await trio.sleep(30)

        provider.set_stream_handler(PING_PROTOCOL, pings_then_silence)
        provider.set_stream_handler(INFER_PROTOCOL, silent)
        remote = RemoteInference(consumer.peer_id_str, consumer)
        with trio.fail_after(10):
            async with remote.generate(GenerationRequest(MODEL, "hi", max_tokens=4)) as gen:
                pieces = []
                async for p in gen:
                    pieces.append(p)
                    last = time.monotonic()
                ended = time.monotonic()
        assert pieces == [" one"]
        assert gen.result.finish_reason == "error"  # nobody left to resume on
        assert LIVENESS_S * 0.9 <= ended - last <= LIVENESS_S + 1.0, ended - last
        entry = consumer.table.get(provider.peer_id_str)
        assert "path lost" in (entry.last_error or "")
        assert entry.backoff_until < time.time() + 30  # not the misbehaviour back-off


def test_protocol_md_vectors_are_what_we_send() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    section = doc.split("### Opening a stream in one write", 1)[1].split("```", 2)[1]
    lines = [ln.split('"')[0] for ln in section.splitlines() if ln.startswith(("13 ", "12 "))]
    assert bytes.fromhex(" ".join(lines[:2])) == (encode_line("/multistream/1.0.0")
                                                  + encode_line(INFER_PROTOCOL))
    assert "03 6e 61 0a" in section and encode_line("na") == bytes.fromhex("03 6e 61 0a")


async def test_trusted_provider_is_redialled_when_its_connection_drops(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The provider dialled us once (no bootstrap loop on either side); when the
    connection drops, our warm-keeping loop dials it again, so the next request does
    not pay for a handshake."""
    caplog.set_level(logging.INFO, logger="qvacd.peers.network")
    trust = TrustStore.in_dir(tmp_path)
    src = FakeCapacity()
    src.add_model(SHA, MODEL)
    async with AsyncExitStack() as stack:
        consumer, _ = make_net(trust_store=trust)
        await stack.enter_async_context(consumer)
        provider, _ = make_net(source=src)
        await stack.enter_async_context(provider)
        trust.add(provider.peer_id_str, ["provider"])
        await provider.connect(consumer.listen_addrs()[0])
        await wait_until(lambda: (consumer.table.get(provider.peer_id_str) or
                                  PeerEntryStub).record is not None, 5.0)
        await consumer.host.libp2p.get_network().close_peer(provider.peer_id)
        await wait_until(lambda: not consumer.is_connected(provider.peer_id), 5.0)
        await wait_until(lambda: any(
            f"dialled peer_id={provider.peer_id_str} source=outbound" in r.getMessage()
            for r in caplog.records), 12.0)
        assert consumer.is_connected(provider.peer_id)


class PeerEntryStub:
    record = None
