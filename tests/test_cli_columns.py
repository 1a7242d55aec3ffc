"""`qvacd status` and `qvacd peers` in 80 columns: no line of ours longer than the
terminal, and the facts still there.

Two real daemons that trust each other, asked by the real CLI with COLUMNS=80; then the
formatting functions alone with the longest things they meet (relayed addresses that
hold two peer ids, long model names and error messages), at 80 and at 60 columns.
"""

from __future__ import annotations

import os
import subprocess
import sys

from qvacd.cli.daemon import status_lines
from qvacd.cli.peers import peers_lines
from tests.harness import REPO, Mesh

MODEL = "gemma3-270m"
ALL = ["consumer", "provider", "seeder"]


def cli80(*args: str) -> list[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("QVACD_")},
           "COLUMNS": "80"}
    r = subprocess.run([sys.executable, "-m", "qvacd.cli", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def assert_fits(lines: list[str], cols: int) -> None:
    long = [(len(x), x) for x in lines if len(x) > cols]
    assert not long, "\n".join(lines)


def test_status_and_peers_fit_80_columns(mesh: Mesh) -> None:
    mesh.add("a")
    mesh.add("b")
    mesh.trust("a", "b", ALL)
    mesh.trust("b", "a", ALL)
    a = mesh.start("a")
    mesh.start("b", bootstrap=["a"])
    mesh.wait_peers("a", ["b"], timeout=30)
    api = a.api.removeprefix("http://")

    status = cli80("status", "--api", api)
    assert_fits(status, 80)
    text = "\n".join(status)
    assert f"peer {mesh.ids['a']}" in status  # whole, on its own line: `trust add` wants it
    assert "sequences " in text and " free" in text and "tok/s" in text
    assert any(x.startswith("listening /ip4/127.0.0.1/tcp/") for x in status), text
    assert any(x.startswith(MODEL) and "yes" in x for x in status), text

    peers = cli80("peers", "--api", api)
    assert_fits(peers, 80)
    b_id = mesh.ids["b"]
    row = next(x for x in peers if x.startswith(b_id[:8] + "…" + b_id[-4:]))
    assert "cons,prov,seed" in row and "direct" in row and "ago" in row, peers
    assert any(x.strip().startswith("models") and MODEL in x for x in peers), peers


def _pid(c: str) -> str:
    return "12D3KooW" + c * 44


def test_long_content_folds_instead_of_wrapping() -> None:
    own, relay = _pid("A"), _pid("R")
    st = {
        "peer_id": own, "version": "0.1.0", "api": "127.0.0.1:11435", "uptime_s": 8000,
        "memory_budget": 16 << 30, "memory_used": 3 << 30, "delegate": "auto",
        "slots_free": 15, "slots_total": 16, "parallel": "auto", "queue": 2,
        "aggregate_tokens_per_s": 123.4,
        "listen_addrs": [f"/ip6/2001:db8:1234:5678:9abc:def0:1234:5678/tcp/4001/p2p/{own}",
                         f"/ip4/192.168.100.200/udp/4001/quic-v1/p2p/{own}"],
        "network": {"reachability": "private", "hole_punch": True,
                    "relayed_addrs": [f"/ip4/203.0.113.7/tcp/4001/p2p/{relay}/p2p-circuit"
                                      f"/p2p/{own}"] * 3,
                    "reservations": [{"relay": relay, "state": "reserved",
                                      "expires_in_s": 3500, "source": "dht"}],
                    "service": {"reservations": 3, "max_reservations": 128,
                                "circuits_active": 2, "bytes_relayed": 123456789}},
        "models": [{"name": "qwen2.5-coder-14b-instruct-q4_k_m-with-a-very-long-name",
                    "size": 9 << 30, "memory_estimate": 11 << 30, "fits_budget": True,
                    "loaded": True, "parallel": 16, "tokens_per_s": 31.5}],
    }
    peers = [{"peer_id": _pid(c), "trusted": True, "roles": ALL, "path": "relayed",
              "rtt_ms": 1234.5, "verified_age_s": 12, "served": 12345, "failed": 678,
              "paths": {"relayed": {"tokens_per_s": 12.5}},
              "last_error": "the provider reset the stream before its first token " * 2,
              "backoff_s": 30,
              "capacity": {"slots_free": 16, "slots_total": 16, "tokens_per_s": {"x": 99.0},
                           "models": [{"name": f"model-number-{i}-instruct"}
                                      for i in range(8)]}} for c in "BC"]
    for cols in (80, 60):
        s = status_lines(st, cols)
        assert_fits(s, cols)
        assert f"peer {own}" in s and "qwen2.5-coder" in "\n".join(s)
        assert "/p2p/12D3KooW…RRRR/p2p-circuit" in "\n".join(s)  # short ids inside addrs
        p = peers_lines(peers, cols)
        assert_fits(p, cols)
        joined = "\n".join(p)
        for i in range(8):
            assert f"model-number-{i}-instruct" in joined  # folded, none dropped
        assert "backing off 30s" in joined and "12345/678" in joined
