"""`qvacd plan MODEL`: how the running daemon would split MODEL across trusted workers.

Asks GET /qvac/plan and prints one row per device: the layers it holds, the memory that
needs and the memory it has free. A model that fits no split prints the daemon's one
line (every device's free memory and the model's needs) and exits 1.
"""

from __future__ import annotations

import argparse
import json
import urllib.parse

import qvacd.cli.terminal as terminal
from .client import DaemonClient


def cmd_plan(args: argparse.Namespace) -> int:
    from models.engine import fmt_bytes

    plan = DaemonClient.for_args(args).get_json(
        "/qvac/plan?model=" + urllib.parse.quote(args.model))
    if args.json:
        print(json.dumps(plan, indent=2))
        return 0
    print(f"{plan['model']}: {plan['n_layers']} layers, {fmt_bytes(plan['model_memory'])}"
          f"{' (loaded)' if plan.get('loaded') else ''}")
    rows = []
    for d in plan["devices"]:
        n = d["layers"]
        span = f"{d['first_layer']}-{d['first_layer'] + n - 1}" if n else "-"
        rows.append(["this node" if d["device"] == "local" else d["device"], str(n), span,
                     fmt_bytes(d["memory"]), fmt_bytes(d["free"])])
    for line in terminal.table(["DEVICE", "LAYERS", "RANGE", "NEEDS", "FREE"], rows,
                               terminal.width(), right=(1, 3, 4), shrink=(0,)):
        print(line)
    return 0
