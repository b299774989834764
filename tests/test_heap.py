"""The daemon's C heap (supervisor/service/heap.py): arenas limited at start, and a trim
that gives free pages back. Each case runs in a fresh interpreter, as orchd does, and reads
glibc's own account of its arenas (malloc_stats)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from supervisor.service import heap

pytestmark = pytest.mark.skipif(heap._LIBC is None, reason="needs glibc's malloc")

# Eight threads that each allocate (and free) a few MiB in blocks under the mmap
# threshold, so each may take an arena of its own; then glibc's count of arenas.
PROGRAM = textwrap.dedent(
    """
    import ctypes, sys, threading
    from supervisor.service import heap
    limited = heap.limit_arenas() if sys.argv[1] == "limit" else None
    barrier = threading.Barrier(8)
    def work():
        barrier.wait()
        blocks = [bytearray(64 * 1024) for _ in range(64)]
        del blocks[::2]
        barrier.wait()
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    print(limited, heap.trim(), flush=True)
    ctypes.CDLL("libc.so.6").malloc_stats()
    """
)


def _arenas(mode: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    """What the program printed, and how many arenas malloc_stats listed."""
    base = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode],
        capture_output=True,
        text=True,
        timeout=60,
        env=base | (env or {}),
        check=True,
    )
    return done.stdout.strip(), len(re.findall(r"^Arena \d+:", done.stderr, re.M))


def test_arenas_are_limited_at_start_and_the_environment_wins() -> None:
    """Without the limit eight allocating threads get more than two arenas, and a trim
    after they freed their blocks releases memory; with the limit, two arenas at most; a
    MALLOC_ARENA_MAX in the environment is left to glibc (limit_arenas says so)."""
    out, free = _arenas("free")
    assert free > heap.ARENAS, f"baseline: {free} arenas ({out})"
    # The threads' blocks are freed: the trim gave pages back to the kernel.
    assert out.split()[1] == "True", out
    out, limited = _arenas("limit")
    assert out.startswith("True") and 1 <= limited <= heap.ARENAS, (out, limited)
    out, env = _arenas("limit", {"MALLOC_ARENA_MAX": "3"})
    assert out.startswith("False") and env <= 3, (out, env)
