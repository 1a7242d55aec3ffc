"""`qvacd models list|add|show|rm`: the local model store.

These work on the data dir by design (models/store.py), with or without a daemon
running: a running daemon re-reads the store within a second and republishes its
capacity. `models pull` asks the running daemon and lives in qvacd/cli/pull.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from .common import CliError, data_dir_of

if TYPE_CHECKING:
    from models.store import ModelStore


def _store(args: argparse.Namespace) -> ModelStore:
    from models.store import ModelStore

    return ModelStore(data_dir_of(args))


def cmd_models_list(args: argparse.Namespace) -> int:
    from models.engine import fmt_bytes

    entries = _store(args).list()
    if args.json:
        print(json.dumps([{"name": e.name, "sha256": e.sha256, "size": e.size, **e.info}
                          for e in entries], indent=2))
        return 0
    if not entries:
        print("no models; add one with `qvacd models add PATH`")
        return 0
    w = max(len(e.name) for e in entries)
    print(f"{'NAME':<{w}}  {'SHA256':<12}  {'SIZE':>10}  {'PARAMS':>8}  QUANT     ARCH")
    for e in entries:
        p = e.info.get("parameters", 0)
        print(f"{e.name:<{w}}  {e.sha256[:12]}  {fmt_bytes(e.size):>10}  "
              f"{p / 1e6:>7.0f}M  {e.info.get('quantization', '?'):<8}  "
              f"{e.info.get('architecture', '?')}")
    return 0


def cmd_models_add(args: argparse.Namespace) -> int:
    from models.store import StoreError

    try:
        e = _store(args).add(Path(args.path), args.name)
    except StoreError as err:
        raise CliError(str(err)) from err
    print(f"added {e.name} sha256:{e.sha256} ({e.size} bytes,"
          f" {e.info.get('architecture')}, {e.info.get('quantization')})")
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    store = _store(args)
    e = store.resolve(args.name)
    if e is None:
        raise CliError(f"no model named {args.name!r}; `qvacd models list` shows what exists")
    info = store.info(e)
    out = {"name": e.name, "sha256": e.sha256, "size": e.size, "path": str(e.path),
           "aliases": list(e.aliases), **info.summary(),
           "kv_cache_bytes_per_4k_ctx": info.kv_cache_bytes(4096),
           "memory_estimate_4k_ctx": info.memory_estimate(4096)}
    try:
        from models.manifest import load_or_build_manifest

        out["manifest"] = load_or_build_manifest(store, e).summary()
    except ImportError:
        pass
    print(json.dumps(out, indent=2))
    return 0


def cmd_models_rm(args: argparse.Namespace) -> int:
    """With a daemon running on this data dir, it deletes (DELETE /api/delete: it unloads
    the model first and refuses while a request uses it); without one, the store directly."""
    from models.store import StoreError

    from ..daemon_file import running_daemon_api

    if getattr(args, "api", None) or running_daemon_api(data_dir_of(args)):
        from .client import DaemonClient

        DaemonClient.for_args(args).send_json("DELETE", "/api/delete", {"model": args.name})
        print(f"removed {args.name}")
        return 0
    try:
        e = _store(args).remove(args.name)
    except StoreError as err:
        raise CliError(str(err)) from err
    print(f"removed {e.name}")
    return 0
