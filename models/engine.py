"""The inference engine: llama-cpp-python in worker threads, tokens streamed into trio.

Why this shape:
- llama.cpp calls block, but ctypes releases the GIL, so each generation runs in a
  worker thread (`trio.to_thread.run_sync`) and queues every piece of text to the
  event loop with `run_sync_soon`, without waiting for the loop to take it.
- A `threading.Event` is checked between tokens: when the consumer goes away the
  worker stops within one token, and the slot is released only after the thread has
  really stopped touching the model (no two threads ever share one llama context),
  and as soon as it has: text not yet read by a slow client stays buffered, without
  holding the slot.
- Each model has a fixed number of slots (llama contexts) and a bounded wait queue;
  a full queue is refused at once with a retry hint instead of growing without limit.
- Loaded models live in an LRU bounded by a memory budget computed from the GGUF
  header (weights + KV cache), so "too big for this device" is a decision, not an
  out-of-memory crash.
"""

from __future__ import annotations

import codecs
import dataclasses
import contextlib
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from .chat import render_chat
from .gguf import GGUFInfo
from .store import ModelEntry, ModelStore

log = logging.getLogger("qvacd.models.engine")


class EngineError(Exception):
    """A request the engine will not run. `code` matches the wire error codes."""

    def __init__(self, code: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


NOT_FOUND = "NOT_FOUND"
TOO_LARGE = "TOO_LARGE"
BUSY = "BUSY"
BAD_REQUEST = "BAD_REQUEST"
INTERNAL = "INTERNAL"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit not in ("B",) else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def gpu_offload_supported() -> bool:
    try:
        import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:
        return False


def default_memory_budget(share: float = 0.5) -> int:
    """A share of the RAM available now (the VRAM is used when llama.cpp offloads)."""
    if gpu_offload_supported():
        from_gpu = _gpu_free_memory()
        if from_gpu:
            return int(from_gpu * 0.9)
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        avail = info.get("MemAvailable", info.get("MemFree", 0))
    except OSError:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return int(avail * share)


def _gpu_free_memory() -> int | None:
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=2, check=True,
        ).stdout
        return int(out.split()[0]) * 1024 * 1024
    except Exception:
        return None


@dataclass(frozen=True)
class EngineConfig:
    n_ctx: int = 4096
    memory_budget: int = 0  # 0: default_memory_budget()
    slots: int = 1  # llama contexts per model; on a 2-core CPU more only divide the cores
    queue_size: int = 16  # requests allowed to wait for a slot, per model
    n_threads: int = 0  # 0: all cores
    gpu_layers: int | None = None  # None: all when llama.cpp has GPU offload, else 0


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    prompt: str
    max_tokens: int | None = None  # None: until the context is full
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    resume: str = ""  # text a previous provider already generated: continue after it
    # Chat: rendered with the model's own template where the model runs (this node or
    # a peer), so a consumer never needs the template of a model it does not hold.
    messages: tuple[dict[str, str], ...] | None = None


@dataclass
class GenerationResult:
    finish_reason: str = "stop"  # stop | length | cancelled
    prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token: float | None = None
    tokens_per_s: float | None = None


@dataclass
class _Model:
    entry: ModelEntry
    info: GGUFInfo
    memory: int
    free: list[Any] = field(default_factory=list)  # idle Llama instances
    instances: int = 0
    slots: trio.Semaphore | None = None
    waiting: int = 0
    active: int = 0
    last_used: float = 0.0
    tokens_per_s: float | None = None
    load_lock: trio.Lock = field(default_factory=trio.Lock)


class Generation:
    """One running generation: iterate it for text pieces; `result` when it ends."""

    def __init__(self, recv: trio.MemoryReceiveChannel, result: GenerationResult) -> None:
        self._recv = recv
        self.result = result

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[str]:
        async for piece in self._recv:
            yield piece


class Engine:
    def __init__(self, store: ModelStore, config: EngineConfig | None = None) -> None:
        self.store = store
        self.config = config or EngineConfig()
        self.memory_budget = self.config.memory_budget or default_memory_budget()
        self.gpu_layers = (
            self.config.gpu_layers
            if self.config.gpu_layers is not None
            else (-1 if gpu_offload_supported() else 0)
        )
        self.n_threads = self.config.n_threads or (os.cpu_count() or 1)
        self._models: OrderedDict[str, _Model] = OrderedDict()  # by sha256, LRU order
        self._tps: dict[str, float] = {}  # measured tokens/s by sha256, kept after unload
        self.on_change: Callable[[], None] = lambda: None  # capacity changed (load/unload)

    # ---- what we can run --------------------------------------------------------------

    def resolve(self, name: str) -> ModelEntry:
        entry = self.store.resolve(name)
        if entry is None:
            names = ", ".join(self.store.names()) or "none"
            raise EngineError(
                NOT_FOUND,
                f"model {name!r} not found; models here: {names}"
                " (add one with `qvacd models add PATH`)",
            )
        return entry

    def memory_needed(self, entry: ModelEntry) -> int:
        info = self.store.info(entry)
        return info.memory_estimate(self.n_ctx_for(info))

    def n_ctx_for(self, info: GGUFInfo) -> int:
        return min(self.config.n_ctx, info.context_length or self.config.n_ctx)

    def fits(self, entry: ModelEntry) -> bool:
        return self.memory_needed(entry) <= self.memory_budget

    def check_fits(self, entry: ModelEntry) -> None:
        need = self.memory_needed(entry)
        if need > self.memory_budget:
            raise EngineError(
                TOO_LARGE,
                f"model {entry.name} needs {fmt_bytes(need)} and the memory budget is"
                f" {fmt_bytes(self.memory_budget)}; raise --memory-budget or use a smaller model",
            )

    def slot_free(self, entry: ModelEntry) -> bool:
        m = self._models.get(entry.sha256)
        if m is None or m.slots is None:
            return True
        return m.slots.value > 0 and m.waiting == 0

    def loaded(self) -> set[str]:
        return {sha for sha, m in self._models.items() if m.instances > 0}

    def tokens_per_s(self) -> dict[str, float]:
        return dict(self._tps)

    def status(self) -> dict[str, Any]:
        used = sum(m.memory for m in self._models.values())
        total_slots = self.config.slots * max(1, len(self._models))
        busy = sum(m.active for m in self._models.values())
        return {
            "memory_budget": self.memory_budget,
            "memory_used": used,
            "slots_total": total_slots,
            "slots_free": max(0, total_slots - busy),
            "queue": sum(m.waiting for m in self._models.values()),
            "queue_limit": self.config.queue_size,
            "gpu_layers": self.gpu_layers,
            "n_ctx": self.config.n_ctx,
            "loaded": [
                {"name": m.entry.name, "sha256": sha, "memory": m.memory, "active": m.active,
                 "waiting": m.waiting, "tokens_per_s": m.tokens_per_s}
                for sha, m in self._models.items()
            ],
        }

    def queue_length(self) -> int:
        return sum(m.waiting for m in self._models.values())

    # ---- loading ----------------------------------------------------------------------

    def _model_for(self, entry: ModelEntry) -> _Model:
        m = self._models.get(entry.sha256)
        if m is None:
            info = self.store.info(entry)
            m = _Model(entry=entry, info=info, memory=self.memory_needed(entry))
            m.slots = trio.Semaphore(self.config.slots)
            self._models[entry.sha256] = m
        self._models.move_to_end(entry.sha256)
        return m

    def _make_room(self, need: int, keep: str) -> None:
        used = sum(m.memory for sha, m in self._models.items() if m.instances and sha != keep)
        for sha, m in list(self._models.items()):
            if used + need <= self.memory_budget:
                return
            if sha == keep or m.instances == 0 or m.active or m.waiting:
                continue
            log.info("unloading %s to make room (LRU)", m.entry.name)
            for llm in m.free:
                with contextlib.suppress(Exception):
                    llm.close()
            m.free.clear()
            used -= m.memory
            m.instances = 0
            del self._models[sha]
        if used + need > self.memory_budget:
            raise EngineError(
                BUSY,
                f"memory budget {fmt_bytes(self.memory_budget)} is held by models in use;"
                " retry shortly",
                retry_after=2.0,
            )

    async def _checkout(self, m: _Model) -> Any:
        """Take an idle llama instance of this model, loading one if needed."""
        if m.free:
            return m.free.pop()
        async with m.load_lock:
            if m.free:
                return m.free.pop()
            if m.instances == 0:
                self._make_room(m.memory, keep=m.entry.sha256)
            llm = await trio.to_thread.run_sync(self._load_sync, m)
            m.instances += 1
            return llm

    def _load_sync(self, m: _Model) -> Any:
        from llama_cpp import Llama

        t0 = time.monotonic()
        llm = Llama(
            model_path=str(m.entry.path),
            n_ctx=self.n_ctx_for(m.info),
            n_threads=self.n_threads,
            n_threads_batch=self.n_threads,
            n_gpu_layers=self.gpu_layers,
            n_batch=512,
            verbose=False,
        )
        log.info("loaded %s in %.2fs", m.entry.name, time.monotonic() - t0)
        return llm

    async def preload(self, name: str) -> None:
        entry = self.resolve(name)
        self.check_fits(entry)
        m = self._model_for(entry)
        if m.instances == 0:
            llm = await self._checkout(m)
            m.free.append(llm)
            self.on_change()

    # ---- generating -------------------------------------------------------------------

    def render_chat(self, entry: ModelEntry, messages: list[dict[str, str]]):
        info = self.store.info(entry)
        meta = info.metadata
        template = meta.get("tokenizer.chat_template")
        bos = eos = ""
        tokens = None
        for key, attr in (("tokenizer.ggml.bos_token_id", "bos"), ("tokenizer.ggml.eos_token_id", "eos")):
            if key in meta and template:
                tokens = tokens or _vocab_tokens(entry)
                idx = int(meta[key])
                if tokens and idx < len(tokens):
                    if attr == "bos":
                        bos = tokens[idx]
                    else:
                        eos = tokens[idx]
        return render_chat(messages, template if isinstance(template, str) else None,
                           bos_token=bos, eos_token=eos)

    @contextlib.asynccontextmanager
    async def generate(self, req: GenerationRequest) -> AsyncIterator[Generation]:
        """Admit, queue, load, check and run one generation.

        Raises EngineError before yielding when the request cannot run. The body
        iterates the Generation; leaving the block early (client gone, cancelled)
        stops the worker within one token.
        """
        entry = self.resolve(req.model)
        self.check_fits(entry)
        m = self._model_for(entry)
        assert m.slots is not None
        if m.slots.value == 0 and m.waiting >= self.config.queue_size:
            raise EngineError(
                BUSY,
                f"model {entry.name} has {m.waiting} requests waiting (queue limit"
                f" {self.config.queue_size}); retry shortly",
                retry_after=max(1.0, m.waiting * 0.5),
            )
        m.waiting += 1
        self.on_change()
        try:
            await m.slots.acquire()
        finally:
            m.waiting -= 1
        m.active += 1
        llm = None
        released = False

        def release() -> None:
            # why as soon as the worker is done, not when the caller has sent everything:
            # a slow reader (a phone on bad wifi) must not hold a slot that sits idle
            nonlocal released
            if released:
                return
            released = True
            if llm is not None:
                m.free.append(llm)
            m.active -= 1
            m.last_used = time.monotonic()
            assert m.slots is not None
            m.slots.release()
            self.on_change()

        try:
            if req.messages is not None:
                chat = self.render_chat(entry, list(req.messages))
                req = dataclasses.replace(req, prompt=chat.prompt, stop=req.stop + chat.stop)
            llm = await self._checkout(m)
            prompt_tokens = llm.tokenize(
                (req.prompt + req.resume).encode("utf-8"), add_bos=True, special=True
            )
            n_ctx = llm.n_ctx()
            if len(prompt_tokens) >= n_ctx:
                raise EngineError(
                    BAD_REQUEST,
                    f"prompt is {len(prompt_tokens)} tokens but the context of {entry.name}"
                    f" is {n_ctx} tokens; shorten the prompt",
                )
            room = n_ctx - len(prompt_tokens)
            want = req.max_tokens
            if req.resume and want is not None:
                # max_tokens counts the whole answer; the resumed part is already spent.
                spent = len(llm.tokenize(req.resume.encode("utf-8"), add_bos=False))
                want = max(0, want - spent)
            if want is not None and want > room:
                if req.resume:  # a resumed request continues as far as the context allows
                    want = room
                else:
                    raise EngineError(
                        BAD_REQUEST,
                        f"prompt ({len(prompt_tokens)} tokens) plus max_tokens"
                        f" ({req.max_tokens}) exceeds the context of {n_ctx} tokens;"
                        " lower max_tokens",
                    )
            room_tokens = want if want is not None else room
            result = GenerationResult(prompt_tokens=len(prompt_tokens))
            send, recv = trio.open_memory_channel[str](math.inf)
            cancel = threading.Event()
            token = trio.lowlevel.current_trio_token()

            def deliver(piece: str) -> None:  # in the trio thread
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    send.send_nowait(piece)  # unbounded: never WouldBlock

            def emit(piece: str) -> None:  # in the worker thread
                # why not from_thread.run_sync: it blocks the worker until the event loop
                # has taken the piece, so every token waited on HTTP work. run_sync_soon
                # queues it and returns; the queue is FIFO, and to_thread reports the
                # worker's end through the same queue, so every piece is delivered before
                # the channel is closed below.
                token.run_sync_soon(deliver, piece)

            async def worker() -> None:
                try:
                    await trio.to_thread.run_sync(
                        _generate_sync, llm, req, prompt_tokens, room_tokens, emit, cancel,
                        result,
                    )
                finally:
                    await send.aclose()
                    release()  # the pieces stay buffered for the caller

            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(worker)
                    try:
                        yield Generation(recv, result)
                    finally:
                        cancel.set()  # the worker sees it before its next token
            finally:
                # Runs even when the caller is being cancelled: the nursery has waited
                # for the worker thread, so `result` is final here.
                if cancel.is_set() and result.finish_reason not in ("stop", "length"):
                    result.finish_reason = "cancelled"
                if result.tokens_per_s and result.completion_tokens >= 8:
                    prev = self._tps.get(entry.sha256)
                    # EWMA: one slow request should not swing routing decisions.
                    tps = result.tokens_per_s if prev is None else \
                        0.7 * prev + 0.3 * result.tokens_per_s
                    self._tps[entry.sha256] = m.tokens_per_s = tps
        finally:
            release()


def _vocab_tokens(entry: ModelEntry) -> list[str] | None:
    """Token strings of the vocabulary, read lazily only for chat-template models."""
    try:
        import gguf  # type: ignore[import-not-found]  # optional; llama-cpp ships it sometimes

        reader = gguf.GGUFReader(str(entry.path))
        field_ = reader.fields["tokenizer.ggml.tokens"]
        return [bytes(field_.parts[i]).decode("utf-8", "replace") for i in field_.data]
    except Exception:
        return None


def _is_eog(llm: Any, tok: int) -> bool:
    import llama_cpp

    try:
        return bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok))
    except AttributeError:  # older bindings
        return tok == llm.token_eos()


def _stop_overlap(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that could begin a stop sequence."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def _generate_sync(
    llm: Any,
    req: GenerationRequest,
    prompt_tokens: list[int],
    max_new: int,
    emit: Callable[[str], None],
    cancel: threading.Event,
    result: GenerationResult,
) -> None:
    """Runs in a worker thread: sample tokens, turn them into text, honour stops."""
    if req.seed is not None:
        # Reusing a cached prefix changes batch shapes and so the logits' last bits; a
        # seeded request must give the same text whatever ran before, so evaluate afresh.
        llm.reset()
        llm.set_seed(req.seed)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stops = tuple(s for s in req.stop if s)
    pending = ""
    generated: list[int] = []
    t0 = time.perf_counter()
    t_first: float | None = None
    finish = "length"
    if max_new <= 0:
        result.finish_reason = "length"
        return
    for tok in llm.generate(
        prompt_tokens,
        temp=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        repeat_penalty=req.repeat_penalty,
        reset=True,
    ):
        if cancel.is_set():
            finish = "cancelled"
            break
        if _is_eog(llm, tok):
            finish = "stop"
            break
        generated.append(tok)
        if t_first is None:
            t_first = time.perf_counter()
            result.time_to_first_token = t_first - t0
        pending += decoder.decode(llm.detokenize([tok]))
        hit = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
        if hit >= 0:
            pending = pending[:hit]
            finish = "stop"
            break
        keep = _stop_overlap(pending, stops) if stops else 0
        out, pending = pending[: len(pending) - keep], pending[len(pending) - keep:]
        if out:
            emit(out)
        if len(generated) >= max_new:
            finish = "length"
            break
    if finish != "cancelled":
        pending += decoder.decode(b"", final=True)
        if pending:
            emit(pending)
    result.finish_reason = finish
    result.completion_tokens = len(generated)
    if t_first is not None and len(generated) > 1:
        result.tokens_per_s = (len(generated) - 1) / max(1e-9, time.perf_counter() - t_first)
