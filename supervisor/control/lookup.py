"""Lookups and resets shared by the operator actions (actions.py, task_actions.py,
ws_actions.py): how a task or workstream named on the command line is found.

They run inside a step of the engine like the actions themselves; a refusal raises OperatorError
with the protocol's error code.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from supervisor.core.errors import OperatorError
from supervisor.core.machine import Machine
from supervisor.core.model import Task, TaskState, Workstream, full_task_id

# A workstream in these states is live: it has work to do, and a bare task id is looked up
# among the live runs first. completed, failed, cancelled and merged runs are finished: a
# failed run waits for an operator, but last week's failed runs must not make every
# bare id of today's run ambiguous.
LIVE_WORKSTREAM_STATES: Final = frozenset({"pending", "running"})


def get_task(s: Machine, ref: str, workstream: str | None = None) -> Task:
    """The task that `ref` names (`orchctl retry REF [--workstream WS]`).

    A full name `WS/TASK` names one task (WS may be a pipeline name: its newest run). A
    bare id names the task of that id in `workstream` when given; else the one live run
    (pending or running) that has it; else, when no live run has it, the only run at all
    that has it. Anything else is ambiguous: refused with exit 2 and the candidates'
    full names, most recent first. A task recorded before full names existed has a bare
    id that is its full name too; it is found the same way."""
    tasks = s.state.data.tasks
    if workstream is not None:
        ws = get_ws(s, workstream)
        for key in (ref, full_task_id(ws.id, ref)):
            task = tasks.get(key)
            if task is not None and task.workstream_id == ws.id:
                return task
        raise OperatorError(
            "not_found",
            f"no task {ref!r} in workstream {ws.id} (see `orchctl tasks --workstream {ws.id}`)",
        )
    task = tasks.get(ref)
    if task is not None and "/" in ref:
        return task
    if "/" in ref:
        ws_ref, _, bare = ref.partition("/")
        if ws_ref and bare and "/" not in bare:
            run = _find_ws(s, ws_ref)
            if run is not None and (task := tasks.get(full_task_id(run.id, bare))) is not None:
                return task
        raise OperatorError("not_found", f"no task {ref!r} (see `orchctl tasks`)")
    found = task_candidates(s, ref)
    if not found:
        raise OperatorError("not_found", f"no task {ref!r} (see `orchctl tasks`)")
    wss = s.state.data.workstreams
    live = [t for t in found if wss[t.workstream_id].state in LIVE_WORKSTREAM_STATES]
    if len(live) == 1:
        return live[0]
    if not live and len(found) == 1:
        return found[0]
    shown = live or found
    listing = ", ".join(f"{t.id} ({wss[t.workstream_id].state})" for t in shown)
    which = (
        f"{len(shown)} live workstreams have it"
        if live
        else f"no live workstream has it, {len(shown)} finished ones do"
    )
    raise OperatorError(
        "invalid",
        f"task id {ref!r} is ambiguous: {which}: {listing} (most recent first); name one "
        "by its full name WS/TASK, or add --workstream WS",
    )


def task_candidates(s: Machine, bare: str) -> list[Task]:
    """Every task whose bare id is `bare`, one per workstream, the most recent run first."""
    tasks, out = s.state.data.tasks, []
    legacy = tasks.get(bare)
    # Workstreams are kept in the order they were submitted (the log's order, which a
    # snapshot keeps): reversed, the most recent first, whatever the wall clock did.
    for ws in reversed(s.state.data.workstreams.values()):
        task = tasks.get(full_task_id(ws.id, bare))
        if task is None and legacy is not None and legacy.workstream_id == ws.id:
            task = legacy
        if task is not None:
            out.append(task)
    return out


def dependency_of(s: Machine, task: Task, ref: str) -> str:
    """Which of `task`'s dependencies `ref` names: its full name, or a bare id (one of the
    same workstream first)."""
    deps = task.depends_on
    if ref in deps:
        return ref
    local = full_task_id(task.workstream_id, ref)
    if local in deps:
        return local
    matches = [d for d in deps if d.rpartition("/")[2] == ref]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise OperatorError(
            "invalid",
            f"{task.id} depends on several tasks named {ref!r}: {', '.join(matches)}; "
            "give the full name",
        )
    raise OperatorError(
        "not_found", f"{task.id} does not depend on {ref} (see `orchctl deps {task.id}`)"
    )


def get_ws(s: Machine, ref: str) -> Workstream:
    """The workstream `ref` names: its id, or a pipeline name (the files' `name`) for that
    pipeline's most recent run."""
    ws = _find_ws(s, ref)
    if ws is None:
        raise OperatorError(
            "not_found",
            f"no workstream {ref!r} (see `orchctl ws list`; a retired one is shown by "
            f"`orchctl ws show --archived {ref}`)",
        )
    return ws


def _find_ws(s: Machine, ref: str) -> Workstream | None:
    wss = s.state.data.workstreams
    ws = wss.get(ref)
    if ws is not None:
        return ws
    for ws in reversed(wss.values()):
        if ws.name == ref:
            return ws
    return None


def refuse_merged(s: Machine, ws_id: str) -> None:
    """A merged workstream is final: nothing in it runs or rolls back again."""
    if s.state.data.workstreams[ws_id].state == "merged":
        raise OperatorError("wrong_state", f"workstream {ws_id} is merged; it never changes again")


def reopen_workstream(s: Machine, ws_id: str) -> None:
    """A finished workstream that has work again runs again (call it after the records
    that give it that work); its ready tasks may run again, and its verdict is decided
    again."""
    ws = s.state.data.workstreams[ws_id]
    if ws.state in ("failed", "completed", "cancelled"):
        s.commit("workstream", ws_id, "running", "operator", ended_at=None)
    tasks = s.state.data.tasks
    # (Its dispatch block is lifted by Core.commit once no critical task is failed.)
    # Its ready tasks were passed over while it was finished: they may run now.
    unmet = s.state.graph.unmet
    for tid in ws.task_ids:
        if tasks[tid].state == TaskState.PENDING and not unmet.get(tid):
            s.state.graph.mark_ready(tid)
    # What it holds may still settle it (a retried task behind a failed dependency, a
    # critical task still failed): decided now, not left `running` with nothing to run.
    s.check_workstream(ws_id)


def fresh_changes(task: Task) -> dict[str, Any]:
    """The fields an operator's reset clears: a fresh set of retries, no skip, no back-off."""
    out: dict[str, Any] = {
        "retry_count": 0,
        "not_before": None,
        "failure_kind": None,
        "skipped": False,
        "skip_reason": None,
    }
    if task.revalidate:
        out["revalidate"] = False
    return out


def reset_tasks(s: Machine, task_ids: Iterable[str]) -> list[str]:
    """Every given task back to pending with fresh retries (none of them may be running)."""
    done = []
    for tid in task_ids:
        task = s.state.data.tasks[tid]
        s.commit("task", tid, "pending", "operator", **fresh_changes(task))
        s.state.graph.mark_ready(tid)
        done.append(tid)
    return done
