"""A blocking client for the control socket (orchctl is short-lived: no event loop needed).

It speaks the frames of supervisor/control/frames.py with the standard json module rather
than msgspec: importing msgspec would be most of a short command's start-up time, and the
replies are read as plain JSON values anyway. The daemon decodes every request into its
typed params (protocol.py) and refuses what does not fit.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import socket
from collections.abc import Iterator
from typing import Any

from supervisor.control import frames as f


class DaemonUnreachable(Exception):
    """Raised when the socket does not exist or nobody listens on it."""


class RemoteError(Exception):
    """Raised when the daemon answered with an error; `code` is the protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        self.code, self.message = code, message
        super().__init__(message)


def _base64(obj: object) -> str:
    """bytes travel as base64 in the JSON (as the daemon's msgspec decodes them)."""
    if isinstance(obj, bytes | bytearray | memoryview):
        return base64.b64encode(obj).decode("ascii")
    raise TypeError(f"{type(obj).__name__} cannot be sent to the daemon")


def _frame(request_id: int, method: str, params: dict[str, Any]) -> bytes:
    present = {k: v for k, v in params.items() if v is not None}
    body = json.dumps(
        {"id": request_id, "method": method, "params": present},
        separators=(",", ":"),
        default=_base64,
    ).encode()
    return f.HEADER.pack(len(body)) + body


def _fits(params: dict[str, Any]) -> bool:
    """The request fits in one frame (JSON escapes can make a text up to six times longer)."""
    return len(_frame(0, "submit", params)) - 4 <= f.MAX_REQUEST


class Client:
    def __init__(self, path: str, timeout_s: float = 60.0) -> None:
        self.path = path
        self._ids = itertools.count(1)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout_s)
        try:
            self.sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self.sock.close()
            raise DaemonUnreachable(
                f"orchd is not running (no daemon on {path}: {exc.strerror})"
            ) from None
        except PermissionError:
            self.sock.close()
            raise RemoteError("permission_denied", f"no permission to use {path}") from None

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise DaemonUnreachable("the daemon closed the connection")
            buf += chunk
        return bytes(buf)

    def _read_result(self) -> Any:
        """The next response's result; RemoteError when it is an error response."""
        n = f.frame_length(self._recv_exact(4), f.MAX_RESPONSE)
        resp = json.loads(self._recv_exact(n))
        if not resp.get("ok"):
            err = resp.get("error") or {}
            raise RemoteError(err.get("code", "failed"), err.get("message", "unknown error"))
        return resp.get("result")

    def call(self, method: str, **params: Any) -> Any:
        """Send one request and return its result; RemoteError on an error response."""
        frame = _frame(next(self._ids), method, params)
        if len(frame) - 4 > f.MAX_REQUEST:
            raise RemoteError(
                "too_large",
                f"the request is {len(frame) - 4} bytes, over the daemon's "
                f"{f.MAX_REQUEST}-byte limit",
            )
        # If the daemon refuses part-way its error response is still there to be read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(frame)
        return self._read_result()

    def submit(self, text: str, source: str | None = None, **params: Any) -> Any:
        """Submit a workstream file: in one request when it fits in a frame, else uploaded
        in chunks on this connection and then submitted whole (the daemon checks the whole
        file before it records anything)."""
        data = text.encode()
        inline = {"text": text, "source": source, **params}
        if len(data) <= f.UPLOAD_CHUNK and _fits(inline):
            return self.call("submit", **inline)
        self.call("upload_begin", size=len(data))
        for start in range(0, len(data), f.UPLOAD_CHUNK):
            self.call("upload_chunk", data=data[start : start + f.UPLOAD_CHUNK])
        return self.call("submit", upload=True, source=source, **params)

    def stream(self, method: str, **params: Any) -> Iterator[Any]:
        """Send a streaming request; yield each result until the daemon closes."""
        self.sock.settimeout(None)
        self.sock.sendall(_frame(next(self._ids), method, params))
        while True:
            yield self._read_result()
