"""The split lab scenario's round-trip counting (bench/lab/split_scenario.py), on real
packets: its sniffer runs in a namespace whose loopback carries ggml-RPC-framed commands
(tests/lab_rpc_fake.py: a client, a relay standing in for the layer tunnel) and whose veth
carries them to a fake RPC server in a second namespace. Every token is SET_TENSOR +
GRAPH_RECOMPUTE + GET_TENSOR with one answer, so the capture must say one answered
command, one decode and one data-bearing answer burst on the link per token.

A few seconds; needs root and iproute2, skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import pickle
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.lab.nodes import StreamResult
from bench.lab.split_scenario import (
    ANSWERED,
    DECODES,
    GET_TENSOR,
    Timed,
    answer_bursts,
    per_token,
    rpc_commands,
)
from tests.harness import namespaces

TOKENS = 6
FAKE = str(REPO / "tests" / "lab_rpc_fake.py")


def _why_not() -> str | None:
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs the `ip` tool (iproute2)"
    try:
        with namespaces.throwaway_namespace(f"qcap{os.getpid()}probe", timeout=10):
            pass
    except (namespaces.NetnsError, OSError) as exc:
        return f"cannot create a network namespace here: {exc}"
    return None


WHY = _why_not()


def test_answer_bursts_split_on_direction_and_sum_sizes() -> None:
    link = [(1.0, True, 400), (1.1, False, 30), (1.2, True, 50), (1.3, False, 2000),
            (1.31, False, 600), (1.4, False, 10), (2.0, True, 100)]
    assert answer_bursts(link) == [(1.1, 30), (1.3, 2610)]


def _ready(p: subprocess.Popen) -> None:
    line = p.stdout.readline()
    assert "ready" in line, f"{p.args}: {line!r} {p.stderr.read() if p.poll() else ''}"


@pytest.mark.skipif(WHY is not None, reason=f"namespaces: {WHY}")
def test_sniffer_counts_rpc_round_trips_per_token(tmp_path: Path) -> None:
    sfx = secrets.token_hex(2)
    spaces = namespaces.Namespaces(timeout=10)
    head, worker = f"qcap{sfx}h", f"qcap{sfx}w"
    ips = ["10.231.7.1", "10.231.7.2"]
    procs: list[subprocess.Popen] = []

    def start(ns: str, *args: str) -> subprocess.Popen:
        p = subprocess.Popen([*namespaces.exec_prefix(ns), sys.executable, *args], cwd=REPO,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        procs.append(p)
        return p

    try:
        for ns in (head, worker):
            spaces.add(ns)
        namespaces.sh("ip", "link", "add", f"qc{sfx}h", "netns", head, "type", "veth", "peer",
                      "name", f"qc{sfx}w", "netns", worker)
        for ns, dev, ip in ((head, f"qc{sfx}h", ips[0]), (worker, f"qc{sfx}w", ips[1])):
            spaces.run(ns, "ip", "addr", "add", f"{ip}/24", "dev", dev)
            spaces.run(ns, "ip", "link", "set", dev, "up")
        out = tmp_path / "cap.pickle"
        sniffer = start(head, "-m", "bench.lab.split_scenario", "sniff", str(out), *ips)
        _ready(sniffer)
        _ready(start(worker, FAKE, "server", ips[1], "7000"))
        _ready(start(head, FAKE, "relay", "7001", ips[1], "7000"))
        t0 = time.monotonic()
        client = start(head, FAKE, "client", "7001", str(TOKENS))
        stdout, stderr = client.communicate(timeout=60)
        assert client.returncode == 0, stderr
        times = [float(x) for x in stdout.split()]
        assert len(times) == TOKENS
        time.sleep(0.3)  # the last segments reach the sniffer
        sniffer.stdin.close()
        assert sniffer.wait(timeout=30) == 0, sniffer.stderr.read()
        cap = pickle.loads(out.read_bytes())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        spaces.down()
    assert cap["drops"] == 0
    rpc = rpc_commands(cap["lo"])
    assert rpc.gaps == 0
    # the answers (zeros here, which frame up as commands) are told apart by who spoke first
    assert rpc.unparsed == 0 and rpc.answer_streams == 1
    gets = [c for c in rpc.commands if c.cmd == GET_TENSOR]
    assert len(gets) == TOKENS and {c.answer for c in gets} == {2560}
    assert len([c for c in rpc.commands if c.cmd in DECODES]) == TOKENS
    assert len(rpc.commands) == 3 * TOKENS
    assert all(t0 < c.t < times[-1] for c in rpc.commands)
    # as the scenario counts them: between the first and the last answer, per token after
    # the first (token k's commands leave after answer k-1 arrived)
    stream = [Timed(StreamResult(), times)]
    assert per_token([c.t for c in rpc.commands if c.cmd in ANSWERED], stream) == 1.0
    data = [t for t, n in answer_bursts(cap["link"]) if n >= 2560]
    assert len(data) == TOKENS
    assert per_token(data, stream) == 1.0
