"""`qvacd start`, `status`, `generate`, `id`: run the daemon, or ask the running one.

`start` runs the daemon in the foreground in this process. `status` and `generate` ask
the running daemon through its HTTP API (DaemonClient). `id` works on the data dir by
design: it reads (or creates) the identity key, so it answers with no daemon running,
and only asks a running daemon for its listen addresses.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ..config import ConfigError, load_config
from ..daemon_file import running_daemon_api
from ..logs import setup_logging
import qvacd.cli.terminal as terminal
from .client import DaemonClient
from .common import CliError, data_dir_of


def cmd_start(args: argparse.Namespace) -> int:
    import trio

    from ..node import Node, StartupError

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


def cmd_generate(args: argparse.Namespace) -> int:
    body = {"model": args.model, "prompt": args.prompt, "stream": True,
            "max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.seed is not None:
        body["seed"] = args.seed
    headers = {"X-Qvac-Local-Only": "1"} if args.local_only else {}
    with DaemonClient.for_args(args).stream("POST", "/v1/completions", body=body,
                                            headers=headers) as r:
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
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    st = DaemonClient.for_args(args).get_json("/qvac/status")
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    cols = terminal.width()
    for line in status_lines(st, cols):
        print(line)
    return 0


def status_lines(st: dict, cols: int) -> list[str]:
    """`qvacd status` as lines of at most `cols` characters (80 columns read well): the
    peer id whole on a line of its own (it is what `qvacd trust add` wants), every other
    peer id short, long lists folded by us rather than wrapped by the terminal."""
    from models.engine import fmt_bytes

    own = st["peer_id"]
    logical = [
        f"qvacd {st['version']}, up {_age(st['uptime_s'])}, api http://{st['api']}",
        f"peer {own}",
        f"memory budget {fmt_bytes(st['memory_budget'])} ({fmt_bytes(st['memory_used'])}"
        f" in use), delegate {st['delegate']}",
        f"sequences {st['slots_free']}/{st['slots_total']} free"
        f" (parallel {st.get('parallel', '-')}), queue {st['queue']},"
        f" {st.get('aggregate_tokens_per_s', 0):.1f} tok/s (last 10 s)",
    ]
    lines = [x for ln in logical for x in terminal.wrap(ln, cols)]
    addrs = [terminal.short_addr(a, own) for a in st.get("listen_addrs", [])]
    if addrs:
        lines += terminal.fold("listening ", addrs, cols)
    net = st.get("network") or {}
    if net:
        lines += terminal.wrap(f"reachability {net.get('reachability', 'unknown')}"
                               + (", hole punching on" if net.get("hole_punch") else ""), cols)
        relayed = [terminal.short_addr(a, own) for a in net.get("relayed_addrs", [])]
        if relayed:
            lines += terminal.fold("relayed ", relayed, cols)
        for r in net.get("reservations", []):
            extra = (f", expires in {_age(r['expires_in_s'])}" if "expires_in_s" in r
                     else f" ({r.get('error', '')})")
            found = " (found in the DHT)" if r.get("source") == "dht" else ""
            lines += terminal.wrap(f"relay {terminal.short_id(r['relay'])}{found}"
                                   f" {r['state']}{extra}", cols)
        svc = net.get("service")
        if svc:
            lines += terminal.wrap(
                f"relay service: {svc['reservations']}/{svc['max_reservations']}"
                f" reservations, {svc['circuits_active']} circuits,"
                f" {fmt_bytes(svc['bytes_relayed'])} relayed", cols)
    if st["models"]:
        rows = []
        for m in st["models"]:
            tps = f"{m['tokens_per_s']:.1f}" if m.get("tokens_per_s") else "-"
            rows.append([m["name"], fmt_bytes(m["size"]), fmt_bytes(m["memory_estimate"]),
                         "yes" if m["fits_budget"] else "no", "yes" if m["loaded"] else "no",
                         str(m.get("parallel", "-")), tps])
        lines.append("")
        lines += terminal.table(["MODEL", "SIZE", "NEEDS", "FITS", "LOADED", "SEQS", "TOK/S"],
                                rows, cols, right=(1, 2, 5, 6), shrink=(0,))
    else:
        lines += terminal.wrap("no models here; `qvacd models pull NAME` fetches one from"
                               " a peer, `qvacd models add FILE.gguf` imports one", cols)
    return lines


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def cmd_id(args: argparse.Namespace) -> int:
    """Works on the data dir by design (reads or creates the identity key), so it answers
    with no daemon running; a running daemon is asked only for its listen addresses."""
    from peers.identity import IdentityError, load_or_create_identity

    where = data_dir_of(args)
    where.mkdir(parents=True, exist_ok=True)
    try:
        ident = load_or_create_identity(where)
    except IdentityError as e:
        raise CliError(str(e)) from e
    print(ident.peer_id_str)
    if running_daemon_api(where):
        try:
            for a in DaemonClient.for_args(args).get_json("/qvac/status").get(
                    "listen_addrs", []):
                print(a)
        except CliError:
            pass
    return 0
