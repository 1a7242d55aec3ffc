"""Opening a stream with the protocol id and the first request in one write.

py-libp2p's `BasicHost.new_stream` negotiates the way multistream-select 1.0 allows but
does not require: it writes "/multistream/1.0.0", waits for the other side's copy, then
writes the protocol id and waits for its echo, and only then may the caller send its
request: two round trips before the request leaves (measured in the lab: delegated TTFT
was local + 3.1 RTT). The protocol also allows the proposer to send the header, one
protocol id and the first bytes of that protocol together and read the answers
afterwards (go-libp2p's "lazy" handshake, `NewStream` with a single protocol), which
leaves one round trip: the request reaches the peer with the negotiation, and its answer
follows the echo on the same stream.

The price is what happens when the peer does not serve the protocol: it answers "na",
then reads our request bytes as its next multistream message, cannot parse them and
resets the stream. That is a clean refusal, not misbehaviour: `ProtocolRefused`, the
stream reset here, nothing leaked. Every read here is bounded (a multistream message is
at most 1 KiB), under the caller's deadline.
"""

from __future__ import annotations

import logging

import trio
from libp2p.abc import INetConn, INetStream, INetwork
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from peers._errors import PeerUnavailable, ProtocolRefused

log = logging.getLogger("qvacd.peers.network")

MULTISTREAM = "/multistream/1.0.0"
NOT_SUPPORTED = "na"
MAX_LINE = 1024  # a multistream message: a protocol id plus "\n"


def encode_line(text: str) -> bytes:
    """One multistream-select message: uvarint length, the text, "\\n"."""
    body = text.encode() + b"\n"
    n, out = len(body), bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out) + body


def pipelined_hello(protocol_id: str, first: bytes) -> bytes:
    """What a pipelined open writes: the header, the protocol id, the first request."""
    return encode_line(MULTISTREAM) + encode_line(protocol_id) + first


async def _read_exactly(stream: INetStream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        try:
            data = await stream.read(n - len(buf))
        except Exception as exc:
            if type(exc).__name__ == "StreamEOF":
                data = b""
            else:
                raise
        if not data:
            raise PeerUnavailable(f"stream ended inside a multistream message ({len(buf)} of"
                                  f" {n} bytes)")
        buf += data
    return buf


async def read_line(stream: INetStream) -> str:
    """One multistream-select message, without its "\\n"; PeerUnavailable if malformed.
    Reads exactly the message's bytes, so what follows stays in the stream."""
    n, shift = 0, 0
    while True:
        (byte,) = await _read_exactly(stream, 1)
        n |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift > 14:
            raise PeerUnavailable("multistream message length is not a short uvarint")
    if not 1 <= n <= MAX_LINE:
        raise PeerUnavailable(f"multistream message of {n} bytes (at most {MAX_LINE})")
    body = await _read_exactly(stream, n)
    if not body.endswith(b"\n"):
        raise PeerUnavailable("multistream message not ended by a newline")
    try:
        return body[:-1].decode()
    except UnicodeDecodeError:
        raise PeerUnavailable("multistream message is not UTF-8") from None


async def negotiate_pipelined(stream: INetStream, peer: str, protocol_id: str,
                              first: bytes) -> None:
    """Write header + `protocol_id` + `first` at once, then check the answers.
    ProtocolRefused on "na"; PeerUnavailable on anything else unexpected."""
    await stream.write(pipelined_hello(protocol_id, first))
    header = await read_line(stream)
    if header != MULTISTREAM:
        raise PeerUnavailable(f"peer {peer} answered {header[:60]!r}, not {MULTISTREAM}")
    reply = await read_line(stream)
    if reply == NOT_SUPPORTED:
        raise ProtocolRefused(f"peer {peer} does not serve {protocol_id}")
    if reply != protocol_id:
        raise PeerUnavailable(f"peer {peer} answered {reply[:60]!r} to {protocol_id}")
    stream.set_protocol(TProtocol(protocol_id))


async def open_pipelined(swarm: INetwork, pid: ID, protocol_id: str, first: bytes,
                         conn: INetConn | None = None) -> INetStream:
    """A new stream to `pid` (on `conn` when given) speaking `protocol_id`, with `first`
    already sent. The stream is reset on any failure, cancellation included."""
    stream = await (conn.new_stream() if conn is not None else swarm.new_stream(pid))
    ok = False
    try:
        await negotiate_pipelined(stream, pid.to_base58(), protocol_id, first)
        ok = True
        return stream
    except PeerUnavailable:
        raise
    except Exception as exc:  # the stream broke under us: the peer is unavailable
        raise PeerUnavailable(f"stream to {pid} broke while negotiating {protocol_id}:"
                              f" {type(exc).__name__}: {exc}"[:300]) from exc
    finally:
        if not ok:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await stream.reset()
                except Exception:
                    log.debug("reset of a refused stream failed", exc_info=True)
