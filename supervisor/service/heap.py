"""The daemon's C heap over a long life. I/O edge (the C library, by ctypes).

Python's own objects stay flat over a month of runs (retention bounds them), but glibc's
malloc keeps what is freed: each thread that allocates gets an arena of its own (up to 8
per core), and the large transient buffers of the worker threads (a snapshot, a
checkpoint or an archive encoded and written there) leave each arena holding free pages
that no later allocation happens to reuse. RSS then creeps up with the number of arenas
and their high-water marks, not with what is live. Two things keep it flat:

- `limit_arenas`, at start before any thread: at most `ARENAS` arenas (unless the
  environment sets MALLOC_ARENA_MAX, which glibc has read already and which wins);
- `trim_forever`: every `TRIM_INTERVAL_S`, `malloc_trim(0)` in a worker thread gives the
  free pages of every arena back to the kernel.

Elsewhere than glibc (musl, macOS) both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Final

import anyio
import structlog

log = structlog.get_logger("orchd.heap")

ARENAS: Final = 2
TRIM_INTERVAL_S: Final = 30.0
_M_ARENA_MAX: Final = -8  # malloc.h


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has mallopt and malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    return libc


_LIBC: Final = _glibc()


def limit_arenas(arenas: int = ARENAS) -> bool:
    """At most `arenas` malloc arenas from now on (call before threads start); False when
    not glibc or the environment already chose (MALLOC_ARENA_MAX)."""
    if _LIBC is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(_LIBC.mallopt(ctypes.c_int(_M_ARENA_MAX), ctypes.c_int(arenas)))


def trim() -> bool:
    """Give the free pages of every arena back to the kernel (any thread); True when some
    memory was released."""
    if _LIBC is None:
        return False
    return bool(_LIBC.malloc_trim(ctypes.c_size_t(0)))


async def trim_forever(interval_s: float = TRIM_INTERVAL_S) -> None:
    """`trim` in a worker thread every `interval_s`, for the daemon's whole life."""
    if _LIBC is None:
        return
    while True:
        await anyio.sleep(interval_s)
        released = await anyio.to_thread.run_sync(trim)
        log.debug("heap_trimmed", released=released)
