"""Model store and GGUF header parsing, on the real default model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.gguf import GGUFError, read_gguf
from models.store import DEFAULT_MODEL_NAME, ModelStore, StoreError, install_default_model


@pytest.fixture(scope="module")
def default_blob(model_template: Path) -> Path:
    return next((model_template / "models" / "blobs").iterdir())


def test_gguf_metadata_of_default_model(default_blob: Path):
    info = read_gguf(default_blob)
    assert info.architecture == "gemma3"
    assert info.quantization == "Q4_K_M"
    assert info.context_length >= 8192
    assert 200e6 < info.parameters < 300e6
    assert info.n_layers == 18
    assert 0 < info.tensor_bytes <= info.file_size
    # Estimate: weights + KV cache for the context, more for a longer context.
    assert info.memory_estimate(4096) > info.tensor_bytes + info.kv_cache_bytes(4096) - 1
    assert info.memory_estimate(8192) > info.memory_estimate(4096)


def test_truncated_and_corrupt_gguf_rejected_nothing_imported(default_blob: Path, tmp_path: Path):
    store = ModelStore(tmp_path / "d")
    truncated = tmp_path / "trunc.gguf"
    with default_blob.open("rb") as f:
        truncated.write_bytes(f.read(default_blob.stat().st_size // 2))
    with pytest.raises(StoreError, match="truncated"):
        store.add(truncated, "trunc")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(StoreError, match="not a GGUF file"):
        store.add(bad)
    header_only = tmp_path / "hdr.gguf"
    with default_blob.open("rb") as f:
        header_only.write_bytes(f.read(1000))
    with pytest.raises(StoreError, match="truncated"):
        store.add(header_only, "hdr")
    for cut in (300_000, 1_500_000, 2_000_003):  # inside the vocabulary's string array
        mid_vocab = tmp_path / f"vocab{cut}.gguf"
        with default_blob.open("rb") as f:
            mid_vocab.write_bytes(f.read(cut))
        with pytest.raises(StoreError, match="truncated"):
            store.add(mid_vocab, f"vocab{cut}")
    assert store.list() == []
    assert list(store.blobs.iterdir()) == [] and list(store.tmp.iterdir()) == []


def test_gguf_parser_never_crashes_on_garbage(tmp_path: Path):
    import random

    rng = random.Random(7)
    for i in range(200):
        p = tmp_path / f"g{i}"
        p.write_bytes(b"GGUF" + bytes([3, 0, 0, 0]) + rng.randbytes(rng.randint(0, 400)))
        with pytest.raises(GGUFError):
            read_gguf(p)


def test_add_list_resolve_remove(default_blob: Path, tmp_path: Path):
    store = ModelStore(tmp_path / "d")
    e = store.add(default_blob, "My-Model")
    assert e.name == "my-model" and len(e.sha256) == 64
    assert store.resolve("my-model:latest") == e
    assert store.resolve(e.sha256) == e
    # A second store on the same dir (the CLI vs the daemon) sees it.
    other = ModelStore(tmp_path / "d")
    assert [x.name for x in other.list()] == ["my-model"]
    store.add(default_blob, "alias-two")  # same bytes, second name, one blob
    assert len(list(store.blobs.iterdir())) == 1
    store.remove("my-model")
    assert store.blob_path(e.sha256).exists()  # still used by alias-two
    store.remove("alias-two")
    assert not store.blob_path(e.sha256).exists()
    with pytest.raises(StoreError, match="invalid model name"):
        store.add(default_blob, "bad name!")


def test_default_model_registered_once(model_template: Path, tmp_path: Path, monkeypatch):
    store = ModelStore(tmp_path / "d")
    first = install_default_model(store, log=lambda m: None)
    assert first is not None and first.name == DEFAULT_MODEL_NAME
    blob = first.path
    mtime = blob.stat().st_mtime_ns
    said: list[str] = []
    again = install_default_model(ModelStore(tmp_path / "d"), log=said.append)
    assert again == first and said == []  # nothing re-assembled
    assert blob.stat().st_mtime_ns == mtime


def test_corrupt_index_is_reported_not_replaced(tmp_path: Path):
    d = tmp_path / "d"
    ModelStore(d)
    (d / "models" / "index.json").write_text("{broken")
    with pytest.raises(StoreError, match="index.json"):
        ModelStore(d)
    assert (d / "models" / "index.json").read_text() == "{broken"


def test_cli_models_add_corrupt_file_one_line_error(tmp_path: Path, default_blob: Path):
    bad = tmp_path / "half.gguf"
    with default_blob.open("rb") as f:
        bad.write_bytes(f.read(5_000_000))
    env = {**os.environ, "QVACD_DATA_DIR": str(tmp_path / "d")}
    r = subprocess.run([sys.executable, "-m", "qvacd.cli", "models", "add", str(bad)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1
    err = r.stderr.strip()
    assert err.count("\n") == 0 and "truncated" in err and "Traceback" not in err
    r = subprocess.run([sys.executable, "-m", "qvacd.cli", "models", "list"],
                       capture_output=True, text=True, env=env)
    assert "no models" in r.stdout
