"""Model distribution between real daemons on 127.0.0.1, the real default model as payload:
pulls from one and from two seeders (sha256 checked), a kill -9 half-way that resumes
without re-fetching, dishonest seeders dropped and named, a peer without the seeder role
refused, the official ollama client's pull, and onward seeding from a node that pulled.

Daemons start through tests/pull_node.py: `qvacd start` plus test-only knobs (a dishonest
seeder, a short stall timeout); without a knob set it is the plain daemon.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest

from peers.identity import load_or_create_identity
from peers.trust import TrustStore
from tests.harness import REPO, Daemon, clone_data_dir, free_port, stop_all

MODEL = "gemma3-270m"
LAUNCHER = Path(__file__).with_name("pull_node.py")
CHUNK = 4 << 20


class PullDaemon(Daemon):
    """A daemon started through the test launcher (see tests/pull_node.py)."""

    launcher = (sys.executable, str(LAUNCHER))
    base_args = ("--no-mdns",)

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.args.append("--no-preload")  # why: nothing here generates; saves CPU

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include `labels` (0 if absent)."""
        total = 0.0
        for line in httpx.get(self.api + "/metrics", timeout=5).text.splitlines():
            m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
            if not m or m.group(1) != name:
                continue
            have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
        return total


class Mesh:
    """Nodes of one test; `shared` nodes (the module's seeders) are used, not owned."""

    def __init__(self, root: Path, template: Path, shared: Mesh | None = None) -> None:
        self.root = root
        self.template = template
        self.nodes: dict[str, PullDaemon] = dict(shared.nodes) if shared else {}
        self.ids: dict[str, str] = dict(shared.ids) if shared else {}
        self.ports: dict[str, int] = dict(shared.ports) if shared else {}
        self.owned: list[str] = []

    def add(self, name: str, *args: str, model: bool = True,
            env: dict[str, str] | None = None, root: Path | None = None) -> str:
        d = (root or self.root) / name
        if model:
            clone_data_dir(self.template, d)
        else:
            d.mkdir(parents=True)
            args = ("--no-default-model", *args)
        self.ids[name] = load_or_create_identity(d).peer_id_str
        self.ports[name] = free_port()
        self.nodes[name] = PullDaemon(d, *args, env=env)
        self.owned.append(name)
        return self.ids[name]

    def trust(self, who: str, whom: str, roles: list[str]) -> None:
        TrustStore.in_dir(self.nodes[who].data_dir).add(self.ids[whom], roles)

    def addr(self, name: str) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.ports[name]}/p2p/{self.ids[name]}"

    def start(self, *names: str, bootstrap: tuple[str, ...] = ()) -> None:
        for name in names:
            d = self.nodes[name]
            d.args = [*d.args, "--listen", f"/ip4/127.0.0.1/tcp/{self.ports[name]}",
                      *[x for b in bootstrap for x in ("--bootstrap", self.addr(b))]]
            d.start(wait=False)
        for name in names:
            self.nodes[name].wait_ready()

    def wait_holders(self, name: str, holders: list[str], timeout: float = 15) -> None:
        """Until `name` holds a capacity record of each of `holders` listing the model."""
        want = {self.ids[h] for h in holders}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            peers = httpx.get(self.nodes[name].api + "/qvac/peers", timeout=5).json()["peers"]
            have = {p["peer_id"] for p in peers
                    if any(m.get("name") == MODEL
                           for m in (p.get("capacity") or {}).get("models", []))}
            if want <= have:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{name} did not see the model on {holders}")

    def stop_all(self) -> None:
        stop_all(self.nodes[name] for name in self.owned)


@pytest.fixture(scope="module")
def model_sha(model_template: Path) -> str:
    index = json.loads((model_template / "models" / "index.json").read_text())
    return index["models"][MODEL]["sha256"]


@pytest.fixture(scope="module")
def seeders(tmp_path_factory: pytest.TempPathFactory, model_template: Path) -> Iterator[Mesh]:
    """Two honest seeders, s1 and s2, shared by the tests of this module."""
    m = Mesh(tmp_path_factory.mktemp("seeders"), model_template)
    m.add("s1")
    m.add("s2")
    m.start("s1", "s2")
    yield m
    m.stop_all()


@pytest.fixture
def mesh(tmp_path: Path, model_template: Path, seeders: Mesh) -> Iterator[Mesh]:
    m = Mesh(tmp_path, model_template, shared=seeders)
    yield m
    m.stop_all()


def pull(d: Daemon, body: dict, *, on_line=None, timeout: float = 120) -> tuple[int, list[dict]]:
    """POST /api/pull; (status, NDJSON lines or the one JSON error body)."""
    lines: list[dict] = []
    with httpx.stream("POST", d.api + "/api/pull", json={"model": MODEL, **body},
                      timeout=timeout) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, [r.json()]
        for raw in r.iter_lines():
            if raw.strip():
                lines.append(json.loads(raw))
                if on_line is not None:
                    on_line(lines[-1])
    return 200, lines


def blob_sha(d: Daemon, sha: str) -> str:
    h = hashlib.sha256()
    with (d.data_dir / "models" / "blobs" / f"sha256-{sha}").open("rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def pullers(mesh: Mesh, names: list[str], seeders: list[str]) -> None:
    """Add empty nodes `names` that trust `seeders` and are trusted by them to fetch."""
    for p in names:
        mesh.add(p, model=False)
        for s in seeders:
            mesh.trust(s, p, ["seeder"])
            mesh.trust(p, s, ["provider"])


# ---- tests ---------------------------------------------------------------------------------


def test_pull_from_one_seeder_then_from_two(mesh, model_sha):
    pullers(mesh, ["p1", "p2"], ["s1", "s2"])
    mesh.start("p1", "p2", bootstrap=("s1", "s2"))
    mesh.wait_holders("p1", ["s1", "s2"])
    s1, s2, p1, p2 = (mesh.nodes[n] for n in ("s1", "s2", "p1", "p2"))
    s1_before = s1.metric("qvacd_shard_upload_bytes_total")
    s2_before = s2.metric("qvacd_shard_upload_bytes_total")
    s1_streams = s1.metric("qvacd_shard_streams_total")
    s1_chunks = s1.metric("qvacd_shard_requests_total", kind="chunk", outcome="ok")

    # One seeder (--from): every byte from s1, none from s2.
    status, lines = pull(p1, {"from": mesh.ids["s1"]})
    assert status == 200, lines
    assert lines[0]["status"] == "pulling manifest"
    done = lines[-1]
    assert done["status"] == "success" and done["digest"] == f"sha256:{model_sha}", done
    assert done["sources"] == 1 and done["fetched"] == done["total"] and done["resumed"] == 0
    assert blob_sha(p1, model_sha) == model_sha
    assert s2.metric("qvacd_shard_upload_bytes_total") == s2_before
    s1_sent = s1.metric("qvacd_shard_upload_bytes_total")
    assert s1_sent - s1_before == done["total"]
    # Chunk after chunk on a few long-lived streams (4 lanes and the manifest's, plus any
    # reopened after an idle close), not one stream per chunk.
    n_chunks = -(-done["total"] // CHUNK)
    assert s1.metric("qvacd_shard_requests_total", kind="chunk", outcome="ok") - s1_chunks \
        == n_chunks
    streams = s1.metric("qvacd_shard_streams_total") - s1_streams
    assert 2 <= streams <= 12 < n_chunks, (streams, n_chunks)
    names = [m["name"] for m in p1.status()["models"]]
    assert names == [MODEL], names
    assert not list((p1.data_dir / "models" / "partial").glob("*"))

    # Two seeders, and two pulls of the same model at once (by name and by sha256)
    # sharing one download.
    results: list[tuple[int, list[dict]]] = []
    t = threading.Thread(target=lambda: results.append(pull(p2, {"model": model_sha})))
    t.start()
    status, lines = pull(p2, {})
    t.join(60)
    assert status == 200 and results and results[0][0] == 200, (lines, results)
    for _, ls in (results[0], (status, lines)):
        assert ls[-1]["status"] == "success", ls[-1]
    assert max(x.get("sources", 0) for x in lines if x["status"] == "downloading") == 2
    assert lines[-1]["sources"] == 2
    assert blob_sha(p2, model_sha) == model_sha
    from_s1 = s1.metric("qvacd_shard_upload_bytes_total") - s1_sent
    from_s2 = s2.metric("qvacd_shard_upload_bytes_total") - s2_before
    assert from_s1 > 0 and from_s2 > 0, (from_s1, from_s2)
    assert from_s1 + from_s2 == lines[-1]["total"]  # one download, not two
    assert p2.metric("qvacd_pulls_total", outcome="success") == 2  # one fetched, one followed
    assert p2.metric("qvacd_pull_bytes_total") == lines[-1]["total"]


def test_kill9_half_way_then_resume_fetches_only_the_rest(mesh, model_sha):
    # 40 MB/s: the pull takes ~6 s, time enough to kill it part-way.
    mesh.add("slow", "--shard-upload-rate", "40MB")
    pullers(mesh, ["p1"], ["slow"])
    mesh.start("slow")
    mesh.start("p1", bootstrap=("slow",))
    mesh.wait_holders("p1", ["slow"])
    s1, p1 = mesh.nodes["slow"], mesh.nodes["p1"]
    seen: list[dict] = []
    gauges: dict[str, float] = {}

    def kill_when_a_third_is_done(ev: dict) -> None:
        seen.append(ev)
        if ev["status"] == "downloading" and ev["completed"] > 0 and not gauges:
            # The same progress numbers in /metrics while the pull runs.
            for name in ("qvacd_pull_active", "qvacd_pull_total_bytes",
                         "qvacd_pull_completed_bytes", "qvacd_pull_sources"):
                gauges[name] = p1.metric(name)
        if ev["status"] == "downloading" and ev["completed"] >= ev["total"] // 3:
            p1.proc.kill()  # SIGKILL: no cleanup, no goodbye

    with pytest.raises(httpx.HTTPError):
        pull(p1, {}, on_line=kill_when_a_third_is_done)
    p1.proc.wait(10)
    at_kill = max(x.get("completed", 0) for x in seen)
    total = seen[-1]["total"]
    assert gauges["qvacd_pull_active"] == 1 and gauges["qvacd_pull_total_bytes"] == total
    assert 0 < gauges["qvacd_pull_completed_bytes"] <= total
    assert gauges["qvacd_pull_sources"] == 1
    assert total // 3 <= at_kill < total
    partial = p1.data_dir / "models" / "partial"
    assert (partial / f"{model_sha}.part").exists() and (partial / f"{model_sha}.state").exists()
    assert not (p1.data_dir / "models" / "blobs" / f"sha256-{model_sha}").exists()

    p1.start()
    mesh.wait_holders("p1", ["slow"])
    status, lines = pull(p1, {})
    assert status == 200, lines
    done = lines[-1]
    assert done["status"] == "success", done
    # Everything verified before the kill was kept; only the rest crossed the network.
    assert done["resumed"] >= at_kill, (done, at_kill)
    assert done["fetched"] == done["total"] - done["resumed"]
    assert p1.metric("qvacd_pull_resumed_bytes_total") == done["resumed"]
    assert p1.metric("qvacd_pull_bytes_total") == done["fetched"]
    # The seeder sent the file once, plus at most the chunks in flight at the kill.
    sent = s1.metric("qvacd_shard_upload_bytes_total")
    assert total <= sent <= total + 4 * CHUNK, (sent, total)
    assert blob_sha(p1, model_sha) == model_sha
    assert not list(partial.glob("*"))


def test_dishonest_seeders_are_dropped_and_named(mesh, model_sha):
    bad = ["corrupt", "short", "stall"]
    pullers(mesh, ["p1"], ["s1"])
    for mode in bad:
        mesh.add(mode, env={"QVACD_TEST_BAD_SEEDER": mode})
        mesh.trust(mode, "p1", ["seeder"])
        mesh.trust("p1", mode, ["provider"])
    mesh.nodes["p1"].env["QVACD_PULL_STALL_TIMEOUT"] = "2"
    mesh.start(*bad)
    mesh.start("p1", bootstrap=("s1", *bad))
    mesh.wait_holders("p1", ["s1", *bad])
    p1 = mesh.nodes["p1"]
    honest_before = mesh.nodes["s1"].metric("qvacd_shard_upload_bytes_total")
    status, lines = pull(p1, {})
    assert status == 200, lines
    done = lines[-1]
    assert done["status"] == "success", done
    assert blob_sha(p1, model_sha) == model_sha
    dropped = done["dropped"]
    assert set(dropped) == {mesh.ids[m] for m in bad}, dropped
    assert "sha256 check" in dropped[mesh.ids["corrupt"]]
    assert "short chunk" in dropped[mesh.ids["short"]]
    assert "stalled" in dropped[mesh.ids["stall"]]
    assert mesh.nodes["s1"].metric("qvacd_shard_upload_bytes_total") > honest_before
    log = p1.log()
    for m in bad:
        assert f"dropped provider {mesh.ids[m]}" in log


def test_pull_whose_seeders_all_stall_fails_in_one_line_naming_them(mesh, model_sha):
    stallers = ["stall1", "stall2"]
    pullers(mesh, ["p1"], [])
    for name in stallers:
        mesh.add(name, env={"QVACD_TEST_BAD_SEEDER": "stall"})
        mesh.trust(name, "p1", ["seeder"])
        mesh.trust("p1", name, ["provider"])
    mesh.nodes["p1"].env["QVACD_PULL_STALL_TIMEOUT"] = "2"
    mesh.start(*stallers)
    mesh.start("p1", bootstrap=tuple(stallers))
    mesh.wait_holders("p1", stallers)
    t0 = time.monotonic()
    status, lines = pull(mesh.nodes["p1"], {})
    assert time.monotonic() - t0 < 60
    assert status == 200, lines
    error = lines[-1].get("error", "")
    assert error and "\n" not in error, lines[-1]
    for name in stallers:
        assert mesh.ids[name] in error, error
    assert error.count("stalled") == 2 and "pull again to resume" in error, error
    assert not (mesh.nodes["p1"].data_dir / "models" / "blobs" / f"sha256-{model_sha}").exists()


def test_seeder_answering_one_chunk_per_stream_still_serves_the_whole_pull(mesh, model_sha):
    """A seeder that closes each stream after one answer (as before streams carried
    several chunk requests): the puller's lanes ask again on fresh streams."""
    pullers(mesh, ["p1"], [])
    mesh.add("old", env={"QVACD_TEST_BAD_SEEDER": "onechunk"})
    mesh.trust("old", "p1", ["seeder"])
    mesh.trust("p1", "old", ["provider"])
    mesh.start("old")
    mesh.start("p1", bootstrap=("old",))
    mesh.wait_holders("p1", ["old"])
    status, lines = pull(mesh.nodes["p1"], {})
    assert status == 200 and lines[-1]["status"] == "success", lines[-1]
    assert not lines[-1].get("dropped"), lines[-1]
    assert blob_sha(mesh.nodes["p1"], model_sha) == model_sha
    n_chunks = -(-lines[-1]["total"] // CHUNK)
    assert mesh.nodes["old"].metric("qvacd_shard_streams_total") >= n_chunks


def test_lying_manifest_in_a_tie_cannot_get_the_honest_seeder_dropped(mesh, model_sha):
    pullers(mesh, ["p1"], ["s1"])
    mesh.add("liar", env={"QVACD_TEST_BAD_SEEDER": "manifest"})
    mesh.trust("liar", "p1", ["seeder"])
    mesh.trust("p1", "liar", ["provider"])
    mesh.start("liar")
    mesh.start("p1", bootstrap=("s1", "liar"))
    mesh.wait_holders("p1", ["s1", "liar"])
    status, lines = pull(mesh.nodes["p1"], {})
    assert status == 200 and lines[-1]["status"] == "success", lines[-1]
    assert set(lines[-1]["dropped"]) == {mesh.ids["liar"]}, lines[-1]
    assert blob_sha(mesh.nodes["p1"], model_sha) == model_sha


def test_peer_without_seeder_role_is_refused_and_unknown_model_says_so(mesh):
    mesh.add("p1", model=False)
    mesh.trust("s1", "p1", ["consumer"])  # trusted, but not to fetch shards
    mesh.trust("p1", "s1", ["provider"])
    mesh.start("p1", bootstrap=("s1",))
    mesh.wait_holders("p1", ["s1"])
    p1, s1 = mesh.nodes["p1"], mesh.nodes["s1"]
    sent_before = s1.metric("qvacd_shard_upload_bytes_total")

    status, body = pull(p1, {})
    assert status == 403, body
    msg = body[0]["error"]
    assert "seeder role" in msg and mesh.ids["p1"] in msg and mesh.ids["s1"] in msg, msg
    assert s1.metric("qvacd_shard_requests_total", outcome="unauthorized") >= 1
    assert s1.metric("qvacd_shard_upload_bytes_total") == sent_before
    assert p1.status()["models"] == []

    status, body = pull(p1, {"model": "no-such-model"})
    assert status == 404, body
    assert "no peer has model 'no-such-model'" in body[0]["error"]
    assert re.search(r"asked \d+ peer", body[0]["error"]), body
    # The CLI says the same in one line.
    out = subprocess.run([sys.executable, "-m", "qvacd.cli", "models", "pull", "no-such-model",
                          "--api", p1.api], capture_output=True, text=True, timeout=60,
                         cwd=REPO, check=False)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"qvacd: error: daemon said (404): {body[0]['error']}"], out.stderr

    # Ollama's client sees the same refusal as an error with the status code.
    with pytest.raises(ollama.ResponseError) as e:
        list(ollama.Client(host=p1.api).pull(MODEL, stream=True))
    assert e.value.status_code == 403


def test_ollama_client_pull_then_a_third_node_pulls_from_the_puller(mesh, model_sha):
    pullers(mesh, ["p1"], ["s1"])
    mesh.add("p2", model=False)
    mesh.trust("p1", "p2", ["seeder"])  # p1 will seed to p2
    mesh.trust("p2", "p1", ["provider"])
    mesh.start("p1", bootstrap=("s1",))
    mesh.wait_holders("p1", ["s1"])
    p1 = mesh.nodes["p1"]

    # By the alias Ollama users type: no record carries it, so p1 asks its peers.
    parts = list(ollama.Client(host=p1.api, timeout=120).pull("gemma3:270m", stream=True))
    statuses = [p.status for p in parts]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success", statuses
    progress = [p for p in parts if p.status == "downloading"]
    assert progress and progress[-1].total == progress[-1].completed > 0
    assert progress[-1].digest == f"sha256:{model_sha}"
    assert all(a.completed <= b.completed for a, b in itertools.pairwise(progress))
    assert blob_sha(p1, model_sha) == model_sha
    [entry] = p1.status()["models"]
    assert entry["name"] == MODEL  # the name its seeders use; the alias resolves too
    r = httpx.post(p1.api + "/api/show", json={"model": "gemma3:270m"}, timeout=30)
    assert r.status_code == 200, r.text

    # p1 announces itself as a provider: p2, which knows only p1, sees it and pulls
    # from it, through the CLI.
    mesh.start("p2", bootstrap=("p1",))
    mesh.wait_holders("p2", ["p1"])
    out = subprocess.run(
        [sys.executable, "-m", "qvacd.cli", "models", "pull", MODEL, "--from", mesh.ids["p1"],
         "--api", mesh.nodes["p2"].api], capture_output=True, text=True, timeout=120,
        cwd=REPO, env={**os.environ, "COLUMNS": "120"}, check=False)
    assert out.returncode == 0, out.stderr
    assert f"pulled {MODEL} (sha256:{model_sha}" in out.stdout, out.stdout
    assert "1 peer(s)" in out.stdout
    assert blob_sha(mesh.nodes["p2"], model_sha) == model_sha
    assert p1.metric("qvacd_shard_upload_bytes_total") == mesh.nodes["p2"].status()[
        "models"][0]["size"]
    # A second pull of a model already here is an immediate success.
    status, lines = pull(mesh.nodes["p2"], {"stream": False})
    assert status == 200 and lines[-1] == {"status": "success"}


def test_disk_full_is_a_clear_error_and_the_pull_resumes_once_there_is_room(
        mesh, model_sha, tmp_path):
    small = tmp_path / "small-disk"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small)],
            capture_output=True, check=False).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        mesh.add("p1", model=False, root=small)
        mesh.trust("s1", "p1", ["seeder"])
        mesh.trust("p1", "s1", ["provider"])
        mesh.start("p1", bootstrap=("s1",))
        mesh.wait_holders("p1", ["s1"])
        p1 = mesh.nodes["p1"]
        status, body = pull(p1, {})
        assert status == 507, body
        assert body[0]["error"].startswith("disk full: the model needs 253113024 bytes"), body
        assert "pull again" in body[0]["error"]
        assert p1.status()["models"] == []
        subprocess.run(["mount", "-o", "remount,size=600m", str(small)], check=True)
        status, lines = pull(p1, {})
        assert status == 200 and lines[-1]["status"] == "success", lines[-1]
        assert blob_sha(p1, model_sha) == model_sha
    finally:
        mesh.stop_all()
        subprocess.run(["umount", "-l", str(small)], capture_output=True, check=False)
