"""Worker lifecycle inside the writer: spawn, hello, exit and crash-loop back-off,
retirement (restart, shutdown, replacement) and the release of a worker after an attempt.

A worker that exits while starting, or soon after (within `unresponsive_after_s` of its
hello), is restarted under the same id after a growing delay, with an event each time: a
broken interpreter or an agent that dies at once never restarts in a tight loop. One that
ran for longer is replaced at once.
"""

from __future__ import annotations

import anyio
import structlog

from supervisor.core.model import (
    Cause,
    Task,
    TaskState,
    WorkerState,
)
from supervisor.engine.writer import (
    STOP_REASSIGN,
    SpawnFailed,
    TreeKilled,
    Writer,
)
from supervisor.store.snapshot import iso_utc
from supervisor.workers import wire
from supervisor.workers.pool import AgentMessage

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

    # Lines for the workers' own logs, written once per batch (one per dispatch would cost
    # an open and a close each on the dispatch path).
    _notes: dict[str, list[tuple[float, str]]] | None = None

    def worker_note(self, wid: str, text: str) -> None:
        """A line in the worker's own log (logs/workers/<id>.log), stamped with the time of
        the batch; lines are written together every NOTES_FLUSH_S (scheduler._periodic),
        off the dispatch path."""
        if self._notes is None:
            self._notes = {}
        self._notes.setdefault(wid, []).append((self.now, text))

    def write_notes(self) -> None:
        notes, self._notes = self._notes or {}, None
        for wid, lines in notes.items():
            try:
                with open(self.store.worker_log_path(wid), "a", encoding="utf-8") as f:
                    f.writelines(f"{iso_utc(ts)} {text}\n" for ts, text in lines)
            except OSError as exc:  # a full disk is no reason to stop the engine
                log.warning("worker_log_failed", worker_id=wid, error=str(exc))

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
                # Retired (or restarted again) during the delay: that start is not wanted.
                now = self.state.data.workers.get(wid)
                if now is None or now.state != WorkerState.STARTING or now.restarts != restarts:
                    return
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
        if isinstance(msg, wire.Hello):
            if worker.state == WorkerState.STARTING:
                self.commit(
                    "worker",
                    wid,
                    "idle",
                    "auto",
                    pid=msg.pid,
                    pid_create_time=msg.create_time,
                    started_at=self.now,
                )
                self.idle[wid] = None
                self.worker_note(wid, f"agent up, pid {msg.pid}")
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
            self.lazy = True  # only a pid learnt: no sync of its own (see Writer.flush)
            try:
                self.commit(
                    "task",
                    task.id,
                    "running",
                    "auto",
                    pid=msg.pid,
                    attempt_update={"pid": msg.pid, "pid_create_time": msg.create_time},
                )
            finally:
                self.lazy = False
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
        h = self.cfg.health
        # started_at is the hello's time once the worker is up.
        young = was_starting or self.now - (worker.started_at or 0.0) < h.unresponsive_after_s
        task_id = worker.task_id
        self.idle.pop(wid, None)
        self.commit("worker", wid, "shutdown", "health", pid=None)
        self.gen[wid] = generation + 1  # anything later from the dead process is stale
        if not self.draining:
            self.emit("worker_exited", "error", worker_id=wid, data={"returncode": returncode})
        self.worker_note(
            wid,
            f"agent exited, returncode {returncode}"
            + (" (while starting)" if was_starting else "")
            + (f", its task {task_id} stopped" if task_id else ""),
        )
        if task_id is not None:
            task = self.state.data.tasks[task_id]
            if task.state == TaskState.RUNNING:
                self.stop_task(
                    task, STOP_REASSIGN if task.stopping is None else task.stopping, direct=True
                )
        if self.draining:
            return
        if not young:
            self.start_failures.pop(wid, None)
            self.spawn_worker(self.new_worker_id(), "health")
            return
        n = self.start_failures.pop(wid, 0) + 1
        # Its task's tree is still being killed under this id (and the kill is addressed to
        # this id's agent): the restart takes a fresh id, and the count goes with it.
        new_id = wid if task_id is None else self.new_worker_id()
        self.start_failures[new_id] = n
        # A first early exit of a worker that did come up is replaced at once; from then on,
        # and for any exit while starting, the delay doubles up to its cap.
        k = n if was_starting else n - 1
        delay = min(h.restart_backoff_base_s * 2 ** (k - 1), h.restart_backoff_max_s) if k else 0.0
        when = "while starting" if was_starting else "soon after starting"
        if delay:  # else worker_exited said it all: it is replaced at once
            self.emit(
                "worker_start_failed",
                "error",
                worker_id=wid,
                message=f"worker exited {when} ({n} in a row); {new_id} starts in {delay:.1f}s",
                data={"failures": n, "delay_s": delay, "returncode": returncode, "next": new_id},
            )
        self.worker_note(wid, f"exited {when} ({n} in a row): {new_id} starts in {delay:.1f}s")
        self.spawn_worker(new_id, "health", delay=delay)

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
        # A stopped or wedged agent cannot act on Stop: waiting for it would only delay.
        graceful = graceful and worker.state in (WorkerState.IDLE, WorkerState.BUSY)
        task = self.state.data.tasks.get(worker.task_id) if worker.task_id else None
        running = task is not None and task.state == TaskState.RUNNING
        if task is not None and running and task.stopping is None:
            self.commit("task", task.id, "running", cause, stopping=task_reason)
        self.idle.pop(wid, None)
        rec = self.commit("worker", wid, "shutdown", cause, pid=None)
        self.gen[wid] = self.gen.get(wid, 0) + 1  # what the old process says from now on is stale
        attempt = task.attempts[-1] if task is not None and running else None
        grace = self.cfg.tasks.kill_grace_s
        self.start_failures.pop(wid, None)
        self.worker_note(
            wid,
            f"shut down ({cause}"
            + (f"; task {task.id} stopped: {task.stopping}" if task is not None and running else "")
            + ("; restarted under the same id)" if restart_same else "; replaced)"),
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

    def retire_unanswering(self, wid: str, reason: str, cause: Cause) -> None:
        """An unresponsive worker's task must stop (timeout, cancel, drain): the agent cannot
        act on a Kill, so the daemon kills it and the task's tree by pid and replaces it."""
        task_id = self.state.data.workers[wid].task_id
        self.emit(
            "worker_shutdown",
            "error",
            worker_id=wid,
            task_id=task_id,
            message=f"unresponsive while its task had to stop ({reason}); killed with the "
            "task's tree",
        )
        self.retire_worker(wid, task_reason=reason, restart_same=False, graceful=False, cause=cause)

    def worker_unanswering(self, wid: str, attempt_id: str) -> bool:
        """The worker runs `attempt_id` but is unresponsive."""
        w = self.state.data.workers.get(wid)
        return w is not None and w.state == WorkerState.UNRESPONSIVE and w.attempt_id == attempt_id

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
