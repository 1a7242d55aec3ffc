"""What tests and benches use to start real qvacd daemons: a free port, waiting for an
HTTP server, a model data dir made of hard links, a daemon handle, a mesh of daemons
on loopback, and network namespaces (tests/harness/namespaces.py).

Why it lives under tests/ and is imported as `tests.harness` by both: these helpers
grew in tests/conftest.py, the test suite is their main user, and the benches already
lean on test code (tests/pull_node.py). Importing it by its full name from both sides
gives one module object (one `Daemon` class), not a second copy loaded as `harness`.
The repo root must be on sys.path for that: `python -m pytest` and `python -m bench.x`
run from it, tests/conftest.py inserts it for a bare `pytest`, and each bench script
inserts it for `python bench/x.py`. Nothing here is installed with the package.
"""

from tests.harness.daemons import (
    REPO,
    Daemon,
    clone_data_dir,
    free_port,
    install_model_template,
    preload_settled,
    stop_all,
    wait_http,
)
from tests.harness.mesh import ALL_ROLES, Mesh, temporary_mesh

__all__ = [
    "ALL_ROLES",
    "REPO",
    "Daemon",
    "Mesh",
    "clone_data_dir",
    "free_port",
    "install_model_template",
    "preload_settled",
    "stop_all",
    "temporary_mesh",
    "wait_http",
]
