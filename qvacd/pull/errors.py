"""How a pull fails: the one error callers see (`PullError`), and the ones the puller
uses inside to decide what to do next (drop a provider, try another manifest, wait).

`PullError` carries the HTTP status the API answers with and one line that says what
happened and what to do; everything else stays inside qvacd/pull/.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import trio


class PullError(Exception):
    """A pull failed. `status` is the HTTP status the API answers with; the message is
    one line that says what happened and what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class PeerFault(Exception):
    """This provider misbehaved or failed: drop it for this pull."""

    def __init__(self, reason: str, kind: str, code: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind  # metrics label: bad_chunk, short, stall, protocol, refused, ...
        self.code = code  # the peer's Error.code when it refused


# PeerFault kinds that may be the network rather than the peer: retried a few times.
TRANSIENT = frozenset({"gone", "unreachable"})


class AllFailed(PullError):
    """Every provider of one manifest failed; another manifest's providers may do."""


class ManifestFalse(Exception):
    """The chunks of a manifest do not make up its model: whoever served it lied."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Busy(Exception):
    """The provider refused a chunk as busy; ask again after `retry_after` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("busy")
        self.retry_after = retry_after


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


@contextlib.contextmanager
def one_error() -> Iterator[None]:
    """Nurseries wrap errors in groups; re-raise the one that says what went wrong."""
    try:
        yield
    except BaseExceptionGroup as eg:
        leaves = [e for e in _leaves(eg) if not isinstance(e, trio.Cancelled)]
        for kind in (PullError, ManifestFalse):
            for e in leaves:
                if isinstance(e, kind):
                    raise e from None
        if len(leaves) == 1 and isinstance(leaves[0], Exception):
            raise leaves[0] from None
        raise


__all__ = ["AllFailed", "Busy", "ManifestFalse", "PeerFault", "PullError", "TRANSIENT",
           "one_error"]
