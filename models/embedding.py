"""Embeddings: one llama context per model with embeddings on, apart from the generation
batch.

Why llama-cpp-python's own `Llama(embedding=True)` and its `embed`: it loads the context
with embeddings on, reads the pooled vector and L2-normalizes (what Ollama returns).
It can also pack many inputs into one decode as sequences of a unified KV cache, but with
gemma3 (0.3.36) a packed input's vector differs from the same input alone by up to 7e-3
(the first input is exact, later ones are not), so the same text would not give the same
vector: each input is decoded on its own, all of one request in one worker-thread call
under one lock. What it does not do, done here: pooling as the GGUF says, mean when it says nothing (llama.cpp
would fall back to NONE, per-token vectors); a too-long input refused with both lengths
instead of a bare ValueError; one lock per instance, so two calls never share a context.

Every method that touches llama.cpp blocks: call it from a worker thread
(`trio.to_thread.run_sync`), never from the event loop.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

# llama.h's enum llama_pooling_type
POOLING_NONE, POOLING_MEAN, POOLING_CLS, POOLING_LAST, POOLING_RANK = 0, 1, 2, 3, 4
_POOLING_NAMES = {POOLING_MEAN: "mean", POOLING_CLS: "cls", POOLING_LAST: "last"}


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
            if not truncate:
                for i, text in enumerate(inputs):
                    n = len(llm.tokenize(text.encode("utf-8")))
                    if n > self.n_ctx:
                        raise InputTooLong(i, n, self.n_ctx)
            if not inputs:
                return EmbeddingResult([], 0)
            vectors: list[list[float]] = []
            total = 0
            for text in inputs:  # one decode each: see the module docstring
                got, count = llm.embed([text], normalize=True, truncate=True,
                                       return_count=True)
                vectors.append([float(x) for x in got[0]])
                total += int(count)
            return EmbeddingResult(vectors, total)

    def close(self) -> None:
        with self._lock:
            llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()
