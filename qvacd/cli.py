"""The `qvacd` command line.

`start` runs the daemon in the foreground. Commands that ask a running daemon
(generate, status, peers) talk to it over its own HTTP API, like Ollama's CLI;
commands that change local state (models, trust, mesh, id) work on the data dir
directly, and a running daemon picks the change up without a restart.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .config import ConfigError, add_data_dir_arg, add_start_args, default_data_dir, load_config
from .logs import setup_logging

DEFAULT_API = "127.0.0.1:11435"


class CliError(Exception):
    pass


def _data_dir(args: argparse.Namespace) -> Path:
    return Path(args.data_dir) if getattr(args, "data_dir", None) else default_data_dir()


# ---- talking to a running daemon ----------------------------------------------------


def _api_base(args: argparse.Namespace) -> str:
    from .node import runtime_api

    api = getattr(args, "api", None) or os.environ.get("QVACD_API") \
        or runtime_api(_data_dir(args)) or DEFAULT_API
    return api if api.startswith("http") else f"http://{api}"


def _client(args: argparse.Namespace, timeout: float | None = 10.0):
    import httpx

    token = os.environ.get("QVACD_API_TOKEN", "")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=_api_base(args), headers=headers, timeout=timeout)


def _get(args: argparse.Namespace, path: str) -> Any:
    import httpx

    try:
        with _client(args) as c:
            r = c.get(path)
    except httpx.TransportError as e:
        raise CliError(f"no qvacd daemon answers at {_api_base(args)}; start one with"
                       " `qvacd start` (or pass --api HOST:PORT)") from e
    if r.status_code != 200:
        raise CliError(_error_text(r))
    return r.json()


def _error_text(r: Any) -> str:
    try:
        err = r.json().get("error")
        if isinstance(err, dict):
            err = err.get("message")
        return f"daemon said ({r.status_code}): {err}"
    except ValueError:
        return f"daemon answered HTTP {r.status_code}"


def cmd_generate(args: argparse.Namespace) -> int:
    import httpx

    body = {"model": args.model, "prompt": args.prompt, "stream": True,
            "max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.seed is not None:
        body["seed"] = args.seed
    headers = {"X-Qvac-Local-Only": "1"} if args.local_only else {}
    try:
        with _client(args, timeout=None) as c, c.stream("POST", "/v1/completions", json=body,
                                                         headers=headers) as r:
            if r.status_code != 200:
                r.read()
                raise CliError(_error_text(r))
            served_by = r.headers.get("x-qvac-served-by", "?")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for ch in chunk.get("choices", []):
                    sys.stdout.write(ch.get("text", ""))
                    sys.stdout.flush()
                if chunk.get("x_qvac_served_by"):
                    served_by = ",".join(chunk["x_qvac_served_by"])
            sys.stdout.write("\n")
            if args.verbose:
                print(f"served by {served_by}", file=sys.stderr)
    except httpx.TransportError as e:
        raise CliError(f"no qvacd daemon answers at {_api_base(args)}; start one with"
                       " `qvacd start` (or pass --api HOST:PORT)") from e
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    st = _get(args, "/qvac/status")
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    from models.engine import fmt_bytes

    con = Console()
    con.print(f"[bold]qvacd {st['version']}[/] peer [cyan]{st['peer_id']}[/]"
              f" api http://{st['api']} up {st['uptime_s']:.0f}s")
    con.print(f"memory budget {fmt_bytes(st['memory_budget'])} (in use"
              f" {fmt_bytes(st['memory_used'])}), slots {st['slots_free']}/{st['slots_total']}"
              f" free, queue {st['queue']}, delegate {st['delegate']}")
    for a in st.get("listen_addrs", []):
        con.print(f"listening {a}")
    net = st.get("network") or {}
    if net:
        con.print(f"reachability {net.get('reachability', 'unknown')}"
                  + (", hole punching on" if net.get("hole_punch") else ""))
        for a in net.get("relayed_addrs", []):
            con.print(f"relayed {a}")
        for r in net.get("reservations", []):
            extra = (f" expires in {r['expires_in_s']}s" if "expires_in_s" in r
                     else f" ({r.get('error', '')})")
            found = " (found in the DHT)" if r.get("source") == "dht" else ""
            con.print(f"relay {r['relay']}{found} {r['state']}{extra}")
        svc = net.get("service")
        if svc:
            con.print(f"relay service: {svc['reservations']}/{svc['max_reservations']}"
                      f" reservations, {svc['circuits_active']} circuits,"
                      f" {svc['bytes_relayed']} bytes relayed")
    t = Table("model", "size", "needs", "fits", "loaded", "tok/s")
    for m in st["models"]:
        tps = f"{m['tokens_per_s']:.1f}" if m.get("tokens_per_s") else "-"
        t.add_row(m["name"], fmt_bytes(m["size"]), fmt_bytes(m["memory_estimate"]),
                  "yes" if m["fits_budget"] else "no", "yes" if m["loaded"] else "no", tps)
    con.print(t)
    return 0


def cmd_peers(args: argparse.Namespace) -> int:
    peers = _get(args, "/qvac/peers")["peers"]
    if args.json:
        print(json.dumps(peers, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table("peer", "trust", "roles", "models", "slots", "tok/s", "rtt ms", "path",
              "served", "failed", "verified")
    for p in peers:
        cap = p.get("capacity") or {}
        models = ",".join(m.get("name", "?") for m in cap.get("models", [])) or "-"
        tps = cap.get("tokens_per_s") or {}
        # the current path's own numbers when it has them (delegated tok/s, RTT)
        here = (p.get("paths") or {}).get(p.get("path") or "") or {}
        rtt = here.get("rtt_ms") if here.get("rtt_ms") is not None else p.get("rtt_ms")
        path = p.get("path") or "-"
        if here.get("tokens_per_s"):
            path += f" ({here['tokens_per_s']:.0f} tok/s)"
        age = p.get("verified_age_s")
        t.add_row(p["peer_id"][:14] + "…", "yes" if p.get("trusted") else "no",
                  ",".join(p.get("roles", [])) or "-", models,
                  f"{cap.get('slots_free', '-')}/{cap.get('slots_total', '-')}",
                  f"{max(tps.values()):.0f}" if tps else "-",
                  f"{rtt:.1f}" if isinstance(rtt, (int, float)) else "-",
                  path,
                  str(p.get("served", 0)), str(p.get("failed", 0)),
                  f"{age:.0f}s ago" if isinstance(age, (int, float)) else "-")
    Console(width=None if sys.stdout.isatty() else 160).print(t)
    return 0


# ---- local state ---------------------------------------------------------------------


def _store(args: argparse.Namespace):
    from models.store import ModelStore

    return ModelStore(_data_dir(args))


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
    from models.store import StoreError

    try:
        e = _store(args).remove(args.name)
    except StoreError as err:
        raise CliError(str(err)) from err
    print(f"removed {e.name}")
    return 0


def cmd_id(args: argparse.Namespace) -> int:
    from peers.identity import IdentityError, load_or_create_identity

    from .node import runtime_api

    data_dir = _data_dir(args)
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        ident = load_or_create_identity(data_dir)
    except IdentityError as e:
        raise CliError(str(e)) from e
    print(ident.peer_id_str)
    if runtime_api(data_dir):
        try:
            for a in _get(args, "/qvac/status").get("listen_addrs", []):
                print(a)
        except CliError:
            pass
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    import trio

    from .node import Node, StartupError

    try:
        config = load_config(args)
    except ConfigError as e:
        raise CliError(str(e)) from e
    setup_logging(config.log_level)
    try:
        node = Node(config)
    except StartupError as e:
        raise CliError(str(e)) from e

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)

    try:
        trio.run(main)
    except StartupError as e:
        raise CliError(str(e)) from e
    except BaseExceptionGroup as eg:  # nurseries wrap errors; surface ours as one line
        match, _ = eg.split(StartupError)
        if match is None:
            raise
        first: BaseException = match
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise CliError(str(first)) from None
    finally:
        node.remove_runtime_file()
    logging.getLogger("qvacd.node").info("stopped")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qvacd", description="Peer-to-peer delegated inference daemon.")
    p.add_argument("--version", action="version", version=f"qvacd {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("start", help="run the daemon in the foreground")
    add_start_args(s)
    s.set_defaults(fn=cmd_start)

    def client_args(sp: argparse.ArgumentParser) -> None:
        add_data_dir_arg(sp)
        sp.add_argument("--api", default=None, help="daemon API HOST:PORT (env QVACD_API)")

    s = sub.add_parser("generate", help="stream a completion from the running daemon")
    s.add_argument("prompt")
    s.add_argument("--model", "-m", default="gemma3-270m")
    s.add_argument("--max-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--local-only", action="store_true", help="never send the prompt to a peer")
    s.add_argument("--verbose", "-v", action="store_true", help="print which node served")
    client_args(s)
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("status", help="show the running daemon's state")
    s.add_argument("--json", action="store_true")
    client_args(s)
    s.set_defaults(fn=cmd_status)

    s = sub.add_parser("peers", help="show known peers, their trust and capacity")
    s.add_argument("--json", action="store_true")
    client_args(s)
    s.set_defaults(fn=cmd_peers)

    s = sub.add_parser("id", help="print this node's peer id (and listen addresses)")
    client_args(s)
    s.set_defaults(fn=cmd_id)

    m = sub.add_parser("models", help="manage the local model store").add_subparsers(
        dest="models_cmd", required=True, metavar="ACTION")
    s = m.add_parser("list", help="list models")
    s.add_argument("--json", action="store_true")
    add_data_dir_arg(s)
    s.set_defaults(fn=cmd_models_list)
    s = m.add_parser("add", help="import a GGUF file")
    s.add_argument("path")
    s.add_argument("--name", default=None)
    add_data_dir_arg(s)
    s.set_defaults(fn=cmd_models_add)
    s = m.add_parser("show", help="show a model's metadata and manifest")
    s.add_argument("name")
    add_data_dir_arg(s)
    s.set_defaults(fn=cmd_models_show)
    from .pull_api import add_pull_command

    add_pull_command(m, client_args)
    s = m.add_parser("rm", help="remove a model")
    s.add_argument("name")
    add_data_dir_arg(s)
    s.set_defaults(fn=cmd_models_rm)

    try:
        from .cli_peers import add_peer_commands
    except ImportError:
        pass
    else:
        add_peer_commands(sub, add_data_dir_arg)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except CliError as e:
        print(f"qvacd: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `qvacd id | head -1`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
