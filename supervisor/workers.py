"""Worker lifecycle inside the writer: spawn, hello, exit and crash-loop back-off,
retirement (restart, shutdown, replacement) and the release of a worker after an attempt.
"""

from __future__ import annotations

import anyio
import structlog

from supervisor import wire
from supervisor.model import (
    Cause,
    Task,
    TaskState,
    WorkerState,
)
from supervisor.pool import AgentMessage
from supervisor.writer import (
    STOP_REASSIGN,
    SpawnFailed,
    TreeKilled,
    Writer,
)

log = structlog.get_logger("orchd.scheduler")


class WorkerOps(Writer):
    """The workers' side of the scheduler."""

    def new_worker_id(self) -> str:
        while True:
            wid = f"worker-{self._next_worker:03d}"
            self._next_worker += 1
            w = self.state.data.workers.get(wid)
            if w is None or (w.state == "shutdown" and wid not in self.gen):
                return wid

    def spawn_worker(self, wid: str, cause: Cause, delay: float = 0.0) -> None:
        w = self.state.data.workers.get(wid)
        restarts = (w.restarts + 1) if w is not None else 0
        self.commit(
            "worker",
            wid,
            "starting",
            cause,
            pid=None,
            pid_create_time=None,
            task_id=None,
            attempt_id=None,
            started_at=self.now,
            restarts=restarts,
        )
        self.heartbeat[wid] = self.now + delay

        async def spawn() -> None:
            if delay:
                await anyio.sleep(delay)
            try:
                gen = await self.pool.spawn(wid)
            except OSError as exc:
                await self.inbox_send.send(SpawnFailed(wid, str(exc)))
                return
            self.gen[wid] = max(gen, self.gen.get(wid, 0))

        self.background(spawn)

    def _fresh(self, wid: str, generation: int) -> bool:
        known = self.gen.get(wid, 0)
        if generation < known:
            return False
        self.gen[wid] = generation
        return True

    def _on_agent(self, m: AgentMessage) -> None:
        wid, msg = m.worker_id, m.msg
        if not self._fresh(wid, m.generation):
            self.emit("stale_agent_message", "warning", worker_id=wid, message=type(msg).__name__)
            return
        self.heartbeat[wid] = self.now
        worker = self.state.data.workers.get(wid)
        if worker is None:
            return
        if self.health is not None:
            self.health.on_heartbeat(wid)
        if isinstance(msg, wire.Hello):
            if worker.state == WorkerState.STARTING:
                self.commit(
                    "worker", wid, "idle", "auto", pid=msg.pid, pid_create_time=msg.create_time
                )
                self.idle[wid] = None
                self.start_failures.pop(wid, None)
                self.store.worker_log(wid, f"agent up, pid {msg.pid}")
        elif isinstance(msg, wire.Started):
            task = self._attempt_task(wid, msg.attempt_id)
            if task is None:
                self.emit(
                    "late_agent_message",
                    "warning",
                    worker_id=wid,
                    message=f"Started {msg.attempt_id}",
                )
                return
            self.commit(
                "task",
                task.id,
                "running",
                "auto",
                pid=msg.pid,
                attempt_update={"pid": msg.pid, "pid_create_time": msg.create_time},
            )
        elif isinstance(msg, wire.Finished):
            self._on_finished(wid, msg)

    def _attempt_task(self, wid: str, attempt_id: str) -> Task | None:
        worker = self.state.data.workers.get(wid)
        if worker is None or worker.attempt_id != attempt_id or worker.task_id is None:
            return None
        task = self.state.data.tasks.get(worker.task_id)
        if task is None or task.state != TaskState.RUNNING or not task.attempts:
            return None
        return task if task.attempts[-1].attempt_id == attempt_id else None

    def _on_agent_exit(self, wid: str, generation: int, returncode: int | None) -> None:
        if not self._fresh(wid, generation):
            return
        worker = self.state.data.workers.get(wid)
        if worker is None or worker.state == WorkerState.SHUTDOWN:
            return
        was_starting = worker.state == WorkerState.STARTING
        task_id = worker.task_id
        self.idle.pop(wid, None)
        self.commit("worker", wid, "shutdown", "health", pid=None)
        self.gen[wid] = generation + 1  # anything later from the dead process is stale
        if not self.draining:
            self.emit("worker_exited", "error", worker_id=wid, data={"returncode": returncode})
        self.store.worker_log(wid, f"agent exited, returncode {returncode}")
        if task_id is not None:
            task = self.state.data.tasks[task_id]
            if task.state == TaskState.RUNNING:
                self.stop_task(
                    task, STOP_REASSIGN if task.stopping is None else task.stopping, direct=True
                )
        if self.draining:
            return
        if was_starting:
            n = self.start_failures.get(wid, 0) + 1
            self.start_failures[wid] = n
            h = self.cfg.health
            delay = min(h.restart_backoff_base_s * 2 ** (n - 1), h.restart_backoff_max_s)
            self.emit(
                "worker_start_failed",
                "error",
                worker_id=wid,
                message=f"worker exited while starting ({n} in a row); restart in {delay:.1f}s",
            )
            self.spawn_worker(wid, "health", delay=delay)
        else:
            self.spawn_worker(self.new_worker_id(), "health")

    def retire_worker(
        self,
        wid: str,
        *,
        task_reason: str,
        restart_same: bool,
        graceful: bool,
        cause: Cause = "operator",
        replace: bool = True,
    ) -> int:
        """Shut a worker down: its running task stopped for `task_reason`, the process (and
        the task's tree, by pid, even if the agent cannot answer) killed, then the worker is
        restarted under the same id or replaced by a new one so the pool keeps its size."""
        worker = self.state.data.workers[wid]
        task = self.state.data.tasks.get(worker.task_id) if worker.task_id else None
        running = task is not None and task.state == TaskState.RUNNING
        if task is not None and running and task.stopping is None:
            self.commit("task", task.id, "running", cause, stopping=task_reason)
        self.idle.pop(wid, None)
        rec = self.commit("worker", wid, "shutdown", cause, pid=None)
        self.gen[wid] = self.gen.get(wid, 0) + 1  # what the old process says from now on is stale
        attempt = task.attempts[-1] if task is not None and running else None
        grace = self.cfg.tasks.kill_grace_s
        self.store.worker_log(
            wid, f"shut down ({cause}; {'restart' if restart_same else 'replace'})"
        )

        async def stop_then_replace() -> None:
            tree = None
            if attempt is not None:
                tree = (
                    attempt.pid or 0,
                    attempt.pid or 0,
                    attempt.pid_create_time or 0.0,
                    attempt.attempt_id,
                )
            if graceful:
                await self.pool.stop(wid, grace)
            await self.pool.kill(wid, task_tree=tree, grace_s=grace)
            if attempt is not None:
                await self.inbox_send.send(TreeKilled(wid, attempt.attempt_id))
            if replace and not self.draining:
                await self.call(
                    lambda: self.spawn_worker(wid if restart_same else self.new_worker_id(), cause)
                )

        self.background(stop_then_replace)
        return rec.seq

    def worker_alive(self, wid: str) -> bool:
        w = self.state.data.workers.get(wid)
        return w is not None and w.state in (WorkerState.IDLE, WorkerState.BUSY)

    def _release_worker(self, wid: str) -> None:
        worker = self.state.data.workers.get(wid)
        if worker is None:
            return
        if worker.state == WorkerState.BUSY:
            self.commit("worker", wid, "idle", "auto", task_id=None, attempt_id=None)
            self.idle[wid] = None
        elif worker.task_id is not None:
            self.commit("worker", wid, str(worker.state), "auto", task_id=None, attempt_id=None)
