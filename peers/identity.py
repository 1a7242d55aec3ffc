"""This node's Ed25519 identity, kept in `data_dir/identity.key` (mode 0600).

The libp2p host is built from `Identity.keypair`, so `Identity.peer_id` is by construction
the id libp2p derives (`ID.from_pubkey`). The id must never change across restarts, so a
key file that cannot be read is an error for a human to resolve, never a reason to create
a new key over it.

Key file format (binary, 80 bytes for Ed25519):

    magic   8 bytes  b"QVACKEY\\x00"
    version 1 byte   1
    purpose 1 byte   1 = node identity, 2 = mesh owner   (so the two files can't be swapped)
    length  2 bytes  big-endian length of payload
    payload          libp2p protobuf-serialized private key (PrivateKey.serialize())
    check   32 bytes sha256 of everything above          (detects corruption and truncation)
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path

from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey, create_new_key_pair
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.crypto.pb import crypto_pb2
from libp2p.peer.id import ID

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.key"
KEY_MAGIC = b"QVACKEY\x00"
KEY_VERSION = 1
PURPOSE_NODE = 1
PURPOSE_MESH_OWNER = 2
_PURPOSE_NAMES = {PURPOSE_NODE: "node identity", PURPOSE_MESH_OWNER: "mesh owner"}
_HEADER = struct.Struct(">8sBBH")
_CHECK_LEN = 32
_MAX_KEY_FILE = 4096


class IdentityError(Exception):
    """The identity (or another key file) is missing, unreadable or corrupt."""


def short_peer_id(peer_id: str | ID) -> str:
    """The first 16 characters of a peer id, as log lines print it (every Ed25519 id
    starts "12D3KooW", so this keeps 8 that tell peers apart)."""
    return str(peer_id)[:16]


def as_id(peer_id: str | ID) -> ID:
    """`peer_id` as a libp2p ID (base58 strings are parsed)."""
    return peer_id if isinstance(peer_id, ID) else ID.from_base58(peer_id)


@dataclass(frozen=True)
class Identity:
    keypair: KeyPair
    peer_id: ID
    path: Path | None = None

    @property
    def peer_id_str(self) -> str:
        return self.peer_id.to_base58()

    @property
    def public_key_bytes(self) -> bytes:
        """The libp2p protobuf-serialized public key (what goes on the wire)."""
        return self.keypair.public_key.serialize()

    @property
    def raw_public_key(self) -> bytes:
        """The 32 raw Ed25519 public key bytes."""
        return self.keypair.public_key.to_bytes()

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature (64 bytes) over `data`; callers add their own domain prefix."""
        return self.keypair.private_key.sign(data)

    @classmethod
    def from_keypair(cls, keypair: KeyPair, path: Path | None = None) -> Identity:
        return cls(keypair=keypair, peer_id=ID.from_pubkey(keypair.public_key), path=path)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh in-memory identity (tests, throwaway nodes); nothing is written."""
        return cls.from_keypair(create_new_key_pair())


def parse_public_key(data: bytes) -> Ed25519PublicKey:
    """Strictly parse a libp2p protobuf-serialized Ed25519 public key; ValueError otherwise.

    Only the canonical encoding is accepted, so one key has exactly one byte form (and
    hence one peer id) and nobody can smuggle extra bytes past a signature check.
    """
    pb = crypto_pb2.PublicKey.FromString(bytes(data))
    if pb.key_type != KeyType.Ed25519.value or len(pb.data) != 32:
        raise ValueError("not an Ed25519 public key")
    key = Ed25519PublicKey.from_bytes(pb.data)
    if key.serialize() != data:
        raise ValueError("public key is not canonically encoded")
    return key


# ---------------------------------------------------------------------------------------
# key files (shared with peers/mesh.py for the mesh owner key)


def encode_key_file(keypair: KeyPair, purpose: int) -> bytes:
    payload = keypair.private_key.serialize()
    head = _HEADER.pack(KEY_MAGIC, KEY_VERSION, purpose, len(payload)) + payload
    return head + hashlib.sha256(head).digest()


def decode_key_file(data: bytes, path: Path, purpose: int) -> KeyPair:
    """Parse a key file's bytes; raise IdentityError naming `path` and the problem."""

    def bad(problem: str) -> IdentityError:
        return IdentityError(
            f"{_PURPOSE_NAMES.get(purpose, 'key')} file {path} {problem}; restore it from a "
            f"backup, or move it away to create a new key (peers that trusted the old one "
            f"will no longer recognise this node)"
        )

    if len(data) > _MAX_KEY_FILE:
        raise bad(f"is {len(data)} bytes, too large to be a key file")
    if len(data) < _HEADER.size:
        raise bad(f"is truncated ({len(data)} bytes)")
    magic, version, file_purpose, length = _HEADER.unpack_from(data)
    if magic != KEY_MAGIC:
        raise bad("is not a qvacd key file (bad magic)")
    if version != KEY_VERSION:
        raise bad(f"has unsupported version {version}")
    if file_purpose != purpose:
        raise bad(
            f"holds a {_PURPOSE_NAMES.get(file_purpose, 'unknown')} key, "
            f"not a {_PURPOSE_NAMES.get(purpose, 'key')} key"
        )
    expected = _HEADER.size + length + _CHECK_LEN
    if len(data) < expected:
        raise bad(f"is truncated ({len(data)} of {expected} bytes)")
    if len(data) > expected:
        raise bad(f"has {len(data) - expected} unexpected trailing bytes")
    head = data[: _HEADER.size + length]
    if not secrets.compare_digest(hashlib.sha256(head).digest(), data[len(head) :]):
        raise bad("is corrupt (checksum mismatch)")
    try:
        pb = crypto_pb2.PrivateKey.FromString(head[_HEADER.size :])
    except Exception:
        raise bad("is corrupt (key does not parse)") from None
    if pb.key_type != KeyType.Ed25519.value or len(pb.data) != 32:
        raise bad(f"holds an unsupported key (type {pb.key_type}, {len(pb.data)} bytes)")
    try:
        private = Ed25519PrivateKey.from_bytes(pb.data)
    except Exception:
        raise bad("is corrupt (invalid Ed25519 key)") from None
    return KeyPair(private, private.get_public_key())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # why: not every platform lets you open a directory; best effort
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_new_private_file(path: Path, data: bytes) -> bool:
    """Create `path` (mode 0600) holding `data`, atomically, never replacing an existing file.

    The bytes go to a temp file first and are hard-linked into place, so a crash leaves
    either no file or a complete one. Returns False if `path` already exists.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
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
        try:
            os.link(tmp, path)  # why: link fails if `path` exists, unlike rename
        except FileExistsError:
            return False
        except OSError:
            # Filesystems without hard links: fall back to an exclusive create of the
            # target, then rename over it (we own it, it's empty until the rename).
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                return False
            os.replace(tmp, path)
        _fsync_dir(path.parent)
        return True
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def read_key_file(path: Path, purpose: int) -> KeyPair:
    """Load an existing key file; IdentityError (naming the path) on any problem."""
    try:
        if not path.is_file():
            raise IdentityError(
                f"{_PURPOSE_NAMES.get(purpose, 'key')} path {path} is not a regular file; "
                f"restore the key file there or move the object away"
            )
        data = path.read_bytes()
        _warn_if_exposed(path)
    except IdentityError:
        raise
    except OSError as exc:
        raise IdentityError(
            f"cannot read {_PURPOSE_NAMES.get(purpose, 'key')} file {path} "
            f"({exc.strerror or exc}); fix its permissions or restore it from a backup"
        ) from None
    return decode_key_file(data, path, purpose)


def _warn_if_exposed(path: Path) -> None:
    # why: a readable-by-others key still works, so warn instead of refusing to start
    if os.name != "nt" and path.stat().st_mode & 0o077:
        log.warning("key file %s is readable by other users; run: chmod 600 %s", path, path)


def load_or_create_key(path: Path, purpose: int) -> tuple[KeyPair, bool]:
    """(keypair, created). Creates the file only if nothing exists at `path`."""
    if not os.path.lexists(path):
        keypair = create_new_key_pair()
        if write_new_private_file(path, encode_key_file(keypair, purpose)):
            return keypair, True
        # why: another process created it between our check and our link; use theirs
    return read_key_file(path, purpose), False


def load_or_create_identity(data_dir: Path) -> Identity:
    """This node's identity from `data_dir/identity.key`, created on first start."""
    path = Path(data_dir) / IDENTITY_FILE
    keypair, _created = load_or_create_key(path, PURPOSE_NODE)
    return Identity.from_keypair(keypair, path)
