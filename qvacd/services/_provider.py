"""What every provider service (infer, embed) does around its own work.

`run_handler` runs a service's `serve(io, peer) -> outcome` and handles what goes wrong
the same way for all of them: a bad frame is answered with its error and reported to the
network's guard as an offence, a consumer that went away is routine (peers'
contain_handler_errors logs one INFO line), anything else is one logged traceback and an
INTERNAL answer; the outcome is counted either way. `first_request` reads the first frame
within REQUEST_TIMEOUT_S, checks it is the protocol's request and that the caller is
authorized, before the service does any work.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from peers import peer_ended_stream, short_peer_id
from protocol import Error, ErrorCode, ProtocolError

from ..p2p_io import FrameStream, try_send

log = logging.getLogger("qvacd.provider")

REQUEST_TIMEOUT_S = 5.0  # a consumer must send its request this quickly
OFFENCES = ("protocol", "unauthorized")  # outcomes the network's guard scores

R = TypeVar("R")


async def run_handler(io: FrameStream, stream: Any, peer_id: str,
                      serve: Callable[[FrameStream, str], Awaitable[str]], *, what: str,
                      count: Callable[[str, str], None],
                      on_offence: Callable[[str, Any, str], bool]) -> None:
    outcome = "error"
    try:
        outcome = await serve(io, peer_id)
    except ProtocolError as e:
        outcome = "protocol"
        log.info("peer %s sent a bad %s frame: %s", short_peer_id(peer_id), what, e)
        await try_send(io, Error.from_exception(e))
    except Exception as e:
        if peer_ended_stream(e) is not None:
            # The consumer reset or closed the stream, or its connection died (also
            # inside the exception group of a streaming nursery): routine. It rises to
            # peers' contain_handler_errors, which wraps the handler: one INFO line
            # naming the peer, no traceback, the stream reset.
            outcome = "gone"
            raise
        log.exception("%s handler failed for peer %s; answered INTERNAL and closed the"
                      " stream", what, short_peer_id(peer_id))
        await try_send(io, Error(ErrorCode.INTERNAL, "provider error; try another peer"))
    finally:
        count(peer_id, outcome)
        if outcome in OFFENCES:
            on_offence(outcome, stream, peer_id)
        await io.close()


async def first_request(io: FrameStream, kind: type[R], expected: str, peer: str,
                        is_authorized: Callable[[str], bool]) -> tuple[R | None, str]:
    """(the request, "") or (None, the outcome) once the refusal has been sent.
    `expected` names the frame for the refusal, e.g. "the first frame on /qvac/infer
    must be a request"."""
    msg = None
    with trio.move_on_after(REQUEST_TIMEOUT_S) as waited:
        msg = await io.recv()
    if waited.cancelled_caught:
        await io.send(Error(ErrorCode.DEADLINE, "no request within"
                            f" {REQUEST_TIMEOUT_S:.0f}s of opening the stream"))
        return None, "timeout"
    if not isinstance(msg, kind):
        await io.send(Error(ErrorCode.PROTOCOL, expected))
        return None, "protocol"
    if not is_authorized(peer):
        await io.send(Error(ErrorCode.UNAUTHORIZED, f"peer {peer} is not trusted as a"
                            " consumer here; its owner must run `qvacd trust add"
                            f" {peer} --roles consumer`"))
        return None, "unauthorized"
    return msg, ""
