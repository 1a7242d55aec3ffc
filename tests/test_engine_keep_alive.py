"""keep_alive and unloading in the real engine with the real model, in process: a model
stays loaded until its keep_alive has passed since its last request, is never unloaded
while a request runs, and `unload` frees it now (or as soon as its last request ends)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from models.engine import Engine, EngineConfig, GenerationRequest
from models.store import ModelStore

MODEL = "gemma3-270m"


@pytest.fixture
def engine(model_template: Path) -> Engine:
    return Engine(ModelStore(model_template), EngineConfig(n_ctx=256, parallel=2, n_threads=2))


async def _ask(engine: Engine, max_tokens: int = 4) -> str:
    req = GenerationRequest(model=MODEL, prompt="1, 2, 3,", max_tokens=max_tokens, temperature=0)
    async with engine.generate(req) as gen:
        return "".join([p async for p in gen])


async def test_keep_alive_unloads_after_idle_and_never_while_in_use(engine):
    entry = engine.resolve(MODEL)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        await _ask(engine)
        assert engine.loaded() == {entry.sha256} and engine.expires_at(entry) is None
        engine.set_keep_alive(entry, 2.0)
        assert engine.expires_at(entry) is not None
        async with engine.generate(GenerationRequest(model=MODEL, prompt="1, 2, 3,",
                                                     max_tokens=200, temperature=0)) as gen:
            with trio.move_on_after(3.5):  # longer than keep_alive: in use, so it stays
                async for _ in gen:
                    pass
            assert engine.loaded() == {entry.sha256}
        with trio.fail_after(10):
            while engine.loaded():
                await trio.sleep(0.2)
        assert await _ask(engine)  # loads again on the next request
        assert engine.loaded() == {entry.sha256}
        nursery.cancel_scope.cancel()


async def test_unload_now_or_when_the_last_request_ends(engine):
    entry = engine.resolve(MODEL)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        await _ask(engine)
        assert engine.unload(entry) is True and not engine.loaded()
        req = GenerationRequest(model=MODEL, prompt="1, 2, 3,", max_tokens=16, temperature=0)
        async with engine.generate(req) as gen:
            first = await gen.__aiter__().__anext__()
            assert first and engine.unload(entry) is False  # in use: not yet
            assert engine.loaded() == {entry.sha256}
            async for _ in gen:
                pass
        with trio.fail_after(5):
            while engine.loaded():
                await trio.sleep(0.05)
        st = engine.status()
        assert st["slots_free"] == st["slots_total"]
        nursery.cancel_scope.cancel()
