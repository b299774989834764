"""Lookups and resets shared by the operator actions (operator.py, task_ops.py, ws_ops.py).

They run inside a step of the engine like the actions themselves; a refusal raises OperatorError
with the protocol's error code.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from supervisor.core.errors import OperatorError
from supervisor.core.machine import Machine
from supervisor.core.model import Task, TaskState, Workstream


def get_task(s: Machine, task_id: str) -> Task:
    task = s.state.data.tasks.get(task_id)
    if task is None:
        raise OperatorError("not_found", f"no task {task_id!r} (see `orchctl tasks`)")
    return task


def get_ws(s: Machine, ws_id: str) -> Workstream:
    ws = s.state.data.workstreams.get(ws_id)
    if ws is None:
        raise OperatorError("not_found", f"no workstream {ws_id!r} (see `orchctl ws list`)")
    return ws


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
