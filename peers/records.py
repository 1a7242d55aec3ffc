"""Signed, expiring capacity records: what a node can run right now, signed by its own key.

Wire format (msgpack map, at most MAX_RECORD_BYTES):

    {"v": 1,
     "pubkey": libp2p protobuf-serialized Ed25519 public key of the node,
     "body":   msgpack bytes of the record fields (see _encode_body),
     "sig":    Ed25519 signature over b"qvac-capacity-record:" + body}

The signature covers the body *bytes*, so verification never depends on re-encoding.
The domain prefix keeps a record signature from being valid as any other message the
same key signs. DHT key: "/qvac-cap/<peer id base58>".

Unlike Petals/hivemind records, nobody but the node itself can write its record, and a
record dies on its own after minutes, so a vanished node stops attracting requests.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
from libp2p.peer.id import ID
from libp2p.records.utils import InvalidRecordType, split_key
from libp2p.records.validator import Validator

from peers.device import DEVICE_KINDS, DeviceInfo
from peers.identity import Identity, parse_public_key

RECORD_VERSION = 1
SIG_DOMAIN = b"qvac-capacity-record:"
CAPACITY_NAMESPACE = "qvac-cap"
DEFAULT_TTL_S = 300.0
MAX_TTL_S = 3600.0  # why: "minutes, not hours"; a longer-lived record is refused
MAX_CLOCK_SKEW_S = 300.0
MAX_RECORD_BYTES = 64 * 1024
MAX_MODELS = 128
MAX_ADDRS = 32
MAX_ROLES = 8
MAX_CERTIFICATES = 4
MAX_NAME_LEN = 256
MAX_ADDR_LEN = 512
MAX_CERT_LEN = 2048
MAX_VERSION_LEN = 64
_MAX_INT = 2**63 - 1
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
RECORD_ROLES = ("consumer", "provider", "seeder")

REASONS = ("malformed", "bad-signature", "key-mismatch", "expired", "too-large", "replayed")
# Rejections by reason since start; the daemon exports these to /metrics.
REJECTIONS: Counter[str] = Counter({r: 0 for r in REASONS})


def rejection_counts() -> dict[str, int]:
    return {r: REJECTIONS[r] for r in REASONS}


class RecordError(Exception):
    """A capacity record was refused; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REASONS
        self.reason = reason
        self.detail = detail
        super().__init__(f"capacity record rejected ({reason})" + (f": {detail}" if detail else ""))


def _reject(reason: str, detail: str = "", *, count: bool = True) -> RecordError:
    if count:
        REJECTIONS[reason] += 1
    return RecordError(reason, detail)


@dataclass(frozen=True)
class ModelInfo:
    sha256: str  # lowercase hex of the model file
    name: str
    size: int  # bytes on disk
    loaded: bool
    memory: int  # estimated bytes to run it


@dataclass(frozen=True)
class CapacityRecord:
    peer_id: str
    seq: int
    issued_at: float  # unix seconds
    expires_at: float  # unix seconds
    device: DeviceInfo
    memory_budget: int = 0
    models: tuple[ModelInfo, ...] = ()
    slots_total: int = 0
    slots_free: int = 0
    queue_len: int = 0
    tokens_per_s: Mapping[str, float] = field(default_factory=dict)  # model sha256 -> tok/s
    # All sequences together over the last seconds (continuous batching): with
    # slots_total/slots_free (parallel sequences), how busy the node is and how much it
    # delivers. Optional on the wire: records of older nodes lack it (read as 0).
    aggregate_tokens_per_s: float = 0.0
    addrs: tuple[str, ...] = ()  # multiaddrs
    roles: tuple[str, ...] = ()  # what this node offers: "provider", "seeder", ...
    certificates: tuple[str, ...] = ()  # mesh certificates it holds
    version: str = ""  # software version
    # Memory this node offers for layers of split models (qvacd/services/layers.py), free
    # now; optional on the wire (absent from older nodes: read as 0, offers none).
    layers_memory: int = 0

    @classmethod
    def issue(
        cls,
        peer_id: str,
        seq: int,
        device: DeviceInfo,
        *,
        now: float | None = None,
        ttl_s: float = DEFAULT_TTL_S,
        **fields: Any,
    ) -> CapacityRecord:
        """A record issued now that expires after `ttl_s` seconds."""
        now = time.time() if now is None else now
        for k in ("models", "addrs", "roles", "certificates"):
            if k in fields:
                fields[k] = tuple(fields[k])
        return cls(peer_id, seq, now, now + ttl_s, device, **fields)

    def is_expired(self, now: float) -> bool:
        return now >= self.expires_at


class SeqSource:
    """Sequence numbers for our own records: strictly increasing, also across restarts,
    because they follow the wall clock in milliseconds (and never repeat within a run)."""

    def __init__(self, last: int = 0) -> None:
        self.last = last

    def next(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        self.last = max(self.last + 1, int(now * 1000))
        return self.last


# ---------------------------------------------------------------------------------------
# encoding


def _encode_body(r: CapacityRecord) -> bytes:
    return msgpack.packb(
        {
            "peer_id": r.peer_id,
            "seq": r.seq,
            "issued_at": float(r.issued_at),
            "expires_at": float(r.expires_at),
            "device": {
                "kind": r.device.kind,
                "name": r.device.name,
                "memory_total": r.device.memory_total,
                "memory_free": r.device.memory_free,
            },
            "memory_budget": r.memory_budget,
            "models": [
                {"sha256": m.sha256, "name": m.name, "size": m.size, "loaded": m.loaded,
                 "memory": m.memory}
                for m in r.models
            ],
            "slots_total": r.slots_total,
            "slots_free": r.slots_free,
            "queue_len": r.queue_len,
            "tokens_per_s": {k: float(v) for k, v in r.tokens_per_s.items()},
            "aggregate_tokens_per_s": float(r.aggregate_tokens_per_s),
            "addrs": list(r.addrs),
            "roles": list(r.roles),
            "certificates": list(r.certificates),
            "version": r.version,
            **({"layers_memory": r.layers_memory} if r.layers_memory else {}),
        },
        use_bin_type=True,
    )


def _unpack(data: bytes, **limits: int) -> Any:
    return msgpack.unpackb(
        data, raw=False, strict_map_key=True, use_list=True, max_ext_len=0, **limits
    )


class _Malformed(Exception):
    pass


class _TooLarge(Exception):
    pass


def _get(m: dict[str, Any], key: str, typ: type) -> Any:
    if key not in m:
        raise _Malformed(f"missing field {key!r}")
    v = m[key]
    if typ is int:
        if type(v) is not int or not 0 <= v <= _MAX_INT:
            raise _Malformed(f"field {key!r} must be a non-negative integer")
    elif typ is float:
        if type(v) not in (int, float) or not math.isfinite(v) or v < 0:
            raise _Malformed(f"field {key!r} must be a non-negative number")
        v = float(v)
    elif typ is bool:
        if type(v) is not bool:
            raise _Malformed(f"field {key!r} must be a boolean")
    elif not isinstance(v, typ):
        raise _Malformed(f"field {key!r} must be {typ.__name__}")
    return v


def _str(m: dict[str, Any], key: str, max_len: int) -> str:
    v = _get(m, key, str)
    if len(v) > max_len:
        raise _TooLarge(f"field {key!r} is longer than {max_len}")
    return v


def _str_list(m: dict[str, Any], key: str, max_items: int, max_len: int) -> tuple[str, ...]:
    v = _get(m, key, list)
    if len(v) > max_items:
        raise _TooLarge(f"{key!r} has {len(v)} entries (max {max_items})")
    if not all(isinstance(s, str) for s in v):
        raise _Malformed(f"{key!r} must be a list of strings")
    if any(len(s) > max_len for s in v):
        raise _TooLarge(f"an entry of {key!r} is longer than {max_len}")
    return tuple(v)


def _decode_body(body: bytes) -> CapacityRecord:
    try:
        m = _unpack(
            body,
            max_str_len=MAX_CERT_LEN,
            max_bin_len=0,
            max_array_len=max(MAX_MODELS, MAX_ADDRS),
            max_map_len=max(MAX_MODELS, 32),
        )
    except ValueError as exc:
        if "exceeds max" in str(exc):
            raise _TooLarge(str(exc)) from None
        raise _Malformed(f"body does not decode ({exc})") from None
    except Exception as exc:
        raise _Malformed(f"body does not decode ({type(exc).__name__})") from None
    if not isinstance(m, dict):
        raise _Malformed("body is not a map")

    dev = _get(m, "device", dict)
    kind = _str(dev, "kind", 16)
    if kind not in DEVICE_KINDS:
        raise _Malformed(f"unknown device kind {kind!r}")
    device = DeviceInfo(
        kind, _str(dev, "name", MAX_NAME_LEN), _get(dev, "memory_total", int),
        _get(dev, "memory_free", int),
    )

    raw_models = _get(m, "models", list)
    if len(raw_models) > MAX_MODELS:
        raise _TooLarge(f"'models' has {len(raw_models)} entries (max {MAX_MODELS})")
    models = []
    for entry in raw_models:
        if not isinstance(entry, dict):
            raise _Malformed("a model entry is not a map")
        sha = _str(entry, "sha256", 64)
        if not _SHA256_RE.fullmatch(sha):
            raise _Malformed("a model sha256 is not 64 lowercase hex digits")
        models.append(
            ModelInfo(sha, _str(entry, "name", MAX_NAME_LEN), _get(entry, "size", int),
                      _get(entry, "loaded", bool), _get(entry, "memory", int))
        )

    tps_raw = _get(m, "tokens_per_s", dict)
    if len(tps_raw) > MAX_MODELS:
        raise _TooLarge(f"'tokens_per_s' has {len(tps_raw)} entries (max {MAX_MODELS})")
    tps: dict[str, float] = {}
    for k in tps_raw:
        if not _SHA256_RE.fullmatch(k):
            raise _Malformed("a tokens_per_s key is not a sha256")
        tps[k] = _get(tps_raw, k, float)

    roles = _str_list(m, "roles", MAX_ROLES, 32)
    if any(r not in RECORD_ROLES for r in roles):
        raise _Malformed(f"unknown role in {roles!r}")

    rec = CapacityRecord(
        peer_id=_str(m, "peer_id", 128),
        seq=_get(m, "seq", int),
        issued_at=_get(m, "issued_at", float),
        expires_at=_get(m, "expires_at", float),
        device=device,
        memory_budget=_get(m, "memory_budget", int),
        models=tuple(models),
        slots_total=_get(m, "slots_total", int),
        slots_free=_get(m, "slots_free", int),
        queue_len=_get(m, "queue_len", int),
        tokens_per_s=tps,
        aggregate_tokens_per_s=(_get(m, "aggregate_tokens_per_s", float)
                                if "aggregate_tokens_per_s" in m else 0.0),
        addrs=_str_list(m, "addrs", MAX_ADDRS, MAX_ADDR_LEN),
        roles=roles,
        certificates=_str_list(m, "certificates", MAX_CERTIFICATES, MAX_CERT_LEN),
        version=_str(m, "version", MAX_VERSION_LEN),
        layers_memory=_get(m, "layers_memory", int) if "layers_memory" in m else 0,
    )
    if rec.expires_at <= rec.issued_at:
        raise _Malformed("expires_at is not after issued_at")
    if rec.expires_at - rec.issued_at > MAX_TTL_S:
        raise _Malformed(f"lifetime exceeds {MAX_TTL_S:.0f} s")
    if rec.slots_free > rec.slots_total:
        raise _Malformed("slots_free exceeds slots_total")
    return rec


def encode_envelope(pubkey: bytes, body: bytes, sig: bytes) -> bytes:
    return msgpack.packb({"v": RECORD_VERSION, "pubkey": pubkey, "body": body, "sig": sig},
                         use_bin_type=True)


def sign_record(record: CapacityRecord, identity: Identity) -> bytes:
    """The wire bytes of `record`, signed by `identity` (which must be the record's peer)."""
    if record.peer_id != identity.peer_id_str:
        raise ValueError(
            f"record is for peer {record.peer_id} but the key is {identity.peer_id_str}"
        )
    body = _encode_body(record)
    try:
        _decode_body(body)  # why: never publish what our own peers would refuse
    except _TooLarge as exc:
        raise RecordError("too-large", str(exc)) from None
    except _Malformed as exc:
        raise RecordError("malformed", str(exc)) from None
    data = encode_envelope(identity.public_key_bytes, body, identity.sign(SIG_DOMAIN + body))
    if len(data) > MAX_RECORD_BYTES:
        raise RecordError("too-large", f"{len(data)} bytes (max {MAX_RECORD_BYTES})")
    return data


def verify_record(
    data: bytes,
    *,
    now: float,
    expected_peer_id: str | None = None,
    count: bool = True,
) -> CapacityRecord:
    """Decode and check a record; raise RecordError (and count it) if it is not acceptable.

    Checks in order: size, envelope shape, signature (before trusting any body field),
    body fields, peer id == id of the signing key (and == `expected_peer_id`), expiry.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _reject("malformed", "not bytes", count=count)
    data = bytes(data)
    if len(data) > MAX_RECORD_BYTES:
        raise _reject("too-large", f"{len(data)} bytes (max {MAX_RECORD_BYTES})", count=count)
    try:
        env = _unpack(data, max_str_len=16, max_bin_len=MAX_RECORD_BYTES, max_array_len=0,
                      max_map_len=4)
    except Exception as exc:
        raise _reject("malformed", f"envelope does not decode ({type(exc).__name__})",
                      count=count) from None
    if not isinstance(env, dict) or set(env) != {"v", "pubkey", "body", "sig"}:
        raise _reject("malformed", "envelope must have exactly v, pubkey, body, sig", count=count)
    if env["v"] != RECORD_VERSION or type(env["v"]) is not int:
        raise _reject("malformed", f"unsupported version {env['v']!r}", count=count)
    pubkey, body, sig = env["pubkey"], env["body"], env["sig"]
    if not (isinstance(pubkey, bytes) and isinstance(body, bytes) and isinstance(sig, bytes)):
        raise _reject("malformed", "pubkey, body and sig must be bytes", count=count)
    try:
        key = parse_public_key(pubkey)
    except Exception:
        raise _reject("malformed", "pubkey is not an Ed25519 public key", count=count) from None
    if len(sig) != 64 or not key.verify(SIG_DOMAIN + body, sig):
        raise _reject("bad-signature", "signature does not match the body and key", count=count)
    try:
        rec = _decode_body(body)
    except _TooLarge as exc:
        raise _reject("too-large", str(exc), count=count) from None
    except _Malformed as exc:
        raise _reject("malformed", str(exc), count=count) from None
    signer = ID.from_pubkey(key).to_base58()
    if rec.peer_id != signer:
        raise _reject("key-mismatch", f"record claims {rec.peer_id} but is signed by {signer}",
                      count=count)
    if expected_peer_id is not None and rec.peer_id != expected_peer_id:
        raise _reject("key-mismatch", f"expected {expected_peer_id}, got {rec.peer_id}",
                      count=count)
    if rec.issued_at > now + MAX_CLOCK_SKEW_S:
        raise _reject("malformed", "issued in the future (check this device's clock)",
                      count=count)
    if rec.is_expired(now):
        raise _reject("expired", f"expired {now - rec.expires_at:.0f} s ago", count=count)
    return rec


# ---------------------------------------------------------------------------------------
# replay protection and the DHT validator


class SeqTracker:
    """Highest seq seen per peer: a lower seq is a replay of an old record. The same seq is
    fine only with the same bytes (a re-delivery); different bytes under one seq is a replay
    too. Bounded: the least recently updated peers are forgotten past `max_peers`."""

    def __init__(self, max_peers: int = 10_000) -> None:
        self.max_peers = max_peers
        self._seen: OrderedDict[str, tuple[int, bytes]] = OrderedDict()

    def highest(self, peer_id: str) -> int | None:
        got = self._seen.get(peer_id)
        return got[0] if got else None

    def check(self, record: CapacityRecord, data: bytes) -> bool:
        """Accept `record` (already verified, with its wire bytes `data`) or raise
        RecordError("replayed"). Returns True if it is newer than anything seen."""
        digest = hashlib.sha256(bytes(data)).digest()
        got = self._seen.get(record.peer_id)
        if got is not None:
            seq, seen_digest = got
            if record.seq < seq:
                raise _reject("replayed", f"seq {record.seq} is older than {seq}")
            if record.seq == seq:
                if digest != seen_digest:
                    raise _reject("replayed", f"seq {seq} was already used for another record")
                return False
        self._seen[record.peer_id] = (record.seq, digest)
        self._seen.move_to_end(record.peer_id)
        while len(self._seen) > self.max_peers:
            self._seen.popitem(last=False)
        return True


def capacity_key(peer_id: str | ID) -> str:
    pid = peer_id.to_base58() if isinstance(peer_id, ID) else peer_id
    return f"/{CAPACITY_NAMESPACE}/{pid}"


class RecordValidator(Validator):
    """py-libp2p KadDHT validator for "/qvac-cap/<peer id>":
    `dht.register_validator(CAPACITY_NAMESPACE, RecordValidator())`.

    validate() raises InvalidRecordType (what KadDHT expects) for any bad record, including
    one stored under another peer's key; select() picks the valid record with the highest
    seq, whatever the order of `values` (KadDHT passes [existing, new] on PUT)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock

    @staticmethod
    def _peer_of(key: str) -> str:
        ns, rest = split_key(key)
        if ns != CAPACITY_NAMESPACE:
            raise InvalidRecordType(f"namespace is {ns!r}, not {CAPACITY_NAMESPACE!r}")
        return rest

    def validate(self, key: str, value: bytes) -> None:
        peer = self._peer_of(key)
        try:
            verify_record(value, now=self.clock(), expected_peer_id=peer)
        except RecordError as exc:
            raise InvalidRecordType(str(exc)) from None

    def select(self, key: str, values: list[bytes]) -> int:
        peer = self._peer_of(key)
        now = self.clock()
        best: tuple[int, float, bytes] | None = None
        best_i = -1
        for i, value in enumerate(values):
            try:
                rec = verify_record(value, now=now, expected_peer_id=peer, count=False)
            except RecordError:
                continue
            # why: by content only; equal seq (shouldn't happen) breaks ties by bytes,
            # so every node picks the same record whatever order it got them in
            rank = (rec.seq, rec.expires_at, bytes(value))
            if best is None or rank > best:
                best, best_i = rank, i
        if best_i < 0:
            raise InvalidRecordType(f"no valid capacity record among {len(values)} for {key}")
        return best_i

