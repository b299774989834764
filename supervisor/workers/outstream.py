"""An attempt's streamed output: its host-local file tailed into Output frames. I/O edge.

With `Run.stream_output` (a worker on another host: the task logs live with the daemon),
the attempt's output, header lines included, goes to a file in the agent's spool, and
this tails that file into `Output` frames of at most CHUNK bytes, in order. The command
writes to a local file, so a stopped or slow link to the daemon never blocks it; the
rest is flushed (`close`) before the attempt's Finished goes out.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio

from supervisor.core import wire
from supervisor.workers.channel import FrameChannel

CHUNK = 64 * 1024
# How often a running attempt's file is looked at for new output.
POLL_S = 0.02


class OutputStream:
    """Tails one attempt's output file into Output frames until closed."""

    def __init__(self, attempt_id: str, path: Path, channel: FrameChannel) -> None:
        self._attempt_id = attempt_id
        self._path = path
        self._channel = channel
        self._closing = anyio.Event()
        self._done = anyio.Event()
        self.sent_bytes = 0

    async def run(self) -> None:
        """Send what the file gains, until `close` and its end; then remove it."""
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._done.set()
            return
        try:
            while True:
                data = os.read(fd, CHUNK)
                if data:
                    out = wire.Output(attempt_id=self._attempt_id, data=data)
                    if not await self._channel.send(out):
                        return  # the daemon's end is gone: nobody to send the rest to
                    self.sent_bytes += len(data)
                    continue
                if self._closing.is_set():
                    return
                with anyio.move_on_after(POLL_S):
                    await self._closing.wait()
        finally:
            os.close(fd)
            self._path.unlink(missing_ok=True)
            self._done.set()

    async def close(self) -> None:
        """The attempt wrote its last line: send the rest, then return."""
        self._closing.set()
        await self._done.wait()
