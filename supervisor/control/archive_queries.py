"""Queries of retired workstreams: `ws show --archived`, `ws list --archived` and an
archived task log (`orchctl logs WS/TASK` falls back to it). They read archive/<ws>.tar.gz,
so the server runs them in a worker thread, never in a step of the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from supervisor.control import protocol as p
from supervisor.core.errors import OperatorError
from supervisor.core.model import Task, Workstream
from supervisor.core.views import task_view
from supervisor.store import archive


def _doc(state_dir: Path, ws_id: str) -> dict[str, Any]:
    try:
        return archive.read_document(state_dir, ws_id)
    except ValueError:
        raise OperatorError("invalid", f"{ws_id!r} cannot name a workstream") from None
    except archive.ArchiveMissing as exc:
        raise OperatorError("not_found", f"{exc} (see `orchctl ws list --archived`)") from None


def ws_show_archived(state_dir: Path, params: p.WsShowArchivedParams) -> dict[str, Any]:
    doc = _doc(state_dir, params.workstream)
    ws = msgspec.convert(doc["workstream"], Workstream)
    out: dict[str, Any] = msgspec.to_builtins(ws)
    out["state"] = str(ws.state)
    out["paused"] = ws.paused
    out["tasks"] = [task_view(t) for t in msgspec.convert(doc.get("tasks", []), list[Task])]
    out["archived"] = True
    out["archived_at"] = doc.get("archived_at")
    out["archive"] = str(archive.archive_path(state_dir, params.workstream))
    out["files"] = doc.get("files", [])
    return out


def ws_list_archived(state_dir: Path, _: p.WsListArchivedParams) -> list[dict[str, Any]]:
    return archive.list_archived(state_dir)


def logs_archived(state_dir: Path, params: p.LogsArchivedParams) -> dict[str, Any]:
    ws_id, slash, task = params.task_id.partition("/")
    if not slash or not ws_id or not task or "/" in task:
        raise OperatorError("invalid", "an archived log is named WS/TASK (the workstream's id)")
    try:
        lines = archive.read_log(state_dir, ws_id, task, params.lines)
    except ValueError:
        raise OperatorError("invalid", f"{params.task_id!r} cannot name a task") from None
    except archive.ArchiveMissing as exc:
        raise OperatorError("not_found", f"no task {params.task_id!r}: {exc}") from None
    if lines is None:
        raise OperatorError(
            "not_found", f"the archive of {ws_id} has no log of {task} (it never ran?)"
        )
    path = archive.archive_path(state_dir, ws_id)
    return {"task_id": params.task_id, "path": f"{path}:logs/{task}.log", "lines": lines}


# Method -> function of (the daemon's state directory, params), run off the loop.
QUERIES: dict[str, Callable[[Path, Any], Any]] = {
    "ws_show_archived": ws_show_archived,
    "ws_list_archived": ws_list_archived,
    "logs_archived": logs_archived,
}
