"""Embeddings: one llama context per model with embeddings on, apart from the generation
batch.

Why llama-cpp-python's `Llama(embedding=True)`: it loads the context with embeddings on
and pools per sequence. Why not its `embed` for many inputs: it packs inputs back to back,
and a packed input's vector then depends on its neighbours in the batch. Measured with
gemma3 270M Q4_K_M on x86 (0.3.36): up to 3e-3 from the same input alone, data-dependent,
the same with f32 KV cache, swa_full, 1 or 2 threads (flash attention: 1e-2). Packed so
that every input starts on a batch row that is a multiple of 32 and has its last group of
32 rows to itself, 32 inputs gave exactly (0.0) their vectors alone; with 8 instead of
32, still 1.7e-3. Our reading: the CPU kernels accumulate in steps (the f16 dot products
of attention in 32 lanes, the quantized matmul in groups of rows, leftover rows by
another kernel), so a row's sums depend on where it sits, and one flipped rounding in a
quantized activation shows far downstream. So every input here takes whole groups of
PACK_ALIGN rows, alone or packed: it starts on a group and a filler sequence of its own
(its own seq id, never read, attending only to itself) fills the rest of its last group.
An input then gets the same vector in any batch, and many are decoded in one pass.
The price is up to PACK_ALIGN - 1 filler rows per input: bench/embeddings.py's 64 short
texts (1206 tokens) take 2048 rows, and run at 0.74x Llama.embed's back-to-back packing.
`load` probes that this holds on this CPU and model; if not, each input is decoded on
its own (`packed` False): slower, still the same vector for the same text.

What else is done here: pooling as the GGUF says, mean when it says nothing (llama.cpp
would fall back to NONE, per-token vectors); L2 normalization (what Ollama returns); a
too-long input refused with both lengths instead of a bare ValueError; one lock per
instance, so two calls never share a context.

Every method that touches llama.cpp blocks: call it from a worker thread
(`trio.to_thread.run_sync`), never from the event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger("qvacd.embedding")

# llama.h's enum llama_pooling_type
POOLING_NONE, POOLING_MEAN, POOLING_CLS, POOLING_LAST, POOLING_RANK = 0, 1, 2, 3, 4
_POOLING_NAMES = {POOLING_MEAN: "mean", POOLING_CLS: "cls", POOLING_LAST: "last"}
# Every input takes whole groups of this many batch rows (see the module docstring).
PACK_ALIGN = 32
# Rows per packed decode. Attention in one decode is computed over every row against
# every row (masked per sequence, but computed), so one decode of 2048 rows costs ~16x
# four of 512; more than 512 rows adds no parallelism on a CPU. A longer input is alone.
PACK_ROWS = 512
PROBE_TOLERANCE = 1e-6
# Texts that drifted when packed unaligned (measured): the load-time probe packs them
# behind fillers of odd lengths and wants exactly their vectors alone.
_PROBE_TEXTS = ("sentence number 1 about topic 2", "sentence number 4 about topic 3",
                "Quantum chromodynamics describes the strong force.")


class InputTooLong(ValueError):
    """An input has more tokens than the embedding context and truncation is off."""

    def __init__(self, index: int, tokens: int, n_ctx: int) -> None:
        super().__init__(f"input[{index}] is {tokens} tokens but the embedding context is"
                         f" {n_ctx} tokens; shorten it or send truncate=true")
        self.index = index
        self.tokens = tokens
        self.n_ctx = n_ctx


def pooling_for(metadata: dict[str, Any], architecture: str) -> int:
    """The pooling the GGUF asks for (`<arch>.pooling_type`); mean when it says nothing.

    NONE (per-token vectors) and RANK (a reranker's score) are not embeddings of a text:
    mean is used for them too, so every input gets exactly one vector.
    """
    v = metadata.get(f"{architecture}.pooling_type")
    try:
        p = int(v) if v is not None else POOLING_MEAN
    except (TypeError, ValueError):
        p = POOLING_MEAN
    return p if p in _POOLING_NAMES else POOLING_MEAN


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: list[list[float]]
    prompt_tokens: int  # after truncation, all inputs together


class EmbeddingRunner:
    """One model's embedding context. `load` then `embed`, both in a worker thread."""

    def __init__(self, model_path: str, *, n_ctx: int, pooling: int, n_threads: int,
                 gpu_layers: int) -> None:
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.pooling = pooling
        self.n_threads = n_threads
        self.gpu_layers = gpu_layers
        self.memory = 0  # what the engine counts for it in the budget
        self.last_used = time.monotonic()  # when the last embed call ended
        self._llm: Any = None
        self._lock = threading.Lock()  # llama.cpp contexts are not thread-safe

    @property
    def pooling_name(self) -> str:
        return _POOLING_NAMES.get(self.pooling, str(self.pooling))

    def load(self) -> None:
        from llama_cpp import Llama  # heavy import, and only nodes that embed need it

        with self._lock:
            if self._llm is not None:
                return
            # n_batch = n_ubatch = n_ctx: an input up to the whole context is one ubatch
            # (non-causal encoders need the whole sequence in one), and short inputs
            # share it, up to n_seq_max sequences per decode.
            self._llm = Llama(
                model_path=self.model_path, embedding=True, n_ctx=self.n_ctx,
                n_batch=self.n_ctx, n_ubatch=self.n_ctx, pooling_type=self.pooling,
                n_threads=self.n_threads, n_threads_batch=self.n_threads,
                n_gpu_layers=self.gpu_layers, verbose=False)
            self.packed = self._packing_is_exact()
            if not self.packed:
                log.info("packed inputs do not reproduce their vectors alone with %s on this"
                         " device: one input per decode", self.model_path)

    packed = False  # set by load: many inputs per decode (True) or one each

    @property
    def busy(self) -> bool:
        """A call is running (in its thread); closing would wait for it."""
        return self._lock.locked()

    @property
    def n_embd(self) -> int:
        return int(self._llm.n_embd()) if self._llm is not None else 0

    def embed(self, inputs: list[str], *, truncate: bool) -> EmbeddingResult:
        """One L2-normalized vector per input. Raises InputTooLong (truncate False)."""
        with self._lock:
            llm = self._llm
            if llm is None:
                raise RuntimeError("embedding model is not loaded")
            tokens = [self._tokens(llm, text) for text in inputs]
            for i, toks in enumerate(tokens):
                if len(toks) > self.n_ctx:
                    if not truncate:
                        raise InputTooLong(i, len(toks), self.n_ctx)
                    tokens[i] = toks[: self.n_ctx]
            if not tokens:
                return EmbeddingResult([], 0)
            total = sum(len(t) for t in tokens)
            if self.packed:
                return EmbeddingResult(self._decode_packed(llm, tokens), total)
            return EmbeddingResult([self._decode_packed(llm, [t])[0] for t in tokens], total)

    @staticmethod
    def _tokens(llm: Any, text: str) -> list[int]:
        toks = llm.tokenize(text.encode("utf-8"))
        if not toks:  # a model that adds no BOS, and an empty text: one token to pool
            bos = llm.token_bos()
            toks = [bos if bos >= 0 else llm.token_eos()]
        return list(toks)

    def _decode_packed(self, llm: Any, tokens: list[list[int]]) -> list[list[float]]:
        """Decode in as few batches as fit n_ctx rows and n_seq_max sequences. Every input
        takes whole groups of PACK_ALIGN rows: it starts on a group and a filler sequence
        fills the rest of its last group, alone or packed alike (see the docstring)."""
        import llama_cpp

        batch, ctx = llm._batch, llm._ctx
        n_embd = llm.n_embd()
        n_seq_max = int(llm.context_params.n_seq_max)
        filler = self._filler_token(llm)
        out: list[list[float]] = [[] for _ in tokens]
        pending: list[tuple[int, int]] = []  # (input index, seq id) in the batch
        rows = seqs = 0

        def flush() -> None:
            ctx.kv_cache_clear()
            ctx.decode(batch)
            for index, seq in pending:
                ptr = llama_cpp.llama_get_embeddings_seq(ctx.ctx, seq)
                v = np.ctypeslib.as_array(ptr, shape=(n_embd,)).astype(np.float64)
                norm = float(np.linalg.norm(v))
                out[index] = (v / norm if norm > 0 else v).tolist()
            batch.reset()
            pending.clear()

        batch.reset()
        for index, toks in enumerate(tokens):
            gap = -len(toks) % PACK_ALIGN
            if len(toks) + gap > self.n_ctx:
                gap = 0  # a whole-context input: always alone, so always the same
            if rows and (rows + len(toks) + gap > min(self.n_ctx, PACK_ROWS)
                         or seqs + 2 > n_seq_max):
                flush()
                rows = seqs = 0
            batch.add_sequence(toks, seqs, True)
            pending.append((index, seqs))
            seqs += 1
            if gap:  # every output row is marked: llama.cpp wants all in embedding mode
                batch.add_sequence([filler] * gap, seqs, True)
                seqs += 1
            rows += len(toks) + gap
        if pending:
            flush()
        return out

    @staticmethod
    def _filler_token(llm: Any) -> int:
        for tok in (llm.token_bos(), llm.token_eos(), 0):
            if tok >= 0:
                return int(tok)
        return 0

    def _packing_is_exact(self) -> bool:
        """The probe texts packed together and behind other inputs give their vectors
        decoded alone (see the module docstring): a few tiny decodes, once per load.
        Within PROBE_TOLERANCE: attention over a longer batch reassociates a few sums
        (1e-8); the drift packing must not have is 1e-4 to 1e-2."""
        llm = self._llm
        t0 = time.monotonic()
        try:
            probes = [self._tokens(llm, t) for t in _PROBE_TEXTS]
            alone = np.array([self._decode_packed(llm, [t])[0] for t in probes])
            mixed: list[list[int]] = []
            for i, toks in enumerate(probes):
                mixed += [[self._filler_token(llm)] * (2 * i + 1), toks]
            together = np.array(self._decode_packed(llm, mixed)[1::2])
        except Exception as e:  # a model llama.cpp cannot pack at all: one per decode
            log.info("packing probe failed (%s): one input per decode", e)
            return False
        drift = float(np.max(np.abs(alone - together)))
        log.debug("packing probe: drift %.1e in %.2fs", drift, time.monotonic() - t0)
        return drift <= PROBE_TOLERANCE

    def close(self) -> None:
        with self._lock:
            llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()
