"""Shared fixtures: real `qvacd` daemons as subprocesses on 127.0.0.1, real default model.

The default model is registered once per test session in a template data dir; each
daemon gets its own data dir whose model blobs are hard links to the template's, so
starting a daemon costs no 253 MB copy. The daemon handle and the helpers behind these
fixtures are tests/harness/, which the benches use too.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The repo root on sys.path, so that `tests.harness` imports under a bare `pytest` too
# (`python -m pytest` from the root has it already).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import (  # noqa: E402
    Daemon,
    Mesh,
    clone_data_dir,
    install_model_template,
    stop_all,
)


@pytest.fixture(scope="session")
def model_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("template")
    if install_model_template(d) is None:
        pytest.skip("the default model is not installed: pip install '.[model]'")
    return d


@pytest.fixture
def data_dir(model_template: Path, tmp_path: Path) -> Path:
    return clone_data_dir(model_template, tmp_path / "node")


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
    stop_all(started)


@pytest.fixture
def mesh(tmp_path: Path, model_template: Path) -> Iterator[Mesh]:
    """Named daemons that can bootstrap to and trust each other; all stopped after."""
    m = Mesh(tmp_path, model_template)
    yield m
    m.stop_all()


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory, model_template: Path) -> Iterator[Daemon]:
    """One daemon for the many tests that only read from it."""
    d = clone_data_dir(model_template, tmp_path_factory.mktemp("shared") / "node")
    daemon = Daemon(d, "--queue-size", "32").start()
    yield daemon
    daemon.stop()


def read_json_lines(lines: Iterator[str]) -> list[dict]:
    return [json.loads(x) for x in lines if x.strip()]
