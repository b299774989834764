"""Survivors of a kill: processes of an attempt that outlived SIGKILL and the sweeps (a
process in uninterruptible sleep, one that escaped while the tree was signalled). Their
task is held back: its outcome is recorded as usual, but it is neither queued nor
dispatched again while they live, so two attempts of one task never overlap. The hold is
durable (the task's `survivors`, as [pid, start ticks]); a timer checks them again (and
SIGKILLs them again) until they are gone, then the task is released. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

from supervisor.core.context import Core
from supervisor.core.dispatch import enqueue
from supervisor.core.effects import CheckSurvivors
from supervisor.core.model import Task, TaskState

# How often the survivors of a held task are checked (and SIGKILLed) again.
RECHECK_S = 1.0


def hold(m: Core, task: Task, attempt_id: str, survivors: Sequence[tuple[int, int]]) -> None:
    """Hold `task` back until `survivors` (of attempt `attempt_id`) are gone."""
    known = {(p, t) for p, t in (tuple(x) for x in task.survivors)}
    merged = sorted(known | {(int(p), int(t)) for p, t in survivors})
    if set(merged) == known:
        return  # the same survivors, reported by another kill of the same attempt
    m.commit("task", task.id, str(task.state), "auto", survivors=[list(x) for x in merged])
    pids = [p for p, _ in merged]
    m.emit(
        "task_tree_survivors",
        "error",
        task_id=task.id,
        workstream_id=task.workstream_id,
        message=f"{len(pids)} process(es) of attempt {attempt_id} outlived the kill "
        f"(pids {', '.join(map(str, pids))}); the task is held back until they are gone",
        data={"attempt_id": attempt_id, "pids": pids},
    )
    m.rt.arm("survivors", task.id, m.now + RECHECK_S)


def held(task: Task) -> bool:
    """The task waits for survivors of an earlier attempt to be gone."""
    return bool(task.survivors)


def on_due(m: Core, task: Task) -> None:
    """The re-check timer of a held task is due: check (and kill) its survivors again."""
    if task.survivors:
        m.effect(CheckSurvivors(task.id, tuple((p, t) for p, t in task.survivors)))


def rearm(m: Core) -> None:
    """At start-up: every held task's re-check is armed again (timers are not durable)."""
    for task in m.state.data.tasks.values():
        if task.survivors:
            m.rt.arm("survivors", task.id, m.now)


def on_checked(m: Core, task_id: str, left: Sequence[tuple[int, int]]) -> None:
    """The survivors were checked: the task is released once none is left."""
    task = m.state.data.tasks.get(task_id)
    if task is None or not task.survivors:
        return
    now_left = sorted((int(p), int(t)) for p, t in left)
    if now_left:
        if [tuple(x) for x in task.survivors] != now_left:
            m.commit(
                "task", task.id, str(task.state), "auto", survivors=[list(x) for x in now_left]
            )
        m.rt.arm("survivors", task.id, m.now + RECHECK_S)
        return
    pids = [p for p, _ in task.survivors]
    m.commit("task", task.id, str(task.state), "auto", survivors=[])
    m.emit(
        "task_released",
        "info",
        task_id=task.id,
        workstream_id=task.workstream_id,
        message=f"the survivors of its last kill are gone (pids {', '.join(map(str, pids))})",
        data={"pids": pids},
    )
    if task.state == TaskState.QUEUED:
        enqueue(m, task)
    elif task.state == TaskState.PENDING:
        m.state.graph.mark_ready(task.id)
