"""`qvacd pair`: add a device with a short one-time code (qvacd/pairing.py does the work).

    qvacd pair [--roles R,...] [--minutes N]   make an offer: prints `code: 7-4821-0953`
                                               (and `link: qvac://pair/...@...` for a peer
                                               beyond the LAN), waits until paired,
                                               expired, closed, or Ctrl-C (which cancels it)
    qvacd pair CODE-OR-LINK                    complete it on the other device

Both talk to the running daemon through its HTTP API (POST /qvac/pair, GET
/qvac/pair/N?wait=, DELETE /qvac/pair/N, POST /qvac/pair/join), since the daemon holds
the peer connections the pairing runs on.
"""

from __future__ import annotations

import argparse
import json

from .client import DaemonClient
from .common import CliError

WAIT_S = 25.0  # one long poll; the route holds it until the offer changes
JOIN_TIMEOUT_S = 90.0


def cmd_pair(args: argparse.Namespace) -> int:
    client = DaemonClient.for_args(args)
    if args.code:
        return _join(client, args)
    return _offer(client, args)


def _join(client: DaemonClient, args: argparse.Namespace) -> int:
    if args.roles is not None or args.minutes is not None:
        raise CliError("--roles and --minutes belong to the device that shows the code;"
                       " here run only `qvacd pair CODE`")
    out = client.send_json("POST", "/qvac/pair/join", {"code": args.code},
                           timeout_s=JOIN_TIMEOUT_S)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"paired with {out['peer_id']}; trusted as {','.join(out['roles'])}")
    return 0


def _offer(client: DaemonClient, args: argparse.Namespace) -> int:
    body: dict[str, object] = {}
    if args.roles is not None:
        body["roles"] = args.roles
    if args.minutes is not None:
        body["minutes"] = args.minutes
    offer = client.send_json("POST", "/qvac/pair", body)
    number = offer["offer"]
    print(f"code: {offer['code']}", flush=True)
    if offer.get("link"):
        print(f"link: {offer['link']}", flush=True)
    minutes = offer["expires_in_s"] / 60
    print(f"on the other device run `qvacd pair {offer['code']}` (valid {minutes:.1f} min,"
          f" roles {','.join(offer['roles'])}; Ctrl-C cancels)", flush=True)
    failed = 0
    try:
        while True:
            view = client.send_json("GET", f"/qvac/pair/{number}?wait={WAIT_S:g}",
                                    timeout_s=WAIT_S + 10)
            if view["failed_attempts"] > failed and view["state"] in ("open", "dead"):
                failed = view["failed_attempts"]
                print(f"a wrong code was tried ({failed} of {view['max_failed_attempts']});"
                      " nothing trusted", flush=True)
            state = view["state"]
            if state == "paired":
                print(f"paired with {view['peer_id']}; trusted as {','.join(view['roles'])}")
                return 0
            if state == "expired":
                raise CliError("the code expired unused; nothing trusted; run `qvacd pair`"
                               " again for a new one")
            if state == "dead":
                raise CliError(f"offer closed after {failed} wrong codes; nothing trusted; run"
                               " `qvacd pair` again for a new code")
            if state == "cancelled":
                raise CliError("the offer was cancelled; run `qvacd pair` again")
    except KeyboardInterrupt:
        try:
            client.send_json("DELETE", f"/qvac/pair/{number}")
        except CliError:
            pass
        print("cancelled; the code no longer works")
        return 130
