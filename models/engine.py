"""The inference engine: which models run here, in how many parallel sequences, and the
admission of each request into a model's continuous batch.

Why this shape:
- Each loaded model has ONE llama context with several sequences, stepped together by
  one thread (models/batch_runner.py): throughput grows with the requests served at
  once instead of cores being divided between contexts.
- How many sequences: --parallel, else as many as the memory budget holds (each
  sequence's KV cache counted) up to `max_parallel`. A request takes a sequence through
  a semaphore; beyond that a bounded wait queue, and a full queue is refused at once
  with a retry hint instead of growing without limit.
- Loaded models live in an LRU bounded by a memory budget computed from the GGUF
  header (weights + KV cache per sequence), so "too big for this device" is a decision,
  not an out-of-memory crash.
- The event loop never waits on llama.cpp: pieces of text are queued to it with
  `run_sync_soon` as the runner produces them, and a sequence is released the moment
  it leaves the batch, not when a slow client has read everything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from .batch_runner import BatchRunner, Sampling, SequenceOutcome, SequenceRequest
from .chat import render_chat
from .embedding import EmbeddingResult, EmbeddingRunner, InputTooLong, pooling_for
from .gguf import GGUFInfo
from .grammar import GrammarError
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
    """A GPU (or integrated GPU) device is there. llama_supports_gpu_offload alone is not
    enough: it is also true for a build with the RPC backend (qvacd's split models),
    which has no GPU here."""
    try:
        import llama_cpp

        if not llama_cpp.llama_supports_gpu_offload():  # also loads the backends
            return False
    except Exception:
        return False
    try:
        import ctypes
        from pathlib import Path

        # the soname file, the copy libllama links (the wheel's libggml.so is another)
        ggml = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml.so.0"))
        ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
        gpu, igpu = 1, 2  # GGML_BACKEND_DEVICE_TYPE_GPU, _IGPU (ggml-backend.h)
        return any(ggml.ggml_backend_dev_by_type(t) for t in (gpu, igpu))
    except Exception:  # no ggml to ask (a build laid out otherwise): RPC alone is no GPU
        return not llama_cpp.llama_supports_rpc()


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
    n_ctx: int = 4096  # context of ONE sequence (one request)
    memory_budget: int = 0  # 0: default_memory_budget()
    parallel: int = 0  # sequences per model; 0: as many as the budget holds, up to max_parallel
    max_parallel: int = 8  # the automatic choice stops here (more adds latency per stream)
    queue_size: int = 16  # requests allowed to wait for a free sequence, per model
    n_threads: int = 0  # 0: all cores
    gpu_layers: int | None = None  # None: all when llama.cpp has GPU offload, else 0
    n_batch: int = 512  # tokens per decode step (prompt chunks of joining sequences)


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
    # GBNF (root rule "root", see models/grammar.py): every sampled token must fit it;
    # with `resume`, the resumed text must be a start the grammar admits.
    grammar: str | None = None


@dataclass
class GenerationResult:
    finish_reason: str = "stop"  # stop | length | cancelled | error
    error: str = ""  # one line, why, when finish_reason is error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from a sequence's KV cache
    time_to_first_token: float | None = None
    tokens_per_s: float | None = None


@dataclass
class _Model:
    entry: ModelEntry
    info: GGUFInfo
    parallel: int
    memory: int
    runner: BatchRunner | None = None
    sequences: trio.Semaphore | None = None
    waiting: int = 0
    active: int = 0
    last_used: float = 0.0
    # How long the model stays loaded after its last request (Ollama's keep_alive):
    # None = until the memory budget needs the room (LRU), the default; 0 = unload as soon
    # as it is idle.
    keep_alive: float | None = None
    tokens_per_s: float | None = None
    load_lock: trio.Lock = field(default_factory=trio.Lock)


class Generation:
    """One running generation: iterate it for text pieces; `result` when it ends.

    A fatal engine error after the first piece ends the iteration with EngineError
    (INTERNAL), so a caller never mistakes a broken answer for a finished one.
    """

    def __init__(self, recv: trio.MemoryReceiveChannel, result: GenerationResult,
                 outcome: SequenceOutcome) -> None:
        self._recv = recv
        self.result = result
        self._outcome = outcome

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[str]:
        async for piece in self._recv:
            yield piece
        if self._outcome.finish_reason == "error":
            raise EngineError(INTERNAL, self._outcome.error or "generation failed")


class Engine:
    """What qvacd asks of the models on this device: resolve, fit, load, generate.

    `run()` must be running (the node starts it in its nursery) for generations: it owns
    the threads of the batch runners.
    """

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
        self._nursery: trio.Nursery | None = None
        self.on_change: Callable[[], None] = lambda: None  # capacity changed
        # Embedding contexts by sha256, apart from the generation runners (see embed).
        self._embedders: dict[str, EmbeddingRunner] = {}
        self._embed_locks: dict[str, trio.Lock] = {}

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Owns the runner threads; cancelling it stops them (each within one step)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:  # keep_alive expiry; a model in use is never unloaded
                    await trio.sleep(1.0)
                    self._unload_expired()
        finally:
            self._nursery = None
            for m in self._models.values():
                if m.runner is not None:
                    m.runner.stop()

    # ---- keep_alive and unloading ------------------------------------------------------

    def set_keep_alive(self, entry: ModelEntry, seconds: float | None) -> None:
        """Keep `entry` loaded `seconds` after its last request (None: until evicted;
        0: unload once idle). It holds until changed: the HTTP API sets it on every request
        (the client's keep_alive, or the default), as Ollama does."""
        m = self._model_for(entry)
        m.keep_alive = None if seconds is None or seconds < 0 else float(seconds)
        self._unload_expired()

    def expires_at(self, entry: ModelEntry) -> float | None:
        """Unix time at which an idle loaded model will be unloaded; None: not planned."""
        m = self._models.get(entry.sha256)
        embedder = self._embedders.get(entry.sha256)
        if m is None or (m.runner is None and embedder is None) or m.keep_alive is None:
            return None
        last_used = max(m.last_used if m.runner is not None else 0.0,
                        embedder.last_used if embedder is not None else 0.0)
        idle_for = 0.0 if (m.active or m.waiting) else time.monotonic() - last_used
        return time.time() + max(0.0, m.keep_alive - idle_for)

    def unload(self, entry: ModelEntry) -> bool:
        """Unload now if idle (True); a model in use is unloaded when its last request
        ends (False)."""
        if self._drop_embedder(entry.sha256):  # an embedding context goes with its model
            log.info("unloading %s for embeddings (unload asked)", entry.name)
        m = self._models.get(entry.sha256)
        if m is None or m.runner is None:
            return True
        m.keep_alive = 0.0
        return self._unload_expired(only=entry.sha256) > 0

    def _unload_expired(self, only: str | None = None) -> int:
        now = time.monotonic()
        done = 0
        for sha, m in list(self._models.items()):
            if only is not None and sha != only:
                continue
            if m.runner is None or m.keep_alive is None or m.active or m.waiting:
                continue
            if now - m.last_used >= m.keep_alive:
                log.info("unloading %s (keep_alive %.0fs passed)", m.entry.name, m.keep_alive)
                m.runner.stop()
                m.runner = None
                done += 1
                self.on_change()
        for sha, runner in list(self._embedders.items()):  # embedding contexts likewise
            m = self._models.get(sha)
            if (only is None or sha == only) and m is not None and m.keep_alive is not None \
                    and now - runner.last_used >= m.keep_alive and self._drop_embedder(sha):
                log.info("unloading %s for embeddings (keep_alive %.0fs passed)",
                         m.entry.name, m.keep_alive)
                done += 1
        return done

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

    def n_ctx_for(self, info: GGUFInfo) -> int:
        """The context of one sequence: --ctx-size, capped by what the model was trained on."""
        return min(self.config.n_ctx, info.context_length or self.config.n_ctx)

    def _memory_for(self, info: GGUFInfo, parallel: int) -> int:
        # Every extra sequence adds its own KV stream; weights and compute buffers are shared.
        n_ctx = self.n_ctx_for(info)
        return info.memory_estimate(n_ctx) + (parallel - 1) * info.kv_cache_bytes(n_ctx)

    def parallel_for(self, entry: ModelEntry) -> int:
        """Sequences this model gets: --parallel, else as many as the budget holds."""
        m = self._models.get(entry.sha256)
        if m is not None:
            return m.parallel
        if self.config.parallel > 0:
            return self.config.parallel
        info = self.store.info(entry)
        best = 1
        for p in range(2, max(1, self.config.max_parallel) + 1):
            if self._memory_for(info, p) <= self.memory_budget:
                best = p
        return best

    def memory_needed(self, entry: ModelEntry) -> int:
        return self._memory_for(self.store.info(entry), self.parallel_for(entry))

    def fits(self, entry: ModelEntry) -> bool:
        return self.memory_needed(entry) <= self.memory_budget

    def check_fits(self, entry: ModelEntry) -> None:
        need = self.memory_needed(entry)
        if need > self.memory_budget:
            p = self.parallel_for(entry)
            seqs = f" with {p} parallel sequences" if p > 1 else ""
            raise EngineError(
                TOO_LARGE,
                f"model {entry.name} needs {fmt_bytes(need)}{seqs} and the memory budget is"
                f" {fmt_bytes(self.memory_budget)}; raise --memory-budget"
                f"{' or lower --parallel' if p > 1 else ''} or use a smaller model",
            )

    def slot_free(self, entry: ModelEntry) -> bool:
        """A request for this model would start now (a free sequence, nobody waiting)."""
        m = self._models.get(entry.sha256)
        if m is None or m.sequences is None:
            return True
        return m.sequences.value > 0 and m.waiting == 0

    def loaded(self) -> set[str]:
        return {sha for sha, m in self._models.items() if m.runner is not None}

    def tokens_per_s(self) -> dict[str, float]:
        """Per-stream speed by sha256 (EWMA over finished requests, as they ran)."""
        return dict(self._tps)

    def aggregate_tokens_per_s(self) -> float:
        """Tokens/s this device generated over the last 10 s, all sequences together."""
        return round(sum(m.runner.recent_tokens_per_s() for m in self._models.values()
                         if m.runner is not None), 2)

    def status(self) -> dict[str, Any]:
        used = sum(m.memory for m in self._models.values() if m.runner is not None)
        total = sum(m.parallel for m in self._models.values()) or self._parallel_unloaded()
        busy = sum(m.active for m in self._models.values())
        return {
            "memory_budget": self.memory_budget,
            "memory_used": used,
            "parallel": self.config.parallel or "auto",
            "slots_total": total,  # sequences, over the models known to the engine
            "slots_free": max(0, total - busy),
            "queue": sum(m.waiting for m in self._models.values()),
            "queue_limit": self.config.queue_size,
            "aggregate_tokens_per_s": self.aggregate_tokens_per_s(),
            "gpu_layers": self.gpu_layers,
            "n_ctx": self.config.n_ctx,
            "loaded": [
                {"name": m.entry.name, "sha256": sha, "memory": m.memory,
                 "parallel": m.parallel, "active": m.active, "waiting": m.waiting,
                 "tokens_per_s": m.tokens_per_s,
                 "aggregate_tokens_per_s": round(m.runner.recent_tokens_per_s(), 2)
                 if m.runner is not None else 0.0,
                 "n_ctx_seq": m.runner.n_ctx_seq if m.runner is not None else None}
                for sha, m in self._models.items()
            ],
        }

    def _parallel_unloaded(self) -> int:
        """Sequences the first model that fits would get, before any model is loaded
        (what the capacity record says while the node has not served yet)."""
        if self.config.parallel > 0:
            return self.config.parallel
        for entry in self.store.list():
            try:
                if self.fits(entry):
                    return self.parallel_for(entry)
            except Exception:  # an unreadable entry says nothing about the others
                continue
        return 1

    def queue_length(self) -> int:
        return sum(m.waiting for m in self._models.values())

    # ---- loading ----------------------------------------------------------------------

    def _model_for(self, entry: ModelEntry) -> _Model:
        m = self._models.get(entry.sha256)
        if m is None:
            info = self.store.info(entry)
            parallel = self.parallel_for(entry)
            m = _Model(entry=entry, info=info, parallel=parallel,
                       memory=self._memory_for(info, parallel))
            m.sequences = trio.Semaphore(parallel)
            self._models[entry.sha256] = m
        self._models.move_to_end(entry.sha256)
        return m

    def _make_room(self, need: int, keep: str) -> None:
        used = sum(m.memory for sha, m in self._models.items()
                   if m.runner is not None and sha != keep)
        used += sum(r.memory for r in self._embedders.values())
        for sha, m in list(self._models.items()):
            if used + need <= self.memory_budget:
                return
            if sha == keep or m.runner is None or m.active or m.waiting:
                continue
            log.info("unloading %s to make room (LRU)", m.entry.name)
            m.runner.stop()  # its thread frees the context and weights, then ends
            m.runner = None
            used -= m.memory
            used -= self._drop_embedder(sha)
            del self._models[sha]
        if used + need > self.memory_budget:
            raise EngineError(
                BUSY,
                f"memory budget {fmt_bytes(self.memory_budget)} is held by models in use;"
                " retry shortly",
                retry_after=2.0,
            )

    async def _runner_for(self, m: _Model) -> BatchRunner:
        """The model's running batch runner, loading the model first if needed."""
        runner = m.runner
        if runner is not None and not runner.stopping:
            return runner
        async with m.load_lock:
            runner = m.runner
            if runner is not None and not runner.stopping:
                return runner
            if self._nursery is None:
                raise RuntimeError("Engine.run() is not running")
            self._make_room(m.memory, keep=m.entry.sha256)
            runner = BatchRunner(
                str(m.entry.path), n_seq=m.parallel, n_ctx_seq=self.n_ctx_for(m.info),
                n_threads=self.n_threads, gpu_layers=self.gpu_layers,
                n_batch=self.config.n_batch)
            t0 = time.monotonic()
            try:
                await trio.to_thread.run_sync(runner.load)
            except Exception as e:
                raise EngineError(INTERNAL, f"cannot load {m.entry.name}: {e}") from e
            log.info("loaded %s in %.2fs: %d parallel sequences of %d tokens",
                     m.entry.name, time.monotonic() - t0, m.parallel, runner.n_ctx_seq)
            m.runner = runner
            self._nursery.start_soon(self._drive, m, runner)
            self.on_change()
            return runner

    async def _drive(self, m: _Model, runner: BatchRunner) -> None:
        """Runs the step loop in a thread of its own; stops it when cancelled."""

        async def stop_when_cancelled() -> None:
            try:
                await trio.sleep_forever()
            finally:
                runner.stop()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_when_cancelled)
                # its own limiter: a model's loop holds its thread for as long as it is loaded
                await trio.to_thread.run_sync(runner.run, limiter=trio.CapacityLimiter(1))
                nursery.cancel_scope.cancel()
        finally:
            if m.runner is runner:
                m.runner = None  # broken: the next request loads the model afresh
                if runner.broken:
                    log.warning("%s unloaded after an engine error; it loads again on the"
                                " next request", m.entry.name)
                self.on_change()

    async def preload(self, name: str) -> None:
        entry = self.resolve(name)
        self.check_fits(entry)
        m = self._model_for(entry)
        await self._runner_for(m)

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
        """Admit, queue, load, check and run one generation as a sequence of the model's
        batch.

        Raises EngineError before yielding when the request cannot run. The body
        iterates the Generation; leaving the block early (client gone, cancelled)
        ends the sequence within one decode step.
        """
        entry = self.resolve(req.model)
        self.check_fits(entry)
        m = self._model_for(entry)
        assert m.sequences is not None
        if m.sequences.value == 0 and m.waiting >= self.config.queue_size:
            raise EngineError(
                BUSY,
                f"model {entry.name} has {m.active} requests running and {m.waiting} waiting"
                f" (queue limit {self.config.queue_size}); retry shortly",
                retry_after=max(1.0, m.waiting * 0.5),
            )
        m.waiting += 1
        self.on_change()
        try:
            await m.sequences.acquire()
        finally:
            m.waiting -= 1
        m.active += 1
        released = False

        def release() -> None:
            # as soon as the sequence has left the batch, not when the caller has sent
            # everything: a slow reader (a phone on bad wifi) must not hold a sequence
            nonlocal released
            if released:
                return
            released = True
            m.active -= 1
            m.last_used = time.monotonic()
            assert m.sequences is not None
            m.sequences.release()
            if m.keep_alive == 0.0:
                self._unload_expired(only=entry.sha256)
            self.on_change()

        submitted: tuple[BatchRunner, SequenceRequest] | None = None
        try:
            if req.messages is not None:
                chat = self.render_chat(entry, list(req.messages))
                req = dataclasses.replace(req, prompt=chat.prompt, stop=req.stop + chat.stop)
            runner = await self._runner_for(m)
            if req.grammar is not None:
                try:
                    if len(req.resume) > 16384:  # walking a long resume: off the event loop
                        await trio.to_thread.run_sync(runner.check_grammar, req.grammar,
                                                      req.resume)
                    else:
                        runner.check_grammar(req.grammar, req.resume)
                except GrammarError as e:
                    raise EngineError(BAD_REQUEST, str(e)) from None
            text = req.prompt + req.resume
            if len(text) > 16384:  # long prompts tokenize off the event loop
                prompt_tokens = await trio.to_thread.run_sync(runner.tokenize, text)
            else:
                prompt_tokens = runner.tokenize(text)
            n_ctx = runner.n_ctx_seq
            if len(prompt_tokens) >= n_ctx:
                raise EngineError(
                    BAD_REQUEST,
                    f"prompt is {len(prompt_tokens)} tokens but the context of {entry.name}"
                    f" is {n_ctx} tokens per sequence; shorten the prompt",
                )
            room = n_ctx - len(prompt_tokens)
            want = req.max_tokens
            if req.resume and want is not None:
                # max_tokens counts the whole answer; the resumed part is already spent.
                want = max(0, want - runner.count_tokens(req.resume))
            if want is not None and want > room:
                if req.resume:  # a resumed request continues as far as the context allows
                    want = room
                else:
                    raise EngineError(
                        BAD_REQUEST,
                        f"prompt ({len(prompt_tokens)} tokens) plus max_tokens"
                        f" ({req.max_tokens}) exceeds the context of {n_ctx} tokens per"
                        " sequence; lower max_tokens or shorten the prompt",
                    )
            result = GenerationResult(prompt_tokens=len(prompt_tokens))
            send, recv = trio.open_memory_channel[str](math.inf)
            token = trio.lowlevel.current_trio_token()

            def deliver(piece: str) -> None:  # in the trio thread
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    send.send_nowait(piece)  # unbounded: never WouldBlock

            ended = False

            def finished(outcome: SequenceOutcome) -> None:  # in the trio thread
                nonlocal ended
                ended = True
                result.finish_reason = outcome.finish_reason
                result.completion_tokens = outcome.completion_tokens
                result.cached_tokens = outcome.cached_tokens
                result.time_to_first_token = outcome.time_to_first_token
                result.tokens_per_s = outcome.tokens_per_s
                send.close()
                release()
                if outcome.tokens_per_s and outcome.completion_tokens >= 8:
                    prev = self._tps.get(entry.sha256)
                    # EWMA: one slow request should not swing routing decisions.
                    tps = outcome.tokens_per_s if prev is None else \
                        0.7 * prev + 0.3 * outcome.tokens_per_s
                    self._tps[entry.sha256] = m.tokens_per_s = tps

            # Why run_sync_soon and not from_thread.run_sync: the runner thread must never
            # wait for the event loop. The queue is FIFO, so every piece is delivered
            # before `finished` closes the channel.
            seq = SequenceRequest(
                prompt_tokens=prompt_tokens,
                max_new=want if want is not None else room,
                sampling=Sampling(temperature=req.temperature, top_p=req.top_p,
                                  top_k=req.top_k, min_p=req.min_p,
                                  repeat_penalty=req.repeat_penalty, seed=req.seed),
                stops=tuple(s for s in req.stop if s),
                emit=lambda piece: _queue_to_loop(token, deliver, piece),
                done=lambda outcome: _queue_to_loop(token, finished, outcome),
                # A seeded request is evaluated afresh: a reused prefix changes batch
                # shapes and so the logits' last bits, and a seed promises the same text.
                reuse_prefix=req.seed is None,
                grammar=req.grammar,
                grammar_prefix=req.resume if req.grammar is not None else "",
            )
            try:
                runner.submit(seq)
            except RuntimeError as e:  # stopped between the check above and now
                raise EngineError(BUSY, f"model {entry.name} is being unloaded; retry",
                                  retry_after=1.0) from e
            submitted = (runner, seq)
            try:
                yield Generation(recv, result, seq.outcome)
            finally:
                if not ended:
                    runner.cancel(seq)  # the runner ends it at its next step
                    result.finish_reason = "cancelled"
        finally:
            if submitted is None:
                release()
            # else: `finished` releases the sequence when the runner reports its end


    # ---- embeddings -------------------------------------------------------------------
    #
    # An embedding context is a second llama context of the model (embeddings on, its own
    # KV cache): the generation batch keeps running while a request embeds. Counted in
    # the budget as the model's whole memory_estimate at the sequence context (weights +
    # KV + compute), on top of a loaded generation runner of the same model: simple, and
    # a little high where the weights' mmap pages are shared.

    def embedding_memory(self, entry: ModelEntry) -> int:
        info = self.store.info(entry)
        return info.memory_estimate(self.n_ctx_for(info))

    def check_embed_fits(self, entry: ModelEntry) -> None:
        need = self.embedding_memory(entry)
        if need > self.memory_budget:
            raise EngineError(
                TOO_LARGE,
                f"embedding with {entry.name} needs {fmt_bytes(need)} and the memory budget"
                f" is {fmt_bytes(self.memory_budget)}; raise --memory-budget or use a"
                " smaller model")

    async def embed(self, model: str, inputs: list[str], *,
                    truncate: bool = True) -> EmbeddingResult:
        """One L2-normalized vector per input, pooled as the model's GGUF says.

        Raises EngineError: NOT_FOUND, TOO_LARGE (does not fit the budget), BUSY (the
        budget is held by models in use), BAD_REQUEST (an input longer than the context
        with truncate False)."""
        entry = self.resolve(model)
        self.check_embed_fits(entry)
        lock = self._embed_locks.setdefault(entry.sha256, trio.Lock())
        async with lock:  # one call at a time per context; waiters wait on the loop
            runner = self._embedders.get(entry.sha256)
            if runner is None:
                runner = await self._load_embedder(entry)
            try:
                # abandon_on_cancel: a client gone or a shutdown does not wait for the
                # decode; the runner's own lock keeps the next call off it until it ends.
                return await trio.to_thread.run_sync(
                    lambda: runner.embed(list(inputs), truncate=truncate),
                    abandon_on_cancel=True)
            except InputTooLong as e:
                raise EngineError(BAD_REQUEST, str(e)) from e
            except (RuntimeError, ValueError) as e:
                raise EngineError(INTERNAL, f"embedding with {entry.name} failed: {e}") from e
            finally:  # the model's keep_alive counts from here (0: drop it now)
                runner.last_used = time.monotonic()
                self._unload_expired_soon(entry.sha256)

    def _unload_expired_soon(self, sha: str) -> None:
        """After the embed lock is released (it is held while this runs)."""
        if self._nursery is not None:
            self._nursery.start_soon(self._unload_after_lock, sha)

    async def _unload_after_lock(self, sha: str) -> None:
        lock = self._embed_locks.get(sha)
        if lock is not None:
            async with lock:
                pass
        self._unload_expired(only=sha)

    async def _load_embedder(self, entry: ModelEntry) -> EmbeddingRunner:
        info = self.store.info(entry)
        runner = EmbeddingRunner(
            str(entry.path), n_ctx=self.n_ctx_for(info),
            pooling=pooling_for(info.metadata, info.architecture),
            n_threads=self.n_threads, gpu_layers=self.gpu_layers)
        runner.memory = self.embedding_memory(entry)
        for sha in [s for s in self._embedders if s != entry.sha256]:
            if sum(r.memory for r in self._embedders.values()) + runner.memory \
                    <= self.memory_budget:
                break
            self._drop_embedder(sha)  # idle embedding contexts go before models
        self._make_room(runner.memory, keep="")
        t0 = time.monotonic()
        try:
            await trio.to_thread.run_sync(runner.load)
        except Exception as e:
            raise EngineError(INTERNAL, f"cannot load {entry.name} for embeddings: {e}") from e
        log.info("loaded %s for embeddings in %.2fs (%s pooling, %d tokens)", entry.name,
                 time.monotonic() - t0, runner.pooling_name, runner.n_ctx)
        self._embedders[entry.sha256] = runner
        return runner

    def _drop_embedder(self, sha: str) -> int:
        """Free the embedding context of `sha` unless a call is using it; its memory."""
        runner = self._embedders.get(sha)
        lock = self._embed_locks.get(sha)
        if runner is None or runner.busy or (lock is not None and lock.locked()):
            return 0
        del self._embedders[sha]
        runner.close()
        return runner.memory


def _queue_to_loop(token: trio.lowlevel.TrioToken, fn: Callable[[Any], None], arg: Any) -> None:
    """From the runner thread: run `fn(arg)` in the event loop, without waiting for it.
    After the loop has ended (shutdown) there is nobody left to tell: drop it."""
    with contextlib.suppress(trio.RunFinishedError):
        token.run_sync_soon(fn, arg)


def _vocab_tokens(entry: ModelEntry) -> list[str] | None:
    """Token strings of the vocabulary, read lazily only for chat-template models."""
    try:
        import gguf  # type: ignore[import-not-found]  # optional; llama-cpp ships it sometimes

        reader = gguf.GGUFReader(str(entry.path))
        field_ = reader.fields["tokenizer.ggml.tokens"]
        return [bytes(field_.parts[i]).decode("utf-8", "replace") for i in field_.data]
    except Exception:
        return None
