"""An attempt is over: record where its task goes (policy.attempt_outcome decides), the
events that say so, and free the worker. Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

from supervisor.core import wire
from supervisor.core.context import Core
from supervisor.core.dispatch import enqueue
from supervisor.core.lifecycle import attempt_task, release_worker
from supervisor.core.model import FailureKind, Task, TaskState
from supervisor.core.policy import attempt_outcome


def on_finished(m: Core, wid: str, msg: wire.Finished) -> None:
    task = attempt_task(m, wid, msg.attempt_id)
    if task is None:
        m.emit(
            "late_result",
            "warning",
            worker_id=wid,
            message=f"result of attempt {msg.attempt_id} that was already given up; ignored",
        )
        return
    t = m.cfg.tasks
    out = attempt_outcome(
        task,
        phase=msg.phase,
        killed=msg.killed,
        exit_code=msg.exit_code,
        now=m.wall,
        base_s=t.backoff_base_s,
        max_s=t.backoff_max_s,
        jitter=t.backoff_jitter,
        rand=m.rand(),
    )
    upd: dict[str, Any] = {"ended_at": m.wall, "exit_code": msg.exit_code, "signal": msg.signal}
    if msg.message:
        upd["message"] = msg.message
    if msg.cpu_s is not None:
        upd["cpu_s"] = msg.cpu_s
    if msg.memory_peak_bytes is not None:
        upd["memory_peak_bytes"] = msg.memory_peak_bytes
    if msg.pid is not None:  # it ended before a Started was worth sending
        upd["pid"], upd["pid_start_ticks"] = msg.pid, msg.start_ticks
    if out.kind is not None:
        upd["failure_kind"] = out.kind
    if out.event == "task_reassigned":
        upd["reassigned"] = True
    extra: dict[str, Any] = {"revalidate": False} if task.revalidate else {}
    if out.to == TaskState.QUEUED:
        extra["queued_at"] = m.wall
    spends = out.to in (TaskState.PENDING, TaskState.FAILED) and "retry_count" in out.changes
    if spends:
        assert out.kind is not None
        m.rt.count(f"failure.{out.kind}")
    m.commit("task", task.id, str(out.to), out.cause, attempt_update=upd, **out.changes, **extra)
    ids = {"task_id": task.id, "workstream_id": task.workstream_id}
    if out.to == TaskState.COMPLETED:
        m.rt.count("completed")
        # Every task's end is in the journal under its TASK_ID, not only its troubles.
        m.emit("task_completed", "info", worker_id=wid, **ids)
    elif out.event == "task_interrupted":
        m.emit("task_interrupted", "warning", **ids)
    elif out.event == "task_reassigned":
        m.emit("task_reassigned", "warning", worker_id=wid, **ids)
        enqueue(m, task)
    elif out.final:
        kind = out.kind or FailureKind.EXIT_CODE
        m.emit(
            "task_failed",
            "error",
            message=f"{kind} after {task.retry_count} attempt(s)",
            data={"failure_kind": str(kind)},
            **ids,
        )
        if task.critical:
            m.rt.block(task.workstream_id)
            m.check_workstream(task.workstream_id)
    elif spends:
        m.rt.count("retries")
        m.emit(
            "task_retry_scheduled",
            "warning",
            data={
                "failure_kind": str(out.kind),
                "retry_count": task.retry_count,
                "delay_s": round((task.not_before or m.wall) - m.wall, 3),
            },
            **ids,
        )
    release_worker(m, wid)


def interrupted(m: Core, task: Task, message: str) -> None:
    """A running task whose attempt the daemon's stop interrupted goes back to pending,
    no retry spent (a recovery record), with a `task_interrupted` event saying why."""
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
        message=message,
    )
