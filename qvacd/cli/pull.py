"""`qvacd models pull NAME|SHA256 [--from PEERID]`: ask the running daemon to fetch a
model from trusted peers, and show its progress.

The daemon does the pull (qvacd/pull_api.py serves `POST /api/pull`, Ollama's NDJSON
progress lines); this command only reads those lines and draws a progress bar (bytes,
rate, ETA, sources), like `ollama pull`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from .client import DaemonClient
from .common import CliError

LINE_TIMEOUT_S = 300.0  # the daemon sends a line at least every progress interval


def cmd_models_pull(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    body: dict[str, Any] = {"model": args.name, "stream": True}
    if getattr(args, "from_peer", None):
        body["from"] = args.from_peer
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
        TransferSpeedColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[sources]} source(s)"), console=console, transient=False)
    task = None
    final: dict[str, Any] = {}
    with DaemonClient.for_args(args).stream("POST", "/api/pull", body=body,
                                            idle_timeout_s=LINE_TIMEOUT_S) as r, progress:
        for line in r.iter_lines():
            if not line.strip():
                continue
            ev = json.loads(line)
            if "error" in ev:
                raise CliError(f"pull failed: {ev['error']}")
            status = ev.get("status", "")
            if status == "success":
                final = ev
            if "total" in ev and (task is not None or status != "success"):
                desc = {"downloading": "pulling", "success": "pulled"}.get(status, status)
                if task is None:
                    task = progress.add_task(desc, total=ev["total"],
                                             completed=ev.get("completed", 0),
                                             sources=ev.get("sources", 0))
                progress.update(task, description=desc, total=ev["total"],
                                completed=ev.get("completed", 0),
                                sources=ev.get("sources", 0))
            elif task is None and status != "success":
                console.print(status)
    if not final:
        raise CliError("the daemon ended the pull without saying it succeeded; pull again")
    dropped = final.get("dropped") or {}
    for peer, why in dropped.items():
        console.print(f"dropped {peer}: {why}")
    if not final.get("fetched") and not final.get("resumed"):
        print(f"{final.get('model', args.name)} is already here ({final.get('digest', '')})")
        return 0
    print(f"pulled {final.get('model', args.name)} ({final.get('digest', '')}, "
          f"{final.get('total', 0)} bytes: {final.get('fetched', 0)} fetched from"
          f" {final.get('sources', 0)} peer(s), {final.get('resumed', 0)} resumed)")
    return 0
