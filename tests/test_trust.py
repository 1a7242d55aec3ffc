"""Trust store (explicit per-peer roles) and mesh certificates."""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from pathlib import Path

import msgpack
import pytest

from peers.identity import Identity
from peers.mesh import CERT_DOMAIN, CERT_PREFIX, MESH_FILE, MeshError, MeshStore
from peers.trust import TRUST_FILE, TrustError, TrustStore

DAY = 86400.0


def pid() -> str:
    return Identity.generate().peer_id_str


# ---------------------------------------------------------------------------------------
# explicit trust


def test_add_list_remove_roles(tmp_path: Path) -> None:
    store = TrustStore.in_dir(tmp_path)
    a, b = pid(), pid()
    assert store.list() == [] and store.roles_of(a) == frozenset()
    assert not store.is_trusted(a, "consumer")

    entry = store.add(a, ["consumer"], note="laptop")
    assert entry.roles == {"consumer"} and entry.note == "laptop"
    assert entry.added.endswith("Z")
    store.add(b, "provider,seeder")
    assert store.roles_of(a) == {"consumer"}
    assert store.roles_of(b) == {"provider", "seeder"}
    assert store.is_trusted(a, "consumer") and not store.is_trusted(a, "provider")
    assert [e.peer_id for e in store.list()] == sorted([a, b])

    store.add(a, ["provider"])  # adds to existing roles, keeps note and time
    again = store.get(a)
    assert again is not None
    assert again.roles == {"consumer", "provider"} and again.note == "laptop"
    assert again.added == entry.added

    assert store.remove(a, ["consumer"])
    assert store.roles_of(a) == {"provider"}
    assert store.remove(a)
    assert store.roles_of(a) == frozenset() and store.get(a) is None
    assert not store.remove(a)
    assert [e.peer_id for e in store.list()] == [b]


def test_file_format_and_mode(tmp_path: Path) -> None:
    store = TrustStore.in_dir(tmp_path)
    a = pid()
    store.add(a, ["seeder", "consumer"], note="n")
    obj = json.loads((tmp_path / TRUST_FILE).read_text())
    assert obj["version"] == 1
    assert obj["peers"][a]["roles"] == ["consumer", "seeder"]
    assert obj["peers"][a]["note"] == "n"
    if os.name != "nt":
        assert stat.S_IMODE((tmp_path / TRUST_FILE).stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "bad",
    ["", "hello", "12D3KooWxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", "0OIl", "Qm" + "1" * 44],
)
def test_bad_peer_id_rejected(tmp_path: Path, bad: str) -> None:
    store = TrustStore.in_dir(tmp_path)
    with pytest.raises(TrustError) as info:
        store.add(bad, ["consumer"])
    assert "not a valid peer id" in str(info.value) and "qvacd id" in str(info.value)
    assert not (tmp_path / TRUST_FILE).exists()


def test_bad_role_rejected(tmp_path: Path) -> None:
    store = TrustStore.in_dir(tmp_path)
    with pytest.raises(TrustError, match="unknown role 'admin'; roles are consumer, provider"):
        store.add(pid(), ["admin"])
    with pytest.raises(TrustError, match="no roles"):
        store.add(pid(), [])
    with pytest.raises(ValueError):
        store.is_trusted(pid(), "admin")


def test_second_instance_sees_changes(tmp_path: Path) -> None:
    daemon = TrustStore.in_dir(tmp_path)
    cli = TrustStore.in_dir(tmp_path)
    a = pid()
    assert not daemon.is_trusted(a, "consumer")
    cli.add(a, ["consumer"])
    assert daemon.is_trusted(a, "consumer")
    cli.add(a, ["provider"])
    assert daemon.roles_of(a) == {"consumer", "provider"}
    cli.remove(a, ["consumer"])
    assert daemon.roles_of(a) == {"provider"}
    cli.remove(a)
    assert daemon.roles_of(a) == frozenset()


def test_edits_from_two_writers_both_kept(tmp_path: Path) -> None:
    one, two = TrustStore.in_dir(tmp_path), TrustStore.in_dir(tmp_path)
    a, b = pid(), pid()
    one.add(a, ["consumer"])
    two.add(b, ["consumer"])  # two's in-memory copy is stale; must not drop a
    assert {e.peer_id for e in TrustStore.in_dir(tmp_path).list()} == {a, b}


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "not a version 1 trust file"),
        (b'{"version": 1}', '"peers"'),
        (b'{"version": 1, "peers": {"nope": {"roles": []}}}', "not a valid peer id"),
        (b'{"version": 1, "peers": {"PID": {"roles": ["root"]}}}', "unknown role 'root'"),
        (b'{"version": 1, "peers": {"PID": {"roles": "consumer"}}}', "no roles list"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_corrupt_file_raises(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / TRUST_FILE
    path.write_bytes(content.replace(b"PID", pid().encode()))
    with pytest.raises(TrustError) as info:
        TrustStore(path)
    assert str(path) in str(info.value) and needle in str(info.value)
    assert "\n" not in str(info.value)


def test_file_corrupted_while_running_fails_closed(tmp_path: Path) -> None:
    daemon = TrustStore.in_dir(tmp_path)
    a = pid()
    TrustStore.in_dir(tmp_path).add(a, ["consumer"])
    assert daemon.is_trusted(a, "consumer")
    (tmp_path / TRUST_FILE).write_text('{"version": 1, "peers": {')
    assert not daemon.is_trusted(a, "consumer")
    assert daemon.error is not None and str(tmp_path / TRUST_FILE) in daemon.error
    with pytest.raises(TrustError):
        daemon.reload_if_changed()
    with pytest.raises(TrustError):  # the CLI refuses to build on a broken file
        TrustStore.in_dir(tmp_path).add(pid(), ["consumer"])


# ---------------------------------------------------------------------------------------
# mesh certificates


@pytest.fixture
def mesh(tmp_path: Path) -> tuple[MeshStore, MeshStore, TrustStore]:
    """An owner device and a member device that joined with an invite."""
    owner_ident, member_ident = Identity.generate(), Identity.generate()
    owner = MeshStore(tmp_path / "owner", owner_ident.peer_id_str)
    owner.init()
    member = MeshStore(tmp_path / "member", member_ident.peer_id_str)
    member.join(owner.invite(member_ident.peer_id_str, ["consumer", "provider"], 30))
    trust = TrustStore.in_dir(tmp_path / "member", mesh=member)
    return owner, member, trust


def test_mesh_init_pins_owner_and_self_certifies(tmp_path: Path) -> None:
    me = pid()
    owner = MeshStore(tmp_path, me)
    key = owner.init()
    assert owner.owner_key == key and owner.is_owner
    assert stat.S_IMODE((tmp_path / "mesh-owner.key").stat().st_mode) == 0o600
    assert owner.roles_for(me) == {"consumer", "provider", "seeder"}
    assert owner.certificates_to_present() == [owner.own_certificate]
    before = (tmp_path / "mesh-owner.key").read_bytes()
    with pytest.raises(MeshError, match="already exists"):
        MeshStore(tmp_path, me).init()
    assert (tmp_path / "mesh-owner.key").read_bytes() == before


def test_valid_cert_grants_roles(tmp_path: Path, mesh) -> None:
    owner, member, trust = mesh
    peer = pid()
    cert = owner.invite(peer, ["seeder"], 7)
    assert cert.startswith(CERT_PREFIX)
    assert trust.roles_of(peer) == frozenset()  # not seen yet
    assert member.observe(peer, [cert]) == {"seeder"}
    assert trust.roles_of(peer) == {"seeder"}
    assert trust.is_trusted(peer, "seeder") and not trust.is_trusted(peer, "consumer")
    # explicit trust and certificate roles combine
    trust.add(peer, ["consumer"])
    assert trust.roles_of(peer) == {"seeder", "consumer"}
    # the member's own certificate came with the join
    assert member.own_certificate is not None
    assert trust.roles_of(member.own_peer_id) == {"consumer", "provider"}


def test_cert_presented_by_other_peer_ignored(mesh) -> None:
    owner, member, trust = mesh
    peer, thief = pid(), pid()
    cert = owner.invite(peer, ["consumer"], 7)
    assert member.observe(thief, [cert]) == frozenset()
    with pytest.raises(MeshError, match="presented by"):
        member.verify(cert, peer_id=thief)
    assert trust.roles_of(thief) == frozenset()


def test_expired_cert_rejected(mesh) -> None:
    owner, member, trust = mesh
    peer = pid()
    now = time.time()
    cert = owner.invite(peer, ["consumer"], 1, now=now - 2 * DAY)
    with pytest.raises(MeshError, match=r"expired on \d{4}-\d\d-\d\d; ask the mesh owner"):
        member.verify(cert)
    assert member.observe(peer, [cert]) == frozenset()
    assert trust.roles_of(peer) == frozenset()
    # a cert that was valid when seen stops granting roles when it expires
    cert2 = owner.invite(peer, ["consumer"], 1, now=now)
    assert member.observe(peer, [cert2], now=now) == {"consumer"}
    assert trust.roles_of(peer, now=now + 0.5 * DAY) == {"consumer"}
    assert trust.roles_of(peer, now=now + 1.5 * DAY) == frozenset()


def test_join_refuses_expired_and_foreign_invites(tmp_path: Path) -> None:
    me = Identity.generate().peer_id_str
    owner = MeshStore(tmp_path / "o")
    owner.init()
    node = MeshStore(tmp_path / "n", me)
    with pytest.raises(MeshError, match="expired"):
        node.join(owner.invite(me, ["consumer"], 1, now=time.time() - 3 * DAY))
    with pytest.raises(MeshError, match="not this device"):
        node.join(owner.invite(pid(), ["consumer"], 1))
    assert node.owner_key is None  # nothing pinned by failed joins
    node.join(owner.invite(me, ["consumer"], 1))
    assert node.owner_key == owner.owner_key
    other = MeshStore(tmp_path / "o2")
    other.init()
    with pytest.raises(MeshError, match="run `qvacd mesh leave` first"):
        node.join(other.invite(me, ["consumer"], 1))


def test_revoked_serial_rejected(mesh) -> None:
    owner, member, trust = mesh
    peer = pid()
    cert = owner.invite(peer, ["consumer"], 7)
    assert member.observe(peer, [cert]) == {"consumer"}
    serial = member.verify(cert).serial
    assert member.revoke(str(serial)) == f"serial {serial}"
    assert trust.roles_of(peer) == frozenset()  # a cert seen earlier stops counting too
    with pytest.raises(MeshError, match="was revoked"):
        member.verify(cert)
    # a fresh certificate for the same peer (new serial) is fine
    assert member.observe(peer, [owner.invite(peer, ["consumer"], 7)]) == {"consumer"}


def test_revoked_peer_rejected_and_seen_by_running_store(tmp_path: Path, mesh) -> None:
    owner, member, trust = mesh
    peer = pid()
    assert member.observe(peer, [owner.invite(peer, ["provider"], 7)]) == {"provider"}
    # the CLI revokes from another process (another MeshStore on the same dir)
    MeshStore(member.data_dir).revoke(peer)
    assert trust.roles_of(peer) == frozenset()
    assert member.observe(peer, [owner.invite(peer, ["provider"], 7)]) == frozenset()
    with pytest.raises(MeshError, match="not a valid peer id"):
        member.revoke("not-a-peer")


def test_cert_from_other_owner_rejected(tmp_path: Path, mesh) -> None:
    _owner, member, trust = mesh
    rogue = MeshStore(tmp_path / "rogue")
    rogue.init()
    peer = pid()
    cert = rogue.invite(peer, ["consumer", "provider", "seeder"], 7)
    with pytest.raises(MeshError, match="signed by mesh owner .* not by this mesh's owner"):
        member.verify(cert)
    assert member.observe(peer, [cert]) == frozenset()
    assert trust.roles_of(peer) == frozenset()


def _split(cert: str) -> tuple[bytes, bytes]:
    body, sig = cert[len(CERT_PREFIX) :].split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    return base64.urlsafe_b64decode(pad(body)), base64.urlsafe_b64decode(pad(sig))


def _join(body: bytes, sig: bytes) -> str:
    enc = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
    return f"{CERT_PREFIX}{enc(body)}.{enc(sig)}"


def test_tampered_cert_rejected(mesh) -> None:
    owner, member, trust = mesh
    peer = pid()
    cert = owner.invite(peer, ["seeder"], 7)
    body, sig = _split(cert)
    fields = msgpack.unpackb(body)
    # upgrade the roles, keep the signature
    forged = _join(msgpack.packb({**fields, "roles": ["consumer", "provider", "seeder"]}), sig)
    with pytest.raises(MeshError, match="signature is invalid"):
        member.verify(forged)
    # extend the expiry
    forged = _join(msgpack.packb({**fields, "expires": fields["expires"] + 1000 * int(DAY)}), sig)
    with pytest.raises(MeshError, match="signature is invalid"):
        member.verify(forged)
    # flip one bit of the signature
    with pytest.raises(MeshError, match="signature is invalid"):
        member.verify(_join(body, bytes([sig[0] ^ 1]) + sig[1:]))
    # signed over the body without the domain prefix: not a certificate signature
    from peers.identity import PURPOSE_MESH_OWNER, read_key_file

    kp = read_key_file(owner.owner_key_path, PURPOSE_MESH_OWNER)
    assert kp.private_key.sign(CERT_DOMAIN + body) == sig  # sanity: we have the right key
    with pytest.raises(MeshError, match="signature is invalid"):
        member.verify(_join(body, kp.private_key.sign(body)))
    assert member.observe(peer, [forged]) == frozenset()
    assert trust.roles_of(peer) == frozenset()


@pytest.mark.parametrize(
    "text",
    ["", "hello", CERT_PREFIX, CERT_PREFIX + "abc", CERT_PREFIX + "!!!.???", CERT_PREFIX + "a.b",
     "x" * 5000],
)
def test_garbage_cert_rejected(mesh, text: str) -> None:
    _owner, member, _trust = mesh
    with pytest.raises(MeshError):
        member.verify(text)
    with pytest.raises(MeshError):
        member.join(text)


def test_verify_without_mesh_explains(tmp_path: Path) -> None:
    owner = MeshStore(tmp_path / "o")
    owner.init()
    lonely = MeshStore(tmp_path / "l")
    with pytest.raises(MeshError, match="mesh join"):
        lonely.verify(owner.invite(pid(), ["consumer"], 1))
    assert lonely.roles_for(pid()) == frozenset()


def test_invite_needs_owner_key(mesh) -> None:
    _owner, member, _trust = mesh
    with pytest.raises(MeshError, match="no mesh owner key"):
        member.invite(pid(), ["consumer"], 1)


def test_invite_validates_inputs(mesh) -> None:
    owner, _member, _trust = mesh
    with pytest.raises(MeshError, match="not a valid peer id"):
        owner.invite("bogus", ["consumer"], 1)
    with pytest.raises(MeshError, match="unknown role"):
        owner.invite(pid(), ["boss"], 1)
    with pytest.raises(MeshError, match="days"):
        owner.invite(pid(), ["consumer"], 0)


def test_corrupt_mesh_file(tmp_path: Path) -> None:
    (tmp_path / MESH_FILE).write_text("{")
    with pytest.raises(MeshError) as info:
        MeshStore(tmp_path)
    assert str(tmp_path / MESH_FILE) in str(info.value)


def test_certs_seen_before_switching_mesh_stop_counting(tmp_path: Path, mesh) -> None:
    owner, member, trust = mesh
    peer = pid()
    assert member.observe(peer, [owner.invite(peer, ["consumer"], 7)]) == {"consumer"}
    # from the CLI (another process): leave, then join a different mesh
    other = MeshStore(tmp_path / "other-owner")
    other.init()
    cli = MeshStore(member.data_dir, member.own_peer_id)
    cli.leave()
    assert trust.roles_of(peer) == frozenset()
    cli.join(other.invite(member.own_peer_id, ["consumer"], 7))
    assert member.owner_key == other.owner_key
    assert trust.roles_of(peer) == frozenset()  # old owner's certificate no longer counts
