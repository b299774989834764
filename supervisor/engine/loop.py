"""The scheduler: the writer's loop. Messages in (agents, control calls, timers), a batch
handled, one group commit, then the effects that waited on it; derived files (checkpoints,
snapshot, metrics) written right after a flush; clean stop and start-up recovery.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import structlog

from supervisor.core.errors import StoreWriteError
from supervisor.core.model import (
    TaskState,
    WorkerState,
)
from supervisor.core.views import metrics_view, resource_views
from supervisor.engine.tasks import TaskEngine
from supervisor.engine.writer import (
    STOP_CANCEL,
    STOP_REASSIGN,
    STOP_SHUTDOWN,
    STOP_TIMEOUT,
    STOP_WORKER_LOST,
    Call,
    SpawnFailed,
    TreeKilled,
)
from supervisor.workers import wire
from supervisor.workers.pool import AgentExited, AgentMessage

log = structlog.get_logger("orchd.scheduler")

# After a failed write (a full disk), how long before messages are handled again.
WRITE_RETRY_S = 1.0
# How often the lines for workers' own logs are written out.
NOTES_FLUSH_S = 0.25

__all__ = [
    "STOP_CANCEL",
    "STOP_REASSIGN",
    "STOP_SHUTDOWN",
    "STOP_TIMEOUT",
    "STOP_WORKER_LOST",
    "Call",
    "Scheduler",
    "SpawnFailed",
    "TreeKilled",
]


class Scheduler(TaskEngine):
    """Owns the State; runs workstreams on the pool's workers."""

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self.now = self.clock()
            await self.recover()
            await self.flush()
            task_status.started()
            while not self.stopped.is_set():
                await self._step()
            tg.cancel_scope.cancel()

    async def _step(self) -> None:
        due = min(
            x
            for x in (
                self.timers.next_due(),
                self._next_periodic(),
                self.sync_due(),
                self._retry_writes_at if self.deferred else None,
            )
            if x is not None
        )
        self.last_step = self.clock()
        wait = min(1.0, max(0.0, due - self.last_step))
        batch: list[Any] = []
        with anyio.move_on_after(wait):
            batch.append(await self.inbox.receive())
        while len(batch) < 1024:
            try:
                batch.append(self.inbox.receive_nowait())
            except anyio.WouldBlock:
                break
        self.now = self.clock()
        if self.deferred and self.now >= self._retry_writes_at:
            batch, self.deferred = self.deferred + batch, []
        for msg in batch:
            if self.deferred and not isinstance(msg, Call):
                self.deferred.append(msg)  # keep their order behind the one that failed
                continue
            try:
                self._handle(msg)
            except StoreWriteError as exc:
                log.error("store_write_failed", error=str(exc))
                if isinstance(msg, Call):
                    msg.error = exc
                    self.calls.append(msg)
                else:
                    # What an agent told us must not be lost: handled again once the
                    # log takes writes (a full disk freed), in arrival order.
                    self.deferred.append(msg)
                    self._retry_writes_at = self.now + WRITE_RETRY_S
        try:
            self._on_timers()
            self._promote()
            self._dispatch()
        except StoreWriteError as exc:
            log.error("store_write_failed", error=str(exc))
        await self.flush()
        await self._periodic()

    def _next_periodic(self) -> float:
        due = min(self._next_snapshot, self._next_metrics)
        if self._notes:
            due = min(due, self._next_notes)
        return min(due, self._next_checkpoint) if self.dirty_ws else due

    async def _periodic(self) -> None:
        """Derived files, written right after a flush so they never run ahead of the log."""
        now = self.clock()
        if now >= min(self._next_checkpoint, self._next_snapshot, self._next_metrics):
            await self.flush(force=True)
        st = self.cfg.store
        if self._notes and now >= self._next_notes:
            self.write_notes()
            self._next_notes = now + NOTES_FLUSH_S
        # Derived files can be regenerated from the log: a failed write (a full disk) is
        # reported and tried again at the next interval, never fatal.
        if self.dirty_ws and now >= self._next_checkpoint:
            dirty, self.dirty_ws = self.dirty_ws, set()
            self._next_checkpoint = now + st.checkpoint_interval_s
            if not await self._derived("checkpoints", self._write_checkpoints, dirty):
                self.dirty_ws |= dirty
        if now >= self._next_snapshot:
            self._next_snapshot = now + st.snapshot_interval_s
            seq = self.state.last_seq
            if seq != self._snapshot_seq and await self._derived(
                "current.json", self.store.write_snapshot, self.state
            ):
                self._snapshot_seq = seq
        if now >= self._next_metrics:
            self._next_metrics = now + st.metrics_interval_s
            await self._derived(
                "metrics.json", self.store.write_json, "metrics.json", self.metrics(now)
            )

    async def _derived(self, what: str, fn: Callable[..., object], *args: Any) -> bool:
        try:
            await anyio.to_thread.run_sync(fn, *args)
        except OSError as exc:
            log.error("derived_write_failed", file=what, error=str(exc))
            return False
        return True

    def _write_checkpoints(self, ws_ids: set[str]) -> None:
        for ws_id in ws_ids:
            self.store.write_checkpoint(ws_id, self.state)

    def metrics(self, now: float) -> dict[str, Any]:
        then, seq = self._last_metrics
        rate = (self.state.last_seq - seq) / (now - then) if now > then else 0.0
        self._last_metrics = (now, self.state.last_seq)
        out = metrics_view(
            self.state, self.counters, self.queue_waits, now=now, transitions_per_s=rate
        )
        out["resources"] = resource_views(
            self.state, {r: self.queue.waiting_on(r) for r in self.queue.parked_resources()}
        )
        out["workers_detail"] = [
            {
                "id": w.id,
                "state": str(w.state),
                "last_heartbeat_age_s": round(now - self.heartbeat[w.id], 3)
                if w.id in self.heartbeat
                else None,
            }
            | (self.health.report(w.id) if self.health else {})
            for w in self.state.data.workers.values()
            if w.state != "shutdown"
        ]
        return out

    def _handle(self, msg: Any) -> None:
        if isinstance(msg, AgentMessage):
            self._on_agent(msg)
        elif isinstance(msg, AgentExited):
            self._on_agent_exit(msg.worker_id, msg.generation, msg.returncode)
        elif isinstance(msg, TreeKilled):
            self._on_finished(
                msg.worker_id,
                wire.Finished(attempt_id=msg.attempt_id, phase="command", killed=True),
            )
        elif isinstance(msg, SpawnFailed):
            self.emit("worker_spawn_failed", "error", worker_id=msg.worker_id, message=msg.message)
            self._on_agent_exit(msg.worker_id, self.gen.get(msg.worker_id, 0), None)
        elif isinstance(msg, Call):
            self.calls.append(msg)
            try:
                msg.result = msg.fn(*msg.args)
            except StoreWriteError:
                raise
            except Exception as exc:  # an operator error: it travels back to the caller
                msg.error = exc
        else:
            log.error("unknown_message", kind=type(msg).__name__)

    async def recover(self) -> None:
        """After (re)start: settle what the previous life left running, then start workers."""
        from supervisor.engine.recovery import recover

        await recover(self)

    async def drain(self) -> None:
        """Clean stop: no new dispatch, running trees killed and recorded as interrupted."""
        await self.call(self._begin_drain, False)
        if not await self._settled(self.cfg.shutdown_grace_s):
            # An agent did not answer in time: kill those trees from here.
            await self.call(self._begin_drain, True)
            await self._settled(self.cfg.tasks.kill_grace_s + 5.0)
        await self.call(self._end_drain)

    async def _settled(self, limit: float) -> bool:
        with anyio.move_on_after(limit):
            while any(t.state == TaskState.RUNNING for t in self.state.data.tasks.values()):
                await anyio.sleep(0.02)
            return True
        return False

    def _begin_drain(self, direct: bool) -> None:
        self.draining = True
        for task in list(self.state.data.tasks.values()):
            if task.state == TaskState.RUNNING:
                self.stop_task(task, STOP_SHUTDOWN, direct=direct)

    def _end_drain(self) -> None:
        """Workers are recorded as shut down; the pool stops their processes on exit."""
        self.write_notes()
        for wid, worker in list(self.state.data.workers.items()):
            if worker.state != WorkerState.SHUTDOWN:
                self.idle.pop(wid, None)
                self.gen[wid] = self.gen.get(wid, 0) + 1
                self.commit(
                    "worker", wid, "shutdown", "shutdown", pid=None, task_id=None, attempt_id=None
                )
        self.stopped.set()
