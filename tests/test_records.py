"""Signed capacity records: roundtrip, every forgery refused for the right reason, DHT
validator selection by content, and bounded decoding of arbitrary bytes."""

from __future__ import annotations

import itertools
import time
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from libp2p.records.utils import InvalidRecordType
from libp2p.records.validator import NamespacedValidator

from peers.device import DeviceInfo
from peers.identity import Identity
from peers.records import (
    CAPACITY_NAMESPACE,
    MAX_RECORD_BYTES,
    SIG_DOMAIN,
    CapacityRecord,
    ModelInfo,
    RecordError,
    RecordValidator,
    SeqSource,
    SeqTracker,
    capacity_key,
    encode_envelope,
    rejection_counts,
    sign_record,
    verify_record,
)

NOW = 1_800_000_000.0
SHA = "ab" * 32
DEV = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", 80 * 2**30, 70 * 2**30)

ALICE = Identity.generate()
BOB = Identity.generate()


def make(ident: Identity = ALICE, seq: int = 1, now: float = NOW, **kw: Any) -> CapacityRecord:
    fields: dict[str, Any] = dict(
        memory_budget=60 * 2**30,
        models=[ModelInfo(SHA, "gemma3-270m-q4_k_m", 253_000_000, True, 300_000_000)],
        slots_total=4,
        slots_free=3,
        queue_len=0,
        tokens_per_s={SHA: 87.5},
        addrs=["/ip4/192.168.1.5/tcp/4001"],
        roles=["provider", "seeder"],
        certificates=[],
        version="0.1.0",
    )
    fields.update(kw)
    return CapacityRecord.issue(ident.peer_id_str, seq, DEV, now=now, **fields)


def envelope(data: bytes) -> dict[str, Any]:
    return msgpack.unpackb(data)


def rewrap(data: bytes, **changes: Any) -> bytes:
    env = envelope(data)
    env.update(changes)
    return msgpack.packb(env)


def reject(data: Any, reason: str, **kw: Any) -> RecordError:
    before = rejection_counts()[reason]
    with pytest.raises(RecordError) as info:
        verify_record(data, now=kw.pop("now", NOW + 1), **kw)
    assert info.value.reason == reason, info.value
    assert rejection_counts()[reason] == before + 1
    return info.value


# ---------------------------------------------------------------------------------------


def test_roundtrip() -> None:
    rec = make()
    data = sign_record(rec, ALICE)
    got = verify_record(data, now=NOW + 1, expected_peer_id=ALICE.peer_id_str)
    assert got == rec
    assert got.models[0].loaded is True and got.tokens_per_s == {SHA: 87.5}
    assert got.expires_at - got.issued_at == 300
    env = envelope(data)
    assert set(env) == {"v", "pubkey", "body", "sig"} and env["v"] == 1
    assert env["pubkey"] == ALICE.public_key_bytes
    # the signature is over the domain-separated body
    from libp2p.crypto.serialization import deserialize_public_key

    assert deserialize_public_key(env["pubkey"]).verify(SIG_DOMAIN + env["body"], env["sig"])


def test_roundtrip_empty_lists_and_cpu() -> None:
    rec = CapacityRecord.issue(
        ALICE.peer_id_str, 5, DeviceInfo("cpu", "Xeon", 1, 1), now=NOW, ttl_s=60
    )
    assert verify_record(sign_record(rec, ALICE), now=NOW) == rec


def test_sign_refuses_someone_elses_record() -> None:
    with pytest.raises(ValueError, match="record is for peer"):
        sign_record(make(ALICE), BOB)


def test_bad_signature_rejected() -> None:
    data = sign_record(make(), ALICE)
    sig = envelope(data)["sig"]
    for i in (0, 31, 63):
        flipped = sig[:i] + bytes([sig[i] ^ 0x01]) + sig[i + 1 :]
        reject(rewrap(data, sig=flipped), "bad-signature")
    reject(rewrap(data, sig=b""), "bad-signature")
    reject(rewrap(data, sig=sig + b"\0"), "bad-signature")


def test_body_tampered_rejected() -> None:
    data = sign_record(make(), ALICE)
    env = envelope(data)
    body = msgpack.unpackb(env["body"])
    # a competitor makes us look busy; a liar makes itself look idle: both break the signature
    for change in ({"slots_free": 0}, {"queue_len": 99}, {"seq": body["seq"] + 1000}):
        reject(rewrap(data, body=msgpack.packb({**body, **change})), "bad-signature")
    raw = bytearray(env["body"])
    raw[-2] ^= 0x01
    reject(rewrap(data, body=bytes(raw)), "bad-signature")
    # signature without the domain prefix is not a record signature
    reject(rewrap(data, sig=ALICE.sign(env["body"])), "bad-signature")


def test_key_mismatch_rejected() -> None:
    # the record claims to be Alice's but is signed (validly) with Bob's key
    body = msgpack.unpackb(envelope(sign_record(make(ALICE), ALICE))["body"])
    forged_body = msgpack.packb(body)
    forged = encode_envelope(BOB.public_key_bytes, forged_body, BOB.sign(SIG_DOMAIN + forged_body))
    err = reject(forged, "key-mismatch")
    assert ALICE.peer_id_str in str(err) and BOB.peer_id_str in str(err)
    # Alice's own key but a swapped-in pubkey field: signature no longer checks
    reject(rewrap(sign_record(make(ALICE), ALICE), pubkey=BOB.public_key_bytes), "bad-signature")
    # a genuine record of Bob's offered as Alice's
    reject(sign_record(make(BOB), BOB), "key-mismatch", expected_peer_id=ALICE.peer_id_str)


def test_expired_rejected() -> None:
    data = sign_record(make(now=NOW), ALICE)
    assert verify_record(data, now=NOW + 299) is not None
    reject(data, "expired", now=NOW + 300)
    reject(data, "expired", now=NOW + 3600 * 24)


def test_lifetime_and_future_bounded() -> None:
    reject(sign_record_unchecked(make(ttl_s=7200)), "malformed")
    reject(sign_record(make(now=NOW + 3600), ALICE), "malformed", now=NOW)


def test_replay_lower_seq_rejected() -> None:
    tracker = SeqTracker()
    old = sign_record(make(seq=10), ALICE)
    new = sign_record(make(seq=11), ALICE)
    assert tracker.check(verify_record(new, now=NOW), new) is True
    assert tracker.check(verify_record(new, now=NOW), new) is False  # same bytes: fine
    before = rejection_counts()["replayed"]
    with pytest.raises(RecordError) as info:
        tracker.check(verify_record(old, now=NOW), old)
    assert info.value.reason == "replayed"
    assert rejection_counts()["replayed"] == before + 1
    # same seq, different content: also refused
    other = sign_record(make(seq=11, queue_len=5), ALICE)
    with pytest.raises(RecordError, match="replayed"):
        tracker.check(verify_record(other, now=NOW), other)
    assert tracker.highest(ALICE.peer_id_str) == 11
    # per peer: Bob's low seq is unaffected by Alice's
    bob = sign_record(make(BOB, seq=1), BOB)
    assert tracker.check(verify_record(bob, now=NOW), bob) is True


def test_seq_tracker_is_bounded() -> None:
    tracker = SeqTracker(max_peers=2)
    idents = [Identity.generate() for _ in range(3)]
    for ident in idents:
        data = sign_record(make(ident), ident)
        tracker.check(verify_record(data, now=NOW), data)
    assert tracker.highest(idents[0].peer_id_str) is None
    assert tracker.highest(idents[2].peer_id_str) == 1


def test_seq_source_increases_across_restarts() -> None:
    src = SeqSource()
    a = src.next(now=NOW)
    b = src.next(now=NOW)  # same millisecond
    assert b == a + 1
    restarted = SeqSource()  # a restart forgets `last` but the clock moved on
    assert restarted.next(now=NOW + 1) > b


def sign_record_unchecked(rec: CapacityRecord, ident: Identity = ALICE) -> bytes:
    """Sign without sign_record's own checks, as an attacker (or buggy peer) could."""
    from peers.records import _encode_body

    body = _encode_body(rec)
    return encode_envelope(ident.public_key_bytes, body, ident.sign(SIG_DOMAIN + body))


def test_oversized_rejected() -> None:
    reject(b"\x80" * (MAX_RECORD_BYTES + 1), "too-large")
    # validly signed but with a huge field
    big = sign_record_unchecked(make(version="x" * (MAX_RECORD_BYTES + 10)))
    reject(big, "too-large")
    # too many list entries, each small, total under 64 KiB
    many = [ModelInfo(f"{i:064x}", "m", 1, False, 1) for i in range(200)]
    data = sign_record_unchecked(make(models=many, tokens_per_s={}))
    assert len(data) < MAX_RECORD_BYTES
    reject(data, "too-large")
    with pytest.raises(RecordError, match="too-large"):
        sign_record(make(models=many, tokens_per_s={}), ALICE)
    reject(sign_record_unchecked(make(addrs=["/ip4/1.2.3.4/tcp/1"] * 40)), "too-large")
    reject(sign_record_unchecked(make(certificates=["c"] * 5)), "too-large")


@pytest.mark.parametrize(
    "change",
    [
        {"device": {"kind": "tpu", "name": "x", "memory_total": 1, "memory_free": 1}},
        {"seq": -1},
        {"seq": True},
        {"slots_free": "3"},
        {"issued_at": float("nan")},
        {"models": [{"sha256": "XYZ", "name": "m", "size": 1, "loaded": True, "memory": 1}]},
        {"models": [{"sha256": SHA, "name": "m", "size": 1, "loaded": 1, "memory": 1}]},
        {"roles": ["admin"]},
        {"tokens_per_s": {"gemma": 1.0}},
        {"slots_free": 9},
        {"expires_at": NOW - 10},
    ],
)
def test_malformed_body_rejected(change: dict[str, Any]) -> None:
    body = msgpack.unpackb(envelope(sign_record(make(), ALICE))["body"])
    new = msgpack.packb({**body, **change})
    reject(encode_envelope(ALICE.public_key_bytes, new, ALICE.sign(SIG_DOMAIN + new)), "malformed")


def test_missing_field_rejected() -> None:
    body = msgpack.unpackb(envelope(sign_record(make(), ALICE))["body"])
    del body["seq"]
    new = msgpack.packb(body)
    reject(encode_envelope(ALICE.public_key_bytes, new, ALICE.sign(SIG_DOMAIN + new)), "malformed")


def test_malformed_envelope_rejected() -> None:
    data = sign_record(make(), ALICE)
    env = envelope(data)
    reject(b"", "malformed")
    reject(b"\xc1", "malformed")
    reject(data + b"\0", "malformed")  # trailing bytes
    reject(msgpack.packb([1, 2, 3]), "malformed")
    reject(rewrap(data, v=2), "malformed")
    reject(rewrap(data, v=True), "malformed")
    reject(msgpack.packb({**env, "extra": 1}), "malformed")
    reject(rewrap(data, pubkey=b"\x08\x01\x12\x20" + b"\0" * 31), "malformed")
    reject(rewrap(data, pubkey=ALICE.raw_public_key), "malformed")
    reject(rewrap(data, body="text"), "malformed")
    reject("not bytes", "malformed")
    reject(b"\x91" * 10_000, "malformed")  # deep nesting


# ---------------------------------------------------------------------------------------
# DHT validator


def test_validator_validates_against_key() -> None:
    v = RecordValidator(clock=lambda: NOW + 1)
    data = sign_record(make(), ALICE)
    v.validate(capacity_key(ALICE.peer_id_str), data)
    assert capacity_key(ALICE.peer_id) == f"/{CAPACITY_NAMESPACE}/{ALICE.peer_id_str}"
    # Alice's genuine record stored under Bob's key
    with pytest.raises(InvalidRecordType, match="key-mismatch"):
        v.validate(capacity_key(BOB.peer_id_str), data)
    with pytest.raises(InvalidRecordType):
        v.validate(f"/other/{ALICE.peer_id_str}", data)
    with pytest.raises(InvalidRecordType, match="expired"):
        RecordValidator(clock=lambda: NOW + 10_000).validate(capacity_key(ALICE.peer_id), data)
    with pytest.raises(InvalidRecordType, match="bad-signature"):
        sig = envelope(data)["sig"]
        v.validate(capacity_key(ALICE.peer_id), rewrap(data, sig=bytes([sig[0] ^ 1]) + sig[1:]))


def test_validator_select_picks_highest_seq_in_any_order() -> None:
    v = RecordValidator(clock=lambda: NOW + 1)
    key = capacity_key(ALICE.peer_id_str)
    recs = {seq: sign_record(make(seq=seq), ALICE) for seq in (3, 7, 5, 1)}
    for order in itertools.permutations(recs.values()):
        values = list(order)
        assert values[v.select(key, values)] == recs[7]


def test_validator_select_ignores_invalid_values() -> None:
    v = RecordValidator(clock=lambda: NOW + 1)
    key = capacity_key(ALICE.peer_id_str)
    good = sign_record(make(seq=5), ALICE)
    # higher seq, but forged (Bob's key), tampered, expired, or garbage: never chosen
    body = msgpack.unpackb(envelope(good)["body"])
    forged_body = msgpack.packb({**body, "seq": 10**12})
    forged = encode_envelope(BOB.public_key_bytes, forged_body, BOB.sign(SIG_DOMAIN + forged_body))
    tampered = rewrap(good, body=forged_body)
    expired = sign_record(make(seq=10**12, now=NOW - 1000), ALICE)
    bobs = sign_record(make(BOB, seq=10**12), BOB)
    bad = [forged, tampered, expired, bobs, b"junk"]
    for order in itertools.permutations([good, *bad]):
        values = list(order)
        assert values[v.select(key, values)] == good
    with pytest.raises(InvalidRecordType):
        v.select(key, bad)


def test_validator_in_libp2p_namespaced_validator() -> None:
    ns = NamespacedValidator({CAPACITY_NAMESPACE: RecordValidator(clock=lambda: NOW)})
    key = capacity_key(ALICE.peer_id_str)
    old, new = sign_record(make(seq=1), ALICE), sign_record(make(seq=2), ALICE)
    ns.validate(key, new)
    # KadDHT's PUT handler calls select(key, [existing, new]) and keeps index 0 on 0
    assert ns.select(key, [old, new]) == 1
    assert ns.select(key, [new, old]) == 0


# ---------------------------------------------------------------------------------------
# hypothesis: arbitrary input never escapes as anything but RecordError


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_raise_only_record_error(data: bytes) -> None:
    with pytest.raises(RecordError) as info:
        verify_record(data, now=NOW)
    assert info.value.reason in ("malformed", "too-large", "bad-signature")


_VALID = sign_record(make(), ALICE)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.integers(0, len(_VALID) - 1), st.integers(1, 255))
def test_mutated_record_rejected_or_identical(pos: int, xor: int) -> None:
    data = bytearray(_VALID)
    data[pos] ^= xor
    try:
        rec = verify_record(bytes(data), now=NOW + 1)
    except RecordError:
        return
    assert rec == verify_record(_VALID, now=NOW + 1)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats()
        | st.text(max_size=20)
        | st.binary(max_size=40),
        lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=10), c, max_size=5),
        max_leaves=30,
    )
)
def test_random_msgpack_bodies_raise_only_record_error(body_obj: Any) -> None:
    # well-formed envelope, validly signed, arbitrary body: must still be refused cleanly
    body = msgpack.packb(body_obj)
    data = encode_envelope(ALICE.public_key_bytes, body, ALICE.sign(SIG_DOMAIN + body))
    with pytest.raises(RecordError):
        verify_record(data, now=NOW)


def test_real_clock_default_ttl() -> None:
    now = time.time()
    rec = CapacityRecord.issue(ALICE.peer_id_str, SeqSource().next(), DEV)
    assert verify_record(sign_record(rec, ALICE), now=now + 1).seq == rec.seq


# ---------------------------------------------------------------------------------------
# device detection (what goes in the record's `device` field)


def test_detect_device_never_raises_and_is_recordable(monkeypatch: pytest.MonkeyPatch) -> None:
    from peers import device

    info = device.detect_device()
    assert info.kind in device.DEVICE_KINDS and info.memory_total >= info.memory_free >= 0
    rec = CapacityRecord.issue(ALICE.peer_id_str, 1, info, now=NOW)
    assert verify_record(sign_record(rec, ALICE), now=NOW).device == info

    def boom() -> None:
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(device, "_probe_pynvml", boom)
    monkeypatch.setattr(device, "_probe_nvidia_smi", boom)
    monkeypatch.setattr(device, "_probe_metal", boom)
    monkeypatch.setattr(device, "_probe_cpu", boom)
    fallback = device.detect_device()
    assert fallback.kind == "cpu"


def test_parse_nvidia_smi_and_meminfo() -> None:
    from peers.device import parse_cpu_model, parse_meminfo, parse_nvidia_smi

    out = "NVIDIA GeForce RTX 3060, 12288, 1000\nNVIDIA H100 80GB HBM3, 81559, 80000\n"
    got = parse_nvidia_smi(out)
    assert got == DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", 81559 * 2**20, 80000 * 2**20)
    assert parse_nvidia_smi("") is None
    assert parse_nvidia_smi("garbage\n") is None
    mem = "MemTotal:       16318412 kB\nMemFree:  1000 kB\nMemAvailable:   8000000 kB\n"
    assert parse_meminfo(mem) == (16318412 * 1024, 8000000 * 1024)
    assert parse_meminfo("nothing") is None
    assert parse_cpu_model("processor\t: 0\nmodel name\t: AMD Ryzen 9 7950X\n") == "AMD Ryzen 9 7950X"


def test_registers_with_real_kad_dht() -> None:
    from libp2p import new_host
    from libp2p.kad_dht.kad_dht import DHTMode, KadDHT

    host = new_host(key_pair=ALICE.keypair)
    dht = KadDHT(host, DHTMode.SERVER)
    dht.register_validator(CAPACITY_NAMESPACE, RecordValidator(clock=lambda: NOW))
    key = capacity_key(ALICE.peer_id)
    old, new = sign_record(make(seq=1), ALICE), sign_record(make(seq=2), ALICE)
    assert dht.validator is not None
    dht.validator.validate(key, old)
    assert dht.validator.select(key, [new, old]) == 0
    with pytest.raises(InvalidRecordType):
        dht.validator.validate(capacity_key(BOB.peer_id), old)
