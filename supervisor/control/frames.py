"""The control socket's framing, size limits and error codes, and the words both sides say
about a drain: what orchctl needs to talk to the daemon, kept free of msgspec so that a
short orchctl command starts fast (the typed messages are in protocol.py, which
re-exports these). Pure: no I/O.

A frame is a 4-byte big-endian length followed by a JSON body.
"""

from __future__ import annotations

import struct
from typing import Any, Final, Literal

MAX_REQUEST: Final = 1024 * 1024
MAX_RESPONSE: Final = 256 * 1024 * 1024
# Raw bytes per upload chunk: base64 makes 4/3 of it, well under MAX_REQUEST.
UPLOAD_CHUNK: Final = 512 * 1024
HEADER: Final = struct.Struct(">I")

# Error codes and the orchctl exit code each maps to (DESIGN.md §6).
ErrorCode = Literal[
    "failed", "invalid", "not_found", "permission_denied", "wrong_state", "unavailable", "too_large"
]
EXIT_CODES: Final[dict[str, int]] = {
    "failed": 1,
    "unavailable": 1,
    "invalid": 2,
    "too_large": 2,
    "not_found": 3,
    "permission_denied": 4,
    "wrong_state": 5,
}


class ProtocolError(Exception):
    """Raised by `decode_request` when a request is malformed, and by `frame_length` when a
    frame is over its limit; carries the error code."""

    def __init__(self, code: str, message: str, request_id: int = 0) -> None:
        self.code, self.message, self.request_id = code, message, request_id
        super().__init__(message)


def frame_length(header: bytes, limit: int) -> int:
    """The body length of a frame header; raises ProtocolError past `limit`."""
    n = int(HEADER.unpack(header)[0])
    if n > limit:
        raise ProtocolError("too_large", f"frame of {n} bytes exceeds the {limit}-byte limit")
    return n


def drain_words(drain: dict[str, Any]) -> str:
    """An operator's drain, as `orchctl status` and systemd's STATUS= line both say it:
    "draining: N running", or "drained: nothing running" once N is 0."""
    n = drain["running"]
    return f"draining: {n} running" if n else "drained: nothing running"
