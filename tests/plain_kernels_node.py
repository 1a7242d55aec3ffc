"""Test launcher: `qvacd start` with llama.cpp's weight repacking off (`use_extra_bufts`
false), the kernel choice of a split head (models/split_load.py).

Why: the CPU backend normally repacks Q4_K/Q8_0 weights into CPU_REPACK buffers whose
kernels add in another order than the plain ones; a split's worker can only use the
plain ones (an RPC server's buffers are the device's plain type), so a split head turns
repacking off for its own layers too. A whole-model node keeps repacking (it is the
product default and no slower), which makes its greedy text differ from any split's in
the last bits of a logit, and after a near tie in its words. tests/test_split.py
compares a split with a whole-model node loaded with the same kernels: this launcher,
otherwise the unchanged daemon.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp  # noqa: E402

from qvacd import cli  # noqa: E402

_default_params = llama_cpp.llama_model_default_params


def _plain_kernels() -> llama_cpp.llama_model_params:
    params = _default_params()
    params.use_extra_bufts = False
    return params


llama_cpp.llama_model_default_params = _plain_kernels

if __name__ == "__main__":
    sys.exit(cli.main(["start", *sys.argv[1:]]))
