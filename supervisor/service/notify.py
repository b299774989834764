"""systemd's notify protocol (READY=1, STATUS=, WATCHDOG=1, STOPPING=1) on NOTIFY_SOCKET.

Without NOTIFY_SOCKET (not under systemd, or in tests) every call does nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket


class Notifier:
    def __init__(self) -> None:
        addr = os.environ.pop("NOTIFY_SOCKET", "")  # never inherited by workers or tasks
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        self.addr = addr
        usec = os.environ.pop("WATCHDOG_USEC", "")
        pid = os.environ.pop("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and ours else 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.addr)

    def send(self, *lines: str) -> None:
        if not self.addr:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        with sock, contextlib.suppress(OSError):  # systemd gone: nothing to tell
            sock.sendto("\n".join(lines).encode(), self.addr)
