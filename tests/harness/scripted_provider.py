"""A small node that delegates, a full node, and a scripted provider beside them.

The tests of how a consumer treats a provider that misbehaves (`garbage`, `stall`) or
predates a wire field (`grammar-blind`) all need the same mesh: "laptop" (64 MiB, holds
no model), "desktop" (the model) and tests/bad_provider.py in MODE, a real libp2p node
whose record claims the model and is the fastest, so the laptop's router tries it first.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from peers.identity import load_or_create_identity
from peers.trust import TrustStore
from tests.harness.daemons import REPO, free_port
from tests.harness.mesh import ALL_ROLES, Mesh


@contextmanager
def laptop_desktop_and_scripted_provider(mesh: Mesh, tmp_path: Path, mode: str,
                                         model: str, name: str = "old") -> Iterator[str]:
    """Laptop and desktop started and trusting each other, the scripted provider trusted
    by the laptop and its bootstrap peer; yields the provider's peer id (also
    mesh.ids[name]). The provider process is killed on exit."""
    sha = json.loads((mesh.template / "models" / "index.json").read_text())[
        "models"][model]["sha256"]
    data_dir = tmp_path / name
    data_dir.mkdir()
    peer_id = load_or_create_identity(data_dir).peer_id_str
    port = free_port()
    mesh.add("laptop", "--memory-budget", "64MiB")
    mesh.add("desktop")
    mesh.ids[name] = peer_id
    TrustStore.in_dir(data_dir).add(mesh.ids["laptop"], ALL_ROLES)
    TrustStore.in_dir(mesh.root / "laptop").add(peer_id, ALL_ROLES)
    mesh.trust("laptop", "desktop", ALL_ROLES)
    mesh.trust("desktop", "laptop", ALL_ROLES)
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "bad_provider.py"),
                             str(data_dir), str(port), mode, sha], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        mesh.start("desktop")
        mesh.nodes["laptop"].args += ["--bootstrap", f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id}"]
        mesh.start("laptop", bootstrap=["desktop"])
        mesh.wait_peers("laptop", ["desktop", name])
        yield peer_id
    finally:
        proc.kill()
        proc.wait()
