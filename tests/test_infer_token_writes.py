"""The provider's token write path (qvacd/services/infer.py): pieces that queued behind a
slow write go out together in one write, a piece is never held back for company, and
what the consumer decodes is the same frames in the same order either way.

Unit tests: the engine is a script (pieces on a timetable) and the stream a recorder of
writes whose first token write is slow; the framing and the service are the real ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import trio

from models.engine import GenerationResult
from protocol import Accepted, Done, FrameDecoder, InferRequest, Token, encode_frame
from qvacd.services.infer import InferService, PeerQuota

MODEL = "gemma3-270m"


class ScriptedGeneration:
    def __init__(self, timetable: list[tuple[float, str]]) -> None:
        self.timetable = timetable  # (seconds to wait before, piece)
        self.result = GenerationResult(finish_reason="length", prompt_tokens=3)

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[str]:
        for wait, piece in self.timetable:
            if wait:
                await trio.sleep(wait)
            self.result.completion_tokens += 1
            yield piece


class ScriptedEngine:
    def __init__(self, timetable: list[tuple[float, str]]) -> None:
        self.timetable = timetable

    @contextlib.asynccontextmanager
    async def generate(self, req: Any) -> AsyncIterator[ScriptedGeneration]:
        yield ScriptedGeneration(self.timetable)


class RecordingStream:
    """A libp2p stream stand-in: hands out the request, then waits; records writes. The
    first write that carries a token takes `slow_s` (a loaded CPU, a full window)."""

    def __init__(self, request: bytes, slow_s: float) -> None:
        self.request = request
        self.slow_s = slow_s
        self.writes: list[bytes] = []

    async def read(self, n: int | None = None) -> bytes:
        if self.request:
            data, self.request = self.request, b""
            return data
        await trio.sleep_forever()
        return b""  # pragma: no cover

    async def write(self, data: bytes) -> None:
        if len(self.writes) == 1 and self.slow_s:  # the write after Accepted
            await trio.sleep(self.slow_s)
        self.writes.append(data)

    async def close(self) -> None:
        pass

    async def reset(self) -> None:
        pass


def frames_of(write: bytes) -> list[Any]:
    dec = FrameDecoder()
    dec.feed(write)
    out = []
    while (msg := dec.next_message()) is not None:
        out.append(msg)
    return out


async def serve(timetable: list[tuple[float, str]], slow_s: float) -> RecordingStream:
    svc = InferService(ScriptedEngine(timetable), is_authorized=lambda peer: True,
                       quota=PeerQuota(4, 10_000))
    stream = RecordingStream(encode_frame(InferRequest(model=MODEL, prompt="hi",
                                                       max_tokens=len(timetable))), slow_s)
    with trio.fail_after(10):
        await svc.handle(stream, "12D3KooWconsumer")
    return stream


async def test_pieces_queued_behind_a_slow_write_go_out_in_one() -> None:
    pieces = [f" t{k}" for k in range(10)]
    # the first piece, then the other nine 50 ms later, during its 200 ms write
    timetable = [(0.0, pieces[0]), (0.05, pieces[1])] + [(0.0, p) for p in pieces[2:]]
    stream = await serve(timetable, slow_s=0.2)
    per_write = [frames_of(w) for w in stream.writes]
    flat = [m for frames in per_write for m in frames]
    assert isinstance(flat[0], Accepted)
    assert [m.text for m in flat if isinstance(m, Token)] == pieces
    assert isinstance(flat[-1], Done) and flat[-1].completion_tokens == 10
    token_writes = [frames for frames in per_write if any(isinstance(m, Token) for m in frames)]
    # the first piece alone (nothing else had arrived), the other nine together
    assert [len(frames) for frames in token_writes] == [1, 9], per_write


async def test_a_piece_is_never_held_back() -> None:
    """Pieces 30 ms apart on a fast stream: each goes out in its own write, at once."""
    pieces = [f" t{k}" for k in range(5)]
    stream = await serve([(0.03, p) for p in pieces], slow_s=0.0)
    token_writes = [frames_of(w) for w in stream.writes
                    if any(isinstance(m, Token) for m in frames_of(w))]
    assert [[m.text for m in frames] for frames in token_writes] == [[p] for p in pieces]
