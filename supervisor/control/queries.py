"""Queries with a file part. A handler runs in a step of the engine, where the state is
consistent; what it must read from files (a log's tail, events, interventions, an
archived workstream) it does not read there: it returns a `FilePart`, holding what the
step decided (the object looked up, the paths, a cut of the files: store/sidelog.py),
and the server runs `FilePart.read` in a worker thread after the step. The loop goes on
stepping while a big file is read.

A handler with a file part:

    def logs(s: Machine, params: p.LogsParams) -> FilePart:
        task = get_task(s, params.task_id, params.workstream)   # in the step
        path = s.files.task_log_path(task.id)
        return FilePart(lambda: {"path": str(path), "lines": s.files.tail(path, n)})

`read` must not touch the state (the loop is changing it meanwhile): it works on what
the step gave it. A part that holds open files (a cut) gives `release`, which `finish`
calls whether or not `read` ran.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio


class FilePart:
    """The rest of a query's answer, read from files after the step (see the module
    docstring): `read()` returns the response's result."""

    __slots__ = ("read", "release")

    def __init__(self, read: Callable[[], Any], release: Callable[[], None] | None = None) -> None:
        self.read, self.release = read, release


async def finish(result: Any, limiter: anyio.CapacityLimiter) -> tuple[Any, bool]:
    """A handler's result, its file part (if any) read in a worker thread; and whether
    there was one (its answer may be big: the caller encodes it off the loop too)."""
    if not isinstance(result, FilePart):
        return result, False
    try:
        return await anyio.to_thread.run_sync(result.read, limiter=limiter), True
    finally:
        if result.release is not None:
            result.release()


def finish_now(result: Any) -> Any:
    """The same, in this thread: for callers that are not on the loop (tests, tools)."""
    if not isinstance(result, FilePart):
        return result
    try:
        return result.read()
    finally:
        if result.release is not None:
            result.release()
