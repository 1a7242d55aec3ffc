"""`qvacd peers`, `qvacd trust ...` and `qvacd mesh ...`: who is out there, and who may do
what with this node.

`peers` asks the running daemon (its peer table, through DaemonClient). `trust` and
`mesh` work on files in the data dir by design (trust.json, mesh.json, mesh-owner.key)
and never talk to a running daemon: the daemon's stores re-read those files when they
change, so edits take effect without a restart, and they work with no daemon running.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import qvacd.cli.terminal as terminal
from .client import DaemonClient
from .common import CliError, data_dir_of


class _Fail(Exception):
    """A one-line error from this module; turned into CliError by _command."""


def _command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run `fn`, turning the library's errors into one-line CLI errors."""

    def run(args: argparse.Namespace) -> int:
        from peers.identity import IdentityError
        from peers.mesh import MeshError
        from peers.trust import TrustError

        try:
            return fn(args)
        except (_Fail, TrustError, MeshError, IdentityError) as exc:
            raise CliError(" ".join(str(exc).split())) from exc
        except OSError as exc:
            where = f" {exc.filename}" if exc.filename else ""
            raise CliError(
                f"cannot access{where} ({exc.strerror or exc}); check the data dir's "
                f"permissions and free space"
            ) from exc

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


# ---- helpers --------------------------------------------------------------------------


def _roles(text: str | None) -> frozenset[str]:
    from peers.trust import ROLES, parse_roles

    if text is None:
        raise _Fail(
            f"no roles given; add --roles with one or more of {','.join(ROLES)} "
            f"(comma-separated)"
        )
    try:
        return parse_roles(text)
    except ValueError as exc:
        raise _Fail(f"{exc} (comma-separated, e.g. --roles consumer,provider)") from None


def _peer_id(text: str) -> str:
    from peers.trust import parse_peer_id

    try:
        return parse_peer_id(text.strip())
    except ValueError as exc:
        raise _Fail(str(exc)) from None


def _roles_str(roles: Any) -> str:
    from peers.trust import ROLES

    return ",".join(r for r in ROLES if r in roles) or "-"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _days(text: str) -> float:
    from peers.mesh import MAX_DAYS

    try:
        days = float(text)
    except ValueError:
        days = float("nan")
    if not 0 < days <= MAX_DAYS:  # also false for nan
        raise _Fail(
            f"--days {text} is not a number of days above 0 and at most {MAX_DAYS}; "
            f"a certificate must be valid for some time (e.g. --days 365)"
        )
    return days


def _own_peer_id(data_dir: Path, create: bool) -> str | None:
    """This device's peer id; created with the identity key only if `create`."""
    from peers.identity import IDENTITY_FILE, PURPOSE_NODE, load_or_create_identity, read_key_file

    if create:
        data_dir.mkdir(parents=True, exist_ok=True)
        return load_or_create_identity(data_dir).peer_id_str
    path = data_dir / IDENTITY_FILE
    if not path.exists():
        return None
    from libp2p.peer.id import ID

    return ID.from_pubkey(read_key_file(path, PURPOSE_NODE).public_key).to_base58()


def _fingerprint(owner_key: bytes) -> str:
    """A short, human-comparable form of the owner public key."""
    h = hashlib.sha256(owner_key).hexdigest()[:16]
    return ":".join(h[i : i + 4] for i in range(0, 16, 4))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _mesh(data_dir: Path, own: str | None = None):
    from peers.mesh import MeshStore

    return MeshStore(data_dir, own_peer_id=own)


def _issued(mesh: Any) -> list[dict[str, Any]]:
    """The owner's log of certificates issued on this device (empty elsewhere).

    MeshStore keeps it in mesh.json but has no public accessor; read the parsed state.
    """
    try:
        issued = mesh._fresh().issued
    except AttributeError:
        return []
    return [dict(i) for i in issued if isinstance(i, dict)]


def _issued_view(mesh: Any, now: float) -> list[dict[str, Any]]:
    revoked_serials, revoked_peers = mesh.revoked_serials, mesh.revoked_peers
    out = []
    for i in _issued(mesh):
        expires = i.get("expires")
        if i.get("serial") in revoked_serials:
            state = "revoked (serial)"
        elif i.get("peer") in revoked_peers:
            state = "revoked (peer)"
        elif isinstance(expires, int) and expires <= now:
            state = "expired"
        else:
            state = "valid"
        out.append(
            {
                "peer_id": i.get("peer"),
                "roles": [r for r in i.get("roles", []) if isinstance(r, str)],
                "serial": i.get("serial"),
                "expires": _iso(expires) if isinstance(expires, int) else None,
                "state": state,
            }
        )
    return out


def _print_rows(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())


# ---- peers ----------------------------------------------------------------------------


def cmd_peers(args: argparse.Namespace) -> int:
    peers = DaemonClient.for_args(args).get_json("/qvac/peers")["peers"]
    if args.json:
        print(json.dumps(peers, indent=2))
        return 0
    for line in peers_lines(peers, terminal.width()):
        print(line)
    return 0


_ROLE_SHORT = {"consumer": "cons", "provider": "prov", "seeder": "seed", "layers": "layr"}


def peers_lines(peers: list[dict[str, Any]], cols: int) -> list[str]:
    """The peer table in `cols` characters (80 read well): one row of numbers per peer,
    short peer ids (`--json` has them whole), and under each row, indented, what does
    not fit a column: its models, the measured tokens/s of the path in use, failures."""
    if not peers:
        return terminal.wrap("no peers known yet; on a LAN they appear within seconds"
                             " (mDNS), beyond it start the daemon with --bootstrap ADDR", cols)
    header = ["PEER", "ROLES", "PATH", "RTT ms", "TOK/S", "SLOTS", "OK/FAIL", "CHECKED"]
    body: list[list[str]] = []
    notes: list[list[str]] = []
    for p in peers:
        cap = p.get("capacity") or {}
        tps = cap.get("tokens_per_s") or {}
        # the current path's own numbers when it has them (delegated tok/s, RTT)
        here = (p.get("paths") or {}).get(p.get("path") or "") or {}
        rtt = here.get("rtt_ms") if here.get("rtt_ms") is not None else p.get("rtt_ms")
        age = p.get("verified_age_s")
        roles = ",".join(_ROLE_SHORT.get(r, r) for r in p.get("roles", []))
        body.append([
            terminal.short_id(p["peer_id"]),
            roles if p.get("trusted") and roles else "untrusted",
            p.get("path") or "-",
            f"{rtt:.1f}" if isinstance(rtt, (int, float)) else "-",
            f"{max(tps.values()):.0f}" if tps else "-",
            f"{cap.get('slots_free', '-')}/{cap.get('slots_total', '-')}" if cap else "-",
            f"{p.get('served', 0)}/{p.get('failed', 0)}",
            f"{age:.0f}s ago" if isinstance(age, (int, float)) else "never",
        ])
        note: list[str] = []
        models = [m.get("name", "?") for m in cap.get("models", [])]
        if models:
            note += terminal.fold("  models ", models, cols)
        extra = []
        if here.get("tokens_per_s"):
            extra.append(f"delegated {here['tokens_per_s']:.0f} tok/s over {p['path']}")
        if p.get("last_error"):
            extra.append(terminal.cut(f"last error: {p['last_error']}", cols - 4))
        if p.get("backoff_s"):
            extra.append(f"backing off {p['backoff_s']:.0f}s")
        notes.append(note + (terminal.fold("  ", extra, cols, sep="; ") if extra else []))
    # a narrow terminal loses whole columns, least telling first, before any cell is cut;
    # what they held moves to the peer's indented lines
    keep = list(range(len(header)))
    moved: list[int] = []
    for drop in (7, 3, 6):
        if _natural_width(header, body, keep) <= cols:
            break
        keep.remove(drop)
        moved.insert(0, drop)
    if moved:
        for row, note in zip(body, notes, strict=True):
            note[:0] = terminal.fold("  ", [f"{header[i].lower()} {row[i]}" for i in moved],
                                     cols)
    table = terminal.table([header[i] for i in keep], [[r[i] for i in keep] for r in body],
                           cols, right=[k for k, i in enumerate(keep) if i in (3, 4, 5, 6)],
                           shrink=[k for k, i in enumerate(keep) if i in (1, 2)])
    lines = table[:1]
    for row, note in zip(table[1:], notes, strict=True):
        lines += [row, *note]
    return lines


def _natural_width(header: list[str], body: list[list[str]], keep: list[int]) -> int:
    return sum(max(len(header[i]), *(len(r[i]) for r in body)) for i in keep) \
        + 2 * (len(keep) - 1)


# ---- trust ----------------------------------------------------------------------------


@_command
def cmd_trust_add(args: argparse.Namespace) -> int:
    from peers.trust import TrustStore

    data_dir = data_dir_of(args)
    pid = _peer_id(args.peer_id)
    roles = _roles(args.roles)
    try:
        own = _own_peer_id(data_dir, create=False)
    except Exception:  # why: a broken identity file is not this command's business
        own = None
    if own is not None and pid == own:
        raise _Fail(
            f"{pid} is this device's own peer id; run `qvacd id` on the other device "
            f"and trust the id it prints"
        )
    store = TrustStore.in_dir(data_dir)
    before = store.get(pid)
    entry = store.add(pid, roles, note=args.note)
    verb = "updated" if before is not None else "trusted"
    note = f" ({entry.note})" if entry.note else ""
    print(f"{verb} {pid}{note} as {_roles_str(entry.roles)}; a running daemon picks this up now")
    return 0


@_command
def cmd_trust_rm(args: argparse.Namespace) -> int:
    from peers.trust import TrustStore

    data_dir = data_dir_of(args)
    pid = _peer_id(args.peer_id)
    drop = _roles(args.roles) if args.roles is not None else None
    store = TrustStore.in_dir(data_dir)
    before = store.get(pid)
    if before is None:
        raise _Fail(
            f"{pid} is not in the trust file {store.path}; `qvacd trust list` shows who is"
            " (peers admitted by a mesh certificate are removed with `qvacd mesh revoke`)"
        )
    if drop is not None and not (drop & before.roles):
        raise _Fail(
            f"{pid} does not have role(s) {_roles_str(drop)}; it has {_roles_str(before.roles)}"
        )
    store.remove(pid, drop)
    after = store.get(pid)
    if after is None:
        print(f"removed {pid} from the trust file")
    else:
        print(f"removed role(s) {_roles_str(drop or ())} from {pid}; it keeps"
              f" {_roles_str(after.roles)}")
    return 0


@_command
def cmd_trust_list(args: argparse.Namespace) -> int:
    import time

    from peers.trust import TrustStore

    data_dir = data_dir_of(args)
    store = TrustStore.in_dir(data_dir)
    entries = store.list()
    mesh = _mesh(data_dir)
    now = time.time()
    mesh_rows = _issued_view(mesh, now) if mesh.owner_key is not None else []
    if args.json:
        print(json.dumps({
            "trust_file": str(store.path),
            "peers": [{"peer_id": e.peer_id, **e.to_json()} for e in entries],
            "mesh_certificates": mesh_rows,
        }, indent=2))
        return 0
    if entries:
        _print_rows(["PEER", "ROLES", "ADDED", "NOTE"],
                    [[e.peer_id, _roles_str(e.roles), e.added, e.note] for e in entries])
    else:
        print(f"no peers in {store.path}; add one with"
              " `qvacd trust add PEERID --roles consumer,provider,seeder`")
    if mesh_rows:
        print("\ncertificates issued by this mesh owner:")
        _print_rows(["PEER", "ROLES", "EXPIRES", "SERIAL", "STATE"],
                    [[str(r["peer_id"]), _roles_str(r["roles"]), str(r["expires"]),
                      str(r["serial"]), r["state"]] for r in mesh_rows])
    elif mesh.owner_key is not None:
        print("\nthis device is in a mesh: peers with a valid certificate from its owner are"
              " trusted too (`qvacd peers` shows them)")
    return 0


# ---- mesh -----------------------------------------------------------------------------


@_command
def cmd_mesh_init(args: argparse.Namespace) -> int:
    from peers.mesh import owner_id

    days = _days(args.days)
    data_dir = data_dir_of(args)
    own = _own_peer_id(data_dir, create=True)
    mesh = _mesh(data_dir, own)
    owner = mesh.init(days=days)  # type: ignore[arg-type]
    cert = mesh.own_certificate
    print(f"created mesh owner key {mesh.owner_key_path}; back it up and keep it secret:"
          " whoever holds it can admit devices to this mesh")
    print(f"mesh owner {owner_id(owner)} (fingerprint {_fingerprint(owner)})")
    if cert:
        from peers.mesh import parse_certificate

        c = parse_certificate(cert)
        print(f"this device {own} holds a certificate for {_roles_str(c.roles)}"
              f" until {_iso(c.expires)}")
    print("next: run `qvacd id` on another device, then here:"
          " `qvacd mesh invite PEERID --roles consumer,provider,seeder --days 365`,"
          " and on that device: `qvacd mesh join CERT`")
    return 0


@_command
def cmd_mesh_invite(args: argparse.Namespace) -> int:
    from peers.mesh import parse_certificate

    pid = _peer_id(args.peer_id)
    roles = _roles(args.roles)
    days = _days(args.days)
    mesh = _mesh(data_dir_of(args))
    text = mesh.invite(pid, roles, days)
    c = parse_certificate(text)
    print(text)  # only the certificate on stdout, so it can be piped to `mesh join -`
    sys.stdout.flush()
    print(f"certificate {c.serial} for {pid}: {_roles_str(c.roles)} until {_iso(c.expires)};"
          " on that device run `qvacd mesh join CERT` (or `-` to read it from stdin)",
          file=sys.stderr)
    return 0


@_command
def cmd_mesh_join(args: argparse.Namespace) -> int:
    from peers.mesh import MAX_CERT_LEN

    text = args.cert
    if text == "-":
        text = sys.stdin.read(MAX_CERT_LEN * 4)
        if not text.strip():
            raise _Fail("no certificate on stdin; pipe in the string `qvacd mesh invite` printed")
    text = text.strip()
    data_dir = data_dir_of(args)
    own = _own_peer_id(data_dir, create=True)
    mesh = _mesh(data_dir, own)
    cert = mesh.join(text)
    print(f"joined the mesh of owner {cert.owner_id} (fingerprint {_fingerprint(cert.owner_key)})"
          f" as {_roles_str(cert.roles)} until {_iso(cert.expires)}; a running daemon"
          " presents the certificate to its peers now")
    return 0


@_command
def cmd_mesh_revoke(args: argparse.Namespace) -> int:
    mesh = _mesh(data_dir_of(args))
    what = mesh.revoke(args.target)
    print(f"revoked {what} on this device; revocations are not shared, so run the same"
          " command on every device of the mesh")
    return 0


@_command
def cmd_mesh_leave(args: argparse.Namespace) -> int:
    from peers.mesh import owner_id

    mesh = _mesh(data_dir_of(args))
    owner = mesh.owner_key
    if owner is None and mesh.own_certificate is None:
        print("this device is in no mesh; nothing to leave")
        return 0
    mesh.leave()
    print(f"left the mesh of owner {owner_id(owner) if owner else '?'}; revocations are kept")
    if mesh.is_owner:
        print(f"the owner key {mesh.owner_key_path} stays; move it away before a new"
              " `qvacd mesh init`, or `qvacd mesh join` an invite it signs")
    return 0


def _mesh_status(data_dir: Path) -> dict[str, Any]:
    import time

    from peers.mesh import MeshError, owner_id, parse_certificate

    own = _own_peer_id(data_dir, create=False)
    mesh = _mesh(data_dir, own)
    now = time.time()
    owner = mesh.owner_key
    st: dict[str, Any] = {
        "peer_id": own,
        "in_mesh": owner is not None,
        "is_owner": mesh.is_owner,
        "owner_id": owner_id(owner) if owner else None,
        "owner_fingerprint": _fingerprint(owner) if owner else None,
        "owner_public_key": _b64(owner) if owner else None,
        "certificate": None,
        "revoked_serials": sorted(mesh.revoked_serials),
        "revoked_peers": sorted(mesh.revoked_peers),
    }
    text = mesh.own_certificate
    if text:
        c: dict[str, Any] = {"text": text}
        try:
            cert = parse_certificate(text)
            c.update(peer_id=cert.peer_id, roles=_roles_str(cert.roles).split(","),
                     serial=cert.serial, issued=_iso(cert.issued), expires=_iso(cert.expires))
            if owner is not None:
                mesh.verify(text, now=now, peer_id=own or cert.peer_id)
            c["valid"], c["problem"] = True, None
        except MeshError as exc:
            c["valid"], c["problem"] = False, str(exc)
        st["certificate"] = c
    if mesh.is_owner:
        st["issued"] = _issued_view(mesh, now)
    return st


@_command
def cmd_mesh_status(args: argparse.Namespace) -> int:
    st = _mesh_status(data_dir_of(args))
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    if not st["in_mesh"] and st["is_owner"]:
        print("this device holds a mesh owner key but is in no mesh (it left); rejoin with"
              " `qvacd mesh join CERT` using an invite it signs (`qvacd mesh invite`)")
    elif not st["in_mesh"]:
        print("this device is in no mesh; start one with `qvacd mesh init`, or join one with"
              " `qvacd mesh join CERT` (an invite from the mesh owner)")
    else:
        role = "owner of" if st["is_owner"] else "member of"
        print(f"{role} the mesh of {st['owner_id']} (fingerprint {st['owner_fingerprint']})")
    c = st["certificate"]
    if c is not None:
        if c.get("roles") is not None:
            state = "valid" if c["valid"] else f"NOT VALID: {c['problem']}"
            print(f"certificate {c['serial']}: {_roles_str(c['roles'])} until {c['expires']}"
                  f" ({state})")
        else:
            print(f"certificate NOT VALID: {c['problem']}")
    elif st["in_mesh"]:
        print("this device holds no certificate of its own; ask the owner for an invite")
    if st["revoked_serials"] or st["revoked_peers"]:
        print("revoked: " + ", ".join([*(f"serial {s}" for s in st["revoked_serials"]),
                                       *(f"peer {p}" for p in st["revoked_peers"])]))
    else:
        print("revoked: none")
    if st.get("issued"):
        valid = sum(1 for i in st["issued"] if i["state"] == "valid")
        print(f"issued {len(st['issued'])} certificate(s), {valid} still valid;"
              " `qvacd mesh list` shows them")
    return 0


@_command
def cmd_mesh_list(args: argparse.Namespace) -> int:
    import time

    mesh = _mesh(data_dir_of(args))
    if not mesh.is_owner:
        raise _Fail(f"this device holds no mesh owner key ({mesh.owner_key_path}); only the"
                    " device that ran `qvacd mesh init` keeps the list of issued certificates")
    rows = _issued_view(mesh, time.time())
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no certificates issued yet; `qvacd mesh invite PEERID --roles ... --days N`")
        return 0
    _print_rows(["SERIAL", "PEER", "ROLES", "EXPIRES", "STATE"],
                [[str(r["serial"]), str(r["peer_id"]), _roles_str(r["roles"]),
                  str(r["expires"]), r["state"]] for r in rows])
    return 0
