"""Three real daemons joined by bootstrap: each sees the others' verified capacity within
2 s, and a model added with the CLI on one shows up at the others within 2 s."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.harness import REPO, Mesh


def capacity_seen(d, peer_id: str) -> dict | None:
    for p in httpx.get(d.api + "/qvac/peers", timeout=5).json()["peers"]:
        if p["peer_id"] == peer_id and p.get("capacity"):
            return p
    return None


def test_three_daemons_find_each_other_and_see_changes(mesh: Mesh, tmp_path: Path):
    for name in ("a", "b", "c"):
        mesh.add(name, "--no-preload")
    mesh.start("a")
    t0 = time.monotonic()
    mesh.start("b", bootstrap=["a"])
    mesh.start("c", bootstrap=["a"])
    started = time.monotonic()
    # Every node holds the verified capacity of both others (c learns b through a).
    pending = {(x, y) for x in "abc" for y in "abc" if x != y}
    while pending and time.monotonic() - started < 2.0:
        for x, y in list(pending):
            if capacity_seen(mesh.nodes[x], mesh.ids[y]):
                pending.discard((x, y))
        time.sleep(0.05)
    assert not pending, f"not seen within 2 s of the last start: {sorted(pending)}"
    del t0
    seen = capacity_seen(mesh.nodes["b"], mesh.ids["a"])
    assert seen["capacity"]["models"][0]["name"] == "gemma3-270m"
    assert seen["trusted"] is False  # listed, but not trusted

    # A model added on c through the CLI (another process) reaches a and b within 2 s.
    blob = next((mesh.root / "c" / "models" / "blobs").iterdir())
    env = {**os.environ, "QVACD_DATA_DIR": str(mesh.root / "c")}
    r = subprocess.run([sys.executable, "-m", "qvacd.cli", "models", "add", str(blob),
                        "--name", "second-copy"], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    added = time.monotonic()
    waiting = {"a", "b"}
    while waiting and time.monotonic() - added < 2.0:
        for x in list(waiting):
            p = capacity_seen(mesh.nodes[x], mesh.ids["c"])
            if p and any(m["name"] == "second-copy" for m in p["capacity"]["models"]):
                waiting.discard(x)
        time.sleep(0.05)
    assert not waiting, f"{waiting} did not see the new model within 2 s"


def test_peer_id_and_table_survive_restart(mesh: Mesh):  # noqa: F811
    mesh.add("a", "--no-preload")
    mesh.add("b", "--no-preload")
    mesh.start("a")
    mesh.start("b", bootstrap=["a"])
    mesh.wait_peers("a", ["b"], timeout=5)
    before = mesh.nodes["b"].status()["peer_id"]
    mesh.nodes["b"].stop()
    mesh.nodes["b"].start()
    assert mesh.nodes["b"].status()["peer_id"] == before == mesh.ids["b"]
    mesh.wait_peers("b", ["a"], timeout=5)
