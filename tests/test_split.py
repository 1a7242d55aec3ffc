"""A model split across two real daemons over llama.cpp's RPC backend, tunnelled through
/qvac/layers/1.0.0, with the real default model.

Neither node can hold gemma3-270m (about 371 MiB at a 4096 context) within its budget:
the head has 300 MiB, the worker 300 MiB of which 200 MiB are offered for layers. The
split's greedy text must equal that of a node holding the whole model.

These tests need llama-cpp-python built with -DGGML_RPC=on, which the README's set-up
commands do. Without libggml-rpc they FAIL (not skip): the README build is supposed to
provide it, and a silently skipped split would pass a broken set-up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import trio

from qvacd.layer_worker import REBUILD_HINT, rpc_available
from tests.harness import Daemon, Mesh, free_port

MODEL = "gemma3-270m"
PROMPT = "The capital of France is"
CTX = "1024"
HEAD_ARGS = ("--memory-budget", "300MiB", "--ctx-size", CTX, "--threads", "1")
WORKER_ARGS = ("--memory-budget", "300MiB", "--layers-memory", "200MiB", "--ctx-size", CTX,
               "--threads", "1")
# the worker also listens on every address, so a server bound beyond loopback would show
WORKER_WIDE_PORT = free_port()


def test_rpc_backend_is_built() -> None:
    assert rpc_available(), REBUILD_HINT


@pytest.fixture(scope="module")
def split_mesh(tmp_path_factory: pytest.TempPathFactory, model_template: Path):
    assert rpc_available(), REBUILD_HINT
    m = Mesh(tmp_path_factory.mktemp("split"), model_template)
    m.add("head", *HEAD_ARGS)
    m.add("worker", *WORKER_ARGS, "--listen", f"/ip4/0.0.0.0/tcp/{WORKER_WIDE_PORT}")
    m.trust("worker", "head", ["layers"])  # the head may place layers on the worker
    m.trust("head", "worker", ["provider"])  # and send it what its prompts become
    m.start("worker")
    m.start("head", bootstrap=["worker"])
    m.wait_peers("head", ["worker"], timeout=30)
    yield m
    m.stop_all()


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory, model_template: Path):
    from tests.harness import clone_data_dir

    d = clone_data_dir(model_template, tmp_path_factory.mktemp("whole") / "node")
    daemon = Daemon(d, "--no-p2p", "--ctx-size", CTX, "--threads", "1").start()
    yield daemon
    daemon.stop()


def _complete(api: str, max_tokens: int = 24) -> httpx.Response:
    return httpx.post(api + "/v1/completions", timeout=600, json={
        "model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0})


def _wait_worker_capacity(m: Mesh, timeout: float = 30) -> None:
    """Until the head's view of the worker offers its layer memory again (after a session)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        peers = httpx.get(m.nodes["head"].api + "/qvac/peers", timeout=5).json()["peers"]
        if any(p["peer_id"] == m.ids["worker"] for p in peers):
            return
        time.sleep(0.2)


def test_split_runs_what_no_node_fits_with_the_whole_models_text(split_mesh, whole):
    m = split_mesh
    head, worker = m.nodes["head"], m.nodes["worker"]
    for node in (head, worker):
        assert not node.status()["models"][0]["fits_budget"]
    plan = httpx.get(head.api + "/qvac/plan", params={"model": MODEL}, timeout=30).json()
    devices = {d["device"]: d for d in plan["devices"]}
    assert set(devices) == {"local", m.ids["worker"]}
    assert sum(d["layers"] for d in plan["devices"]) == plan["n_layers"] == 18
    assert devices[m.ids["worker"]]["layers"] > 0 and devices["local"]["layers"] > 0
    assert devices[m.ids["worker"]]["memory"] <= 200 * 2**20
    cli = subprocess.run([sys.executable, "-m", "qvacd.cli", "plan", MODEL, "--api",
                          head.api.replace("http://", "")], capture_output=True, text=True,
                         timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert "this node" in cli.stdout and m.ids["worker"][:12] in cli.stdout

    oai = openai.OpenAI(base_url=head.api + "/v1", api_key="x", max_retries=0, timeout=600)
    raw = oai.completions.with_raw_response.create(
        model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stream=True)
    assert raw.headers["x-qvac-served-by"].split(",") == [m.ids["head"], m.ids["worker"]]
    chunks = list(raw.parse())
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    reference = _complete(whole.api).json()["choices"][0]["text"]
    assert text == reference and text.strip()
    final = [c for c in chunks if getattr(c, "x_qvac_served_by", None)]
    assert final and final[-1].x_qvac_served_by == [m.ids["head"], m.ids["worker"]]
    st = worker.status()["layers"]
    assert st["sessions"] == 1 and st["bytes_in"] > 0 and len(st["server_pids"]) == 1
    # a second request reuses the loaded split
    again = _complete(head.api).json()["choices"][0]["text"]
    assert again == reference


def _listening_inodes() -> dict[int, str]:
    """inode -> local address of every listening TCP socket on this machine."""
    out: dict[int, str] = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] == "0A":  # LISTEN
                    out[int(parts[9])] = parts[1]
    return out


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _is_loopback(addr: str) -> bool:
    host = addr.split(":")[0]
    if len(host) == 8:  # IPv4, little-endian hex
        return host.endswith("7F")
    return host == "0" * 31 + "1" or host == "0000000000000000FFFF00000100007F"


def test_worker_listens_on_no_network_address_but_its_libp2p_port(split_mesh):
    m = split_mesh
    worker = m.nodes["worker"]
    if not worker.status()["layers"]["server_pids"]:
        _complete(m.nodes["head"].api, 4)  # a session, so its RPC server process exists
    st = worker.status()
    pids = [worker.proc.pid, *st["layers"]["server_pids"]]
    assert len(pids) >= 2, "no RPC server process to check"
    listening = _listening_inodes()
    libp2p_ports = {m.ports["worker"], WORKER_WIDE_PORT}
    seen = []
    for pid in pids:
        for inode in _socket_inodes(pid) & set(listening):
            addr = listening[inode]
            port = int(addr.split(":")[1], 16)
            seen.append((pid, addr))
            assert _is_loopback(addr) or port in libp2p_ports, \
                f"pid {pid} listens on {addr} (port {port})"
    # the RPC server process does listen, on loopback
    assert any(pid in st["layers"]["server_pids"] for pid, _ in seen), seen
