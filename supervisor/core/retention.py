"""Retention of finished workstreams, decided: which are due to leave the live state, when
the next one falls due, and the three steps of retiring one. Pure: no I/O, no clock reads
(the wall time of the step is passed in through the context).

A finished workstream (completed, cancelled, merged) is due `retention.keep_finished_s`
after it ended, or at once when `retention.keep_finished` newer finished runs of its
pipeline exist. A failed one waits for an operator (a retry, resume, skip, rollback or
cancel makes it something else) and is due only `retention.keep_failed_s` after it failed.

Retiring is write-ahead, so a SIGKILL anywhere loses nothing:
1. a step finds the workstream due and asks (WriteArchive) for its archive, the document
   encoded here, in that step;
2. the archive is durable (the Archived input): a step records the retirement, which takes
   the workstream and its tasks out of the state, and forgets them in the runtime;
3. once that record is durable, DropFiles deletes its checkpoints and task logs.
A workstream that changes while its archive is written (an operator's retry) is not
retired: its archive is written again when it is due again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import msgspec

from supervisor.core.config import RetentionConfig
from supervisor.core.context import Core
from supervisor.core.effects import DropFiles, WriteArchive
from supervisor.core.errors import OperatorError
from supervisor.core.model import RETIRED, State, Task, Transition, Workstream

# The states of a finished workstream; only these may be retired.
FINISHED: Final = frozenset({"completed", "failed", "cancelled", "merged"})
# How long to wait before trying again when an archive could not be written.
RETRY_AFTER_S: Final = 60.0
# The archive's document format.
ARCHIVE_FORMAT: Final = 1


class ArchiveDocument(msgspec.Struct, kw_only=True):
    """What archive/<ws>.tar.gz holds as workstream.json."""

    format: int = ARCHIVE_FORMAT
    archived_at: float
    last_seq: int
    workstream: Workstream
    # As the state holds them (defaults omitted): `task_view` shows each whole.
    tasks: list[Task]


def _ended(ws: Workstream) -> float:
    return ws.ended_at if ws.ended_at is not None else ws.submitted_at


def _deadline(ws: Workstream, cfg: RetentionConfig) -> float:
    keep = cfg.keep_failed_s if ws.state == "failed" else cfg.keep_finished_s
    return _ended(ws) + keep


def due(workstreams: Iterable[Workstream], cfg: RetentionConfig, wall: float) -> list[str]:
    """The finished workstreams due to be retired at wall time `wall`, oldest first."""
    out: list[str] = []
    seen: dict[str, int] = {}
    # Newest first, for the count per pipeline name (the submission order).
    for ws in reversed(list(workstreams)):
        if ws.state not in FINISHED:
            continue
        over = False
        if ws.state != "failed" and ws.name is not None:
            n = seen[ws.name] = seen.get(ws.name, 0) + 1
            over = n > cfg.keep_finished
        if over or wall >= _deadline(ws, cfg):
            out.append(ws.id)
    out.reverse()
    return out


def next_due(workstreams: Iterable[Workstream], cfg: RetentionConfig) -> float | None:
    """The wall time at which the next finished workstream falls due by its age."""
    times = [_deadline(ws, cfg) for ws in workstreams if ws.state in FINISHED]
    return min(times) if times else None


def document(state: State, ws_id: str, wall: float) -> bytes:
    """The archive's document: the workstream, its tasks and their attempts, as JSON
    (the structs encoded as they are: a few ms for 2,000 tasks, in the step)."""
    ws = state.data.workstreams[ws_id]
    tasks = state.data.tasks
    doc = ArchiveDocument(
        archived_at=wall,
        last_seq=state.last_seq,
        workstream=ws,
        tasks=[tasks[t] for t in ws.task_ids if t in tasks],
    )
    return msgspec.json.encode(doc)


def sweep(m: Core) -> None:
    """In `settle`: ask for the archive of every workstream now due (each once)."""
    rt = m.rt
    if not rt.retention_due(m.wall):
        return
    data = m.state.data
    cfg = m.cfg.retention
    wss = data.workstreams.values()
    retry: list[float] = []
    for ws_id in due(wss, cfg, m.wall):
        if rt.archiving(ws_id) is not None or m.state.retire_problem(ws_id) is not None:
            continue
        at = rt.archive_retry_at(ws_id)
        if at is not None and at > m.wall:
            retry.append(at)  # its last archive failed: not again before then
            continue
        _archive(m, ws_id, "auto")
    # Looked at again at the next change, or when the next one comes of age (those just
    # found due but not retirable yet are looked at again when their tasks move).
    waiting = [ws for ws in wss if ws.state in FINISHED and rt.archiving(ws.id) is None]
    later = next_due((ws for ws in waiting if _deadline(ws, cfg) > m.wall), cfg)
    rt.set_retention_at(min([*retry, later] if later is not None else retry, default=None))


def _archive(m: Core, ws_id: str, cause: str) -> None:
    m.rt.set_archiving(ws_id, cause)
    m.effect(WriteArchive(ws_id, document(m.state, ws_id, m.wall)))


def retire_by_hand(m: Core, ws_id: str) -> None:
    """`orchctl ws retire WS`: a finished workstream (a failed one too) is archived and
    then retired, whatever retention says. Raises OperatorError when it is not finished
    or something of it still runs."""
    ws = m.state.data.workstreams[ws_id]
    if ws.state not in FINISHED:
        raise OperatorError(
            "wrong_state",
            f"workstream {ws_id} is {ws.state}; only a finished one (completed, failed, "
            f"cancelled, merged) is retired — wait for it, or `orchctl ws pause {ws_id}` "
            "and cancel its tasks first",
        )
    why = m.state.retire_problem(ws_id)
    if why is not None:
        raise OperatorError("wrong_state", f"workstream {ws_id} cannot be retired yet: {why}")
    if m.rt.archiving(ws_id) is None:
        _archive(m, ws_id, "operator")
    else:
        m.rt.set_archiving(ws_id, "operator")


def on_archived(m: Core, ws_id: str, path: str, error: str | None) -> Transition | None:
    """The archive asked for is written (or failed): retire the workstream if it is still
    as it was archived; the retirement record, or None."""
    rt = m.rt
    cause = rt.archiving(ws_id)
    if cause is None:
        return None  # it changed meanwhile (or was retired): asked again when due again
    rt.set_archiving(ws_id, None)
    ws = m.state.data.workstreams.get(ws_id)
    if ws is None or ws.state not in FINISHED or m.state.retire_problem(ws_id) is not None:
        rt.retention_changed()
        return None
    if error is not None:
        m.emit(
            "archive_failed",
            "error",
            workstream_id=ws_id,
            message=f"{error}; the workstream stays live, tried again in {RETRY_AFTER_S:g}s",
        )
        rt.set_archive_retry_at(ws_id, m.wall + RETRY_AFTER_S)
        rt.retention_changed()
        return None
    task_ids = list(ws.task_ids)
    rec = m.commit(
        "workstream", ws_id, RETIRED, "operator" if cause == "operator" else "auto", archive=path
    )
    rt.forget_tasks(ws_id, task_ids)
    rt.retention_changed()
    m.effect(DropFiles(ws_id))
    m.emit(
        "workstream_retired",
        "info",
        workstream_id=ws_id,
        message=f"archived in {path}; `orchctl ws show --archived {ws_id}`",
        data={"tasks": len(task_ids), "archive": path},
    )
    return rec
