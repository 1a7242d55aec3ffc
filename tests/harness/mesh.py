"""Several named daemons on 127.0.0.1 that know each other's peer ids and p2p ports
before they start, so one can bootstrap to another and each can trust the others.

Used by tests/test_delegation.py and tests/test_discovery.py (the `mesh` fixture), and
by bench/delegation.py and bench/idle_cpu.py (`temporary_mesh`).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.harness.daemons import (
    Daemon,
    clone_data_dir,
    free_port,
    install_model_template,
    stop_all,
)

ALL_ROLES = ["consumer", "provider", "seeder"]


class Mesh:
    def __init__(self, root: Path, template: Path) -> None:
        self.root = root
        self.template = template
        self.nodes: dict[str, Daemon] = {}
        self.ids: dict[str, str] = {}
        self.ports: dict[str, int] = {}

    def add(self, name: str, *args: str) -> None:
        # imported here: the namespace helpers share this package and need none of qvacd
        from peers.identity import load_or_create_identity

        d = clone_data_dir(self.template, self.root / name)
        self.ids[name] = load_or_create_identity(d).peer_id_str
        self.ports[name] = free_port()
        self.nodes[name] = Daemon(d, *args)

    def trust(self, who: str, whom: str, roles: list[str]) -> None:
        from peers.trust import TrustStore

        TrustStore.in_dir(self.root / who).add(self.ids[whom], roles)

    def addr(self, name: str) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.ports[name]}/p2p/{self.ids[name]}"

    def start(self, name: str, bootstrap: list[str] = ()) -> Daemon:
        d = self.nodes[name]
        d.args = [*d.args, "--listen", f"/ip4/127.0.0.1/tcp/{self.ports[name]}",
                  *[x for b in bootstrap for x in ("--bootstrap", self.addr(b))]]
        return d.start()

    def wait_peers(self, name: str, others: list[str], timeout: float = 10) -> None:
        """Until `name` holds verified capacity of every node in `others`."""
        want = {self.ids[o] for o in others}
        deadline = time.monotonic() + timeout
        d = self.nodes[name]
        while time.monotonic() < deadline:
            peers = httpx.get(d.api + "/qvac/peers", timeout=5).json()["peers"]
            have = {p["peer_id"] for p in peers if p.get("capacity")}
            if want <= have:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{name} did not see {others}")

    def stop_all(self) -> None:
        stop_all(self.nodes.values())


@contextmanager
def temporary_mesh(prefix: str) -> Iterator[Mesh]:
    """A Mesh in a fresh temporary dir, the default model registered as its template;
    on the way out every daemon is stopped and the dir removed (a bench's lifetime)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    mesh = None
    try:
        template = work / "template"
        assert install_model_template(template), "the default model is not installed:" \
            " pip install '.[model]'"
        mesh = Mesh(work, template)
        yield mesh
    finally:
        if mesh:
            mesh.stop_all()
        shutil.rmtree(work, ignore_errors=True)
