"""The `qvacd` command line: `main` and the wiring of every command to its arguments.

One module per command family, each with its `cmd_*` functions:

    daemon.py   start (runs the daemon here), status, generate, id
    models.py   models list|add|show|rm (the local store)
    pull.py     models pull (asks the daemon, draws its progress)
    ps.py       ps (the models the daemon has loaded)
    plan.py     plan MODEL (how the daemon would split a model across workers)
    peers.py    peers (asks the daemon), trust ..., mesh ... (files in the data dir)
    pair.py     pair [CODE] (a one-time code, through the daemon)
    run.py      run MODEL (a chat in the terminal, through the daemon's API)
    service.py  service install|uninstall|status (systemd user unit, launchd agent)

Commands that ask a running daemon go through one small client of its HTTP API
(client.py), like Ollama's CLI; commands that change local state (models, trust, mesh,
id) work on the data dir directly, and a running daemon picks the change up without a
restart. This file holds the argument parser alone, so `qvacd --help` reads as the list
of commands, and the command modules never import each other's wiring.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..config import add_data_dir_arg, add_start_args
from . import daemon, models, pair, peers, plan, ps, pull, run, service
from .common import CliError, add_client_args

__all__ = ["CliError", "build_parser", "main"]

_ROLE_HELP = (
    "comma-separated roles: consumer (may send us inference requests), provider (we may "
    "send it our prompts), seeder (may fetch model shards from us), layers (may place "
    "layers of a split model in our memory)"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qvacd", description="Peer-to-peer delegated inference daemon.")
    p.add_argument("--version", action="version", version=f"qvacd {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("start", help="run the daemon in the foreground")
    add_start_args(s)
    s.set_defaults(fn=daemon.cmd_start)

    s = sub.add_parser("generate", help="stream a completion from the running daemon")
    s.add_argument("prompt")
    s.add_argument("--model", "-m", default="gemma3-270m")
    s.add_argument("--max-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--local-only", action="store_true", help="never send the prompt to a peer")
    s.add_argument("--verbose", "-v", action="store_true", help="print which node served")
    add_client_args(s)
    s.set_defaults(fn=daemon.cmd_generate)

    s = sub.add_parser("ps", help="list the models the running daemon has loaded")
    s.add_argument("--json", action="store_true")
    add_client_args(s)
    s.set_defaults(fn=ps.cmd_ps)

    s = sub.add_parser("plan", help="show how the running daemon would split a model across"
                       " trusted workers (layers per device)")
    s.add_argument("model")
    s.add_argument("--json", action="store_true")
    add_client_args(s)
    s.set_defaults(fn=plan.cmd_plan)

    s = sub.add_parser("status", help="show the running daemon's state")
    s.add_argument("--json", action="store_true")
    add_client_args(s)
    s.set_defaults(fn=daemon.cmd_status)

    s = sub.add_parser("peers", help="show known peers, their trust and capacity")
    s.add_argument("--json", action="store_true")
    add_client_args(s)
    s.set_defaults(fn=peers.cmd_peers)

    s = sub.add_parser("id", help="print this node's peer id (and listen addresses)")
    add_client_args(s)
    s.set_defaults(fn=daemon.cmd_id)

    s = sub.add_parser("run", help="chat with a model in the terminal (/bye exits)")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--max-tokens", type=int, default=None,
                   help="longest answer in tokens (default: until the model stops)")
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--system", default=None, help="a system message that starts the chat")
    s.add_argument("--local-only", action="store_true", help="never send the chat to a peer")
    s.add_argument("--verbose", "-v", action="store_true", help="print which node served")
    add_client_args(s)
    s.set_defaults(fn=run.cmd_run)

    _add_service_commands(sub)
    s = sub.add_parser("pair", help="add a device with a short one-time code (shows one,"
                       " or completes one given)")
    s.add_argument("code", nargs="?", metavar="CODE-OR-LINK",
                   help="the code or link `qvacd pair` shows on the other device")
    s.add_argument("--roles", default=None, help=_ROLE_HELP + "; granted both ways"
                   " (default: all three)")
    s.add_argument("--minutes", type=float, default=None, help="how long the code is valid"
                   " (default 5)")
    s.add_argument("--json", action="store_true", help="print the pairing result as JSON")
    add_client_args(s)
    s.set_defaults(fn=pair.cmd_pair)

    _add_models_commands(sub)
    _add_trust_commands(sub)
    _add_mesh_commands(sub)
    return p


def _add_service_commands(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser(
        "service", help="run the daemon at login (systemd user unit, launchd agent)"
    ).add_subparsers(dest="service_cmd", required=True, metavar="ACTION")
    s = m.add_parser("install", help="install, enable and start the service")
    s.add_argument("--dry-run", action="store_true", help="print the file, touch nothing")
    add_data_dir_arg(s)
    s.set_defaults(fn=service.cmd_service_install)
    s = m.add_parser("uninstall", help="stop, disable and remove the service")
    s.add_argument("--dry-run", action="store_true", help="print what it would do")
    add_data_dir_arg(s)
    s.set_defaults(fn=service.cmd_service_uninstall)
    s = m.add_parser("status", help="installed or not, running or not")
    add_client_args(s)
    s.set_defaults(fn=service.cmd_service_status)


def _add_models_commands(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("models", help="manage the local model store").add_subparsers(
        dest="models_cmd", required=True, metavar="ACTION")
    s = m.add_parser("list", help="list models")
    s.add_argument("--json", action="store_true")
    add_data_dir_arg(s)
    s.set_defaults(fn=models.cmd_models_list)
    s = m.add_parser("add", help="import a GGUF file")
    s.add_argument("path")
    s.add_argument("--name", default=None)
    add_data_dir_arg(s)
    s.set_defaults(fn=models.cmd_models_add)
    s = m.add_parser("show", help="show a model's metadata and manifest")
    s.add_argument("name")
    add_data_dir_arg(s)
    s.set_defaults(fn=models.cmd_models_show)
    s = m.add_parser("pull", help="fetch a model from trusted peers (resumable)")
    s.add_argument("name", help="model name, alias or sha256")
    s.add_argument("--from", dest="from_peer", default=None, metavar="PEERID",
                   help="fetch only from this peer")
    add_client_args(s)
    s.set_defaults(fn=pull.cmd_models_pull)
    s = m.add_parser("rm", help="remove a model (through the daemon when one runs)")
    s.add_argument("name")
    add_client_args(s)
    s.set_defaults(fn=models.cmd_models_rm)


def _add_trust_commands(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "trust", help="who may use this node, and whom it may use (trust.json)"
    ).add_subparsers(dest="trust_cmd", required=True, metavar="ACTION")

    s = t.add_parser("add", help="trust a peer with roles (added to the roles it has)")
    s.add_argument("peer_id", metavar="PEERID", help="the id `qvacd id` prints on that device")
    s.add_argument("--roles", default=None, help=_ROLE_HELP + " (required)")
    s.add_argument("--note", default=None, help="a reminder of which device this is")
    add_data_dir_arg(s)
    s.set_defaults(fn=peers.cmd_trust_add)

    s = t.add_parser("list", help="list trusted peers")
    s.add_argument("--json", action="store_true")
    add_data_dir_arg(s)
    s.set_defaults(fn=peers.cmd_trust_list)

    s = t.add_parser("rm", help="remove a peer, or only some of its roles")
    s.add_argument("peer_id", metavar="PEERID")
    s.add_argument("--roles", default=None, help=_ROLE_HELP + " (default: all)")
    add_data_dir_arg(s)
    s.set_defaults(fn=peers.cmd_trust_rm)


def _add_mesh_commands(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser(
        "mesh", help="admit devices with certificates signed by one owner key"
    ).add_subparsers(dest="mesh_cmd", required=True, metavar="ACTION")

    s = m.add_parser("init", help="create a mesh owner key on this device")
    s.add_argument("--days", default="365",
                   help="validity of this device's own certificate (default 365)")
    add_data_dir_arg(s)
    s.set_defaults(fn=peers.cmd_mesh_init)

    s = m.add_parser("invite", help="sign a certificate for a peer (printed alone on stdout)")
    s.add_argument("peer_id", metavar="PEERID", help="the id `qvacd id` prints on that device")
    s.add_argument("--roles", default=None, help=_ROLE_HELP + " (required)")
    s.add_argument("--days", required=True, help="how many days the certificate is valid")
    add_data_dir_arg(s)
    s.set_defaults(fn=peers.cmd_mesh_invite)

    s = m.add_parser("join", help="join a mesh with a certificate made for this device")
    s.add_argument("cert", metavar="CERT", help="the string `qvacd mesh invite` printed, or - for"
                   " stdin")
    add_data_dir_arg(s)
    s.set_defaults(fn=peers.cmd_mesh_join)

    s = m.add_parser("revoke", help="refuse a peer's or a certificate's mesh membership here")
    s.add_argument("target", metavar="PEERID|SERIAL")
    add_data_dir_arg(s)
    s.set_defaults(fn=peers.cmd_mesh_revoke)

    s = m.add_parser("leave", help="forget the mesh owner and this device's certificate")
    add_data_dir_arg(s)
    s.set_defaults(fn=peers.cmd_mesh_leave)

    s = m.add_parser("status", help="mesh owner, this device's certificate, revocations")
    s.add_argument("--json", action="store_true")
    add_data_dir_arg(s)
    s.set_defaults(fn=peers.cmd_mesh_status)

    s = m.add_parser("list", help="certificates issued on this (owner) device, with serials")
    s.add_argument("--json", action="store_true")
    add_data_dir_arg(s)
    s.set_defaults(fn=peers.cmd_mesh_list)


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
