"""Test hooks that make the daemon's own I/O misbehave on purpose, read once from the
environment variable ORCHD_FAILPOINT at start-up. Never set in production.

    ORCHD_FAILPOINT="name[:arg][,name[:arg]...]"

- `sync_delay:SECONDS`: every fdatasync of the transitions log sleeps this long first
  (a slow disk).
- `append_fail[:COUNT]`: the next COUNT (default 1) appends to the log fail with ENOSPC,
  cut back as a real failure is.
- `spawn_fail[:COUNT]`: the next COUNT (default 1) worker agent spawns fail with OSError.
- `crash_at:NAME[@COUNT]`: the daemon SIGKILLs itself the COUNT-th time (default 1) it
  reaches the crash point NAME (`failpoints.crash_point("NAME")` in the code), so a test
  can prove that a crash between any two steps of a multi-file operation loses nothing.
  Alternatives are separated by `|`: `crash_at:compact_unlink|retire_files@2`.
- `loop_stall_file:PATH`: while PATH exists, the engine's loop does not step (it waits
  without blocking the event loop): a stuck engine, for the watchdog's tests.
- `wall_offset_file:PATH`: the daemon's wall clock is `time.time()` plus the number in
  PATH (read at most every 50 ms; a missing or empty file is 0), so a test steps the
  clock the daemon sees without touching the host's.

A real write error needs no hook: set the live daemon's file-size limit to the log's
current size (`prlimit --pid PID --fsize=N`) and the next append fails with EFBIG.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Final

ENV: Final = "ORCHD_FAILPOINT"


def _parse(spec: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in spec.split(","):
        item = item.strip()
        if item:
            name, _, arg = item.partition(":")
            out[name.strip()] = arg.strip()
    return out


_points: dict[str, str] = _parse(os.environ.get(ENV, ""))
_counts: dict[str, int] = {}


def arg(name: str) -> str | None:
    """The argument of failpoint `name` ("" when it has none), or None when it is not set."""
    return _points.get(name)


def take(name: str) -> bool:
    """True when counted failpoint `name` should fire now (and counts it down)."""
    if name not in _points:
        return False
    left = _counts.setdefault(name, int(_points[name] or "1"))
    if left <= 0:
        return False
    _counts[name] = left - 1
    return True


def delay(name: str) -> float:
    """The seconds of delay failpoint `name` asks for (0.0 when it is not set)."""
    value = _points.get(name)
    return float(value) if value else 0.0


def crash_point(name: str) -> None:
    """SIGKILL this process here when `crash_at` names `name` (and its count is reached)."""
    spec = _points.get("crash_at")
    if not spec:
        return
    for item in spec.split("|"):
        point, _, count = item.partition("@")
        if point.strip() != name:
            continue
        key = "crash_at:" + name
        left = _counts.setdefault(key, int(count or "1"))
        _counts[key] = left - 1
        if left == 1:
            os.kill(os.getpid(), signal.SIGKILL)


_offset = (0.0, -1.0)  # (value, when read)


def wall() -> float:
    """The wall clock the daemon records: time.time(), shifted by `wall_offset_file`."""
    global _offset
    path = _points.get("wall_offset_file")
    now = time.time()
    if path is None:
        return now
    mono = time.monotonic()
    if mono - _offset[1] > 0.05:
        try:
            with open(path, encoding="ascii") as f:
                text = f.read().strip()
            _offset = (float(text) if text else 0.0, mono)
        except (OSError, ValueError):
            _offset = (0.0, mono)
    return now + _offset[0]


def reset(spec: str | None = None) -> None:
    """Re-read the failpoints (from `spec`, or the environment): for in-process tests."""
    global _points, _offset
    _points = _parse(os.environ.get(ENV, "") if spec is None else spec)
    _counts.clear()
    _offset = (0.0, -1.0)
