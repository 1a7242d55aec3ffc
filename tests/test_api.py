"""The local node through the official openai and ollama clients, and raw HTTP for the
error cases. One real daemon (subprocess) with the real default model."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import ollama
import openai
import pytest

MODEL = "gemma3-270m"


@pytest.fixture(scope="module")
def oai(shared_daemon):
    return openai.OpenAI(base_url=shared_daemon.api + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def oll(shared_daemon):
    return ollama.Client(host=shared_daemon.api)


def test_openai_models_lists_default(oai):
    ids = [m.id for m in oai.models.list()]
    assert MODEL in ids


def test_openai_completion_stream(oai, shared_daemon):
    raw = oai.completions.with_raw_response.create(
        model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0,
        stream=True, stream_options={"include_usage": True})
    assert raw.headers["x-qvac-served-by"] == shared_daemon.status()["peer_id"]
    stream = raw.parse()
    texts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            texts.append(ch.text)
            finish = ch.finish_reason or finish
    text = "".join(texts)
    assert text.strip(), "no text streamed"
    assert len([t for t in texts if t]) > 1, "stream came as one piece"
    assert finish in ("length", "stop")
    assert usage is not None and usage.completion_tokens <= 12 and usage.prompt_tokens > 3


def test_openai_completion_deterministic_with_seed(oai):
    a = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16,
                               temperature=0.9, seed=42)
    b = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16,
                               temperature=0.9, seed=42)
    assert a.choices[0].text == b.choices[0].text
    assert a.usage.completion_tokens == 16
    assert a.choices[0].finish_reason == "length"


def test_openai_stop_sequence(oai):
    r = oai.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=30,
                               temperature=0, stop=[","])
    assert "," not in r.choices[0].text
    assert r.choices[0].finish_reason == "stop"


def test_openai_chat_stream_and_whole(oai):
    msgs = [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "Name a color."}]
    stream = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16,
                                         temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces).strip()
    whole = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == "".join(pieces)
    assert "\nUser:" not in whole.choices[0].message.content  # fallback template's stop
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_openai_errors(oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert MODEL in str(e.value)  # names the models that exist
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MODEL, prompt="x", max_tokens=100000)
    assert "max_tokens" in str(e.value)


def test_ollama_list_show_version(oll):
    names = [m.model for m in oll.list().models]
    assert f"{MODEL}:latest" in names
    show = oll.show(MODEL)
    assert show.details.family == "gemma3"
    assert show.details.quantization_level == "Q4_K_M"
    assert httpx.get(oll._client.base_url.join("/api/version")).json()["version"]


def test_ollama_generate_stream_and_chat(oll):
    parts = list(oll.generate(model=MODEL, prompt="The sky is", stream=True,
                              options={"num_predict": 10, "temperature": 0}))
    assert parts[-1].done and parts[-1].done_reason in ("length", "stop")
    assert parts[-1].eval_count and parts[-1].eval_count <= 10
    assert "".join(p.response for p in parts).strip()
    chat = oll.chat(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                    options={"num_predict": 8})
    assert chat.message.role == "assistant" and chat.done


def test_bad_inputs_get_clear_errors(shared_daemon):
    api = shared_daemon.api
    r = httpx.post(api + "/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(api + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": "5"})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    r = httpx.post(api + "/v1/completions", json={"model": MODEL, "prompt": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(api + "/v1/chat/completions", json={"model": MODEL, "messages": "hi"})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(api + "/api/generate", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and MODEL in r.json()["error"]
    r = httpx.post(api + "/api/generate",
                   json={"model": MODEL, "prompt": "x", "options": {"temperature": "hot"}})
    assert r.status_code == 400 and "options.temperature" in r.json()["error"]


def test_prompt_longer_than_context(shared_daemon):
    ctx = shared_daemon.status()["n_ctx"]
    r = httpx.post(shared_daemon.api + "/v1/completions",
                   json={"model": MODEL, "prompt": "hello " * (ctx + 100), "max_tokens": 4},
                   timeout=60)
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert str(ctx) in msg and "prompt is" in msg


def test_status_and_metrics(shared_daemon):
    httpx.post(shared_daemon.api + "/v1/completions",
               json={"model": MODEL, "prompt": "Hi", "max_tokens": 3}, timeout=30)
    st = shared_daemon.status()
    assert st["peer_id"].startswith("12D3Koo")
    assert st["models"][0]["name"] == MODEL and st["models"][0]["loaded"]
    assert st["memory_budget"] > st["models"][0]["memory_estimate"] > st["models"][0]["size"]
    m = httpx.get(shared_daemon.api + "/metrics").text
    assert 'qvacd_requests_total{endpoint="/v1/completions",status="200"}' in m
    assert "qvacd_time_to_first_token_seconds_bucket" in m
    assert "qvacd_queue_length" in m
    tokens = [line for line in m.splitlines() if line.startswith("qvacd_tokens_generated_total")]
    assert tokens and float(tokens[0].split()[-1]) >= 3


def test_eight_concurrent_streams_all_finish(shared_daemon):
    client = openai.OpenAI(base_url=shared_daemon.api + "/v1", api_key="x", max_retries=0)

    def one(i: int) -> tuple[str, str | None]:
        text, finish = "", None
        for c in client.completions.create(model=MODEL, prompt=f"Story number {i}:",
                                           max_tokens=12, stream=True):
            text += c.choices[0].text if c.choices else ""
            finish = (c.choices[0].finish_reason if c.choices else None) or finish
        return text, finish

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert all(t.strip() and f in ("length", "stop") for t, f in results)


def test_disconnect_mid_stream_frees_slot(shared_daemon):
    api = shared_daemon.api
    body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 2000, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", api + "/v1/completions", json=body, timeout=30) as r:
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                got += 1
            if got >= 3:
                break
    # The client is gone: the slot must be free again at once (within ~a token).
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        st = shared_daemon.status()
        if st["slots_free"] == st["slots_total"]:
            break
        time.sleep(0.02)
    assert st["slots_free"] == st["slots_total"], st
    t0 = time.monotonic()
    r = httpx.post(api + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2},
                   timeout=30)
    assert r.status_code == 200 and time.monotonic() - t0 < 5


def test_queue_full_gets_429_with_retry_after(start_daemon):
    d = start_daemon("--queue-size", "0", "--slots", "1")
    body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 300, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", d.api + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()  # kept: a dropped iterator closes the connection
        next(lines)  # the slot is taken now
        assert d.status()["slots_free"] == 0
        busy = httpx.post(d.api + "/v1/completions",
                          json={"model": MODEL, "prompt": "x", "max_tokens": 2}, timeout=60)
        assert busy.status_code == 429, (busy.text, d.status())
        assert int(busy.headers["retry-after"]) >= 1
        assert "retry" in busy.json()["error"]["message"]
        oll = httpx.post(d.api + "/api/generate",
                         json={"model": MODEL, "prompt": "x", "stream": False}, timeout=60)
        assert oll.status_code == 429 and "error" in oll.json()


def test_json_stream_lines_are_ndjson(shared_daemon):
    with httpx.stream("POST", shared_daemon.api + "/api/chat", timeout=30, json={
            "model": MODEL, "messages": [{"role": "user", "content": "Hello"}],
            "options": {"num_predict": 5}}) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        assert r.headers["x-qvac-served-by"].startswith("12D3Koo")
        lines = [json.loads(x) for x in r.iter_lines() if x]
    assert lines[-1]["done"] is True and not any(x["done"] for x in lines[:-1])


def test_dns_rebinding_host_is_refused_without_token(shared_daemon):
    # A web page whose own name resolves to 127.0.0.1 sends its name as Host: refused.
    r = httpx.get(shared_daemon.api + "/qvac/status", headers={"Host": "rebind.example:11435"})
    assert r.status_code == 403 and "not a loopback name" in r.json()["error"]
    r = httpx.post(shared_daemon.api + "/v1/completions", headers={"Host": "rebind.example"},
                   json={"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert r.status_code == 403 and "not a loopback name" in r.json()["error"]["message"]
    for host in ("localhost", f"127.0.0.1:{shared_daemon.port}", "[::1]"):
        assert httpx.get(shared_daemon.api + "/qvac/status", headers={"Host": host}).status_code == 200
