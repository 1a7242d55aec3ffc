"""The qvac wire: frames, message types, limits and error codes.

Pure and sans-IO (in the style of h11): bytes in, typed messages out; no sockets, no
trio, and no imports from the rest of qvacd. The wire itself is specified in
docs/protocol.md. Everything public is re-exported here; the `_modules` are private.
"""

from ._errors import ErrorCode, ProtocolError
from ._framing import FrameDecoder, decode_frame, encode_frame, encode_varint
from ._limits import (
    DEFAULT_LIMITS,
    MAX_CHUNK_PIECE,
    MAX_FRAME_SIZE,
    MAX_MANIFEST_SIZE,
    MAX_RECORD_SIZE,
    MAX_SHARD_FRAME_SIZE,
    SHARD_LIMITS,
    Limits,
)
from ._messages import (
    CAPACITY_PROTOCOL,
    INFER_PROTOCOL,
    MESSAGE_TYPES,
    PROTOCOL_MESSAGES,
    SHARD_PROTOCOL,
    Accepted,
    CapacityRequest,
    CapacityResponse,
    ChatMessage,
    ChunkData,
    ChunkRequest,
    Done,
    Error,
    FinishReason,
    InferRequest,
    ManifestRequest,
    ManifestResponse,
    Message,
    Token,
    limits_for,
    parse_message,
)
from ._state import ChunkClientState, InferClientState, StreamState

__all__ = [
    "CAPACITY_PROTOCOL",
    "DEFAULT_LIMITS",
    "INFER_PROTOCOL",
    "MAX_CHUNK_PIECE",
    "MAX_FRAME_SIZE",
    "MAX_MANIFEST_SIZE",
    "MAX_RECORD_SIZE",
    "MAX_SHARD_FRAME_SIZE",
    "MESSAGE_TYPES",
    "PROTOCOL_MESSAGES",
    "SHARD_LIMITS",
    "SHARD_PROTOCOL",
    "Accepted",
    "CapacityRequest",
    "CapacityResponse",
    "ChatMessage",
    "ChunkClientState",
    "ChunkData",
    "ChunkRequest",
    "Done",
    "Error",
    "ErrorCode",
    "FinishReason",
    "FrameDecoder",
    "InferClientState",
    "InferRequest",
    "Limits",
    "ManifestRequest",
    "ManifestResponse",
    "Message",
    "ProtocolError",
    "StreamState",
    "Token",
    "decode_frame",
    "encode_frame",
    "encode_varint",
    "limits_for",
    "parse_message",
]
