"""Start-up recovery: settle what a previous life of the daemon left behind.

Runs inside the scheduler before it takes any message: resources from the config, workers
of the old life recorded as shut down, attempts that were running found (pid + create
time, never a reused pid) and their trees killed, then retried as interrupted attempts
(no retry spent). Finally the worker pool is started.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from supervisor.core.model import FailureKind, TaskState, WorkerState
from supervisor.workers import proctree

if TYPE_CHECKING:
    from supervisor.engine.loop import Scheduler


async def recover(s: Scheduler) -> None:
    data = s.state.data
    for message in s.store.repairs:
        s.emit("state_repaired", "warning", message=message)
    for rid, rc in s.cfg.resources.items():
        res = data.resources.get(rid)
        if res is None or res.max_holders != rc.max_holders:
            s.commit("resource", rid, "defined", "config", max_holders=rc.max_holders)
    for wid, worker in list(data.workers.items()):
        if worker.state != WorkerState.SHUTDOWN:
            s.commit("worker", wid, "shutdown", "recovery", pid=None, task_id=None, attempt_id=None)
    running = [t for t in data.tasks.values() if t.state == TaskState.RUNNING]
    for task in running:
        s.commit("task", task.id, "running", "recovery", stopping="shutdown")
    await s.flush(force=True)  # the intent to kill is durable before any signal
    trees = [
        (a.pid or 0, a.pid or 0, a.pid_create_time or 0.0, a.attempt_id)
        for a in (t.attempts[-1] for t in running if t.attempts)
    ]
    if trees:
        grace = s.cfg.tasks.kill_grace_s

        def kill_all() -> None:
            for pgid, pid, ctime, marker in trees:
                proctree.kill_tree(pgid, pid, ctime, marker, grace)

        await anyio.to_thread.run_sync(kill_all)
    s.now = s.clock()
    for task in running:
        s.commit(
            "task",
            task.id,
            "pending",
            "recovery",
            worker_id=None,
            pid=None,
            stopping=None,
            attempt_update={"ended_at": s.now, "failure_kind": FailureKind.INTERRUPTED},
        )
        s.emit(
            "task_interrupted",
            "warning",
            task_id=task.id,
            workstream_id=task.workstream_id,
            message="the daemon stopped while this attempt ran; it runs again (no retry spent)",
        )
    for task in data.tasks.values():
        if task.state == TaskState.QUEUED:
            s.enqueue(task)
        elif task.state == TaskState.FAILED and task.critical:
            s.blocked_ws.add(task.workstream_id)
    for ws in list(data.workstreams.values()):
        if ws.state in ("pending", "running"):
            s.check_workstream(ws.id)
    s.dirty_ws.update(data.workstreams)
    for _ in range(s.cfg.worker_count):
        s.spawn_worker(s.new_worker_id(), "recovery")
