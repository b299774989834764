"""`orchctl state validate|backups` asked of the running daemon. They read the state
directory's files (a validate replays the whole log), so the server runs them in a worker
thread, never in a step of the engine: the loop goes on while they read.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from supervisor.control import protocol as p
from supervisor.control.archive_queries import QUERIES
from supervisor.store import maintenance


def state_validate(state_dir: Path, _: p.StateValidateParams) -> dict[str, Any]:
    problems = maintenance.validate_live(state_dir)
    return {"ok": not problems, "problems": problems, "state_dir": str(state_dir)}


def state_backups(state_dir: Path, _: p.StateBackupsParams) -> dict[str, Any]:
    found = maintenance.list_backups(state_dir)
    return {"backups": [str(b) for b in found], "state_dir": str(state_dir)}


# Method -> function of (the daemon's state directory, params), run off the loop.
OFF_LOOP: dict[str, Callable[[Path, Any], Any]] = {
    "state_validate": state_validate,
    "state_backups": state_backups,
}

# Reading archive/ (retired workstreams) is the same kind of request.
OFF_LOOP |= QUERIES
