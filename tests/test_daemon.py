"""Daemon lifecycle: clean shutdown, restart keeps the store and identity, API auth,
and the CLI against a running (or absent) daemon."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.harness import REPO, free_port

MODEL = "gemma3-270m"


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run([sys.executable, "-m", "qvacd.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, cwd=REPO, timeout=timeout)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_clean_shutdown_within_two_seconds(start_daemon, sig):
    d = start_daemon()
    # Mid-stream shutdown is the hard case: a generation is running in a worker thread.
    with httpx.stream("POST", d.api + "/v1/completions", timeout=30, json={
            "model": MODEL, "prompt": "Tell me a story", "max_tokens": 500, "stream": True}) as r:
        lines = r.iter_lines()  # kept: a dropped iterator closes the connection
        next(lines)
        t0 = time.monotonic()
        d.proc.send_signal(sig)
        rc = d.proc.wait(5)
    assert time.monotonic() - t0 < 2.0, d.log()
    assert rc == 0, d.log()
    assert not (d.data_dir / "daemon.json").exists()


def test_restart_keeps_store_and_identity(start_daemon):
    d = start_daemon()
    first = d.status()
    d.stop()
    d.start()
    second = d.status()
    assert second["peer_id"] == first["peer_id"]
    assert [m["sha256"] for m in second["models"]] == [m["sha256"] for m in first["models"]]
    assert "registering the default model" not in d.log()  # never re-assembled


def test_first_start_registers_default_model(start_daemon):
    d = start_daemon(with_model=False)
    st = d.status()
    assert [m["name"] for m in st["models"]] == [MODEL]
    assert "registering the default model" in d.log()


def test_non_loopback_api_refused_without_token(tmp_path):
    r = run_cli("start", "--data-dir", str(tmp_path / "d"), "--api", f"0.0.0.0:{free_port()}",
                "--no-mdns", "--no-default-model", timeout=30)
    assert r.returncode == 1
    assert "without a token" in r.stderr and r.stderr.count("\n") == 1


def test_token_required_when_set(start_daemon):
    d = start_daemon("--no-preload", env={"QVACD_API_TOKEN": "s3cret"})
    assert httpx.get(d.api + "/v1/models").status_code == 401
    r = httpx.get(d.api + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = httpx.get(d.api + "/v1/models", headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200


def test_cli_generate_and_status(start_daemon):
    d = start_daemon()
    env = {"QVACD_DATA_DIR": str(d.data_dir)}  # the CLI finds the API from daemon.json
    r = run_cli("generate", "The capital of France is", "--max-tokens", "8", "-v", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "served by 12D3Koo" in r.stderr
    r = run_cli("status", env=env)
    assert r.returncode == 0 and MODEL in r.stdout
    r = run_cli("generate", "x", "--model", "nope", env=env)
    assert r.returncode == 1 and "not found" in r.stderr


def test_cli_without_daemon_says_so(tmp_path):
    r = run_cli("status", "--api", f"127.0.0.1:{free_port()}",
                env={"QVACD_DATA_DIR": str(tmp_path)})
    assert r.returncode == 1
    assert "no qvacd daemon answers" in r.stderr and "qvacd start" in r.stderr


def test_port_in_use_is_a_clear_error(start_daemon, tmp_path):
    d = start_daemon("--no-preload")
    r = run_cli("start", "--data-dir", str(tmp_path / "other"), "--api", f"127.0.0.1:{d.port}",
                "--no-mdns", "--no-default-model", "--listen", "/ip4/127.0.0.1/tcp/0", timeout=30)
    assert r.returncode == 1 and "cannot listen" in r.stderr


@pytest.mark.parametrize("victim", ["identity.key", "trust.json"])
def test_corrupt_identity_or_trust_refuses_to_start(tmp_path, victim):
    d = tmp_path / "d"
    r = run_cli("id", "--data-dir", str(d))
    assert r.returncode == 0
    target = d / victim
    target.write_bytes(b"\x00garbage\xff" * 3)
    before = target.read_bytes()
    r = run_cli("start", "--data-dir", str(d), "--api", f"127.0.0.1:{free_port()}", "--no-mdns",
                "--no-default-model", "--listen", "/ip4/127.0.0.1/tcp/0", timeout=30)
    assert r.returncode == 1
    assert str(target) in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert target.read_bytes() == before  # never silently replaced
