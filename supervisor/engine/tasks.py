"""Task lifecycle inside the writer: readiness, dispatch under resource limits, attempts
and their outcomes (the retry rule), timeouts and other timers, workstream verdicts.
"""

from __future__ import annotations

import secrets
from typing import Any

import anyio
import structlog

from supervisor.core.model import (
    Cause,
    FailureKind,
    Task,
    TaskState,
)
from supervisor.core.policy import after_failure, workstream_verdict
from supervisor.core.views import task_view
from supervisor.engine.worker_ops import WorkerOps
from supervisor.engine.writer import (
    STOP_CANCEL,
    STOP_REASSIGN,
    STOP_SHUTDOWN,
    STOP_TIMEOUT,
    STOP_WORKER_LOST,
    TreeKilled,
)
from supervisor.workers import wire

log = structlog.get_logger("orchd.scheduler")

# An operator's workstream rollback stops the attempt; the task goes back to pending.
STOP_ROLLBACK = "rollback"


class TaskEngine(WorkerOps):
    """The tasks' side of the scheduler."""

    def _after_task(self, task: Task, frm: str) -> None:
        self.dirty_ws.add(task.workstream_id)
        if frm == "running" and task.state != TaskState.RUNNING:
            self.timers.disarm("timeout", task.id)
            for r in task.resources:
                self.queue.unpark(r)
        if task.state == frm:
            return
        ws = self.state.data.workstreams[task.workstream_id]
        if task.state == TaskState.RUNNING and ws.state == "pending":
            self.commit("workstream", ws.id, "running", "auto")
        if task.state in (TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED):
            self.check_workstream(ws.id)

    def check_workstream(self, ws_id: str) -> None:
        ws = self.state.data.workstreams[ws_id]
        if ws.state not in ("pending", "running"):
            return
        counts = self.state.graph.ws_counts.get(ws_id, {})
        critical = runnable = False
        if counts.get("failed") and not counts.get("running"):
            tasks = [self.state.data.tasks[t] for t in ws.task_ids]
            critical = any(t.state == TaskState.FAILED and t.critical for t in tasks)
            runnable = any(
                t.state == TaskState.PENDING and self.state.graph.unmet.get(t.id) == 0
                for t in tasks
            )
        verdict = workstream_verdict(
            counts, critical_failed=critical, has_runnable_pending=runnable
        )
        if verdict is None:
            return
        self.commit("workstream", ws_id, str(verdict), "auto", ended_at=self.now)
        self.dirty_ws.add(ws_id)
        if verdict == "failed":
            self.emit("workstream_failed", "critical", workstream_id=ws_id)
            payload = {
                "workstream": self.state.data.workstreams[ws_id],
                "tasks": [task_view(self.state.data.tasks[t]) for t in ws.task_ids],
            }
            self.background(
                lambda: anyio.to_thread.run_sync(
                    self.store.write_json, f"archive/{ws_id}.json", payload
                )
            )
        else:
            self.emit("workstream_completed", "info", workstream_id=ws_id)

    def _promote(self) -> None:
        """Pending tasks whose dependencies are met (and back-off is over) become queued."""
        tasks = self.state.data.tasks
        for tid in self.state.graph.drain_ready():
            task = tasks.get(tid)
            if task is None or task.state != TaskState.PENDING or self.state.graph.unmet.get(tid):
                continue
            ws = self.state.data.workstreams[task.workstream_id]
            if ws.state not in ("pending", "running"):
                continue
            if task.not_before is not None and task.not_before > self.now:
                self.timers.arm("backoff", tid, task.not_before)
                continue
            self.commit("task", tid, "queued", "auto", queued_at=self.now, not_before=None)
            self.enqueue(task)

    def enqueue(self, task: Task) -> None:
        self.queue.push(task.priority, task.order, task.id)
        qt = task.queue_timeout_s or self.cfg.tasks.queue_timeout_s
        if qt:
            self.timers.arm("queue_alert", task.id, self.now + qt)

    def _dispatch(self) -> None:
        if self.draining:
            return
        tasks, resources = self.state.data.tasks, self.state.data.resources
        while self.idle:
            entry = self.queue.pop()
            if entry is None:
                break
            task = tasks.get(entry[2])
            if task is None or task.state != TaskState.QUEUED:
                continue
            if task.workstream_id in self.blocked_ws:
                self.queue.park_ws(task.workstream_id, entry)
                continue
            full = next(
                (
                    r
                    for r in sorted(task.resources)
                    if len(self.state.graph.holders_of(r)) >= resources[r].max_holders
                ),
                None,
            )
            if full is not None:
                self.queue.park(full, entry)
                self.parked_on[task.id] = full
                if (
                    self.timers.armed("resource_alert", task.id) is None
                    and full not in self.res_alerted
                ):
                    self.timers.arm(
                        "resource_alert",
                        task.id,
                        (task.queued_at or self.now) + self.cfg.tasks.resource_wait_alert_s,
                    )
                continue
            wid = next(iter(self.idle))
            del self.idle[wid]
            self._start_attempt(task, wid)
        for r in list(self.res_alerted):
            if not self.queue.waiting_on(r):
                self.res_alerted.discard(r)

    def _start_attempt(self, task: Task, wid: str) -> None:
        n = len(task.attempts) + 1
        attempt_id = f"{task.id}.{n}.{secrets.token_hex(3)}"
        self.parked_on.pop(task.id, None)
        self.timers.disarm("queue_alert", task.id)
        self.timers.disarm("resource_alert", task.id)
        if task.queued_at is not None:
            self.queue_waits.append(self.now - task.queued_at)
            if len(self.queue_waits) > 10000:
                del self.queue_waits[:5000]
        self.commit(
            "task",
            task.id,
            "running",
            "auto",
            worker_id=wid,
            pid=None,
            stopping=None,
            attempt={
                "attempt_id": attempt_id,
                "number": n,
                "worker_id": wid,
                "started_at": self.now,
            },
        )
        self.commit("worker", wid, "busy", "auto", task_id=task.id, attempt_id=attempt_id)
        self.worker_note(wid, f"took task {task.id}, attempt {n} ({attempt_id})")
        self.counters["attempts"] = self.counters.get("attempts", 0) + 1
        self.timers.arm("timeout", task.id, self.now + task.timeout_s)
        run = wire.Run(
            attempt_id=attempt_id,
            task_id=task.id,
            number=n,
            # A revalidation runs the validate step alone, as the attempt's command.
            command=task.validate if task.revalidate and task.validate else task.command,
            cwd=task.cwd,
            env=task.env,
            validate=None if task.revalidate else task.validate,
            rlimits=task.rlimits,
            log_path=str(self.store.task_log_path(task.id)),
        )
        self.effect(lambda: self.pool.send(wid, run))

    def stop_task(self, task: Task, reason: str, *, direct: bool = False) -> None:
        """Begin killing a running attempt; its outcome is decided when the tree is gone."""
        attempt = task.attempts[-1]
        wid = task.worker_id or attempt.worker_id
        cause: Cause = (
            "timeout"
            if reason == STOP_TIMEOUT
            else "operator"
            if reason in (STOP_CANCEL, STOP_WORKER_LOST, STOP_ROLLBACK)
            else "health"
            if reason == STOP_REASSIGN
            else "shutdown"
        )
        if task.stopping != reason:
            self.commit("task", task.id, "running", cause, stopping=reason)
        grace = self.cfg.tasks.kill_grace_s
        if not direct and self.worker_alive(wid):
            kill = wire.Kill(attempt_id=attempt.attempt_id, grace_s=grace, reason=reason)
            self.effect(lambda: self.pool.send(wid, kill))
            return
        if not direct and self.worker_unanswering(wid, attempt.attempt_id):
            self.retire_unanswering(wid, reason, cause)
            return
        tree = (
            attempt.pid or 0,
            attempt.pid or 0,
            attempt.pid_create_time or 0.0,
            attempt.attempt_id,
        )

        async def kill_direct() -> None:
            await self.pool.kill(wid, task_tree=tree, grace_s=grace)
            await self.inbox_send.send(TreeKilled(wid, attempt.attempt_id))

        self.background(kill_direct)

    def _on_finished(self, wid: str, msg: wire.Finished) -> None:
        task = self._attempt_task(wid, msg.attempt_id)
        if task is None:
            self.emit(
                "late_result",
                "warning",
                worker_id=wid,
                message=f"result of attempt {msg.attempt_id} that was already given up; ignored",
            )
            return
        upd: dict[str, Any] = {
            "ended_at": self.now,
            "exit_code": msg.exit_code,
            "signal": msg.signal,
        }
        if msg.message:
            upd["message"] = msg.message
        if msg.pid is not None:  # it ended before a Started was worth sending
            upd["pid"], upd["pid_create_time"] = msg.pid, msg.create_time
        reason = task.stopping
        if msg.phase == "done" and not msg.killed:
            self.commit(
                "task",
                task.id,
                "completed",
                "auto",
                worker_id=None,
                pid=None,
                stopping=None,
                failure_kind=None,
                attempt_update=upd,
                **({"revalidate": False} if task.revalidate else {}),
            )
            self.counters["completed"] = self.counters.get("completed", 0) + 1
        elif reason == STOP_CANCEL:
            upd["failure_kind"] = FailureKind.EXIT_CODE
            self.commit(
                "task",
                task.id,
                "cancelled",
                "operator",
                worker_id=None,
                pid=None,
                stopping=None,
                attempt_update=upd,
            )
        elif reason in (STOP_SHUTDOWN, STOP_ROLLBACK):
            upd["failure_kind"] = FailureKind.INTERRUPTED
            self.commit(
                "task",
                task.id,
                "pending",
                "shutdown" if reason == STOP_SHUTDOWN else "operator",
                worker_id=None,
                pid=None,
                stopping=None,
                attempt_update=upd,
            )
            self.emit(
                "task_interrupted", "warning", task_id=task.id, workstream_id=task.workstream_id
            )
        elif reason == STOP_REASSIGN and self._reassigns(task) < max(task.max_retries, 3):
            upd |= {"failure_kind": FailureKind.WORKER_LOST, "reassigned": True}
            self.commit(
                "task",
                task.id,
                "queued",
                "health",
                worker_id=None,
                pid=None,
                stopping=None,
                queued_at=self.now,
                attempt_update=upd,
            )
            self.emit(
                "task_reassigned",
                "warning",
                task_id=task.id,
                workstream_id=task.workstream_id,
                worker_id=wid,
            )
            self.enqueue(task)
        else:
            if reason == STOP_TIMEOUT:
                kind = FailureKind.TIMEOUT
            elif reason in (STOP_WORKER_LOST, STOP_REASSIGN):
                kind = FailureKind.WORKER_LOST
            else:
                kind = {"spawn": FailureKind.SPAWN_ERROR, "validate": FailureKind.VALIDATION}.get(
                    msg.phase, FailureKind.EXIT_CODE
                )
                if task.revalidate and kind == FailureKind.EXIT_CODE:
                    kind = FailureKind.VALIDATION  # the "command" was the validate step
            self.fail_attempt(task, kind, msg.exit_code, upd)
        self._release_worker(wid)

    def _reassigns(self, task: Task) -> int:
        return sum(1 for a in task.attempts if a.reassigned)

    def fail_attempt(
        self, task: Task, kind: FailureKind, exit_code: int | None, upd: dict[str, Any]
    ) -> None:
        t = self.cfg.tasks
        out = after_failure(
            task,
            kind,
            exit_code,
            now=self.now,
            base_s=t.backoff_base_s,
            max_s=t.backoff_max_s,
            jitter=t.backoff_jitter,
            rand=self.rand(),
        )
        upd["failure_kind"] = kind
        self.counters[f"failure.{kind}"] = self.counters.get(f"failure.{kind}", 0) + 1
        cause: Cause = "timeout" if kind == FailureKind.TIMEOUT else "failure"
        extra = {"revalidate": False} if task.revalidate else {}
        self.commit("task", task.id, str(out.to), cause, attempt_update=upd, **out.changes, **extra)
        if out.final:
            self.emit(
                "task_failed",
                "error",
                task_id=task.id,
                workstream_id=task.workstream_id,
                message=f"{kind} after {task.retry_count} attempt(s)",
                data={"failure_kind": str(kind)},
            )
            if task.critical:
                self.blocked_ws.add(task.workstream_id)
                self.check_workstream(task.workstream_id)
        else:
            self.counters["retries"] = self.counters.get("retries", 0) + 1
            self.emit(
                "task_retry_scheduled",
                "warning",
                task_id=task.id,
                workstream_id=task.workstream_id,
                data={
                    "failure_kind": str(kind),
                    "retry_count": task.retry_count,
                    "delay_s": round((task.not_before or self.now) - self.now, 3),
                },
            )

    def _on_timers(self) -> None:
        tasks = self.state.data.tasks
        for kind, key in self.timers.pop_due(self.now):
            if kind == "timeout":
                task = tasks.get(key)
                if task is not None and task.state == TaskState.RUNNING and task.stopping is None:
                    self.counters["timeouts"] = self.counters.get("timeouts", 0) + 1
                    self.emit(
                        "task_timeout",
                        "warning",
                        task_id=key,
                        workstream_id=task.workstream_id,
                        worker_id=task.worker_id,
                        data={"timeout_s": task.timeout_s},
                    )
                    self.stop_task(task, STOP_TIMEOUT)
            elif kind == "backoff":
                task = tasks.get(key)
                if task is not None and task.state == TaskState.PENDING:
                    self.state.graph.ready[key] = None
            elif kind == "queue_alert":
                task = tasks.get(key)
                if task is not None and task.state == TaskState.QUEUED:
                    self.emit(
                        "task_queue_timeout",
                        "warning",
                        task_id=key,
                        workstream_id=task.workstream_id,
                        data={"waited_s": round(self.now - (task.queued_at or self.now), 3)},
                    )
            elif kind == "resource_alert":
                task = tasks.get(key)
                res = self.parked_on.get(key)
                if (
                    task is not None
                    and task.state == TaskState.QUEUED
                    and res
                    and res not in self.res_alerted
                ):
                    self.res_alerted.add(res)
                    self.emit(
                        "resource_exhausted",
                        "critical",
                        resource_id=res,
                        task_id=key,
                        workstream_id=task.workstream_id,
                        data={
                            "holders": list(self.state.graph.holders_of(res)),
                            "waiting": self.queue.waiting_on(res),
                            "waited_s": round(self.now - (task.queued_at or self.now), 3),
                        },
                    )
