"""Error codes shared by every qvac wire protocol, and the one exception the wire raises."""

from __future__ import annotations

import enum

__all__ = ["ErrorCode", "ProtocolError"]


class ErrorCode(enum.StrEnum):
    """Why a request failed. The value is what travels on the wire (`Error.code`)."""

    UNAUTHORIZED = "unauthorized"  # the peer lacks the role this protocol needs
    NOT_FOUND = "not_found"  # no such model / manifest / chunk here
    BUSY = "busy"  # no free slot right now; see retry_after
    TOO_LARGE = "too_large"  # a frame, field or prompt exceeds a limit
    BAD_REQUEST = "bad_request"  # well-formed, but a value is out of range or inconsistent
    DEADLINE = "deadline"  # the caller's deadline cannot be (or was not) met
    INTERNAL = "internal"  # the provider failed; not the caller's fault
    PROTOCOL = "protocol"  # malformed frame, wrong type, message out of order
    UNAVAILABLE = "unavailable"  # the peer went away or is shutting down


class ProtocolError(Exception):
    """Anything wrong with bytes or messages on the wire.

    `code` is the code a server would send back in an `Error` frame
    (see `Error.from_exception`), so a handler can answer with it directly.
    """

    def __init__(self, code: ErrorCode, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"

    def __repr__(self) -> str:
        return f"ProtocolError({self.code.name}, {self.message!r})"
