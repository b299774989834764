"""wire frames over a pair of file descriptors, for the agent's end of the pipe. I/O edge.

The agent's stdin/stdout are driven non-blocking from its event loop (no reader thread), so
that a daemon that stops reading can never block heartbeats or a kill.
"""

from __future__ import annotations

import os

import anyio
import msgspec

from supervisor.core import wire


class ProtocolError(Exception):
    """Raised by `FrameChannel.receive` when a frame is oversized or does not decode."""


class FrameChannel:
    """wire frames over a pair of non-blocking file descriptors, driven by the event loop."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self._rfd, self._wfd = rfd, wfd
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        self._buf = bytearray()
        self._eof = False
        self._lock = anyio.Lock()
        self.broken = False

    async def receive(self) -> wire.ToAgent | None:
        """The next message, or None at end of input."""
        header = await self._read_exactly(4)
        if header is None:
            return None
        try:
            body = await self._read_exactly(wire.frame_length(header))
        except ValueError as exc:
            raise ProtocolError(str(exc)) from exc
        if body is None:
            raise ProtocolError("input ended inside a frame")
        try:
            msg: wire.ToAgent = wire.to_agent_decoder.decode(body)
            return msg
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"undecodable frame: {exc}") from exc

    async def _read_exactly(self, n: int) -> bytes | None:
        while len(self._buf) < n and not self._eof:
            try:
                data = os.read(self._rfd, max(65536, n - len(self._buf)))
            except BlockingIOError:
                await anyio.wait_readable(self._rfd)
                continue
            if not data:
                self._eof = True
            self._buf += data
        if len(self._buf) < n:
            return None
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def send(self, msg: wire.FromAgent) -> bool:
        """Write one frame; False once the daemon's end is gone."""
        if self.broken:
            return False
        data = wire.frame(msg)
        if self._lock.locked():
            async with self._lock:
                await self._write_all(memoryview(data))
            return not self.broken
        # No send in progress, so nothing can interleave: try the whole frame at once (a
        # frame up to PIPE_BUF goes in whole or not at all), the lock only when it did not.
        try:
            written = os.write(self._wfd, data)
        except BlockingIOError:
            written = 0
        except OSError:
            self.broken = True
            return False
        if written == len(data):
            return True
        # Taken without a checkpoint, so no other send can slip in after our partial write.
        self._lock.acquire_nowait()
        try:
            await self._write_all(memoryview(data)[written:])
        finally:
            self._lock.release()
        return not self.broken

    async def _write_all(self, view: memoryview) -> None:
        while view and not self.broken:
            try:
                view = view[os.write(self._wfd, view) :]
            except BlockingIOError:
                await anyio.wait_writable(self._wfd)
            except OSError:
                self.broken = True
