"""Model management as Ollama does it, against a real daemon with the real default model,
through the official ollama client: ps and keep_alive, copy, delete, blob upload and create,
`qvacd ps` and `qvacd models rm`; every bad input gets one line and leaves nothing in the
store. Also the keep_alive duration parser alone."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import ollama
import pytest

from qvacd.models_api import KeepAliveError, parse_keep_alive
from tests.harness import REPO, Daemon, clone_data_dir

MODEL = "gemma3-270m"


def test_parse_keep_alive():
    assert parse_keep_alive(None) is None
    assert parse_keep_alive("5m") == 300
    assert parse_keep_alive("1h30m") == 5400
    assert parse_keep_alive("30s") == 30
    assert parse_keep_alive("1.5s") == 1.5
    assert parse_keep_alive(0) == 0
    assert parse_keep_alive("0") == 0
    assert parse_keep_alive(120) == 120
    assert parse_keep_alive(-1) is None
    assert parse_keep_alive("-1m") is None
    for bad in ("5 minutes", "m", "", "1x", True, [1], float("inf")):
        with pytest.raises(KeepAliveError, match="keep_alive"):
            parse_keep_alive(bad)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, model_template: Path) -> Iterator[Daemon]:
    d = clone_data_dir(model_template, tmp_path_factory.mktemp("models_api") / "node")
    daemon = Daemon(d, "--no-p2p").start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def oll(node: Daemon) -> ollama.Client:
    return ollama.Client(host=node.api, timeout=120)


def store_files(node: Daemon) -> tuple[set[str], set[str]]:
    root = node.data_dir / "models"
    return ({p.name for p in (root / "blobs").iterdir()},
            {p.name for p in (root / "tmp").iterdir()})


def loaded(oll: ollama.Client) -> list[str]:
    return [m.model for m in oll.ps().models]


def test_ps_and_keep_alive(node, oll):
    oll.generate(model=MODEL, prompt="Hi", options={"num_predict": 2}, keep_alive="10m")
    ps = oll.ps().models
    assert [m.model for m in ps] == [f"{MODEL}:latest"]
    m = ps[0]
    assert m.digest and len(m.digest) == 64 and m.size > 0 and m.size_vram == 0
    assert m.details is not None and m.details.format == "gguf"
    ahead = m.expires_at - datetime.now(timezone.utc)
    assert timedelta(minutes=9) < ahead <= timedelta(minutes=10, seconds=5)

    # No keep_alive: loaded until the budget needs the room, which ps says as far future.
    oll.chat(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
             options={"num_predict": 2})
    assert oll.ps().models[0].expires_at.year > 2200

    # keep_alive 0 with nothing to generate unloads it (Ollama's unload call).
    r = oll.generate(model=MODEL, keep_alive=0)
    assert r.done_reason == "unload"
    assert loaded(oll) == []
    assert node.status()["memory_used"] == 0

    # keep_alive 0 with a prompt: answered, then unloaded once the request ended.
    r = oll.generate(model=MODEL, prompt="Hi", options={"num_predict": 2}, keep_alive=0)
    assert r.done and r.eval_count >= 1
    assert loaded(oll) == []


def test_cli_ps_table(node, oll):
    cli = [sys.executable, "-m", "qvacd.cli", "ps", "--api", node.api.removeprefix("http://")]
    out = subprocess.run(cli, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0 and "no models loaded" in out.stdout
    oll.generate(model=MODEL, prompt="Hi", options={"num_predict": 2}, keep_alive="1h")
    out = subprocess.run(cli, capture_output=True, text=True, timeout=60, cwd=REPO,
                         env={**os.environ, "COLUMNS": "80"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ID", "SIZE", "PROCESSOR", "UNTIL"]
    assert lines[1].startswith(f"{MODEL}:latest") and "CPU" in lines[1] and "minutes" in lines[1]
    assert all(len(ln) <= 80 for ln in lines)
    oll.generate(model=MODEL, keep_alive=0)


@pytest.mark.parametrize("bad", ["5 minutes", "soon", True])
def test_bad_keep_alive_is_400_naming_it(node, bad):
    for path, extra in (("/api/generate", {"prompt": "Hi"}),
                        ("/api/chat", {"messages": [{"role": "user", "content": "Hi"}]})):
        r = httpx.post(node.api + path, json={"model": MODEL, "keep_alive": bad, **extra},
                       timeout=30)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert "keep_alive" in err and "\n" not in err


def test_copy_then_delete_keeps_the_shared_blob(node, oll):
    blobs_before, _ = store_files(node)
    oll.copy(MODEL, "gemma-copy")
    names = {m.model for m in oll.list().models}
    assert {f"{MODEL}:latest", "gemma-copy:latest"} <= names
    assert store_files(node)[0] == blobs_before  # a name, not a second blob
    r = oll.generate(model="gemma-copy", prompt="Hi", options={"num_predict": 2})
    assert r.eval_count >= 1

    with pytest.raises(ollama.ResponseError, match="exists already"):
        oll.copy(MODEL, "gemma-copy")
    with pytest.raises(ollama.ResponseError, match="not found") as e:
        oll.copy("no-such-model", "x")
    assert e.value.status_code == 404

    assert oll.delete("gemma-copy").status == "success"
    assert "gemma-copy:latest" not in {m.model for m in oll.list().models}
    assert store_files(node)[0] == blobs_before  # gemma3-270m still uses it
    r = oll.generate(model=MODEL, prompt="Hi", options={"num_predict": 2})
    assert r.eval_count >= 1


def test_delete_unknown_names_what_exists(node):
    r = httpx.request("DELETE", node.api + "/api/delete", json={"model": "nope"}, timeout=30)
    assert r.status_code == 404
    err = r.json()["error"]
    assert "'nope' not found" in err and MODEL in err and "\n" not in err
    r = httpx.request("DELETE", node.api + "/api/delete", json={}, timeout=30)
    assert r.status_code == 400 and "'model'" in r.json()["error"]


def test_upload_create_generate_delete(node, oll, tmp_path):
    # A GGUF with another digest than the default model: the same file plus trailing bytes
    # (llama.cpp reads tensors by offset; the tail is never read).
    src = node.data_dir / "models" / "blobs"
    default_blob = next(p for p in src.iterdir())
    variant = tmp_path / "variant.gguf"
    variant.write_bytes(default_blob.read_bytes() + b"\0" * 32)
    digest = "sha256:" + hashlib.sha256(variant.read_bytes()).hexdigest()
    head = node.api + f"/api/blobs/{digest}"
    assert httpx.head(head, timeout=30).status_code == 404

    assert oll.create_blob(variant) == digest
    assert httpx.head(head, timeout=30).status_code == 200
    assert store_files(node)[1] == set()  # nothing left in tmp/

    oll.create(model="uploaded", files={"variant.gguf": digest})
    entry = next(m for m in oll.list().models if m.model == "uploaded:latest")
    assert entry.digest == digest.removeprefix("sha256:")
    r = oll.generate(model="uploaded", prompt="Hi", options={"num_predict": 2})
    assert r.eval_count >= 1
    assert "uploaded:latest" in loaded(oll)

    # In use: a 409 that says retry, and the model stays.
    with httpx.stream("POST", node.api + "/api/generate", timeout=60,
                      json={"model": "uploaded", "raw": True, "prompt": "1, 2, 3, 4, 5, 6,",
                            "options": {"num_predict": 2000, "temperature": 0}}) as r:
        next(r.iter_lines())
        busy = httpx.request("DELETE", node.api + "/api/delete", json={"model": "uploaded"},
                             timeout=30)
        assert busy.status_code == 409 and "retry" in busy.json()["error"], busy.text
    assert "uploaded:latest" in {m.model for m in oll.list().models}
    # Idle and loaded: deleting unloads it, and its blob goes with its last name.
    deadline = time.monotonic() + 30
    while True:  # the cancelled stream ends within a token or so
        r = httpx.request("DELETE", node.api + "/api/delete", json={"model": "uploaded"},
                          timeout=30)
        if r.status_code != 409 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 200, r.text
    assert "uploaded:latest" not in loaded(oll)
    assert f"sha256-{digest.removeprefix('sha256:')}" not in store_files(node)[0]
    assert httpx.head(head, timeout=30).status_code == 404


def test_bad_uploads_leave_nothing(node, oll, tmp_path):
    before = store_files(node)
    # Bytes that do not hash to the digest in the URL.
    wrong = "sha256:" + "0" * 64
    r = httpx.post(node.api + f"/api/blobs/{wrong}", content=b"GGUF" + b"x" * 1000, timeout=30)
    assert r.status_code == 400
    assert "hash to" in r.json()["error"] and "\n" not in r.json()["error"]
    # Right digest, not a GGUF.
    junk = b"not a model at all" * 100
    digest = "sha256:" + hashlib.sha256(junk).hexdigest()
    r = httpx.post(node.api + f"/api/blobs/{digest}", content=junk, timeout=30)
    assert r.status_code == 400 and "GGUF" in r.json()["error"]
    assert httpx.head(node.api + f"/api/blobs/{digest}", timeout=30).status_code == 404
    # A malformed digest.
    r = httpx.post(node.api + "/api/blobs/md5:abc", content=junk, timeout=30)
    assert r.status_code == 400 and "sha256" in r.json()["error"]
    # create: a blob never uploaded, a Modelfile, an existing name.
    with pytest.raises(ollama.ResponseError, match="upload it first"):
        oll.create(model="ghost", files={"m.gguf": digest})
    with pytest.raises(ollama.ResponseError, match="only the 'files' form"):
        oll.create(model="ghost", from_=MODEL)
    sha = next(m.digest for m in oll.list().models if m.model == f"{MODEL}:latest")
    with pytest.raises(ollama.ResponseError, match="exists already"):
        oll.create(model=MODEL, files={"m.gguf": f"sha256:{sha}"})
    assert store_files(node) == before
    assert "ghost:latest" not in {m.model for m in oll.list().models}


def test_cli_models_rm_goes_through_the_daemon(node, oll):
    oll.copy(MODEL, "to-remove")
    cli = [sys.executable, "-m", "qvacd.cli", "models", "rm", "--data-dir", str(node.data_dir)]
    out = subprocess.run([*cli, "to-remove"], capture_output=True, text=True, timeout=60,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "to-remove:latest" not in {m.model for m in oll.list().models}
    out = subprocess.run([*cli, "to-remove"], capture_output=True, text=True, timeout=60,
                         cwd=REPO)
    assert out.returncode != 0
    assert "daemon said (404)" in out.stderr and MODEL in out.stderr


def test_new_routes_need_the_token(start_daemon):
    d = start_daemon("--no-p2p", "--no-preload", env={"QVACD_API_TOKEN": "s3cret"})
    for method, path in (("GET", "/api/ps"), ("DELETE", "/api/delete"), ("POST", "/api/copy"),
                         ("HEAD", f"/api/blobs/sha256:{'0' * 64}"), ("POST", "/api/create")):
        assert httpx.request(method, d.api + path, timeout=30).status_code == 401, path
    ok = ollama.Client(host=d.api, headers={"Authorization": "Bearer s3cret"})
    assert ok.ps().models == []


def test_delete_on_a_seeder_mid_pull_moves_the_pull_to_the_other(tmp_path, model_template):
    # Seeders capped at 25 MB/s each: the 253 MB pull takes seconds, room to delete in it.
    from tests.test_pull import Mesh as PullMesh
    from tests.test_pull import blob_sha, pull, pullers

    mesh = PullMesh(tmp_path, model_template)
    try:
        mesh.add("s1", "--shard-upload-rate", "25MB")
        mesh.add("s2", "--shard-upload-rate", "25MB")
        pullers(mesh, ["p"], ["s1", "s2"])
        mesh.start("s1", "s2")
        mesh.start("p", bootstrap=("s1", "s2"))
        mesh.wait_holders("p", ["s1", "s2"])
        s1, s2, p = (mesh.nodes[n] for n in ("s1", "s2", "p"))
        sha = json.loads((model_template / "models" / "index.json").read_text()
                         )["models"][MODEL]["sha256"]
        deleted: list[int] = []

        def on_line(ev: dict) -> None:
            if (not deleted and ev.get("status") == "downloading" and ev.get("sources") == 2
                    and ev.get("completed", 0) > 0):
                r = httpx.request("DELETE", s1.api + "/api/delete", json={"model": MODEL},
                                  timeout=30)
                deleted.append(r.status_code)

        status, lines = pull(p, {}, on_line=on_line, timeout=180)
        assert deleted == [200], (deleted, lines[-3:])
        assert status == 200 and lines[-1]["status"] == "success", lines[-3:]
        assert mesh.ids["s1"] in lines[-1].get("dropped", {}), lines[-1]
        assert blob_sha(p, sha) == sha
        assert not (s1.data_dir / "models" / "blobs" / f"sha256-{sha}").exists()
        # The seeder that lost its copy keeps serving, and crashed nowhere.
        assert s1.status()["models"] == [] and s2.status()["models"][0]["name"] == MODEL
        assert "Traceback" not in s1.log(), s1.log()
    finally:
        mesh.stop_all()
