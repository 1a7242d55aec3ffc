"""One sequence's grammar (llama.cpp's grammar sampler) and what models/batch_runner.py
needs of it: does it admit a token, accept one, mask candidates, walk a resumed text.

Why every accept is guarded: llama.cpp throws a C++ exception when its grammar accepts a
token the grammar does not admit, and that aborts the whole process (a daemon serving
others). So a token is accepted only right after `admits` said yes, and the resume text
of a failover is walked token by token the same way; a text the grammar does not admit
is refused with a reason instead.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

from .grammar import GrammarError, check_grammar_text

__all__ = ["GRAMMAR_SHORTLIST", "GrammarSampler", "candidates"]

# A grammar that refuses the chain's choice masks this many of the most likely tokens
# first: checking all 262k pieces of Gemma 3 takes 120-200 ms on 2 loaded cores, these
# about 1 ms. The whole vocabulary is checked only when none of them fits.
GRAMMAR_SHORTLIST = 2048

_TOKEN_DATA = [("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]  # llama_token_data


def candidates(logits: Any, ids: Any) -> tuple[Any, Any]:
    """Tokens `ids` with their `logits` as a llama_token_data_array (and the numpy memory
    under it, which must outlive the array's use)."""
    import llama_cpp
    import numpy as np

    assert ctypes.sizeof(llama_cpp.llama_token_data) == 12
    cand = np.empty(len(ids), dtype=_TOKEN_DATA)
    cand["id"] = ids
    cand["logit"] = logits[ids]
    cand["p"] = 0.0
    data = cand.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))
    arr = llama_cpp.llama_token_data_array(data=data, size=len(ids), selected=-1, sorted=False)
    return cand, arr


class GrammarSampler:
    """llama.cpp's grammar sampler for GBNF `text` (root rule "root") over `vocab`.
    GrammarError when the text is refused (models.grammar.check_grammar_text) or does
    not parse. Safe from any one thread at a time; `free` when done."""

    def __init__(self, vocab: Any, text: str) -> None:
        import llama_cpp

        check_grammar_text(text)
        self._ptr = llama_cpp.llama_sampler_init_grammar(vocab, text.encode(), b"root")
        if not self._ptr:
            raise GrammarError("the grammar does not parse as GBNF with a rule named root "
                               "(llama.cpp's log says where)")
        self._vocab = vocab
        self._one = (llama_cpp.llama_token_data * 1)()

    def free(self) -> None:
        import llama_cpp

        if self._ptr:
            llama_cpp.llama_sampler_free(self._ptr)
            self._ptr = None

    def admits(self, tok: int) -> bool:
        """Whether the grammar, where it stands, admits `tok` next (an end-of-generation
        token: whether the grammar is complete)."""
        import llama_cpp

        one = self._one
        one[0].id = tok
        one[0].logit = 1.0
        arr = llama_cpp.llama_token_data_array(data=one, size=1, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(self._ptr, ctypes.byref(arr))
        return bool(one[0].logit != float("-inf"))

    def accept(self, tok: int) -> None:
        """Advance over `tok`, which `admits` must just have said yes to."""
        import llama_cpp

        if not llama_cpp.llama_vocab_is_eog(self._vocab, tok):
            llama_cpp.llama_sampler_accept(self._ptr, tok)

    def mask(self, logits: Any, shortlist: int) -> tuple[Any, Any] | None:
        """Candidates with the grammar's mask applied (refused tokens at -inf): the
        `shortlist` most likely tokens when any of them fits (0: no shortlist), else the
        whole vocabulary; None when no token fits at all."""
        import llama_cpp
        import numpy as np

        n_vocab = len(logits)
        if 0 < shortlist < n_vocab:
            cand, arr = candidates(logits, np.argpartition(logits, -shortlist)[-shortlist:])
            llama_cpp.llama_sampler_apply(self._ptr, ctypes.byref(arr))
            if np.isfinite(cand["logit"][:arr.size]).any():
                return cand, arr
        cand, arr = candidates(logits, np.arange(n_vocab, dtype=np.int32))
        llama_cpp.llama_sampler_apply(self._ptr, ctypes.byref(arr))
        if not np.isfinite(cand["logit"][:arr.size]).any():
            return None
        return cand, arr

    def walk(self, text: str, piece: Callable[[int, Any], bytes]) -> str | None:
        """Advance over `text` (a resumed answer); why it cannot, or None. `piece(tok,
        buf)` is a token's bytes, written through `buf`."""
        import llama_cpp

        if not text:
            return None
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (llama_cpp.llama_token * n_max)()
        # as plain text (no special tokens): the grammar sees exactly these characters
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, False, False)
        tokens = list(buf[:max(n, 0)])
        piece_buf = ctypes.create_string_buffer(256)  # this thread's own
        pieces = [piece(t, piece_buf) for t in tokens]
        if n < 0 or b"".join(pieces) != data:
            return ("the resumed text does not tokenize back to itself; cannot continue it "
                    "inside the grammar")
        done = 0
        for tok, p in zip(tokens, pieces):
            if not self.admits(tok):
                return (f"the resumed text is not a start the grammar admits (it departs "
                        f"near character {len(data[:done].decode('utf-8', 'replace'))})")
            self.accept(tok)
            done += len(p)
        return None
