"""Node identity: created once, 0600, stable, and never silently replaced."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.peer.id import ID

from peers.identity import (
    IDENTITY_FILE,
    Identity,
    IdentityError,
    load_or_create_identity,
)


def test_created_with_mode_0600(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path)
    path = tmp_path / IDENTITY_FILE
    assert path.is_file()
    if os.name != "nt":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # no temp files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [IDENTITY_FILE]


def test_creates_missing_data_dir(tmp_path: Path) -> None:
    ident = load_or_create_identity(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b" / IDENTITY_FILE).is_file()
    assert ident.path == tmp_path / "a" / "b" / IDENTITY_FILE


def test_same_peer_id_after_reload(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path)
    before = (tmp_path / IDENTITY_FILE).read_bytes()
    second = load_or_create_identity(tmp_path)
    assert second.peer_id == first.peer_id
    assert second.peer_id_str == first.peer_id_str
    assert second.public_key_bytes == first.public_key_bytes
    assert (tmp_path / IDENTITY_FILE).read_bytes() == before


def test_different_dirs_get_different_ids(tmp_path: Path) -> None:
    a = load_or_create_identity(tmp_path / "a")
    b = load_or_create_identity(tmp_path / "b")
    assert a.peer_id != b.peer_id


def test_peer_id_is_libp2ps(tmp_path: Path) -> None:
    ident = load_or_create_identity(tmp_path)
    assert ident.peer_id == ID.from_pubkey(ident.keypair.public_key)
    assert ident.peer_id_str == ID.from_pubkey(ident.keypair.public_key).to_base58()
    assert ident.peer_id_str.startswith("12D3KooW")  # Ed25519, inlined key
    assert ID.from_base58(ident.peer_id_str) == ident.peer_id


def test_sign_verifies_with_public_key(tmp_path: Path) -> None:
    ident = load_or_create_identity(tmp_path)
    sig = ident.sign(b"hello")
    pub = deserialize_public_key(ident.public_key_bytes)
    assert pub.verify(b"hello", sig)
    assert not pub.verify(b"hellO", sig)
    assert len(ident.raw_public_key) == 32


def _assert_refused(tmp_path: Path, data: bytes, needle: str) -> None:
    path = tmp_path / IDENTITY_FILE
    path.write_bytes(data)
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError) as info:
        load_or_create_identity(tmp_path)
    msg = str(info.value)
    assert str(path) in msg
    assert needle in msg
    assert "restore" in msg and "move it away" in msg
    assert "\n" not in msg
    assert path.read_bytes() == data  # left untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == [IDENTITY_FILE]


def _good_key_bytes(tmp_path: Path) -> bytes:
    d = tmp_path / "good"
    load_or_create_identity(d)
    return (d / IDENTITY_FILE).read_bytes()


def test_truncated_file_refused(tmp_path: Path) -> None:
    good = _good_key_bytes(tmp_path)
    for n in (0, 5, 12, len(good) - 1):
        d = tmp_path / f"t{n}"
        d.mkdir()
        _assert_refused(d, good[:n], "truncated")


def test_corrupt_file_refused(tmp_path: Path) -> None:
    good = _good_key_bytes(tmp_path)
    for i in (20, 40, len(good) - 1):  # in the key, in the key, in the checksum
        d = tmp_path / f"c{i}"
        d.mkdir()
        bad = bytearray(good)
        bad[i] ^= 0x01
        _assert_refused(d, bytes(bad), "corrupt")


def test_foreign_file_refused(tmp_path: Path) -> None:
    _assert_refused(tmp_path, b"-----BEGIN OPENSSH PRIVATE KEY-----\n" * 3, "not a qvacd key file")


def test_trailing_garbage_refused(tmp_path: Path) -> None:
    good = _good_key_bytes(tmp_path)
    d = tmp_path / "x"
    d.mkdir()
    _assert_refused(d, good + b"\0", "trailing")


def test_mesh_owner_key_is_not_an_identity(tmp_path: Path) -> None:
    from peers.mesh import OWNER_KEY_FILE, MeshStore

    MeshStore(tmp_path / "m").init()
    owner_bytes = (tmp_path / "m" / OWNER_KEY_FILE).read_bytes()
    d = tmp_path / "x"
    d.mkdir()
    _assert_refused(d, owner_bytes, "mesh owner")


def test_wide_mode_still_loads(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path)
    os.chmod(tmp_path / IDENTITY_FILE, 0o644)
    assert load_or_create_identity(tmp_path).peer_id == first.peer_id


@pytest.mark.skipif(os.name == "nt" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_refused(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path)
    path = tmp_path / IDENTITY_FILE
    os.chmod(path, 0o000)
    try:
        with pytest.raises(IdentityError, match="cannot read"):
            load_or_create_identity(tmp_path)
    finally:
        os.chmod(path, 0o600)


def test_unreadable_file_refused_any_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # why: as root chmod 000 still reads, so simulate the OS refusing the read
    load_or_create_identity(tmp_path)
    path = tmp_path / IDENTITY_FILE
    before = path.read_bytes()
    real = Path.read_bytes

    def deny(self: Path) -> bytes:
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(IdentityError) as info:
        load_or_create_identity(tmp_path)
    monkeypatch.undo()
    assert str(path) in str(info.value) and "Permission denied" in str(info.value)
    assert path.read_bytes() == before


def test_directory_in_place_of_file_refused(tmp_path: Path) -> None:
    (tmp_path / IDENTITY_FILE).mkdir()
    with pytest.raises(IdentityError) as info:
        load_or_create_identity(tmp_path)
    assert str(tmp_path / IDENTITY_FILE) in str(info.value)
    assert (tmp_path / IDENTITY_FILE).is_dir()


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks")
def test_dangling_symlink_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / IDENTITY_FILE
    path.symlink_to(tmp_path / "elsewhere.key")
    with pytest.raises(IdentityError):
        load_or_create_identity(tmp_path)
    assert path.is_symlink() and not (tmp_path / "elsewhere.key").exists()


def test_generate_is_in_memory() -> None:
    a, b = Identity.generate(), Identity.generate()
    assert a.peer_id != b.peer_id and a.path is None


def test_concurrent_first_starts_agree(tmp_path: Path) -> None:
    # why: two processes starting at once must not end up with different ids
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(lambda _: load_or_create_identity(tmp_path).peer_id_str, range(16)))
    assert len(ids) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [IDENTITY_FILE]
