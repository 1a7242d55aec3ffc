"""Continuous batching: the one thread that owns a model's llama context and steps every
sequence in it together.

Why this shape (llama.cpp's own server does the same; see
shared/llama-cpp-batching-and-rpc.md for the facts about the bindings):
- One context per loaded model holds `n_seq` sequences (`n_seq_max`), and one thread
  drives it: only one thread may touch a llama context, and one decode over many
  sequences uses the cores far better than many contexts fighting over them (on 2 cores:
  47 tokens/s for one sequence, 184 for eight decoded together).
- Each step is ONE `llama_decode` over the next token of every generating sequence plus
  prompt chunks of sequences that are joining, up to `n_batch` tokens. A request joins at
  the next step; a sequence leaves the moment it finishes, is cancelled, or its client
  goes away. Only a prompt's last token asks for logits.
- Each sequence has its own sampler chain (llama.h: a sampler must see its sequence's
  tokens in order, without gaps), sampled at that sequence's index in the batch.
- The KV cache is split, one stream of `n_ctx_seq` tokens per sequence
  (`kv_unified=false`), not one pool: a request's context never depends on what other
  peers are doing (the 400 for "prompt + max_tokens too long" is decided up front and
  holds), one peer cannot starve the others of cache, and llama.cpp attends faster over
  a sequence's own stream when prompts do not share a long prefix. The cost: one long
  conversation cannot borrow the cache of idle sequences.
- An idle sequence keeps its KV; a new request goes to the free sequence whose cached
  tokens share the longest prefix with its prompt (a chat's next turn, a failover
  resume), and only the rest is evaluated. At least one prompt token is always
  evaluated so its logits exist.
- The event loop never waits on this thread: text pieces and the end of a sequence are
  queued to trio (`emit`/`done` callbacks, FIFO), and requests and cancels reach the
  thread through a condition variable.

Grammar-constrained sampling (structured output, tool calls): a request with a GBNF
grammar gets a grammar sampler of its own (models/grammar_sampling.py) beside its chain,
used as llama.cpp's common_sampler does: the chain picks a token from the raw logits; if
the grammar admits it, done; else the grammar masks the candidates (the most likely
GRAMMAR_SHORTLIST first; all 262k pieces only if none fits) and the chain picks again.
A resumed answer (failover) first walks the grammar over the text already given, and
ends with an error if that text is not a start the grammar admits.

Faults: "no KV slot" (llama_decode returns 1) shrinks the step's prompt chunks and
retries, then ends the newest sequence with a clear error, never everyone; a fatal
decode error ends every sequence with an error and stops the runner, and the engine
loads the model afresh for the next request.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .grammar_sampling import GRAMMAR_SHORTLIST, GrammarSampler, candidates

log = logging.getLogger("qvacd.models.batch")

PENALTY_LAST_N = 64  # llama-cpp-python's default window for repeat_penalty


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None


@dataclass
class SequenceOutcome:
    """Written by the runner thread, read by the event loop after `done` was called."""

    finish_reason: str = "stop"  # stop | length | cancelled | error
    error: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused, not evaluated
    completion_tokens: int = 0
    time_to_first_token: float | None = None
    tokens_per_s: float | None = None


@dataclass(eq=False)
class SequenceRequest:
    """One generation handed to the runner. `emit` and `done` are called in the runner
    thread and must only queue work to the event loop."""

    prompt_tokens: list[int]
    max_new: int
    sampling: Sampling
    stops: tuple[str, ...]
    emit: Callable[[str], None]
    done: Callable[[SequenceOutcome], None]
    reuse_prefix: bool = True
    grammar: str | None = None  # GBNF, root rule "root": every token sampled must fit it
    grammar_prefix: str = ""  # text the grammar has already seen (a resumed answer)
    outcome: SequenceOutcome = field(default_factory=SequenceOutcome)
    cancelled: bool = False  # set by the event loop; read between steps
    submitted: float = field(default_factory=time.perf_counter)


class _Fatal(Exception):
    pass


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def stop_overlap(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that could begin a stop sequence."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class _Sequence:
    """One of the context's sequences (seq_id fixed) and what runs in it now."""

    def __init__(self, seq_id: int) -> None:
        self.seq_id = seq_id
        self.cached: list[int] = []  # tokens whose KV is in this sequence, by position
        self.last_used = 0.0
        self.req: SequenceRequest | None = None
        self.sampler: Any = None
        self.grammar: GrammarSampler | None = None
        self.todo: list[int] = []  # prompt tokens not yet evaluated
        self.next_token: int | None = None  # sampled, not yet in the KV cache
        self.batch_index = -1  # where this step's logits are, or -1
        self.fed = 0  # prompt tokens put in this step's batch
        self.joined = 0.0
        self.decoder: Any = None
        self.pending = ""
        self.generated = 0
        self.t_first: float | None = None
        self.t_last: float | None = None

    @property
    def generating(self) -> bool:
        return self.req is not None and self.next_token is not None


class BatchRunner:
    """Loads one GGUF model with a multi-sequence context and runs the step loop.

    `load()` and `run()` are blocking and run in worker threads (one after the other,
    never at once); everything else is called from the event loop and only touches the
    condition-protected queue and flags.
    """

    def __init__(self, path: str, *, n_seq: int, n_ctx_seq: int, n_threads: int,
                 gpu_layers: int, n_batch: int = 512) -> None:
        self.path = path
        self.n_seq = n_seq
        self.n_ctx_seq_wanted = n_ctx_seq
        self.n_threads = n_threads
        self.gpu_layers = gpu_layers
        self.n_batch = max(n_batch, n_seq)
        self.n_ctx_seq = n_ctx_seq  # the real per-sequence context once loaded
        self._cv = threading.Condition()
        self._pending: list[SequenceRequest] = []
        self._stopping = False
        self.broken: str | None = None  # why the runner stopped by itself
        self._model: Any = None
        self._ctx: Any = None
        self._batch: Any = None
        self._vocab: Any = None
        self._mem: Any = None
        self._n_swa = 0
        self._n_vocab = 0
        self._seqs: list[_Sequence] = []
        self._piece_buf = ctypes.create_string_buffer(256)
        # counters read by the event loop (plain ints: the GIL makes them coherent)
        self.tokens_generated = 0
        self.steps = 0
        # tokens per whole second, a ring of 16 (written here, read by the event loop)
        self._bucket_sec = [0] * 16
        self._bucket_n = [0] * 16

    # ---- called from the event loop ---------------------------------------------------

    def submit(self, req: SequenceRequest) -> None:
        with self._cv:
            if self._stopping:
                raise RuntimeError("runner is stopping")
            self._pending.append(req)
            self._cv.notify()

    def cancel(self, req: SequenceRequest) -> None:
        req.cancelled = True
        with self._cv:
            self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def tokenize(self, text: str) -> list[int]:
        """Thread-safe: llama_tokenize only reads the vocabulary."""
        import llama_cpp

        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, True, True)
        if n < 0:
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, True, True)
            if n < 0:
                raise ValueError("prompt could not be tokenized")
        return list(buf[:n])

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` as a continuation (no BOS)."""
        import llama_cpp

        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, False, False)
        return abs(n)

    def check_grammar(self, grammar: str, prefix: str = "") -> None:
        """GrammarError unless llama.cpp parses `grammar` (root rule "root") and it admits
        `prefix` as the start of an answer. Safe from the event loop: parsing and matching
        read only the vocabulary."""
        from .grammar import GrammarError

        sampler = GrammarSampler(self._vocab, grammar)
        try:
            why = sampler.walk(prefix, self._piece)
        finally:
            sampler.free()
        if why is not None:
            raise GrammarError(why)

    # ---- loading (worker thread) -----------------------------------------------------

    def load(self) -> None:
        import llama_cpp
        from llama_cpp import _logger

        # llama.cpp prints every tensor and buffer as it loads; keep that for --log-level debug
        _logger.logger.setLevel(logging.DEBUG if log.isEnabledFor(logging.DEBUG)
                                else logging.ERROR)
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = self.gpu_layers if self.gpu_layers >= 0 else 0x7FFFFFFF
        model = llama_cpp.llama_model_load_from_file(self.path.encode(), mparams)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {self.path}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self.n_ctx_seq_wanted * self.n_seq
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = min(self.n_batch, 512)
        cparams.n_seq_max = self.n_seq
        cparams.kv_unified = False
        cparams.n_threads = self.n_threads
        cparams.n_threads_batch = self.n_threads
        cparams.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise RuntimeError(f"llama.cpp could not create a context for {self.path}"
                               f" ({self.n_seq} sequences of {self.n_ctx_seq_wanted} tokens)")
        self._model, self._ctx = model, ctx
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._n_swa = int(llama_cpp.llama_model_n_swa(model))
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.n_ctx_seq = int(llama_cpp.llama_n_ctx_seq(ctx))
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._seqs = [_Sequence(i) for i in range(self.n_seq)]

    def _free(self) -> None:
        import llama_cpp

        for s in self._seqs:
            if s.sampler:
                llama_cpp.llama_sampler_free(s.sampler)
                s.sampler = None
            if s.grammar is not None:
                s.grammar.free()
                s.grammar = None
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    # ---- the step loop (worker thread) -------------------------------------------------

    def run(self) -> None:
        """Step until stopped. Never raises: every request gets `done` exactly once."""
        try:
            while True:
                admitted = self._wait_for_work()
                if admitted is None:
                    break
                for req in admitted:
                    self._join(req)
                self._step()
        except _Fatal as e:
            self.broken = str(e)
            log.error("%s; ended every sequence of this model and unloaded it"
                      " (the next request loads it again)", e)
        except Exception as e:  # a bug here must not take the daemon down
            self.broken = f"batch runner failed: {e!r}"
            log.exception("batch runner of %s failed; ended its sequences and unloaded it",
                          self.path)
        finally:
            with self._cv:
                self._stopping = True
                pending, self._pending = self._pending, []
            why = self.broken
            for s in self._seqs:
                if s.req is not None:
                    self._finish(s, "error" if why else "cancelled", why)
            for req in pending:
                req.outcome.finish_reason = "error" if why else "cancelled"
                req.outcome.error = why
                req.done(req.outcome)
            self._free()

    def _busy(self) -> list[_Sequence]:
        return [s for s in self._seqs if s.req is not None]

    def _wait_for_work(self) -> list[SequenceRequest] | None:
        """New requests for free sequences; None when stopping. Blocks while idle."""
        with self._cv:
            while True:
                if self._stopping:
                    return None
                dropped = [r for r in self._pending if r.cancelled]
                if dropped:
                    self._pending = [r for r in self._pending if not r.cancelled]
                free = sum(1 for s in self._seqs if s.req is None)
                taken, self._pending = self._pending[:free], self._pending[free:]
                if taken or dropped or self._busy():
                    break
                self._cv.wait()
        for r in dropped:
            r.outcome.finish_reason = "cancelled"
            r.done(r.outcome)
        return taken

    def _join(self, req: SequenceRequest) -> None:
        import llama_cpp

        free = [s for s in self._seqs if s.req is None]
        prompt = req.prompt_tokens
        if req.reuse_prefix:
            best = max(free, key=lambda s: (_common_prefix(s.cached, prompt), -s.last_used))
            keep = min(_common_prefix(best.cached, prompt), len(prompt) - 1)
        else:  # the least recently used sequence; its cache is the least likely wanted
            best = min(free, key=lambda s: s.last_used)
            keep = 0
        s = best
        if keep < len(s.cached):
            if keep <= 0 or not llama_cpp.llama_memory_seq_rm(self._mem, s.seq_id, keep, -1):
                keep = 0
            elif self._n_swa > 0:
                # A sliding-window cache drops positions older than the window; reusing a
                # prefix needs the window before `keep` (llama-server's rule).
                pos_min = llama_cpp.llama_memory_seq_pos_min(self._mem, s.seq_id)
                if pos_min > max(0, keep - self._n_swa):
                    keep = 0
            if keep == 0:
                llama_cpp.llama_memory_seq_rm(self._mem, s.seq_id, -1, -1)
        s.cached = s.cached[:keep]
        s.todo = prompt[keep:]
        s.req = req
        s.next_token = None
        s.joined = time.perf_counter()
        s.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        s.pending = ""
        s.generated = 0
        s.t_first = s.t_last = None
        req.outcome.prompt_tokens = len(prompt)
        req.outcome.cached_tokens = keep
        s.sampler = self._make_sampler(req.sampling, prompt)
        if req.grammar is not None:
            try:
                s.grammar = GrammarSampler(self._vocab, req.grammar)
                why = s.grammar.walk(req.grammar_prefix, self._piece)
            except ValueError as e:  # GrammarError (Engine.generate checked it first)
                why = str(e)
            if why is not None:
                self._finish(s, "error", why)
                return
        if req.max_new <= 0:
            self._finish(s, "length")

    def _make_sampler(self, p: Sampling, prompt: list[int]) -> Any:
        import llama_cpp

        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        # Same order as llama-cpp-python's Llama sampler (penalties, top-k, top-p, min-p,
        # temperature, dist); top-k first also keeps top-p from sorting the whole vocabulary.
        if p.repeat_penalty != 1.0:
            n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
            add(chain, llama_cpp.llama_sampler_init_penalties(
                n_vocab, PENALTY_LAST_N, p.repeat_penalty, 0.0, 0.0))
        if p.temperature <= 0.0:
            add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            if p.top_k > 0:
                add(chain, llama_cpp.llama_sampler_init_top_k(p.top_k))
            if p.top_p < 1.0:
                add(chain, llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
            if p.min_p > 0.0:
                add(chain, llama_cpp.llama_sampler_init_min_p(p.min_p, 1))
            add(chain, llama_cpp.llama_sampler_init_temp(p.temperature))
            seed = p.seed if p.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
            add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        if p.repeat_penalty != 1.0:
            for tok in prompt[-PENALTY_LAST_N:]:
                llama_cpp.llama_sampler_accept(chain, tok)
        return chain

    def _fill(self, prompt_budget: int) -> tuple[int, list[_Sequence], list[_Sequence]]:
        """Put this step's tokens in the batch: generating sequences first, then prompt
        chunks within `prompt_budget`. Returns (tokens, generating, prompting)."""
        b = self._batch
        n = 0
        gen: list[_Sequence] = []
        feeding: list[_Sequence] = []
        for s in self._seqs:
            s.batch_index = -1
            s.fed = 0
            if s.generating:
                b.token[n] = s.next_token
                b.pos[n] = len(s.cached)
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = s.seq_id
                b.logits[n] = 1
                s.batch_index = n
                n += 1
                gen.append(s)
        joining = sorted((s for s in self._seqs if s.req is not None and s.todo),
                         key=lambda s: s.joined)
        budget = prompt_budget
        for s in joining:
            if budget <= 0:
                break
            take = min(budget, len(s.todo))
            base = len(s.cached)
            last = take == len(s.todo)
            for j in range(take):
                b.token[n] = s.todo[j]
                b.pos[n] = base + j
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = s.seq_id
                b.logits[n] = 1 if (last and j == take - 1) else 0
                n += 1
            if last:
                s.batch_index = n - 1
            s.fed = take
            budget -= take
            feeding.append(s)
        b.n_tokens = n
        return n, gen, feeding

    def _step(self) -> None:
        import llama_cpp

        for s in self._busy():
            if s.req is not None and s.req.cancelled:
                self._finish(s, "cancelled")
        if not self._busy():
            return
        n_gen = sum(1 for s in self._seqs if s.generating)
        prompt_budget = self.n_batch - n_gen
        while True:
            n, gen, feeding = self._fill(prompt_budget)
            if n == 0:
                return
            ret = llama_cpp.llama_decode(self._ctx, self._batch)
            if ret == 0:
                break
            # nothing of a failed batch stays in the cache
            for s in gen + feeding:
                llama_cpp.llama_memory_seq_rm(self._mem, s.seq_id, len(s.cached), -1)
            if ret == 1:  # no KV slot for the batch: shrink it, as llama-server does
                if feeding and n - len(gen) > 1:
                    prompt_budget = (n - len(gen)) // 2  # half the prompt tokens it held
                    log.info("no KV slot for a %d-token step; retrying with prompt chunks"
                             " of at most %d tokens", n, prompt_budget)
                    continue
                victims = feeding or gen
                victim = max(victims, key=lambda s: s.joined)
                log.warning("no KV slot left for sequence %d; ended that request with an"
                            " error, the others continue", victim.seq_id)
                self._finish(victim, "error", "the model's KV cache is full; retry shortly"
                             " or lower max_tokens")
                if victim in feeding:
                    victim.todo = []
                continue
            raise _Fatal(f"llama_decode failed with code {ret} for {self.path}")
        self.steps += 1
        for s in gen:
            s.cached.append(s.next_token)  # type: ignore[arg-type]
        for s in feeding:
            s.cached.extend(s.todo[:s.fed])
            s.todo = s.todo[s.fed:]
        for s in self._seqs:
            if s.batch_index >= 0 and s.req is not None:
                if s.grammar is None:
                    self._take_token(s, self._sample(s))
                    continue
                tok = self._sample_in_grammar(s)
                if tok < 0:
                    self._finish(s, "error", "the grammar admits no next token")
                else:
                    self._take_token(s, tok)

    def _sample(self, s: _Sequence) -> int:
        """The next token of `s` from its logits at its batch index.

        Why not always llama_sampler_sample: it copies the whole vocabulary (262k entries
        for Gemma 3) into a candidate array for every sequence at every step, ~14% of a
        step with 8 sequences here. Greedy is an argmax over the logits; a chain that
        begins with top-k sees the same result on the top k candidates chosen here.
        Penalties need the whole vocabulary: those go through the full path.
        """
        import llama_cpp
        import numpy as np

        req = s.req
        assert req is not None
        p = req.sampling
        if p.repeat_penalty != 1.0 or (p.temperature > 0.0 and p.top_k <= 0):
            return int(llama_cpp.llama_sampler_sample(s.sampler, self._ctx, s.batch_index))
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, s.batch_index)
        logits = np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))
        if p.temperature <= 0.0:
            return int(logits.argmax())
        tok = self._top_k_pick(s, logits)
        llama_cpp.llama_sampler_accept(s.sampler, tok)
        return tok

    def _top_k_pick(self, s: _Sequence, logits: Any) -> int:
        """The chain's choice over the top k logits (the chain begins with top-k, so the
        rest would be cut anyway); not accepted into the chain."""
        import llama_cpp
        import numpy as np

        assert s.req is not None
        k = min(s.req.sampling.top_k, self._n_vocab)
        ids = np.argpartition(logits, -k)[-k:]
        cand = (llama_cpp.llama_token_data * k)()
        for j, tok in enumerate(ids.tolist()):
            cand[j].id = tok
            cand[j].logit = float(logits[tok])
            cand[j].p = 0.0
        arr = llama_cpp.llama_token_data_array(data=cand, size=k, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(s.sampler, ctypes.byref(arr))
        # the samplers may sort or shrink the array in place: read it back through `arr`
        return int(arr.data[arr.selected].id) if 0 <= arr.selected < arr.size else int(ids[-1])

    def _sample_in_grammar(self, s: _Sequence) -> int:
        """The next token of `s` that its grammar admits, accepted into grammar and chain;
        -1 when the grammar admits none (not even the end)."""
        import llama_cpp
        import numpy as np

        req = s.req
        assert req is not None
        p = req.sampling
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, s.batch_index)
        logits = np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))
        # First the chain's own choice, as if unconstrained (cheap: most tokens of a JSON
        # answer are ones the model would pick anyway) ...
        if p.repeat_penalty == 1.0 and p.temperature <= 0.0:
            tok = int(logits.argmax())
        elif p.repeat_penalty == 1.0 and p.top_k > 0:
            tok = self._top_k_pick(s, logits)
        else:
            _cand, arr = candidates(logits, np.arange(self._n_vocab, dtype=np.int32))
            llama_cpp.llama_sampler_apply(s.sampler, ctypes.byref(arr))
            tok = int(arr.data[arr.selected].id) if 0 <= arr.selected < arr.size else -1
        grammar = s.grammar
        assert grammar is not None
        if tok < 0 or not grammar.admits(tok):
            # ... and when the grammar refuses it, the grammar masks the candidates first:
            # a shortlist, except when top-k is off (then every token counts).
            if p.temperature <= 0.0:  # greedy: the best token that fits is in any shortlist
                shortlist = GRAMMAR_SHORTLIST
            else:
                shortlist = max(GRAMMAR_SHORTLIST, p.top_k) if p.top_k > 0 else 0
            masked = grammar.mask(logits, shortlist)
            if masked is None:
                return -1
            _cand, arr = masked  # _cand: the memory under arr, kept alive while arr is used
            llama_cpp.llama_sampler_apply(s.sampler, ctypes.byref(arr))
            tok = int(arr.data[arr.selected].id) if 0 <= arr.selected < arr.size else -1
            # never accept what the grammar refuses (llama.cpp would abort)
            if tok < 0 or not grammar.admits(tok):
                return -1
        grammar.accept(tok)
        llama_cpp.llama_sampler_accept(s.sampler, tok)
        return tok

    def _piece(self, tok: int, buf: Any = None) -> bytes:
        import llama_cpp

        buf = self._piece_buf if buf is None else buf
        n = llama_cpp.llama_token_to_piece(self._vocab, tok, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, tok, buf, len(buf), 0, False)
        return bytes(buf.raw[:n])

    def _take_token(self, s: _Sequence, tok: int) -> None:
        import llama_cpp

        req = s.req
        assert req is not None
        if req.cancelled:
            self._finish(s, "cancelled")
            return
        if llama_cpp.llama_vocab_is_eog(self._vocab, tok):
            self._finish(s, "stop")
            return
        now = time.perf_counter()
        s.generated += 1
        self.tokens_generated += 1
        sec = int(time.monotonic())
        i = sec % 16
        if self._bucket_sec[i] != sec:
            self._bucket_n[i] = 0
            self._bucket_sec[i] = sec
        self._bucket_n[i] += 1
        if s.t_first is None:
            s.t_first = now
            req.outcome.time_to_first_token = now - req.submitted
        s.t_last = now
        s.pending += s.decoder.decode(self._piece(tok))
        stops = req.stops
        if stops:
            hit = min((i for i in (s.pending.find(x) for x in stops) if i >= 0), default=-1)
            if hit >= 0:
                s.pending = s.pending[:hit]
                self._finish(s, "stop")
                return
            keep = stop_overlap(s.pending, stops)
        else:
            keep = 0
        out, s.pending = s.pending[: len(s.pending) - keep], s.pending[len(s.pending) - keep:]
        if out:
            req.emit(out)
        if s.generated >= req.max_new:
            self._finish(s, "length")
            return
        s.next_token = tok

    def _finish(self, s: _Sequence, reason: str, error: str | None = None) -> None:
        import llama_cpp

        req = s.req
        if req is None:
            return
        out = req.outcome
        if reason not in ("cancelled", "error") and s.decoder is not None:
            tail = s.pending + s.decoder.decode(b"", final=True)
            if tail:
                req.emit(tail)
        out.finish_reason = reason
        out.error = error
        out.completion_tokens = s.generated
        if s.t_first is not None and s.t_last is not None and s.generated > 1:
            out.tokens_per_s = (s.generated - 1) / max(1e-9, s.t_last - s.t_first)
        if s.sampler:
            llama_cpp.llama_sampler_free(s.sampler)
            s.sampler = None
        if s.grammar is not None:
            s.grammar.free()
            s.grammar = None
        s.req = None
        s.todo = []
        s.next_token = None
        s.batch_index = -1
        s.last_used = time.monotonic()
        req.done(out)

    # ---- what the event loop may read ----------------------------------------------

    def active(self) -> int:
        return sum(1 for s in self._seqs if s.req is not None)

    def recent_tokens_per_s(self, window: int = 10) -> float:
        """Tokens generated per second over the last `window` whole seconds."""
        now = int(time.monotonic())
        total = sum(n for sec, n in zip(self._bucket_sec, self._bucket_n)
                    if now - window <= sec < now)
        return total / window
