"""`qvacd ps`: the models the running daemon has loaded (Ollama's `ollama ps`).

Asks GET /api/ps through the DaemonClient and prints a table that fits the terminal
(80 columns when not a terminal): name, digest, memory, where it runs, when it unloads.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone

import qvacd.cli.terminal as terminal
from .client import DaemonClient


def _until(expires_at: str, now: datetime) -> str:
    try:
        when = datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    except ValueError:
        return expires_at
    secs = (when - now).total_seconds()
    if secs > 100 * 365 * 86400:
        return "Forever"
    if secs < 1:
        return "Stopping..."
    if secs < 120:
        return f"{secs:.0f} seconds from now"
    if secs < 7200:
        return f"{secs / 60:.0f} minutes from now"
    return f"{secs / 3600:.0f} hours from now"


def cmd_ps(args: argparse.Namespace) -> int:
    from models.engine import fmt_bytes

    models = DaemonClient.for_args(args).get_json("/api/ps").get("models", [])
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    if not models:
        print("no models loaded; a request loads one (`qvacd run MODEL`)")
        return 0
    now = datetime.now(timezone.utc)
    rows = [[m["name"], m["digest"][:12], fmt_bytes(m["size"]),
             "100% GPU" if m.get("size_vram") else "100% CPU", _until(m["expires_at"], now)]
            for m in models]
    for line in terminal.table(["NAME", "ID", "SIZE", "PROCESSOR", "UNTIL"], rows,
                               terminal.width(), right=(2,), shrink=(0, 4)):
        print(line)
    return 0
