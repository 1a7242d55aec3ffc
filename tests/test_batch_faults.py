"""Faults inside a continuous batch, with the real engine and the real model in process.

llama_decode is wrapped to answer as llama.cpp does when it cannot place a batch in the
KV cache (1) or fails fatally (< -1); everything else is real. What must hold: "no KV
slot" never fails everyone (the step shrinks, or the newest sequence ends with a clear
error and the others go on); a fatal error ends the sequences in flight with a clear
error, the model is unloaded, and the next request loads it again and is served.
"""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import pytest
import trio

from models.engine import INTERNAL, Engine, EngineConfig, EngineError, GenerationRequest
from models.store import ModelStore

MODEL = "gemma3-270m"


def _counting(start: int) -> str:
    return ", ".join(str(start + i) for i in range(5)) + ","


async def _run(engine: Engine, prompt: str, max_tokens: int = 12) -> tuple[str, str]:
    req = GenerationRequest(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)
    async with engine.generate(req) as gen:
        text = "".join([piece async for piece in gen])
    return text, gen.result.finish_reason


@pytest.fixture
def engine(model_template: Path) -> Engine:
    return Engine(ModelStore(model_template),
                  EngineConfig(n_ctx=256, parallel=4, n_threads=2))


def _wrap_decode(monkeypatch, answer):
    real = llama_cpp.llama_decode
    calls = {"n": 0}

    def decode(ctx, batch):
        calls["n"] += 1
        forced = answer(calls["n"], batch)
        return real(ctx, batch) if forced is None else forced

    monkeypatch.setattr(llama_cpp, "llama_decode", decode)
    return calls


async def test_no_kv_slot_for_prompts_shrinks_the_step_and_all_finish(engine, monkeypatch):
    failed = []

    def answer(n, batch):
        # the first two batches that carry several prompt tokens find no KV slot
        if batch.n_tokens > 4 and len(failed) < 2:
            failed.append(batch.n_tokens)
            return 1
        return None

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        await engine.preload(MODEL)
        _wrap_decode(monkeypatch, answer)
        results: dict[int, tuple[str, str]] = {}

        async def one(start: int) -> None:
            results[start] = await _run(engine, _counting(start))

        async with trio.open_nursery() as batch:
            for start in (10, 20, 30):
                batch.start_soon(one, start)
        nursery.cancel_scope.cancel()
    assert len(failed) == 2 and failed[1] < failed[0]  # retried with smaller chunks
    for start, (text, reason) in results.items():
        assert reason == "length" and text.lstrip().startswith(f"{start + 5},"), results


async def test_no_kv_slot_for_generation_ends_only_the_newest_sequence(engine, monkeypatch):
    failed = []

    def answer(n, batch):
        # once, a step of generated tokens only (no prompt) cannot be placed
        all_logits = all(batch.logits[i] for i in range(batch.n_tokens))
        if not failed and batch.n_tokens >= 3 and all_logits:
            failed.append(n)
            return 1
        return None

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        await engine.preload(MODEL)
        _wrap_decode(monkeypatch, answer)
        outcomes: dict[int, object] = {}

        async def one(start: int) -> None:
            try:
                outcomes[start] = await _run(engine, _counting(start), max_tokens=64)
            except EngineError as e:
                outcomes[start] = e

        async with trio.open_nursery() as batch:
            for start in (10, 20, 30):
                batch.start_soon(one, start)
                await trio.sleep(0.2)  # join in this order: 30 is the newest
        status = engine.status()
        nursery.cancel_scope.cancel()
    assert failed
    errors = [s for s, o in outcomes.items() if isinstance(o, EngineError)]
    assert len(errors) == 1, outcomes  # one sequence ended, never everyone
    err = outcomes[errors[0]]
    assert isinstance(err, EngineError) and err.code == INTERNAL and "KV cache" in err.message
    for start, o in outcomes.items():
        if start not in errors:
            assert o[1] == "length" and o[0].lstrip().startswith(f"{start + 5},"), outcomes
    assert status["slots_free"] == status["slots_total"]


async def test_fatal_decode_error_ends_sequences_and_the_model_reloads(engine, monkeypatch):
    def answer(n, batch):
        return -3 if n == 6 else None  # a fatal error a few steps in

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        await engine.preload(MODEL)
        calls = _wrap_decode(monkeypatch, answer)
        errors: list[EngineError] = []

        async def one(start: int) -> None:
            try:
                await _run(engine, _counting(start), max_tokens=40)
            except EngineError as e:
                errors.append(e)

        async with trio.open_nursery() as batch:
            batch.start_soon(one, 10)
            batch.start_soon(one, 20)
        assert len(errors) == 2, errors
        assert all(e.code == INTERNAL and "llama_decode failed with code -3" in e.message
                   for e in errors)
        with trio.fail_after(10):
            while engine.loaded():  # the broken runner has stopped and unloaded
                await trio.sleep(0.05)
        text, reason = await _run(engine, _counting(40))  # loads afresh and serves
        assert reason == "length" and text.lstrip().startswith("45,")
        assert engine.loaded() and calls["n"] > 6
        st = engine.status()
        assert st["slots_free"] == st["slots_total"]
        nursery.cancel_scope.cancel()
