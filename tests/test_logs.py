"""What the daemon's logs hold: py-libp2p's chatter only at --log-level debug, its
expected-event errors demoted, real errors kept, and a peer that resets a stream
mid-request (capacity, or infer while tokens stream) logged as one INFO line without a
traceback."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamReset
from test_network_support import make_net

from models.engine import GenerationRequest, GenerationResult
from peers._libp2p_logs import demote_expected_libp2p_errors
from protocol import CAPACITY_PROTOCOL, INFER_PROTOCOL, InferRequest, encode_frame
from qvacd.logs import NOISY_LOGGERS, setup_logging
from qvacd.services.infer import InferService, PeerQuota

YAMUX = "libp2p.stream_muxer.yamux.yamux"
MULTISELECT = "libp2p.protocol_muxer.multiselect_client"
SWARM = "libp2p.network.swarm"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """setup_logging rewires the root logger; put back what pytest and other tests had."""
    root = logging.getLogger()
    saved_root = (root.handlers[:], root.level)
    names = (*NOISY_LOGGERS, "qvacd")
    saved = {n: (logging.getLogger(n).level, logging.getLogger(n).propagate) for n in names}
    try:
        yield
    finally:
        root.handlers[:], root.level = saved_root[0], saved_root[1]
        for n, (level, propagate) in saved.items():
            logging.getLogger(n).setLevel(level)
            logging.getLogger(n).propagate = propagate


def _emit_library_lines() -> None:
    logging.getLogger(YAMUX).debug("yamux chatter: window update for stream 7")
    logging.getLogger(YAMUX).info("yamux chatter: stream 7 opened")
    logging.getLogger(MULTISELECT).error(
        "MultiselectClient handshake: read failed: %s", "stream reset"
    )
    logging.getLogger(SWARM).error("Error in background prune: %s", "boom")


def test_libp2p_chatter_only_at_debug(restore_logging: None, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    demote_expected_libp2p_errors()  # make_host does this for every node

    setup_logging("info")
    _emit_library_lines()
    err = capsys.readouterr().err
    assert "yamux chatter" not in err
    # an expected event the library logs at ERROR (the caller gets the exception) is gone
    assert "MultiselectClient handshake" not in err
    # a real library error still shows, in our format (not bare through lastResort)
    [line] = [ln for ln in err.splitlines() if "background prune" in ln]
    assert f"level=error logger={SWARM}" in line

    setup_logging("debug")
    _emit_library_lines()
    err = capsys.readouterr().err
    assert "yamux chatter: window update" in err and "yamux chatter: stream 7 opened" in err
    [line] = [ln for ln in err.splitlines() if "MultiselectClient handshake" in ln]
    assert f"level=debug logger={MULTISELECT}" in line
    assert "level=error" in next(ln for ln in err.splitlines() if "background prune" in ln)


def test_library_module_that_sets_its_own_level_is_held_too(
        restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    """py-libp2p's auto_connector sets its logger to INFO at import; at --log-level info
    its per-cycle lines ("initiating 200 new dials") must not reach the log."""
    import libp2p.network.auto_connector  # noqa: F401  (sets its level to INFO)

    name = "libp2p.network.auto_connector"
    logging.getLogger(name).setLevel(logging.INFO)  # as its import does
    setup_logging("info")
    logging.getLogger(name).info("Connections (0) below target (200); initiating 200 new dials")
    assert "initiating 200 new dials" not in capsys.readouterr().err
    setup_logging("debug")
    logging.getLogger(name).info("Connections (0) below target (200); initiating 200 new dials")
    assert "initiating 200 new dials" in capsys.readouterr().err


class _ResetStream:
    """A stream whose peer reset it: every read and write raises what py-libp2p raises."""

    def __init__(self, peer_id: object) -> None:
        self.muxed_conn = SimpleNamespace(peer_id=peer_id)
        self.was_reset = False

    async def read(self, n: int | None = None) -> bytes:
        raise StreamReset("stream reset by remote")

    async def write(self, data: bytes) -> None:
        raise StreamReset("stream reset by remote")

    async def reset(self) -> None:
        self.was_reset = True

    async def close(self) -> None:
        pass

    def get_remote_address(self) -> tuple[str, int]:
        return ("127.0.0.1", 4001)


async def test_stream_reset_in_capacity_handler_is_one_info_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net, _ = make_net()
    peer, _ = make_net()
    # the real handler, as the swarm calls it for an inbound /qvac/capacity/1.0.0 stream
    handler = net.host.libp2p.get_mux().handlers[TProtocol(CAPACITY_PROTOCOL)]
    stream = _ResetStream(peer.peer_id)
    caplog.set_level(logging.DEBUG, logger="qvacd")
    await handler(stream)  # type: ignore[arg-type]
    ours = [r for r in caplog.records if r.name.startswith("qvacd") and r.levelno >= logging.INFO]
    assert len(ours) == 1, [r.getMessage() for r in ours]
    [rec] = ours
    assert rec.levelno == logging.INFO and rec.exc_info is None
    msg = rec.getMessage()
    assert peer.peer_id_str[:16] in msg and CAPACITY_PROTOCOL in msg
    assert "StreamReset" in msg and "dropped the stream" in msg
    assert stream.was_reset


async def test_a_failing_handler_is_logged_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net, _ = make_net()
    peer, _ = make_net()

    async def broken(stream: object, remote: str) -> None:
        raise ValueError("a bug in a service")

    net.set_stream_handler("/qvac/test/1.0.0", broken)
    handler = net.host.libp2p.get_mux().handlers[TProtocol("/qvac/test/1.0.0")]
    stream = _ResetStream(peer.peer_id)
    caplog.set_level(logging.INFO, logger="qvacd")
    await handler(stream)  # type: ignore[arg-type]
    [rec] = [r for r in caplog.records if r.name.startswith("qvacd")]
    assert rec.levelno == logging.ERROR and rec.exc_info is not None
    assert "reset the stream" in rec.getMessage() and stream.was_reset


class _ResetMidAnswer(_ResetStream):
    """An infer stream whose consumer sends its request, takes the first frames, then
    resets: the write of a later Token raises what py-libp2p raises."""

    def __init__(self, peer_id: object, request: bytes, writes_ok: int) -> None:
        super().__init__(peer_id)
        self.unread = request
        self.writes_ok = writes_ok

    async def read(self, n: int | None = None) -> bytes:
        if self.unread:
            data, self.unread = self.unread, b""
            return data
        await trio.sleep_forever()  # the consumer says nothing after its request
        raise AssertionError("unreachable")

    async def write(self, data: bytes) -> None:
        if self.writes_ok == 0:
            raise StreamReset("stream reset by remote")
        self.writes_ok -= 1


class _Pieces:
    result = GenerationResult(prompt_tokens=1)

    async def __aiter__(self) -> AsyncIterator[str]:
        for i in range(8):
            yield f" piece{i}"
            await trio.lowlevel.checkpoint()


class _Engine:
    @contextlib.asynccontextmanager
    async def generate(self, req: GenerationRequest) -> AsyncIterator[_Pieces]:
        yield _Pieces()


@pytest.mark.parametrize("writes_ok", [0, 2], ids=["before-accepted", "mid-answer"])
async def test_consumer_resetting_an_infer_stream_is_one_info_line(
    caplog: pytest.LogCaptureFixture, writes_ok: int,
) -> None:
    """Also when the reset hits a Token write inside the streaming nursery, whose
    exception group once reached the log as "infer handler failed" with a traceback."""
    net, _ = make_net()
    peer, _ = make_net()
    service = InferService(_Engine(), is_authorized=lambda p: True,  # type: ignore[arg-type]
                           quota=PeerQuota(4, 10**6))
    net.set_stream_handler(INFER_PROTOCOL, service.handle)
    handler = net.host.libp2p.get_mux().handlers[TProtocol(INFER_PROTOCOL)]
    request = encode_frame(InferRequest(model="m", prompt="p", max_tokens=8,
                                        deadline_ms=10_000))
    stream = _ResetMidAnswer(peer.peer_id, request, writes_ok)
    caplog.set_level(logging.DEBUG, logger="qvacd")
    with trio.fail_after(10):
        await handler(stream)  # type: ignore[arg-type]
    ours = [r for r in caplog.records if r.name.startswith("qvacd") and r.levelno >= logging.INFO]
    assert len(ours) == 1, [r.getMessage() for r in ours]
    [rec] = ours
    assert rec.levelno == logging.INFO and rec.exc_info is None
    msg = rec.getMessage()
    assert peer.peer_id_str[:16] in msg and INFER_PROTOCOL in msg
    assert "StreamReset" in msg and "dropped the stream" in msg
    assert stream.was_reset
