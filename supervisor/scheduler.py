"""The one writer of state: messages in, transitions committed, effects out.

Every change goes through `commit`: the record is checked against the state core, written
to the log, applied in memory. Effects (messages to agents, kills, spawns, replies) are
queued and only carried out after the group commit's fdatasync covered their records —
the write-ahead rule. The engine's decisions on tasks live here; operator actions are in
operator.py, health verdicts in health.py.
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from supervisor import wire
from supervisor.config import Config
from supervisor.errors import StoreWriteError
from supervisor.model import (
    Cause,
    Entity,
    Event,
    FailureKind,
    Severity,
    State,
    Task,
    TaskState,
    Transition,
    WorkerState,
)
from supervisor.policy import after_failure, workstream_verdict
from supervisor.pool import AgentExited, AgentMessage, Pool
from supervisor.queue import DispatchQueue, Timers
from supervisor.store import Store
from supervisor.views import metrics_view, resource_views, task_view

log = structlog.get_logger("orchd.scheduler")

# Why a running attempt is being stopped, and what becomes of the task afterwards.
STOP_TIMEOUT = "timeout"
STOP_CANCEL = "cancel"
STOP_SHUTDOWN = "shutdown"  # the daemon stops: interrupted, no retry spent
STOP_REASSIGN = "reassign"  # worker lost/restarted: back to queued, no retry spent
STOP_WORKER_LOST = "worker_lost"  # forced shutdown without reassign: a retry is spent


class TreeKilled:
    """Sent to the scheduler when the daemon itself killed an attempt's tree."""

    __slots__ = ("attempt_id", "worker_id")

    def __init__(self, worker_id: str, attempt_id: str) -> None:
        self.worker_id, self.attempt_id = worker_id, attempt_id


class SpawnFailed:
    """Sent when an agent process could not even be started."""

    __slots__ = ("message", "worker_id")

    def __init__(self, worker_id: str, message: str) -> None:
        self.worker_id, self.message = worker_id, message


class Call:
    """A request to the scheduler from another task, answered after its records are durable."""

    __slots__ = ("_done", "args", "error", "fn", "result")

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn, self.args = fn, args
        self.result: Any = None
        self.error: BaseException | None = None
        self._done = anyio.Event()

    def finish(self) -> None:
        self._done.set()

    async def wait(self) -> Any:
        await self._done.wait()
        if self.error is not None:
            raise self.error
        return self.result


Inbox = MemoryObjectReceiveStream[Any]


class Scheduler:
    """Owns the State; runs workstreams on the pool's workers."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        state: State,
        pool: Pool,
        inbox: Inbox,
        inbox_send: MemoryObjectSendStream[Any],
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.cfg, self.store, self.state, self.pool = cfg, store, state, pool
        self.inbox, self.inbox_send = inbox, inbox_send
        self.clock, self.rand = clock, rand
        self.now = clock()
        self.queue = DispatchQueue()
        self.timers = Timers()
        self.idle: dict[str, None] = {}
        self.gen: dict[str, int] = {}
        self.heartbeat: dict[str, float] = {}
        self.start_failures: dict[str, int] = {}
        self.parked_on: dict[str, str] = {}
        self.res_alerted: set[str] = set()
        self.blocked_ws: set[str] = set()
        self.dirty_ws: set[str] = set()
        self.effects: list[Callable[[], Awaitable[object]]] = []
        self.calls: list[Call] = []
        self.event_listeners: list[MemoryObjectSendStream[Event]] = []
        self.draining = False
        self.stopped = anyio.Event()
        self.counters: dict[str, int] = {}
        self.queue_waits: list[float] = []
        self.started_at = self.now
        self._tg: TaskGroup | None = None
        self.last_step = self.now
        self._next_checkpoint = self._next_metrics = 0.0
        self._next_snapshot = self.now + cfg.store.snapshot_interval_s
        self._snapshot_seq = state.last_seq
        self._last_metrics: tuple[float, int] = (self.now, 0)
        self._next_worker = 1
        self.health: Any = None  # set by the daemon: health.Health

    # --- commit and effects ------------------------------------------------------------

    def commit(self, entity: Entity, id_: str, to: str, cause: Cause, **changes: Any) -> Transition:
        """Check, log and apply one transition; follow-up bookkeeping for tasks."""
        frm = self.state.current(entity, id_)
        rec = Transition(
            seq=self.state.last_seq + 1,
            ts=self.now,
            entity=entity,
            id=id_,
            from_=frm,
            to=to,
            cause=cause,
            changes=changes,
        )
        self.state.check(rec)
        self.store.write(rec)
        self.state.apply(rec)
        self.counters["transitions"] = self.counters.get("transitions", 0) + 1
        if entity == "task":
            self._after_task(self.state.data.tasks[id_], frm or "")
        return rec

    def effect(self, fn: Callable[[], Awaitable[object]]) -> None:
        """Run `fn` once the records committed so far are durable."""
        self.effects.append(fn)

    def background(self, fn: Callable[[], Coroutine[Any, Any, object]]) -> None:
        """Run `fn` as its own task once durable (for slow effects: kills, spawns)."""

        async def start() -> None:
            assert self._tg is not None
            self._tg.start_soon(fn)

        self.effects.append(start)

    def emit(self, event: str, severity: Severity, **fields: Any) -> None:
        ev = Event(event=event, severity=severity, ts=self.now, **fields)
        self.store.append_event(ev)
        self.counters[f"event.{event}"] = self.counters.get(f"event.{event}", 0) + 1
        level = {"critical": "critical", "error": "error", "warning": "warning"}.get(
            severity, "info"
        )
        kv = {k: v for k, v in fields.items() if v is not None}
        getattr(log, level)(event, severity=severity, **kv)
        for listener in list(self.event_listeners):
            try:
                listener.send_nowait(ev)
            except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                self.event_listeners.remove(listener)

    async def flush(self) -> None:
        """Group commit, then the effects and replies that waited on it."""
        if self.store.written_seq > self.store.synced_seq:
            await anyio.to_thread.run_sync(self.store.sync)
        effects, self.effects = self.effects, []
        for fn in effects:
            try:
                await fn()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                log.warning("effect_failed", error=str(exc))
        calls, self.calls = self.calls, []
        for call in calls:
            call.finish()

    # --- the loop ----------------------------------------------------------------------

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
        due = min(x for x in (self.timers.next_due(), self._next_periodic()) if x is not None)
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
        for msg in batch:
            try:
                self._handle(msg)
            except StoreWriteError as exc:
                log.error("store_write_failed", error=str(exc))
                if isinstance(msg, Call):
                    msg.error = exc
                    self.calls.append(msg)
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
        return min(due, self._next_checkpoint) if self.dirty_ws else due

    async def _periodic(self) -> None:
        """Derived files, written right after a flush so they never run ahead of the log."""
        now = self.clock()
        st = self.cfg.store
        if self.dirty_ws and now >= self._next_checkpoint:
            dirty, self.dirty_ws = self.dirty_ws, set()
            await anyio.to_thread.run_sync(self._write_checkpoints, dirty)
            self._next_checkpoint = now + st.checkpoint_interval_s
        if now >= self._next_snapshot:
            if self.state.last_seq != self._snapshot_seq:
                await anyio.to_thread.run_sync(self.store.write_snapshot, self.state)
                self._snapshot_seq = self.state.last_seq
            self._next_snapshot = now + st.snapshot_interval_s
        if now >= self._next_metrics:
            metrics = self.metrics(now)
            await anyio.to_thread.run_sync(self.store.write_json, "metrics.json", metrics)
            self._next_metrics = now + st.metrics_interval_s

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

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` inside the scheduler and return its result once durable."""
        c = Call(fn, *args)
        await self.inbox_send.send(c)
        return await c.wait()

    # --- workers -----------------------------------------------------------------------

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

    def healthy(self, limit: float) -> bool:
        """The loop stepped within `limit` seconds (for the systemd watchdog)."""
        return self.clock() - self.last_step < limit

    def worker_alive(self, wid: str) -> bool:
        w = self.state.data.workers.get(wid)
        return w is not None and w.state in (WorkerState.IDLE, WorkerState.BUSY)

    # --- tasks -------------------------------------------------------------------------

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
        self.counters["attempts"] = self.counters.get("attempts", 0) + 1
        self.timers.arm("timeout", task.id, self.now + task.timeout_s)
        run = wire.Run(
            attempt_id=attempt_id,
            task_id=task.id,
            number=n,
            command=task.command,
            cwd=task.cwd,
            env=task.env,
            validate=task.validate,
            rlimits=task.rlimits,
            log_path=str(self.store.task_log_path(task.id)),
        )
        self.effect(lambda: self.pool.send(wid, run))

    def stop_task(self, task: Task, reason: str, *, direct: bool = False) -> None:
        """Begin killing a running attempt; its outcome is decided when the tree is gone."""
        attempt = task.attempts[-1]
        wid = task.worker_id or attempt.worker_id
        if task.stopping != reason:
            self.commit(
                "task",
                task.id,
                "running",
                "timeout"
                if reason == STOP_TIMEOUT
                else "operator"
                if reason in (STOP_CANCEL, STOP_WORKER_LOST)
                else "health"
                if reason == STOP_REASSIGN
                else "shutdown",
                stopping=reason,
            )
        grace = self.cfg.tasks.kill_grace_s
        if not direct and self.worker_alive(wid):
            kill = wire.Kill(attempt_id=attempt.attempt_id, grace_s=grace, reason=reason)
            self.effect(lambda: self.pool.send(wid, kill))
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
        elif reason == STOP_SHUTDOWN:
            upd["failure_kind"] = FailureKind.INTERRUPTED
            self.commit(
                "task",
                task.id,
                "pending",
                "shutdown",
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
        self.commit("task", task.id, str(out.to), cause, attempt_update=upd, **out.changes)
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

    def _release_worker(self, wid: str) -> None:
        worker = self.state.data.workers.get(wid)
        if worker is None:
            return
        if worker.state == WorkerState.BUSY:
            self.commit("worker", wid, "idle", "auto", task_id=None, attempt_id=None)
            self.idle[wid] = None
        elif worker.task_id is not None:
            self.commit("worker", wid, str(worker.state), "auto", task_id=None, attempt_id=None)

    # --- timers ------------------------------------------------------------------------

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
            elif self.health is not None:
                self.health.on_timer(kind, key)

    # --- start and stop ----------------------------------------------------------------

    async def recover(self) -> None:
        """After (re)start: settle what the previous life left running, then start workers."""
        from supervisor.recovery import recover

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
        for wid, worker in list(self.state.data.workers.items()):
            if worker.state != WorkerState.SHUTDOWN:
                self.idle.pop(wid, None)
                self.gen[wid] = self.gen.get(wid, 0) + 1
                self.commit(
                    "worker", wid, "shutdown", "shutdown", pid=None, task_id=None, attempt_id=None
                )
        self.stopped.set()
