"""Mesh membership: an owner key signs certificates "peer P may act as roles R until T".

A new device then needs one invite from the owner instead of a `trust add` on every other
device. Every member pins the owner's public key (learned from the certificate it joins
with) and accepts another peer's certificate only if that pinned key signed it, it has
not expired, and neither its serial nor its peer is on this node's revocation list.

Certificate string:

    "qvac-cert1:" + base64url(body) + "." + base64url(signature)

    body = msgpack {"owner": owner public key (libp2p protobuf bytes), "peer": peer id,
                    "roles": [role...], "issued": unix s, "expires": unix s,
                    "serial": int}
    signature = Ed25519 by the owner key over b"qvac-mesh-cert:" + body

Files in the data dir:
    mesh-owner.key  the owner key (only on the owner's device), format of peers/identity.py
    mesh.json       {"version": 1, "owner": base64url(owner public key) | null,
                     "certificate": this node's own certificate | null,
                     "revoked_serials": [int], "revoked_peers": [peer id],
                     "issued": [{"serial", "peer", "roles", "expires"}]}   (owner's log)
"""

from __future__ import annotations

import base64
import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgpack
from libp2p.crypto.ed25519 import Ed25519PublicKey, create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from peers.identity import (
    PURPOSE_MESH_OWNER,
    IdentityError,
    encode_key_file,
    parse_public_key,
    read_key_file,
    write_new_private_file,
)
from peers.trust import (
    BASE_ROLES,
    ROLES,
    StatSig,
    atomic_write_json,
    file_lock,
    parse_peer_id,
    parse_roles,
    read_json_file,
    stat_sig,
)

log = logging.getLogger(__name__)

MESH_FILE = "mesh.json"
OWNER_KEY_FILE = "mesh-owner.key"
CERT_PREFIX = "qvac-cert1:"
CERT_DOMAIN = b"qvac-mesh-cert:"
MAX_CERT_LEN = 2048
MAX_DAYS = 3650
_VERSION = 1
_MAX_MESH_FILE = 4 * 1024 * 1024
_MAX_CERTS_PER_PEER = 4  # why: bound what a peer can make us store by presenting certs
_MAX_OBSERVED_PEERS = 10_000


class MeshError(Exception):
    """A mesh operation failed or a certificate is not acceptable."""


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    if not text or len(text) % 4 == 1:
        raise ValueError("bad base64url length")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def parse_owner_key(data: bytes) -> Ed25519PublicKey:
    """Strictly parse a protobuf-serialized Ed25519 public key (canonical encoding only)."""
    return parse_public_key(data)


def owner_id(owner_key: bytes) -> str:
    """A printable name for an owner key (its libp2p-style id), e.g. to compare by eye."""
    return ID.from_pubkey(parse_owner_key(owner_key)).to_base58()


@dataclass(frozen=True)
class Certificate:
    owner_key: bytes  # protobuf-serialized Ed25519 public key of the mesh owner
    peer_id: str
    roles: frozenset[str]
    issued: int
    expires: int
    serial: int
    text: str  # the certificate string as issued

    @property
    def owner_id(self) -> str:
        return owner_id(self.owner_key)


def parse_certificate(text: str) -> Certificate:
    """Decode and check the signature against the key the certificate names.

    Whether that key is *our* mesh owner, expiry and revocation are checked by
    MeshStore.verify.
    """
    bad_form = (
        "not a qvac mesh certificate ({}); copy the whole string printed by `qvacd mesh invite`"
    )
    if not isinstance(text, str) or len(text) > MAX_CERT_LEN:
        raise MeshError(bad_form.format("wrong type or too long"))
    text = text.strip()
    if not text.startswith(CERT_PREFIX):
        raise MeshError(bad_form.format(f"does not start with {CERT_PREFIX!r}"))
    body_b64, dot, sig_b64 = text[len(CERT_PREFIX) :].partition(".")
    try:
        if not dot:
            raise ValueError("missing signature")
        body, sig = _b64d(body_b64), _b64d(sig_b64)
        fields = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_str_len=256,
            max_bin_len=128,
            max_array_len=8,
            max_map_len=16,
            max_ext_len=0,
        )
        if not isinstance(fields, dict):
            raise ValueError("body is not a map")
        owner_key, peer, roles = fields.get("owner"), fields.get("peer"), fields.get("roles")
        issued, expires, serial = fields.get("issued"), fields.get("expires"), fields.get("serial")
        if not isinstance(owner_key, bytes) or not isinstance(peer, str):
            raise ValueError("owner or peer missing")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise ValueError("roles missing")
        for n in (issued, expires, serial):
            if type(n) is not int or n < 0 or n >= 2**63:
                raise ValueError("issued/expires/serial must be non-negative integers")
        if expires <= issued:
            raise ValueError("expires before issued")
        parse_peer_id(peer)
        role_set = parse_roles(roles)
        key = parse_owner_key(owner_key)
    except MeshError:
        raise
    except Exception as exc:  # why: any decoding failure is the same user-facing problem
        raise MeshError(bad_form.format(str(exc) or type(exc).__name__)) from None
    if len(sig) != 64 or not key.verify(CERT_DOMAIN + body, sig):
        raise MeshError(
            "certificate signature is invalid (altered or corrupted); "
            "ask the mesh owner for a new invite"
        )
    return Certificate(owner_key, peer, role_set, issued, expires, serial, text)


@dataclass
class _MeshState:
    owner: bytes | None = None
    certificate: str | None = None
    revoked_serials: frozenset[int] = frozenset()
    revoked_peers: frozenset[str] = frozenset()
    issued: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "version": _VERSION,
            "owner": _b64e(self.owner) if self.owner else None,
            "certificate": self.certificate,
            "revoked_serials": sorted(self.revoked_serials),
            "revoked_peers": sorted(self.revoked_peers),
            "issued": list(self.issued),
        }


def _parse_state(obj: Any, path: Path) -> _MeshState:
    def bad(problem: str) -> MeshError:
        return MeshError(
            f"mesh file {path} {problem}; fix it by hand, restore it from a backup, "
            f"or move it away and join the mesh again"
        )

    if obj is None:
        return _MeshState()
    if not isinstance(obj, dict) or obj.get("version") != _VERSION:
        raise bad(f"is not a version {_VERSION} mesh file")
    state = _MeshState()
    owner = obj.get("owner")
    if owner is not None:
        try:
            state.owner = _b64d(owner) if isinstance(owner, str) else None
            if state.owner is None:
                raise ValueError("not a string")
            parse_owner_key(state.owner)
        except Exception as exc:
            raise bad(f"has an invalid owner key ({exc})") from None
    cert = obj.get("certificate")
    if cert is not None and not isinstance(cert, str):
        raise bad("has a non-string certificate")
    state.certificate = cert
    serials = obj.get("revoked_serials", [])
    if not isinstance(serials, list) or not all(type(s) is int for s in serials):
        raise bad("has a revoked_serials that is not a list of integers")
    peers = obj.get("revoked_peers", [])
    if not isinstance(peers, list) or not all(isinstance(p, str) for p in peers):
        raise bad("has a revoked_peers that is not a list of peer ids")
    issued = obj.get("issued", [])
    if not isinstance(issued, list) or not all(isinstance(i, dict) for i in issued):
        raise bad("has an issued log that is not a list of objects")
    state.revoked_serials, state.revoked_peers = frozenset(serials), frozenset(peers)
    state.issued = tuple(issued)
    return state


class MeshStore:
    """Mesh owner key, pinned owner, own certificate, revocations and certificates seen.

    `own_peer_id` is this node's peer id: `join` refuses a certificate made for another
    device, and `init` gives the owner's own device a certificate.
    """

    def __init__(self, data_dir: Path, own_peer_id: str | ID | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / MESH_FILE
        self.owner_key_path = self.data_dir / OWNER_KEY_FILE
        self.own_peer_id = parse_peer_id(own_peer_id) if own_peer_id is not None else None
        self.error: str | None = None
        self._sig: StatSig = None
        self._state = _MeshState()
        # peer id -> {serial: Certificate}; signatures checked once, validity on every use
        self._seen: dict[str, dict[int, Certificate]] = {}
        self._load()

    # -- file handling --

    def _load(self) -> None:
        sig = stat_sig(self.path)
        self._state = _parse_state(
            read_json_file(self.path, _MAX_MESH_FILE, MeshError, "mesh file"), self.path
        )
        self._sig, self.error = sig, None

    def _fresh(self) -> _MeshState:
        sig = stat_sig(self.path)
        if sig != self._sig:
            try:
                self._load()
            except MeshError as exc:
                if self.error != str(exc):
                    log.error("%s (accepting no mesh certificates until fixed)", exc)
                # why: fail closed; a broken revocation list must not let revoked peers in
                self._state, self._sig, self.error = _MeshState(), sig, str(exc)
        return self._state

    def reload_if_changed(self) -> bool:
        """Re-read mesh.json if it changed. Raises MeshError if it is corrupt."""
        if stat_sig(self.path) == self._sig:
            if self.error is not None:  # still the broken file we already saw
                raise MeshError(self.error)
            return False
        self._load()
        return True

    def _save(self, state: _MeshState) -> None:
        atomic_write_json(self.path, state.to_json())
        self._state, self._sig, self.error = state, stat_sig(self.path), None

    def _owner_keypair(self) -> KeyPair:
        if not self.owner_key_path.exists():
            raise MeshError(
                f"this device holds no mesh owner key ({self.owner_key_path}); run "
                f"`qvacd mesh init` here, or invite from the device that ran it"
            )
        try:
            return read_key_file(self.owner_key_path, PURPOSE_MESH_OWNER)
        except IdentityError as exc:
            raise MeshError(str(exc)) from None

    # -- state --

    @property
    def owner_key(self) -> bytes | None:
        """The pinned mesh owner public key (protobuf bytes), or None if not in a mesh."""
        return self._fresh().owner

    @property
    def is_owner(self) -> bool:
        return self.owner_key_path.exists()

    @property
    def own_certificate(self) -> str | None:
        return self._fresh().certificate

    def certificates_to_present(self) -> list[str]:
        """Certificates to put in our capacity record (field `certificates`)."""
        cert = self.own_certificate
        return [cert] if cert else []

    # -- owner side --

    def init(self, *, days: int = 365, now: float | None = None) -> bytes:
        """Create the owner key (never over an existing one) and pin it here.

        Returns the owner public key. If this node's peer id is known, it also gets a
        certificate with every role, so its peers can recognise it as a member.
        """
        now = time.time() if now is None else now
        with file_lock(self.path):
            self._load()
            if self.owner_key_path.exists() or self.owner_key_path.is_symlink():
                raise MeshError(
                    f"a mesh owner key already exists at {self.owner_key_path}; this device "
                    f"already owns a mesh (move the file away first to start a new one)"
                )
            if self._state.owner is not None:
                raise MeshError(
                    f"this device already belongs to the mesh of owner "
                    f"{owner_id(self._state.owner)}; run `qvacd mesh leave` first"
                )
            keypair = create_new_key_pair()
            owner = keypair.public_key.serialize()
            if not write_new_private_file(
                self.owner_key_path, encode_key_file(keypair, PURPOSE_MESH_OWNER)
            ):
                raise MeshError(
                    f"a mesh owner key appeared at {self.owner_key_path} while creating one; "
                    f"check that no other `qvacd mesh init` is running"
                )
            state = _MeshState(
                owner=owner,
                certificate=None,
                revoked_serials=self._state.revoked_serials,
                revoked_peers=self._state.revoked_peers,
                issued=self._state.issued,
            )
            self._save(state)
        if self.own_peer_id is not None:
            text = self.invite(self.own_peer_id, BASE_ROLES, days, now=now)
            self._set_own_certificate(text)
        return owner

    def invite(
        self,
        peer_id: str | ID,
        roles: Iterable[str] | str,
        days: float,
        *,
        now: float | None = None,
    ) -> str:
        """Sign a certificate granting `roles` to `peer_id` for `days` days."""
        now = time.time() if now is None else now
        try:
            pid = parse_peer_id(peer_id)
            role_set = parse_roles(roles)
        except ValueError as exc:
            raise MeshError(str(exc)) from None
        if not 0 < days <= MAX_DAYS:
            raise MeshError(f"days must be between 1 and {MAX_DAYS}, not {days}")
        keypair = self._owner_keypair()
        issued = int(now)
        serial = secrets.randbits(63)  # why: random, so a restored owner key can't reuse one
        body = msgpack.packb(
            {
                "owner": keypair.public_key.serialize(),
                "peer": pid,
                "roles": [r for r in ROLES if r in role_set],
                "issued": issued,
                "expires": int(issued + days * 86400),
                "serial": serial,
            }
        )
        sig = keypair.private_key.sign(CERT_DOMAIN + body)
        text = f"{CERT_PREFIX}{_b64e(body)}.{_b64e(sig)}"
        with file_lock(self.path):
            self._load()
            log_entry = {
                "serial": serial,
                "peer": pid,
                "roles": sorted(role_set),
                "expires": int(issued + days * 86400),
            }
            self._save(
                _MeshState(
                    owner=self._state.owner or keypair.public_key.serialize(),
                    certificate=self._state.certificate,
                    revoked_serials=self._state.revoked_serials,
                    revoked_peers=self._state.revoked_peers,
                    issued=(*self._state.issued, log_entry)[-10_000:],
                )
            )
        return text

    # -- member side --

    def _set_own_certificate(self, text: str) -> None:
        with file_lock(self.path):
            self._load()
            s = self._state
            self._save(
                _MeshState(s.owner, text, s.revoked_serials, s.revoked_peers, s.issued)
            )

    def join(self, text: str, *, now: float | None = None) -> Certificate:
        """Verify an invite made for this node, pin its owner key and keep the certificate."""
        now = time.time() if now is None else now
        cert = parse_certificate(text)
        pinned = self._fresh().owner
        if pinned is not None and pinned != cert.owner_key:
            raise MeshError(
                f"this certificate is from mesh owner {cert.owner_id}, but this device belongs "
                f"to the mesh of {owner_id(pinned)}; run `qvacd mesh leave` first"
            )
        if self.own_peer_id is not None and cert.peer_id != self.own_peer_id:
            raise MeshError(
                f"this certificate is for peer {cert.peer_id}, not this device "
                f"({self.own_peer_id}); ask the mesh owner to invite {self.own_peer_id}"
            )
        self._check_validity(cert, now, self._state)
        with file_lock(self.path):
            self._load()
            s = self._state
            self._save(
                _MeshState(cert.owner_key, cert.text, s.revoked_serials, s.revoked_peers, s.issued)
            )
        return cert

    def leave(self) -> None:
        """Forget the pinned owner and our certificate (revocations are kept)."""
        with file_lock(self.path):
            self._load()
            s = self._state
            self._save(_MeshState(None, None, s.revoked_serials, s.revoked_peers, s.issued))
        self._seen.clear()

    def revoke(self, target: str) -> str:
        """Revoke by serial (digits) or by peer id on this node. Returns what was revoked."""
        target = target.strip()
        with file_lock(self.path):
            self._load()
            s = self._state
            if target.isdigit():
                serial = int(target)
                if serial >= 2**63:
                    raise MeshError(f"serial {target} is out of range; copy it from `mesh list`")
                state = _MeshState(
                    s.owner, s.certificate, s.revoked_serials | {serial}, s.revoked_peers, s.issued
                )
                what = f"serial {serial}"
            else:
                try:
                    pid = parse_peer_id(target)
                except ValueError as exc:
                    raise MeshError(f"{exc} (or give a certificate serial number)") from None
                state = _MeshState(
                    s.owner, s.certificate, s.revoked_serials, s.revoked_peers | {pid}, s.issued
                )
                what = f"peer {pid}"
            self._save(state)
        return what

    @property
    def revoked_serials(self) -> frozenset[int]:
        return self._fresh().revoked_serials

    @property
    def revoked_peers(self) -> frozenset[str]:
        return self._fresh().revoked_peers

    # -- verification --

    @staticmethod
    def _check_validity(cert: Certificate, now: float, state: _MeshState) -> None:
        if now >= cert.expires:
            raise MeshError(
                f"certificate for {cert.peer_id} expired on {_day(cert.expires)}; "
                f"ask the mesh owner for a new invite"
            )
        if cert.issued > now + 600:  # why: tolerate clock skew, not certificates from the future
            raise MeshError(
                f"certificate for {cert.peer_id} is issued in the future ({_day(cert.issued)}); "
                f"check the clocks of this device and the mesh owner's"
            )
        if cert.serial in state.revoked_serials:
            raise MeshError(
                f"certificate {cert.serial} for {cert.peer_id} was revoked; "
                f"ask the mesh owner for a new invite"
            )
        if cert.peer_id in state.revoked_peers:
            raise MeshError(
                f"peer {cert.peer_id} was revoked from this mesh; "
                f"remove it from the revocation list in {MESH_FILE} to let it back"
            )

    def verify(
        self, text: str, *, now: float | None = None, peer_id: str | ID | None = None
    ) -> Certificate:
        """A certificate presented to us: pinned owner, signature, expiry, revocation, peer."""
        now = time.time() if now is None else now
        state = self._fresh()
        if state.owner is None:
            raise MeshError(
                "this device is in no mesh, so it cannot check mesh certificates; "
                "run `qvacd mesh join CERT` or `qvacd mesh init`"
            )
        cert = parse_certificate(text)
        if cert.owner_key != state.owner:
            raise MeshError(
                f"certificate was signed by mesh owner {cert.owner_id}, not by this mesh's "
                f"owner {owner_id(state.owner)}; ask your mesh owner for an invite"
            )
        if peer_id is not None:
            pid = peer_id.to_base58() if isinstance(peer_id, ID) else peer_id
            if cert.peer_id != pid:
                raise MeshError(
                    f"certificate is for peer {cert.peer_id} but was presented by {pid}"
                )
        self._check_validity(cert, now, state)
        return cert

    def observe(
        self, peer_id: str | ID, certificates: Iterable[str], *, now: float | None = None
    ) -> frozenset[str]:
        """Remember the valid certificates a peer presented (e.g. in its capacity record,
        already verified as signed by that peer). Returns the roles they grant now."""
        pid = peer_id.to_base58() if isinstance(peer_id, ID) else peer_id
        now = time.time() if now is None else now
        kept = self._seen.get(pid, {})
        for i, text in enumerate(certificates):
            if i >= _MAX_CERTS_PER_PEER:
                break
            try:
                cert = self.verify(text, now=now, peer_id=pid)
            except MeshError as exc:
                log.debug("ignoring certificate from %s: %s", pid, exc)
                continue
            kept = {**kept, cert.serial: cert}
        if kept:
            if len(kept) > _MAX_CERTS_PER_PEER:  # keep the ones that last longest
                best = sorted(kept.values(), key=lambda c: c.expires)[-_MAX_CERTS_PER_PEER:]
                kept = {c.serial: c for c in best}
            if pid not in self._seen and len(self._seen) >= _MAX_OBSERVED_PEERS:
                self._seen.pop(next(iter(self._seen)))
            self._seen[pid] = kept
        return self.roles_for(pid, now=now)

    def roles_for(self, peer_id: str | ID, *, now: float | None = None) -> frozenset[str]:
        """Roles that currently valid certificates grant `peer_id` (empty if none)."""
        pid = peer_id.to_base58() if isinstance(peer_id, ID) else peer_id
        now = time.time() if now is None else now
        state = self._fresh()
        if state.owner is None:
            return frozenset()
        certs = list(self._seen.get(pid, {}).values())
        if state.certificate and pid == self.own_peer_id:
            try:
                certs.append(parse_certificate(state.certificate))
            except MeshError:
                pass
        roles: frozenset[str] = frozenset()
        for cert in certs:
            if cert.owner_key != state.owner or cert.peer_id != pid:
                continue
            try:
                self._check_validity(cert, now, state)
            except MeshError:
                continue
            roles |= cert.roles
        return roles
