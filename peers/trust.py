"""Who may do what: peer ids with roles, from `data_dir/trust.json` and mesh certificates.

Roles (what a peer may do with *us*):
    consumer  may send us inference requests
    provider  we may send our prompts to it
    seeder    may fetch model shards from us
    layers    may place layers of a split model in our memory and run them here
              (llama.cpp RPC over /qvac/layers/1.0.0; never granted by default)

trust.json (written atomically, mode 0600):

    {"version": 1,
     "peers": {"12D3KooW...": {"roles": ["consumer"], "added": "2026-11-26T08:00:00Z",
                               "note": "laptop"}}}

The CLI edits the file from another process while the daemon runs, so the daemon's
TrustStore re-reads it whenever its stat signature (mtime, size, inode) changes; one
`os.stat` per check is cheap next to a libp2p stream.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from libp2p.crypto.pb import crypto_pb2
from libp2p.peer.id import ID

log = logging.getLogger(__name__)

TRUST_FILE = "trust.json"
ROLES = ("consumer", "provider", "seeder", "layers")
# What a mesh owner's own certificate grants its device (nodes before "layers" existed
# refuse a certificate naming a role they do not know, so that one is granted explicitly).
BASE_ROLES = ("consumer", "provider", "seeder")
_VERSION = 1
_MAX_NOTE = 200
_MAX_TRUST_FILE = 4 * 1024 * 1024


class TrustError(Exception):
    """The trust file is unusable, or a trust change was refused."""


# ---------------------------------------------------------------------------------------
# validation helpers (also used by peers/mesh.py)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated multihash")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def parse_peer_id(value: str | ID) -> str:
    """The canonical base58 form of a peer id; ValueError with a readable reason otherwise."""
    if isinstance(value, ID):
        return value.to_base58()
    if not isinstance(value, str) or not value or len(value) > 128:
        raise ValueError(f"not a valid peer id {value!r}; copy it from `qvacd id` on that device")
    try:
        pid = ID.from_base58(value)  # why: accepts any base58, so check the multihash too
        raw = pid.to_bytes()
        code, pos = _read_varint(raw, 0)
        length, pos = _read_varint(raw, pos)
        digest = raw[pos:]
        if len(digest) != length:
            raise ValueError("multihash length mismatch")
        if code == 0x00:  # identity multihash: the public key itself (Ed25519 etc.)
            if length > 42:
                raise ValueError("inline key too long")
            crypto_pb2.PublicKey.FromString(digest)
        elif code == 0x12:  # sha2-256 of a larger key (RSA)
            if length != 32:
                raise ValueError("sha2-256 digest must be 32 bytes")
        else:
            raise ValueError(f"unsupported multihash code {code}")
        if pid.to_base58() != value:
            raise ValueError("not in canonical form")
    except Exception as exc:
        raise ValueError(
            f"not a valid peer id {value!r} ({exc}); copy it from `qvacd id` on that device"
        ) from None
    return value


def parse_roles(roles: Iterable[str] | str) -> frozenset[str]:
    if isinstance(roles, str):
        roles = [r for r in roles.replace(",", " ").split() if r]
    out = set()
    for r in roles:
        if r not in ROLES:
            raise ValueError(f"unknown role {r!r}; roles are {', '.join(ROLES)}")
        out.add(r)
    if not out:
        raise ValueError(f"no roles given; choose from {', '.join(ROLES)}")
    return frozenset(out)


def _sorted_roles(roles: Iterable[str]) -> list[str]:
    return [r for r in ROLES if r in roles]


# ---------------------------------------------------------------------------------------
# small file helpers (also used by peers/mesh.py)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Replace `path` with `obj` as JSON: temp file + fsync + rename, so readers never
    see a half-written file, even if we crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on `path.lock`, so two CLI runs don't lose each other's edit."""
    try:
        import fcntl
    except ImportError:  # why: Windows has no flock; atomic rename still prevents corruption
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


StatSig = tuple[int, int, int, int] | None


def stat_sig(path: Path) -> StatSig:
    """What changes when the file is replaced or edited; None if it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)


def read_json_file(path: Path, max_size: int, err: type[Exception], what: str) -> Any:
    """Parse JSON from `path`, or raise `err` naming the path; None if the file is absent."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_size + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise err(
            f"cannot read {what} {path} ({exc.strerror or exc}); fix its permissions"
        ) from None
    if len(data) > max_size:
        raise err(f"{what} {path} is larger than {max_size} bytes; restore it from a backup")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise err(
            f"{what} {path} is not valid JSON ({exc}); fix it by hand or restore it from a backup"
        ) from None


# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrustEntry:
    peer_id: str
    roles: frozenset[str]
    added: str  # ISO 8601 UTC
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"roles": _sorted_roles(self.roles), "added": self.added, "note": self.note}


class MeshRoles(Protocol):
    """What TrustStore needs from peers.mesh.MeshStore."""

    def roles_for(self, peer_id: str, *, now: float | None = None) -> frozenset[str]: ...


def _parse_trust(obj: Any, path: Path) -> dict[str, TrustEntry]:
    def bad(problem: str) -> TrustError:
        return TrustError(
            f"trust file {path} {problem}; fix it by hand, restore it from a backup, "
            f"or move it away to start with no trusted peers"
        )

    if obj is None:
        return {}
    if not isinstance(obj, dict) or obj.get("version") != _VERSION:
        raise bad(f"is not a version {_VERSION} trust file")
    peers = obj.get("peers")
    if not isinstance(peers, dict):
        raise bad('has no "peers" object')
    out: dict[str, TrustEntry] = {}
    for pid, entry in peers.items():
        try:
            parse_peer_id(pid)
        except ValueError as exc:
            raise bad(f"has an invalid entry: {exc}") from None
        if not isinstance(entry, dict):
            raise bad(f"has a non-object entry for {pid}")
        roles, added, note = entry.get("roles"), entry.get("added", ""), entry.get("note", "")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise bad(f"has no roles list for {pid}")
        unknown = [r for r in roles if r not in ROLES]
        if unknown:
            raise bad(f"has unknown role {unknown[0]!r} for {pid} (roles are {', '.join(ROLES)})")
        if not isinstance(added, str) or not isinstance(note, str):
            raise bad(f"has a non-string added/note for {pid}")
        out[pid] = TrustEntry(pid, frozenset(roles), added, note)
    return out


class TrustStore:
    """Explicit per-peer trust (trust.json) plus, optionally, mesh certificates.

    Raises TrustError at construction if the file is corrupt (the daemon refuses to start).
    If the file goes bad while the daemon runs, explicit trust fails closed (no peer is
    trusted through trust.json) and the error is logged and kept in `self.error` until
    the file is fixed; mesh certificates keep working.
    """

    def __init__(self, path: Path, mesh: MeshRoles | None = None) -> None:
        self.path = Path(path)
        self.mesh = mesh
        self.error: str | None = None
        self._sig: StatSig = None
        self._entries: dict[str, TrustEntry] = {}
        self._load()

    @classmethod
    def in_dir(cls, data_dir: Path, mesh: MeshRoles | None = None) -> TrustStore:
        return cls(Path(data_dir) / TRUST_FILE, mesh)

    def _load(self) -> None:
        sig = stat_sig(self.path)
        entries = _parse_trust(
            read_json_file(self.path, _MAX_TRUST_FILE, TrustError, "trust file"), self.path
        )
        self._entries, self._sig, self.error = entries, sig, None

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed since we last read it. Raises TrustError."""
        if stat_sig(self.path) == self._sig:
            if self.error is not None:  # still the broken file we already saw
                raise TrustError(self.error)
            return False
        self._load()
        return True

    def _fresh(self) -> dict[str, TrustEntry]:
        sig = stat_sig(self.path)
        if sig == self._sig:
            return self._entries
        try:
            self._load()
        except TrustError as exc:
            if self.error != str(exc):
                log.error("%s (trusting no peers through it until fixed)", exc)
            self._entries, self._sig, self.error = {}, sig, str(exc)
        return self._entries

    # -- edits (the CLI's side) --

    def _edit(self) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.path)

    def _write(self, entries: dict[str, TrustEntry]) -> None:
        atomic_write_json(
            self.path,
            {"version": _VERSION, "peers": {p: e.to_json() for p, e in sorted(entries.items())}},
        )
        self._entries, self._sig, self.error = entries, stat_sig(self.path), None

    def add(
        self, peer_id: str | ID, roles: Iterable[str] | str, note: str | None = None
    ) -> TrustEntry:
        """Trust `peer_id` with `roles` (added to any roles it already has)."""
        try:
            pid = parse_peer_id(peer_id)
            new_roles = parse_roles(roles)
        except ValueError as exc:
            raise TrustError(str(exc)) from None
        if note is not None and len(note) > _MAX_NOTE:
            raise TrustError(f"note is longer than {_MAX_NOTE} characters; shorten it")
        with self._edit():
            self._load()  # why: start from what's on disk, not our possibly stale copy
            entries = dict(self._entries)
            old = entries.get(pid)
            added = old.added if old else datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            entry = TrustEntry(
                pid,
                (old.roles if old else frozenset()) | new_roles,
                added,
                note if note is not None else (old.note if old else ""),
            )
            entries[pid] = entry
            self._write(entries)
        return entry

    def remove(self, peer_id: str | ID, roles: Iterable[str] | str | None = None) -> bool:
        """Remove `roles` from `peer_id` (all of them if None). True if anything changed."""
        try:
            pid = parse_peer_id(peer_id)
            drop = parse_roles(roles) if roles is not None else None
        except ValueError as exc:
            raise TrustError(str(exc)) from None
        with self._edit():
            self._load()
            entries = dict(self._entries)
            old = entries.get(pid)
            if old is None:
                return False
            left = frozenset() if drop is None else old.roles - drop
            if left == old.roles:
                return False
            if left:
                entries[pid] = TrustEntry(pid, left, old.added, old.note)
            else:
                del entries[pid]
            self._write(entries)
        return True

    # -- queries (the daemon's side) --

    def get(self, peer_id: str | ID) -> TrustEntry | None:
        pid = peer_id.to_base58() if isinstance(peer_id, ID) else peer_id
        return self._fresh().get(pid)

    def list(self) -> list[TrustEntry]:
        return [e for _, e in sorted(self._fresh().items())]

    def roles_of(self, peer_id: str | ID, *, now: float | None = None) -> frozenset[str]:
        """Explicit roles from trust.json united with roles from valid mesh certificates."""
        pid = peer_id.to_base58() if isinstance(peer_id, ID) else peer_id
        entry = self._fresh().get(pid)
        roles = entry.roles if entry else frozenset()
        if self.mesh is not None:
            roles = roles | self.mesh.roles_for(pid, now=now)
        return roles

    def is_trusted(self, peer_id: str | ID, role: str, *, now: float | None = None) -> bool:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        return role in self.roles_of(peer_id, now=now)
