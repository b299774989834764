"""Start-up recovery: settle what a previous life of the daemon left behind.

Runs before the engine takes any input: resources from the config, workers of the old
life recorded as shut down, attempts that were running found (pid + create time, never a
reused pid) and their trees killed, then retried as interrupted attempts (no retry
spent). Finally the worker pool is started. Each stage is one step, durable before the
next begins: the intent to kill is on disk before any signal.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from supervisor.core.dispatch import enqueue
from supervisor.core.lifecycle import new_worker_id, spawn_worker, tree_of
from supervisor.core.machine import Machine
from supervisor.core.model import FailureKind, TaskState, WorkerState
from supervisor.core.policy import StopReason
from supervisor.engine.ports import Agents

Transact = Callable[[Callable[[Machine], None]], Awaitable[None]]


def _settle_old_life(m: Machine) -> None:
    data = m.state.data
    for message in m.files.repairs:
        m.emit("state_repaired", "warning", message=message)
    for rid, rc in m.cfg.resources.items():
        res = data.resources.get(rid)
        if res is None or res.max_holders != rc.max_holders:
            m.commit("resource", rid, "defined", "config", max_holders=rc.max_holders)
    for wid, worker in list(data.workers.items()):
        if worker.state != WorkerState.SHUTDOWN:
            m.commit("worker", wid, "shutdown", "recovery", pid=None, task_id=None, attempt_id=None)
    for task in list(m.running_tasks()):
        m.commit("task", task.id, "running", "recovery", stopping=StopReason.SHUTDOWN)


def _resume(m: Machine) -> None:
    data = m.state.data
    for task in list(m.running_tasks()):
        m.commit(
            "task",
            task.id,
            "pending",
            "recovery",
            attempt_update={"ended_at": m.wall, "failure_kind": FailureKind.INTERRUPTED},
        )
        m.emit(
            "task_interrupted",
            "warning",
            task_id=task.id,
            workstream_id=task.workstream_id,
            message="the daemon stopped while this attempt ran; it runs again (no retry spent)",
        )
    for task in data.tasks.values():
        if task.state == TaskState.QUEUED:
            enqueue(m, task)
        elif task.state == TaskState.FAILED and task.critical:
            m.rt.block(task.workstream_id)
    for ws in list(data.workstreams.values()):
        if ws.state in ("pending", "running"):
            m.check_workstream(ws.id)
        m.rt.mark_dirty(ws.id)
    for _ in range(m.cfg.worker_count):
        spawn_worker(m, new_worker_id(m), "recovery")


async def recover(m: Machine, transact: Transact, agents: Agents) -> None:
    """Settle the old life through `transact` (the loop's: one durable step per call);
    the interrupted attempts' trees are killed together, within one grace."""
    await transact(_settle_old_life)
    trees = [tree_of(t.attempts[-1]) for t in m.running_tasks() if t.attempts]
    if trees:
        await agents.kill_trees(
            [(t.pgid, t.pid, t.create_time, t.marker) for t in trees], m.cfg.tasks.kill_grace_s
        )
    await transact(_resume)
