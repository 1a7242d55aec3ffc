"""Embeddings through the official openai and ollama clients against a real daemon with
the real default model, plus raw HTTP for the refusals."""

from __future__ import annotations

import math

import httpx
import numpy as np
import ollama
import openai
import pytest

MODEL = "gemma3-270m"
N_EMBD = 640  # gemma3-270m's embedding_length

TEXTS = ["The cat sat on the mat.", "Quantum chromodynamics describes the strong force."]


@pytest.fixture(scope="module")
def oai(shared_daemon):
    return openai.OpenAI(base_url=shared_daemon.api + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def oll(shared_daemon):
    return ollama.Client(host=shared_daemon.api)


def norm(v) -> float:
    return math.sqrt(sum(x * x for x in v))


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_openai_one_string(oai):
    r = oai.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    assert len(r.data) == 1 and r.data[0].index == 0
    v = r.data[0].embedding
    assert len(v) == N_EMBD
    assert abs(norm(v) - 1.0) < 1e-4
    assert r.usage.prompt_tokens > 3 and r.usage.total_tokens == r.usage.prompt_tokens
    again = oai.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    assert max_diff(v, again.data[0].embedding) < 1e-6, "same text, different vector"


def test_openai_list_equals_alone_and_base64(oai):
    alone = [oai.embeddings.create(model=MODEL, input=t, encoding_format="float")
             .data[0].embedding for t in TEXTS]
    both = oai.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert [d.index for d in both.data] == [0, 1]
    for a, b in zip(alone, both.data):  # packed in one decode, yet the same vectors
        assert max_diff(a, b.embedding) < 1e-6
    cos = float(np.dot(alone[0], alone[1]))
    assert cos < 0.99, f"different texts gave near-identical vectors (cosine {cos})"
    # the client's default is base64 (float32), decoded by the client itself
    b64 = oai.embeddings.create(model=MODEL, input=TEXTS)
    for a, b in zip(alone, b64.data):
        assert len(b.embedding) == N_EMBD and max_diff(a, b.embedding) < 1e-6


def test_openai_batch_of_16(oai):
    texts = [f"sentence number {i} about topic {i * 7 % 5}" for i in range(16)]
    r = oai.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert len(r.data) == 16
    vecs = [d.embedding for d in r.data]
    assert all(len(v) == N_EMBD and abs(norm(v) - 1) < 1e-4 for v in vecs)
    assert len({tuple(round(x, 5) for x in v) for v in vecs}) == 16
    # Decoded together (models/embedding.py packs them), each is its vector alone; and a
    # repeat of the same text in the batch is cosine 1 with it.
    for i in (0, 5, 15):
        alone = oai.embeddings.create(model=MODEL, input=texts[i], encoding_format="float")
        assert max_diff(alone.data[0].embedding, vecs[i]) < 1e-6, i
    again = oai.embeddings.create(model=MODEL, input=[texts[3], "other", texts[3]],
                                  encoding_format="float")
    cos = float(np.dot(again.data[0].embedding, again.data[2].embedding))
    assert abs(cos - 1.0) < 1e-6 and float(np.dot(again.data[0].embedding,
                                                   again.data[1].embedding)) < 0.99


def test_ollama_embed_and_embeddings(oll, oai):
    r = oll.embed(model=MODEL, input=TEXTS)
    assert len(r.embeddings) == 2 and all(len(v) == N_EMBD for v in r.embeddings)
    assert r.prompt_eval_count > 6 and r.total_duration > 0
    one = oll.embed(model=MODEL, input=TEXTS[1])
    assert max_diff(one.embeddings[0], r.embeddings[1]) < 1e-4
    old = oll.embeddings(model=MODEL, prompt=TEXTS[0])
    assert len(old.embedding) == N_EMBD and abs(norm(old.embedding) - 1) < 1e-4
    via_openai = oai.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    assert max_diff(old.embedding, via_openai.data[0].embedding) < 1e-6


def one_line_400(r: httpx.Response, *words: str) -> str:
    assert r.status_code == 400, r.text
    body = r.json()
    msg = body["error"]["message"] if isinstance(body["error"], dict) else body["error"]
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


def test_refusals(shared_daemon, oai):
    api = shared_daemon.api
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        oai.embeddings.create(model=MODEL, input="x", dimensions=64)
    one_line_400(httpx.post(f"{api}/v1/embeddings",
                            json={"model": MODEL, "input": [[1, 2, 3]]}), "token arrays")
    one_line_400(httpx.post(f"{api}/v1/embeddings",
                            json={"model": MODEL, "input": "x", "encoding_format": "int8"}),
                 "encoding_format")
    one_line_400(httpx.post(f"{api}/v1/embeddings",
                            json={"model": MODEL, "input": "x", "temprature": 1}),
                 "unknown field 'temprature'")
    one_line_400(httpx.post(f"{api}/api/embed",
                            json={"model": MODEL, "input": "x", "dimensions": 8}), "dimensions")
    r = httpx.post(f"{api}/api/embed", json={"model": "nope", "input": "x"})
    assert r.status_code == 404 and "nope" in r.json()["error"]


def test_too_long_input(start_daemon):
    """A small context (--ctx-size 256) so the over-long input is cheap to embed on CPU."""
    d = start_daemon("--ctx-size", "256", "--no-p2p")
    long_text = "word " * 600  # about 600 tokens, past the 256-token context
    r = httpx.post(f"{d.api}/api/embed", timeout=120,
                   json={"model": MODEL, "input": ["short", long_text], "truncate": False})
    msg = one_line_400(r, "input[1]", "256", "truncate")
    assert any(str(n) in msg for n in range(590, 620)), msg  # the input's own length
    cut = httpx.post(f"{d.api}/api/embed", timeout=120,
                     json={"model": MODEL, "input": long_text, "truncate": True})
    assert cut.status_code == 200, cut.text
    assert cut.json()["prompt_eval_count"] == 256
    assert abs(norm(cut.json()["embeddings"][0]) - 1) < 1e-4
