"""Embeddings delegated between real daemons on 127.0.0.1 with the real default model and
the official clients: a node without the model gets from a trusted peer the peer's own
vectors; a peer that predates /qvac/embed (tests/bad_provider.py: a real libp2p node with
a signed record claiming the model, and no embed handler) is a quick clear error or a
failover, never a hang; a provider that does not trust the consumer refuses it; and
keep_alive on /api/embed."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import numpy as np
import ollama
import openai
import pytest

from peers.identity import load_or_create_identity
from peers.trust import TrustStore
from tests.harness import ALL_ROLES as ALL
from tests.harness import REPO, Daemon, Mesh, free_port

MODEL = "gemma3-270m"
N_EMBD = 640
TEXTS = [f"sentence number {i} about topic {i * 7 % 5}" for i in range(15)] + [
    "sentence number 0 about topic 0"]  # the last repeats the first: cosine 1


def add_empty(mesh: Mesh, name: str, *args: str) -> None:
    """A node with no model at all (Mesh.add gives each the default model)."""
    d = mesh.root / name
    d.mkdir(parents=True)
    mesh.ids[name] = load_or_create_identity(d).peer_id_str
    mesh.ports[name] = free_port()
    mesh.nodes[name] = Daemon(d, "--no-default-model", *args)


def vectors(r: openai.types.CreateEmbeddingResponse) -> np.ndarray:
    return np.asarray([d.embedding for d in r.data])


def test_node_without_the_model_gets_the_peers_vectors(mesh):
    add_empty(mesh, "laptop")
    mesh.add("desktop", "--no-preload", "--ctx-size", "1024")
    mesh.trust("laptop", "desktop", ALL)
    mesh.trust("desktop", "laptop", ALL)
    big = mesh.start("desktop")
    small = mesh.start("laptop", bootstrap=["desktop"])
    mesh.wait_peers("laptop", ["desktop"])
    # The desktop's own vectors for the texts, asked directly (this also loads its
    # embedding context, which takes a while on a loaded CPU).
    direct = openai.OpenAI(base_url=big.api + "/v1", api_key="x", max_retries=0, timeout=600)
    here = direct.embeddings.with_raw_response.create(model=MODEL, input=TEXTS,
                                                      encoding_format="float")
    assert here.headers["x-qvac-served-by"] == mesh.ids["desktop"]
    oai = openai.OpenAI(base_url=small.api + "/v1", api_key="x", max_retries=0, timeout=600)
    raw = oai.embeddings.with_raw_response.create(model=MODEL, input=TEXTS,
                                                  encoding_format="float")
    assert raw.headers["x-qvac-served-by"] == mesh.ids["desktop"]
    got = vectors(raw.parse())
    assert got.shape == (16, N_EMBD)  # a batch of 16, the model's own dimension
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    cos = got @ got.T
    assert abs(cos[0, 15] - 1.0) < 1e-6, "identical inputs, cosine not 1"
    different = ~np.eye(16, dtype=bool)
    different[0, 15] = different[15, 0] = False
    # Below 1 by far more than the 1e-6 that identical texts are within (a base model's
    # mean-pooled vectors of such alike sentences are close: 0.999 was seen).
    assert cos[different].max() < 1 - 1e-4, "different inputs gave identical vectors"
    assert np.max(np.abs(got - vectors(here.parse()))) < 1e-5
    assert raw.parse().usage.prompt_tokens == here.parse().usage.prompt_tokens
    # base64 (the client's default) through the peer too.
    b64 = vectors(oai.embeddings.create(model=MODEL, input=TEXTS[:2]))
    assert np.max(np.abs(b64 - got[:2])) < 1e-5
    # Ollama's routes, delegated the same way.
    oll = ollama.Client(host=small.api, timeout=600)
    r = oll.embed(model=MODEL, input=TEXTS[3])
    assert np.max(np.abs(np.asarray(r.embeddings[0]) - got[3])) < 1e-5
    old = oll.embeddings(model=MODEL, prompt=TEXTS[4])
    assert np.max(np.abs(np.asarray(old.embedding) - got[4])) < 1e-5
    # Too long for the provider's context with truncate false: its 400, both lengths.
    r = httpx.post(small.api + "/api/embed", timeout=600, json={
        "model": MODEL, "input": ["short", "word " * 1500], "truncate": False})
    assert r.status_code == 400, r.text
    assert "input[1]" in r.json()["error"] and "1024" in r.json()["error"]
    # Local only: this node has no model to embed with.
    r = httpx.post(small.api + "/v1/embeddings", headers={"X-Qvac-Local-Only": "1"},
                   json={"model": MODEL, "input": "x"}, timeout=60)
    assert r.status_code == 404 and MODEL in r.json()["error"]["message"]


def start_old_peer(mesh: Mesh, tmp_path, trusted_by: list[str]):
    """tests/bad_provider.py: speaks capacity and infer, not /qvac/embed/1.0.0, and its
    record (warm, fast, idle) puts it first among the holders of the model."""
    sha = json.loads((mesh.template / "models" / "index.json").read_text())[
        "models"][MODEL]["sha256"]
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    old_id = load_or_create_identity(old_dir).peer_id_str
    mesh.ids["old"] = old_id
    port = free_port()
    for name in trusted_by:
        TrustStore.in_dir(old_dir).add(mesh.ids[name], ALL)
        TrustStore.in_dir(mesh.root / name).add(old_id, ALL)
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "bad_provider.py"),
                             str(old_dir), str(port), "stall", sha], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc, f"/ip4/127.0.0.1/tcp/{port}/p2p/{old_id}"


def test_old_version_peer_is_a_clear_error_or_a_failover(mesh, tmp_path):
    add_empty(mesh, "alone")  # knows only the old peer
    add_empty(mesh, "laptop")  # knows the old peer and a current one
    mesh.add("desktop", "--no-preload")
    mesh.trust("laptop", "desktop", ALL)
    mesh.trust("desktop", "laptop", ALL)
    old, old_addr = start_old_peer(mesh, tmp_path, ["alone", "laptop"])
    try:
        for name in ("alone", "laptop"):
            mesh.nodes[name].args += ["--bootstrap", old_addr]
        alone = mesh.start("alone")
        mesh.start("desktop")
        laptop = mesh.start("laptop", bootstrap=["desktop"])
        mesh.wait_peers("alone", ["old"])
        mesh.wait_peers("laptop", ["desktop", "old"], timeout=30)
        t0 = time.monotonic()
        r = httpx.post(alone.api + "/v1/embeddings", timeout=120,
                       json={"model": MODEL, "input": "hello"})
        took = time.monotonic() - t0
        assert r.status_code == 503, r.text
        msg = r.json()["error"]["message"]
        assert "/qvac/embed/1.0.0" in msg and "upgrade" in msg and "\n" not in msg, msg
        assert took < 30, f"an old peer took {took:.1f}s to refuse"
        # The old peer still serves generation: no failure is held against it.
        peers = {p["peer_id"]: p for p in httpx.get(alone.api + "/qvac/peers").json()["peers"]}
        assert peers[mesh.ids["old"]]["failures"] == 0

        # With a current peer too: the old one is asked first, refuses, the next serves.
        r = httpx.post(laptop.api + "/v1/embeddings", timeout=600,
                       json={"model": MODEL, "input": ["hello", "world"]})
        assert r.status_code == 200, r.text
        assert r.headers["x-qvac-served-by"] == mesh.ids["desktop"]
        assert len(r.json()["data"]) == 2
        assert len(r.json()["data"][0]["embedding"]) == N_EMBD
        assert "does not speak /qvac/embed/1.0.0" in laptop.log()
    finally:
        old.kill()
        old.wait(timeout=10)


def test_untrusted_consumer_is_refused(mesh):
    add_empty(mesh, "laptop")
    mesh.add("desktop", "--no-preload")
    mesh.trust("laptop", "desktop", ALL)  # the desktop does not trust the laptop
    mesh.start("desktop")
    small = mesh.start("laptop", bootstrap=["desktop"])
    mesh.wait_peers("laptop", ["desktop"])
    r = httpx.post(small.api + "/api/embed", timeout=120, json={"model": MODEL, "input": "x"})
    assert r.status_code == 503, r.text
    msg = r.json()["error"]
    assert "unauthorized" in msg and "not trusted" in msg, msg
    assert "for embeddings" not in mesh.nodes["desktop"].log()  # refused before any work


@pytest.mark.timeout(600)
def test_keep_alive_on_embed(start_daemon):
    d = start_daemon("--no-p2p", "--no-preload")
    oll = ollama.Client(host=d.api, timeout=600)
    r = oll.embed(model=MODEL, input="hello", keep_alive="2s")
    assert len(r.embeddings[0]) == N_EMBD
    assert "loaded gemma3-270m for embeddings" in d.log()
    deadline = time.monotonic() + 30
    while "for embeddings (keep_alive" not in d.log():
        assert time.monotonic() < deadline, "the embedding context outlived keep_alive 2s"
        time.sleep(0.5)
    # 0 with no input: Ollama's "unload now"; and 0 after an embedding drops it at once.
    oll.embed(model=MODEL, input="again")  # default keep_alive: kept
    r = httpx.post(f"{d.api}/api/embed", json={"model": MODEL, "keep_alive": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["embeddings"] == []
    assert "unloading gemma3-270m for embeddings (unload asked)" in d.log()
    bad = httpx.post(f"{d.api}/api/embed", timeout=60,
                     json={"model": MODEL, "input": "x", "keep_alive": "soon"})
    assert bad.status_code == 400 and "keep_alive" in bad.json()["error"]
    bad = httpx.post(f"{d.api}/api/embed", timeout=60,
                     json={"model": MODEL, "input": "x", "options": {"num_ctx": 64}})
    assert bad.status_code == 400 and "num_ctx" in bad.json()["error"]
