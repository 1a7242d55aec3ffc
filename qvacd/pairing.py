"""Pairing two devices with a short one-time code: both ends of `/qvac/pair/1.0.0`.

`qvacd pair` on one device makes an *offer* and shows its code, `7-4821-0953`: the offer
number (7, not secret: it tells the offering device which offer is meant) and 8 secret
digits (26.6 bits), something a person reads aloud. `qvacd pair 7-4821-0953` on the other
device finds the offering device among the peers it is connected to (on a LAN the
daemons already find each other by mDNS, so the code carries no address), or dials the
address in the link form `qvac://pair/7-4821-0953@<multiaddr>` (peers beyond the LAN).

Why a PAKE: the code is far too short to be a key. SPAKE2 (the `spake2` package) turns
it into one only if both sides know it, with the two peer ids of the authenticated
libp2p connection (Noise proves them) as its identities, so the key belongs to exactly
those two devices. An eavesdropper learns nothing; an active attacker (a fake mDNS
responder, a third node that knows both peer ids) gets one guess per attempt and
cannot test guesses offline. Both sides then prove they hold the key (HMACs over the
transcript, the offered roles included); only after both checks does each side add the
other to its trust store (peers/trust.py) with the offered roles; an offering device
that owns a mesh (peers/mesh.py) also issues the joiner a membership certificate, so the
mesh's other devices trust it too. The exact exchange is in docs/protocol.md.

Attempts are limited where the guesses land, on the offering device: one at a time per
offer, every attempt that does not end in a pairing is counted as failed, and the offer
dies after MAX_FAILED_ATTEMPTS. Every failed or refused attempt is also an offence for
the guard (peers/guard.py, kind "pairing"), so an untrusted peer that floods guesses is
banned. Every read has a deadline; the handler ends at its stream (contain_handler_errors).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import trio
from spake2 import SPAKE2_A, SPAKE2_B

from peers.identity import short_peer_id
from peers.trust import BASE_ROLES, ROLES, TrustError, parse_roles
from protocol import (
    PAIR_LIMITS,
    PAIR_PROTOCOL,
    Error,
    ErrorCode,
    PairConfirm,
    PairDone,
    PairReply,
    PairStart,
    ProtocolError,
)

from .p2p_io import FrameStream, StreamGone

log = logging.getLogger("qvacd.pairing")

SECRET_DIGITS = 8
MAX_OFFER_NUMBER = 99
MAX_FAILED_ATTEMPTS = 3
MAX_OPEN_OFFERS = 4
MAX_KEPT_OFFERS = 32  # finished offers kept to say "used"/"expired" instead of "no such offer"
KEEP_FINISHED_S = 600.0
DEFAULT_MINUTES = 5.0
MAX_MINUTES = 60.0
MESH_CERT_DAYS = 90  # what `qvacd mesh invite` gives by default
STEP_TIMEOUT_S = 10.0  # one read of the exchange; a person is not waiting on these
FIND_PEERS_S = 5.0  # how long a just-started joiner waits for mDNS to connect it to someone
YOUNG_S = 30.0  # "just started": later, no connected peer now means none soon either
LINK_SCHEME = "qvac://pair/"
_PASSWORD_PREFIX = b"qvac-pair/1:"
_NO_OFFER = "has no pairing offer"  # the generic refusal: this peer never made the offer

_CODE_RE = re.compile(r"^\s*(\d{1,2})\s*[-\s]\s*(\d{4})\s*[-\s]?\s*(\d{4})\s*$")


class PairingError(Exception):
    """A pairing that did not happen: one line that says why and what to do.
    `kind`: wrong_code, not_found, expired, used, busy, unreachable, bad_input, failed."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


# ---- the code ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PairCode:
    offer: int
    secret: str  # SECRET_DIGITS decimal digits

    def __str__(self) -> str:
        return f"{self.offer}-{self.secret[:4]}-{self.secret[4:]}"

    @property
    def password(self) -> bytes:
        return _PASSWORD_PREFIX + str(self).encode()

    @classmethod
    def new(cls, offer: int) -> PairCode:
        return cls(offer, f"{secrets.randbelow(10 ** SECRET_DIGITS):0{SECRET_DIGITS}d}")


def parse_code(text: str) -> tuple[PairCode, str | None]:
    """A typed code or link: (code, multiaddr or None). PairingError(bad_input) otherwise."""
    if not isinstance(text, str) or len(text) > 1024:
        raise PairingError("bad_input", "a pairing code looks like 7-4821-0953; type the one"
                           " `qvacd pair` shows on the other device")
    text = text.strip()
    addr = None
    if text.lower().startswith(LINK_SCHEME):
        rest = text[len(LINK_SCHEME):]
        code_part, sep, addr = rest.partition("@")
        if not sep or not addr.startswith("/") or "/p2p/" not in addr:
            raise PairingError("bad_input", f"pairing link {text[:80]!r} has no address; it"
                               " looks like qvac://pair/7-4821-0953@/ip4/.../p2p/<peer id>")
        text = code_part
    m = _CODE_RE.match(text)
    if m is None or not 1 <= int(m[1]) <= MAX_OFFER_NUMBER:
        raise PairingError("bad_input", f"{text[:40]!r} is not a pairing code; it looks like"
                           " 7-4821-0953 (the offer number, then 8 digits)")
    return PairCode(int(m[1]), m[2] + m[3]), addr


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def transcript_hash(offerer: str, joiner: str, offer: int, pake_a: bytes, pake_b: bytes,
                    roles: Iterable[str]) -> bytes:
    """What both confirmations cover (docs/protocol.md, `/qvac/pair/1.0.0`)."""
    parts = (b"qvac-pair/1", offerer.encode(), joiner.encode(), str(offer).encode(),
             pake_a, pake_b, ",".join(roles).encode())
    return hashlib.sha256(b"".join(_lp(p) for p in parts)).digest()


def confirmation(key: bytes, side: bytes, th: bytes) -> bytes:
    return hmac.new(key, side + th, hashlib.sha256).digest()


# ---- offers -----------------------------------------------------------------------------


@dataclass
class Offer:
    code: PairCode
    roles: tuple[str, ...]
    created: float  # wall clock, for people
    expires_at: float  # wall clock
    deadline: float  # monotonic
    state: str = "open"  # open, paired, expired, dead, cancelled
    failed: int = 0
    in_flight: bool = False
    peer_id: str | None = None  # who paired
    last_failure: str | None = None
    finished: float | None = None  # monotonic
    _changed: trio.Event | None = field(default=None, repr=False)

    def view(self, links: list[str]) -> dict[str, Any]:
        return {
            "offer": self.code.offer, "state": self.state, "roles": list(self.roles),
            "expires_at": datetime.fromtimestamp(self.expires_at, UTC).strftime(
                "%Y-%m-%dT%H:%M:%SZ"),
            "expires_in_s": max(0.0, round(self.deadline - time.monotonic(), 1)),
            "failed_attempts": self.failed, "max_failed_attempts": MAX_FAILED_ATTEMPTS,
            "peer_id": self.peer_id, "last_failure": self.last_failure,
            **({"code": str(self.code), "links": links,
                "link": links[0] if links else None} if self.state == "open" else {}),
        }


class PairNetwork(Protocol):
    """What pairing needs of peers.PeerNetwork."""

    def connected_peers(self) -> list[str]: ...
    async def connect(self, addr: str, *, source: str = "manual") -> str: ...
    async def open_stream(self, peer_id: str, protocol_id: str, timeout: float = 10.0) -> Any: ...
    def offence(self, kind: str, stream: Any, peer: str) -> bool: ...


class TrustEdit(Protocol):
    def add(self, peer_id: str, roles: Iterable[str] | str, note: str | None = None) -> Any: ...


class MeshEdit(Protocol):
    """What pairing needs of peers.mesh.MeshStore."""

    @property
    def is_owner(self) -> bool: ...
    def invite(self, peer_id: str, roles: Iterable[str] | str, days: float) -> str: ...
    def join(self, text: str) -> Any: ...


class PairingService:
    """Offers made here, the server side of `/qvac/pair/1.0.0`, and joining others'."""

    def __init__(self, node_id: str, trust: TrustEdit, network: PairNetwork, *,
                 link_addrs: Callable[[], list[str]] = list, registry: Any = None,
                 mesh: MeshEdit | None = None) -> None:
        self.node_id = node_id
        self.trust = trust
        self.mesh = mesh
        self.network = network
        self.link_addrs = link_addrs
        self.offers: dict[int, Offer] = {}
        self.started = time.monotonic()
        self.counts: Counter[str] = Counter()
        self._metric = None
        if registry is not None:
            from prometheus_client import Counter as PromCounter

            self._metric = PromCounter("qvacd_pairing_attempts", "Pairing attempts seen by this"
                                       " node, by role and outcome", ["side", "outcome"],
                                       registry=registry)

    def _count(self, side: str, outcome: str) -> None:
        self.counts[f"{side}_{outcome}"] += 1
        if self._metric is not None:
            self._metric.labels(side, outcome).inc()

    # -- offers (the HTTP API's side) --

    def create_offer(self, roles: Iterable[str] | str | None = None,
                     minutes: float = DEFAULT_MINUTES) -> Offer:
        """A new open offer; PairingError(bad_input|busy) if it cannot be made."""
        try:
            granted = parse_roles(BASE_ROLES if roles is None else roles)
        except ValueError as e:
            raise PairingError("bad_input", str(e)) from None
        if type(minutes) not in (int, float) or not 0 < minutes <= MAX_MINUTES:
            raise PairingError("bad_input", f"minutes must be a number in (0, {MAX_MINUTES:g}]")
        self._housekeep()
        open_now = [o for o in self.offers.values() if o.state == "open"]
        if len(open_now) >= MAX_OPEN_OFFERS:
            raise PairingError("busy", f"{len(open_now)} pairing offers are open already;"
                               " finish or cancel one (Ctrl-C the `qvacd pair` showing it)")
        free = [n for n in range(1, MAX_OFFER_NUMBER + 1)
                if n not in self.offers or self.offers[n].state != "open"]
        number = secrets.choice(free)
        now = time.time()
        offer = Offer(PairCode.new(number), tuple(r for r in ROLES if r in granted), now,
                      now + minutes * 60, time.monotonic() + minutes * 60)
        self.offers[number] = offer
        self._count("offer", "created")
        log.info("pairing offer %d open for %.1f min, roles %s", number, minutes,
                 ",".join(offer.roles))
        return offer

    def cancel_offer(self, number: int) -> Offer | None:
        offer = self.offers.get(number)
        if offer is not None and offer.state == "open":
            self._finish(offer, "cancelled")
            log.info("pairing offer %d cancelled", number)
        return offer

    def view(self, offer: Offer) -> dict[str, Any]:
        self._housekeep()
        return offer.view(self.links_for(offer))

    def links_for(self, offer: Offer) -> list[str]:
        return [f"{LINK_SCHEME}{offer.code}@{a}" for a in self.link_addrs()]

    def status(self) -> dict[str, Any]:
        self._housekeep()
        return {"offers": [o.view([]) for o in self.offers.values()],
                "counts": dict(self.counts)}

    async def wait_change(self, offer: Offer, timeout: float) -> None:
        """Until `offer` changes (a failed attempt, pairing, expiry) or `timeout` passes."""
        if offer._changed is None or offer._changed.is_set():
            offer._changed = trio.Event()
        with trio.move_on_after(min(timeout, max(0.0, offer.deadline - time.monotonic()) + 0.05)):
            await offer._changed.wait()
        self._housekeep()

    def _finish(self, offer: Offer, state: str) -> None:
        offer.state = state
        offer.finished = time.monotonic()
        self._changed(offer)

    def _changed(self, offer: Offer) -> None:
        if offer._changed is not None:
            offer._changed.set()

    def _housekeep(self) -> None:
        now = time.monotonic()
        for offer in list(self.offers.values()):
            if offer.state == "open" and now >= offer.deadline and not offer.in_flight:
                self._finish(offer, "expired")
                log.info("pairing offer %d expired unused", offer.code.offer)
            if offer.finished is not None and now - offer.finished > KEEP_FINISHED_S:
                del self.offers[offer.code.offer]
        done = sorted((o for o in self.offers.values() if o.finished is not None),
                      key=lambda o: o.finished or 0.0)
        for offer in done[: max(0, len(self.offers) - MAX_KEPT_OFFERS)]:
            del self.offers[offer.code.offer]

    # -- the offering side of /qvac/pair/1.0.0 --

    async def handle(self, stream: Any, peer: str) -> None:
        fs = FrameStream(stream, PAIR_LIMITS)
        try:
            await self._serve(fs, stream, peer)
        except (StreamGone, trio.TooSlowError) as e:
            log.info("pairing stream from %s ended early: %s", short_peer_id(peer),
                     type(e).__name__)
        finally:
            await fs.close()

    async def _refuse(self, fs: FrameStream, stream: Any, peer: str, code: ErrorCode,
                      message: str, offence: str | None = "pairing") -> None:
        if offence is not None:
            self.network.offence(offence, stream, peer)
        try:
            await fs.send(Error(code=code, message=message))
        except StreamGone:
            pass

    async def _recv(self, fs: FrameStream) -> Any:
        with trio.fail_after(STEP_TIMEOUT_S):
            return await fs.recv()

    async def _serve(self, fs: FrameStream, stream: Any, peer: str) -> None:
        try:
            start = await self._recv(fs)
        except ProtocolError as e:
            return await self._refuse(fs, stream, peer, e.code, e.message, "protocol")
        if start is None:
            return
        if not isinstance(start, PairStart):
            return await self._refuse(fs, stream, peer, ErrorCode.PROTOCOL,
                                      f"a pairing stream starts with pairq, not {start.tag}",
                                      "protocol")
        self._housekeep()
        offer = self.offers.get(start.offer)
        if offer is None or offer.state != "open":
            self._count("offer", "refused")
            why = self._closed_reason(start.offer, offer)
            log.info("refused a pairing attempt from %s: %s", short_peer_id(peer), why)
            code = ErrorCode.DEADLINE if offer is not None and offer.state == "expired" \
                else ErrorCode.NOT_FOUND
            return await self._refuse(fs, stream, peer, code, why)
        if offer.in_flight:
            self._count("offer", "busy")
            return await self._refuse(fs, stream, peer, ErrorCode.BUSY,
                                      f"another device is trying pairing offer {start.offer}"
                                      " right now; try again in a few seconds", "busy")
        offer.in_flight = True
        paired = False
        try:
            paired = await self._attempt(fs, stream, peer, offer, start)
        finally:
            offer.in_flight = False
            if not paired and offer.state == "open":
                self._failed(offer, peer, stream)

    def _closed_reason(self, number: int, offer: Offer | None) -> str:
        if offer is None:
            return f"this device {_NO_OFFER} {number}"
        if offer.state == "paired":
            return (f"pairing code {offer.code.offer}-... was already used; ask for a new code"
                    " (`qvacd pair` on the other device)")
        if offer.state == "expired":
            return (f"pairing code {offer.code.offer}-... expired; ask for a new code"
                    " (`qvacd pair` on the other device)")
        if offer.state == "dead":
            return (f"pairing offer {offer.code.offer} was closed after {offer.failed} wrong"
                    " codes; ask for a new code (`qvacd pair` on the other device)")
        return f"pairing offer {offer.code.offer} was cancelled; ask for a new code"

    def _failed(self, offer: Offer, peer: str, stream: Any) -> None:
        offer.failed += 1
        offer.last_failure = short_peer_id(peer)
        self._count("offer", "failed")
        self.network.offence("pairing", stream, peer)
        if offer.failed >= MAX_FAILED_ATTEMPTS:
            self._finish(offer, "dead")
            log.warning("pairing offer %d closed after %d failed attempts (last from %s);"
                        " nothing was trusted", offer.code.offer, offer.failed,
                        short_peer_id(peer))
        else:
            self._changed(offer)
            log.warning("a wrong pairing code for offer %d from %s (%d of %d); nothing"
                        " trusted", offer.code.offer, short_peer_id(peer), offer.failed,
                        MAX_FAILED_ATTEMPTS)

    async def _attempt(self, fs: FrameStream, stream: Any, peer: str, offer: Offer,
                       start: PairStart) -> bool:
        spake = SPAKE2_A(offer.code.password, idA=self.node_id.encode(), idB=peer.encode())
        pake_a = spake.start()
        try:
            key = spake.finish(start.pake)
        except Exception:  # noqa: BLE001 - the spake2 package raises several types on junk
            await self._refuse(fs, stream, peer, ErrorCode.BAD_REQUEST,
                               "PairStart.pake is not a SPAKE2 message", None)
            return False
        th = transcript_hash(self.node_id, peer, start.offer, pake_a, start.pake, offer.roles)
        await fs.send(PairReply(pake=pake_a, roles=offer.roles,
                                confirm=confirmation(key, b"A", th)))
        try:
            reply = await self._recv(fs)
        except ProtocolError as e:
            await self._refuse(fs, stream, peer, e.code, e.message, "protocol")
            return False
        if isinstance(reply, Error) or reply is None:
            return False  # the joiner's check of our confirmation failed: a wrong code
        if not isinstance(reply, PairConfirm):
            await self._refuse(fs, stream, peer, ErrorCode.PROTOCOL,
                               f"expected pairc, got {reply.tag}", "protocol")
            return False
        if not hmac.compare_digest(reply.confirm, confirmation(key, b"B", th)):
            await self._refuse(fs, stream, peer, ErrorCode.UNAUTHORIZED,
                               "wrong pairing code; nothing was trusted", None)
            return False
        if time.monotonic() >= offer.deadline:
            await self._refuse(fs, stream, peer, ErrorCode.DEADLINE,
                               self._closed_reason(offer.code.offer, offer), None)
            return False
        try:
            self.trust.add(peer, offer.roles, note=f"paired with offer {offer.code.offer}")
        except TrustError as e:
            log.error("pairing with %s verified, but trusting it failed: %s", peer, e)
            await self._refuse(fs, stream, peer, ErrorCode.INTERNAL,
                               "the other device could not save its trust file", None)
            return False
        offer.peer_id = peer
        self._finish(offer, "paired")
        self._count("offer", "paired")
        log.info("paired with %s through offer %d; trusted it as %s", peer, offer.code.offer,
                 ",".join(offer.roles))
        await fs.send(PairDone(roles=offer.roles, certificate=self._certificate_for(peer, offer)))
        return True

    def _certificate_for(self, peer: str, offer: Offer) -> str | None:
        """A mesh membership certificate for `peer`, when this node owns a mesh, so that
        the mesh's other devices trust it too; the explicit trust stands either way."""
        if self.mesh is None or not self.mesh.is_owner:
            return None
        try:
            return self.mesh.invite(peer, offer.roles, MESH_CERT_DAYS)
        except Exception as e:  # noqa: BLE001 - MeshError, an unreadable owner key
            log.warning("paired with %s, but could not issue its mesh certificate: %s", peer, e)
            return None

    # -- the joining side --

    async def join(self, text: str) -> dict[str, Any]:
        """Pair with the device that shows the code (or link) `text`: {peer_id, roles}.
        PairingError with one line otherwise; nothing is trusted then."""
        code, addr = parse_code(text)
        if addr is not None:
            try:
                with trio.fail_after(STEP_TIMEOUT_S):
                    candidates = [await self.network.connect(addr, source="manual")]
            except Exception as e:  # noqa: BLE001 - PeerUnavailable, bad multiaddr, timeout
                raise PairingError("unreachable", f"cannot reach the device in the link"
                                   f" ({str(e)[:120] or type(e).__name__}); check the link"
                                   " and that `qvacd pair` still runs there") from None
        else:
            candidates = await self._find_candidates()
        results: dict[str, Any] = {}
        async with trio.open_nursery() as nursery:
            for peer in candidates:
                nursery.start_soon(self._try_peer, peer, code, results, nursery.cancel_scope)
        won = results.get("paired")
        if won is not None:
            return won
        raise self._best_failure(code, list(results.values()), bool(addr))

    async def _find_candidates(self) -> list[str]:
        young = time.monotonic() - self.started < YOUNG_S
        with trio.move_on_after(FIND_PEERS_S if young else 0):
            while True:
                peers = [p for p in self.network.connected_peers() if p != self.node_id]
                if peers:
                    return peers
                await trio.sleep(0.25)
        raise PairingError("not_found", "no other qvacd device is connected; start qvacd on"
                           " the other device on this network (found by mDNS), or use the"
                           " link `qvacd pair` printed there")

    async def _try_peer(self, peer: str, code: PairCode, results: dict[str, Any],
                        scope: trio.CancelScope) -> None:
        try:
            with trio.fail_after(3 * STEP_TIMEOUT_S):
                roles = await self._join_one(peer, code)
        except PairingError as e:
            results[peer] = e
            return
        except trio.TooSlowError:
            results[peer] = PairingError("failed", f"peer {short_peer_id(peer)} did not answer"
                                         " the pairing in time; try again")
            return
        self._count("join", "paired")
        results["paired"] = {"peer_id": peer, "roles": list(roles)}
        scope.cancel()  # why: the other candidates do not hold this offer

    async def _join_one(self, peer: str, code: PairCode) -> tuple[str, ...]:
        try:
            stream = await self.network.open_stream(peer, PAIR_PROTOCOL, timeout=STEP_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - PeerUnavailable: no pairing there, or gone
            raise PairingError("unreachable", f"peer {short_peer_id(peer)} does not pair:"
                               f" {str(e)[:100]}") from None
        fs = FrameStream(stream, PAIR_LIMITS)
        try:
            return await self._join_exchange(fs, peer, code)
        except (StreamGone, ProtocolError) as e:
            raise PairingError("failed", f"peer {short_peer_id(peer)} broke off the pairing"
                               f" ({type(e).__name__}); try again") from None
        finally:
            await fs.close()

    async def _join_exchange(self, fs: FrameStream, peer: str, code: PairCode) -> tuple[str, ...]:
        spake = SPAKE2_B(code.password, idA=peer.encode(), idB=self.node_id.encode())
        pake_b = spake.start()
        await fs.send(PairStart(offer=code.offer, pake=pake_b))
        reply = await self._recv(fs)
        if isinstance(reply, Error):
            raise _error_to_failure(reply, peer)
        if not isinstance(reply, PairReply):
            raise PairingError("failed", f"peer {short_peer_id(peer)} answered the pairing"
                               " out of order; nothing was trusted")
        try:
            key = spake.finish(reply.pake)
            roles = tuple(r for r in ROLES if r in parse_roles(reply.roles))
        except Exception:  # noqa: BLE001 - junk SPAKE2 message or unknown roles
            raise PairingError("failed", f"peer {short_peer_id(peer)} sent an invalid pairing"
                               " reply; nothing was trusted") from None
        th = transcript_hash(peer, self.node_id, code.offer, reply.pake, pake_b, reply.roles)
        if not hmac.compare_digest(reply.confirm, confirmation(key, b"A", th)):
            self._count("join", "wrong_code")
            await fs.send(Error(code=ErrorCode.UNAUTHORIZED,
                                message="wrong pairing code; nothing was trusted"))
            raise PairingError("wrong_code", "wrong pairing code; nothing was trusted: check"
                               " the code shown by `qvacd pair` on the other device")
        await fs.send(PairConfirm(confirm=confirmation(key, b"B", th)))
        done = await self._recv(fs)
        if isinstance(done, Error):
            raise _error_to_failure(done, peer)
        if not isinstance(done, PairDone) or set(done.roles) != set(roles):
            raise PairingError("failed", f"peer {short_peer_id(peer)} did not confirm the"
                               " pairing; nothing was trusted here")
        try:
            self.trust.add(peer, roles, note=f"paired with offer {code.offer}")
        except TrustError as e:
            raise PairingError("failed", f"paired, but this device could not save its trust"
                               f" file: {e}") from None
        log.info("paired with %s (offer %d); trusted it as %s", peer, code.offer,
                 ",".join(roles))
        if done.certificate is not None:
            self._join_mesh(peer, done.certificate)
        return roles

    def _join_mesh(self, peer: str, certificate: str) -> None:
        if self.mesh is None:
            return
        try:
            self.mesh.join(certificate)
        except Exception as e:  # noqa: BLE001 - MeshError: another mesh, not for us, expired
            log.warning("paired with %s; kept its explicit trust, but not the mesh certificate"
                        " it issued: %s", short_peer_id(peer), e)
            return
        log.info("joined the mesh of %s with the certificate it issued when pairing",
                 short_peer_id(peer))

    def _best_failure(self, code: PairCode, failures: list[PairingError],
                      linked: bool) -> PairingError:
        """The one line that tells most: a verdict of the device holding the offer beats
        'this peer has no such offer' from the others."""
        self._count("join", "failed")
        for kind in ("wrong_code", "used", "expired", "dead", "busy", "failed"):
            for f in failures:
                if f.kind == kind:
                    return f
        where = "the device in the link" if linked else "no connected device"
        return PairingError("not_found", f"{where} has pairing offer {code.offer} open; check"
                            " the code, that `qvacd pair` still waits on the other device, and"
                            " that both are on the same network (or use its link)")


def _error_to_failure(err: Error, peer: str) -> PairingError:
    """The offering device's refusal as the joiner's one line."""
    msg = err.message[:300]
    if err.code is ErrorCode.UNAUTHORIZED:
        return PairingError("wrong_code", msg)
    if err.code is ErrorCode.DEADLINE:
        return PairingError("expired", msg)
    if err.code is ErrorCode.BUSY:
        return PairingError("busy", msg)
    if err.code is ErrorCode.NOT_FOUND:
        if _NO_OFFER in msg:
            return PairingError("not_found", msg)
        return PairingError("dead" if "closed after" in msg else "used", msg)
    return PairingError("failed", f"peer {short_peer_id(peer)} refused: {msg}")
