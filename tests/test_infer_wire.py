"""/qvac/infer/1.0.0 against a real daemon from a raw libp2p client: malformed frames
get protocol errors and the daemon keeps serving; an untrusted caller is refused before
any model is loaded; trust granted to the running daemon takes effect at once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import multiaddr
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr

from peers.host import make_host
from peers.identity import Identity, load_or_create_identity
from peers.trust import TrustStore
from protocol import (
    INFER_PROTOCOL,
    Accepted,
    Done,
    Error,
    ErrorCode,
    FrameDecoder,
    InferRequest,
    Token,
    encode_frame,
    encode_varint,
)
from tests.harness import Daemon, clone_data_dir, free_port

MODEL = "gemma3-270m"


async def exchange(client, peer_id, payload: bytes, *, read_all: bool = False):
    """Send raw bytes on a fresh infer stream; return the decoded reply frames."""
    stream = await client.libp2p.new_stream(peer_id, [INFER_PROTOCOL])
    await stream.write(payload)
    dec = FrameDecoder()
    out = []
    with trio.fail_after(30):
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
            if out and (not read_all or isinstance(out[-1], (Done, Error))):
                break
    await stream.close()
    return out


def deep_nesting(depth: int) -> bytes:
    body = b"\x91" * depth + b"\xc0"  # [[[...nil...]]]
    return encode_varint(len(body)) + body


@dataclass
class RawSession:
    daemon: Daemon
    data: Path  # the provider's data dir (its trust store)
    client: Any  # a bare libp2p host, connected to the provider
    me: Identity  # the client's identity
    provider: Any  # the provider's libp2p peer id


@asynccontextmanager
async def raw_client_of_provider(tmp_path: Path, model_template: Path, *daemon_args: str,
                                 trusted: bool = True) -> AsyncIterator[RawSession]:
    """A provider daemon with the real model and a bare libp2p host connected to it,
    trusted as a consumer unless `trusted` is false. On a clean exit the daemon must still
    be running (nothing the test sent crashed it); it is stopped either way."""
    data = clone_data_dir(model_template, tmp_path / "provider")
    provider_id = load_or_create_identity(data).peer_id_str
    me = Identity.generate()
    if trusted:
        TrustStore.in_dir(data).add(me.peer_id_str, ["consumer"])
    port = free_port()
    daemon = Daemon(data, *daemon_args, "--listen", f"/ip4/127.0.0.1/tcp/{port}")
    daemon.start()
    try:
        client = make_host(me.keypair, ["/ip4/127.0.0.1/tcp/0"])
        async with client.run():
            addr = multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port}/p2p/{provider_id}")
            info = info_from_p2p_addr(addr)
            await client.libp2p.connect(info)
            yield RawSession(daemon, data, client, me, info.peer_id)
        assert daemon.proc.poll() is None  # nothing the test sent crashed the daemon
    finally:
        daemon.stop()


async def test_bad_frames_unauthorized_then_trusted(tmp_path: Path, model_template: Path):
    async with raw_client_of_provider(tmp_path, model_template, "--no-preload",
                                      trusted=False) as raw:
        daemon, data, client, me, pid = raw.daemon, raw.data, raw.client, raw.me, raw.provider
        cases = [
            (b"\x05hello", ErrorCode.PROTOCOL),
            (encode_varint(100 << 20) + b"x" * 16, ErrorCode.TOO_LARGE),
            (deep_nesting(5000), None),
            (encode_varint(20) + msgpack.packb({"t": "req", "model": 7, "deadline_ms": 5}),
             ErrorCode.PROTOCOL),
            (encode_frame(Token(text="not a request")), ErrorCode.PROTOCOL),
        ]
        for payload, code in cases:
            reply = await exchange(client, pid, payload)
            assert len(reply) == 1 and isinstance(reply[0], Error), (payload[:10], reply)
            if code is not None:
                assert reply[0].code == code, reply
            else:
                assert reply[0].code in (ErrorCode.PROTOCOL, ErrorCode.TOO_LARGE)
        req = InferRequest(model=MODEL, prompt="The capital of France is", max_tokens=6,
                           temperature=0.0, deadline_ms=30000)
        reply = await exchange(client, pid, encode_frame(req))
        assert reply[0].code == ErrorCode.UNAUTHORIZED, reply
        assert "trust add" in reply[0].message
        # Refused before any work: the model was never loaded for the stranger.
        assert not daemon.status()["models"][0]["loaded"]

        # Trust it in the running daemon (as `qvacd trust add` would): served now.
        TrustStore.in_dir(data).add(me.peer_id_str, ["consumer"])
        reply = await exchange(client, pid, encode_frame(req), read_all=True)
        assert isinstance(reply[0], Accepted), reply
        assert all(isinstance(m, Token) for m in reply[1:-1]) and len(reply) > 3
        assert isinstance(reply[-1], Done) and reply[-1].completion_tokens == 6
        missing = InferRequest(model="no-such-model", prompt="x", deadline_ms=5000)
        reply = await exchange(client, pid, encode_frame(missing))
        assert reply[0].code == ErrorCode.NOT_FOUND and MODEL in reply[0].message
        # Trust removed again: refused again, without a restart.
        TrustStore.in_dir(data).remove(me.peer_id_str)
        reply = await exchange(client, pid, encode_frame(req))
        assert reply[0].code == ErrorCode.UNAUTHORIZED


async def test_grammar_on_the_wire(tmp_path: Path, model_template: Path):
    """InferRequest.grammar against a real provider: the answer is in the grammar's
    language and Accepted says the grammar is enforced; a resume continues inside it; a
    resume outside it, a grammar that does not parse, or one nested to crash llama.cpp's
    parser is a bad_request before anything is generated, and the daemon keeps serving."""
    async with raw_client_of_provider(tmp_path, model_template) as raw:
        client, provider = raw.client, raw.provider
        yes_no = 'root ::= "yes" | "no"'

        def ask(**kw) -> bytes:
            return encode_frame(InferRequest(
                model=MODEL, prompt="Answer yes or no: is water wet?", max_tokens=8,
                temperature=0.8, deadline_ms=120_000, **kw))

        for seed in (1, 2, 3):
            reply = await exchange(client, provider, ask(grammar=yes_no, seed=seed),
                                   read_all=True)
            assert isinstance(reply[0], Accepted) and reply[0].grammar is True, reply
            assert isinstance(reply[-1], Done) and reply[-1].finish_reason == "stop"
            assert "".join(m.text for m in reply[1:-1]) in ("yes", "no"), reply
        # without a grammar, Accepted does not claim one
        reply = await exchange(client, provider, ask(), read_all=True)
        assert isinstance(reply[0], Accepted) and reply[0].grammar is None
        # a failover resume: only the rest of the word, inside the grammar
        reply = await exchange(client, provider, ask(grammar=yes_no, resume="ye"),
                               read_all=True)
        assert reply[0].grammar is True and isinstance(reply[-1], Done), reply
        assert "".join(m.text for m in reply[1:-1]) == "s"
        for kw, words in [
            ({"resume": "maybe"}, "not a start the grammar admits"),
            ({"grammar": "root ::= answer"}, "uses rule 'answer' but does not define"),
            ({"grammar": "root ::= " + "(" * 20000 + '"a"' + ")" * 20000},
             "nests parentheses deeper than"),
        ]:
            reply = await exchange(client, provider, ask(**{"grammar": yes_no, **kw}))
            assert len(reply) == 1 and reply[0].code == ErrorCode.BAD_REQUEST, (kw, reply)
            assert words in reply[0].message, reply


async def test_sampling_knobs_on_the_wire(tmp_path: Path, model_template: Path):
    """InferRequest.top_k/min_p/repeat_penalty against a real provider: Accepted says they
    are applied, the text is the provider's own HTTP answer with the same knobs (and not
    the default answer), a resume continues the penalized answer, and out-of-range or
    mistyped knobs are refused before anything is generated."""
    import httpx

    async with raw_client_of_provider(tmp_path, model_template) as raw:
        client, provider, daemon = raw.client, raw.provider, raw.daemon
        prompt = "The capital of France is"

        def http_text(**knobs) -> str:
            r = httpx.post(daemon.api + "/v1/completions", timeout=600, json={
                "model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, **knobs})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        def ask(**kw) -> bytes:
            return encode_frame(InferRequest(model=MODEL, prompt=prompt, max_tokens=12,
                                             temperature=0.0, deadline_ms=120_000, **kw))

        reply = await exchange(client, provider, ask(repeat_penalty=1.3), read_all=True)
        assert isinstance(reply[0], Accepted) and reply[0].sampling is True, reply
        assert isinstance(reply[-1], Done), reply
        pieces = [m.text for m in reply[1:-1]]
        penalized = "".join(pieces)
        assert penalized == await trio.to_thread.run_sync(
            lambda: http_text(repeat_penalty=1.3))
        plain = await exchange(client, provider, ask(), read_all=True)
        assert plain[0].sampling is None  # nothing to acknowledge
        assert "".join(m.text for m in plain[1:-1]) != penalized
        # a failover's resume, penalty and all: the rest of the same answer
        head = "".join(pieces[:4])
        rest = await exchange(client, provider, ask(repeat_penalty=1.3, resume=head),
                              read_all=True)
        assert rest[0].sampling is True and isinstance(rest[-1], Done), rest
        assert head + "".join(m.text for m in rest[1:-1]) == penalized
        bad = {"t": "req", "model": MODEL, "prompt": prompt, "deadline_ms": 5000}
        for extra, code, words in [
            ({"repeat_penalty": -1.0}, ErrorCode.BAD_REQUEST, "repeat_penalty must be"),
            ({"min_p": 2.0}, ErrorCode.BAD_REQUEST, "min_p must be"),
            ({"top_k": "40"}, ErrorCode.PROTOCOL, "top_k must be an int"),
        ]:
            body = msgpack.packb({**bad, **extra})
            reply = await exchange(client, provider, encode_varint(len(body)) + body)
            assert len(reply) == 1 and reply[0].code == code, (extra, reply)
            assert words in reply[0].message, reply
