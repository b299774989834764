"""A big workstream file arriving in chunks on one connection: its buffer, bounded by
`control.max_submit_bytes`, and the figures of every upload in progress. The buffer
belongs to the connection and is dropped with it: a client that goes away mid-upload
leaves nothing behind (nothing was sent to the engine yet).
"""

from __future__ import annotations

from typing import Any

from supervisor.core.errors import OperatorError


class Upload:
    """One upload being assembled: `size` bytes announced, `received` so far."""

    __slots__ = ("_parts", "received", "size")

    def __init__(self, size: int, limit: int) -> None:
        if size <= 0:
            raise OperatorError("invalid", f"an upload needs a size > 0, got {size}")
        if size > limit:
            raise OperatorError(
                "too_large",
                f"the file is {size} bytes, over the daemon's limit of {limit} "
                "(control.max_submit_bytes in its config); split the workstream or raise it",
            )
        self.size, self.received = size, 0
        self._parts: list[bytes] = []

    def add(self, data: bytes) -> None:
        """One more chunk; refused (the caller drops the upload) past the announced size."""
        if self.received + len(data) > self.size:
            raise OperatorError(
                "invalid",
                f"upload overflow: {self.received + len(data)} bytes sent, {self.size} "
                "announced; the upload is dropped, start again with upload_begin",
            )
        self._parts.append(data)
        self.received += len(data)

    def take(self) -> bytes:
        """The whole file (the buffer is released); refused while incomplete."""
        if self.received != self.size:
            raise OperatorError(
                "invalid",
                f"the upload is incomplete: {self.received} of {self.size} bytes; "
                "the upload is dropped, start again with upload_begin",
            )
        data, self._parts = b"".join(self._parts), []
        return data


class Uploads:
    """Every upload in progress in the daemon (for `orchctl status`)."""

    def __init__(self) -> None:
        self._live: set[Upload] = set()

    def add(self, upload: Upload) -> None:
        self._live.add(upload)

    def discard(self, upload: Upload | None) -> None:
        if upload is not None:
            self._live.discard(upload)

    def figures(self) -> dict[str, Any]:
        return {"open": len(self._live), "bytes": sum(u.received for u in self._live)}
