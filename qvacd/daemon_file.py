"""`daemon.json` in the data dir: where a running daemon's HTTP API is.

The daemon writes it once it listens and removes it when it stops; the CLI reads it so
`qvacd status` finds a daemon started with another --api port. The pid is in it to spot
a file left behind by a daemon that died: a file whose pid is not alive counts as none.
Kept apart from qvacd.node so the CLI reads it without importing the daemon.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DAEMON_FILE = "daemon.json"


def write_daemon_file(data_dir: Path, *, api: str | None, peer_id: str) -> None:
    """Atomically record this process's API address (pid too, to spot stale files)."""
    path = data_dir / DAEMON_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "api": api, "peer_id": peer_id}))
    os.replace(tmp, path)


def remove_daemon_file(data_dir: Path) -> None:
    """Remove the file if this process wrote it (a newer daemon's file stays)."""
    path = data_dir / DAEMON_FILE
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def running_daemon_api(data_dir: Path) -> str | None:
    """HOST:PORT of the daemon running on `data_dir`, or None if none is."""
    try:
        info = json.loads((data_dir / DAEMON_FILE).read_text())
        os.kill(int(info["pid"]), 0)
        return str(info["api"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
