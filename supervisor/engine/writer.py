"""The one writer of state and its messages: commit, effects, events, group commit.

Every change goes through `commit`: the record is checked against the state core, written
to the log, applied in memory. Effects (messages to agents, kills, spawns, replies) are
queued and only carried out after the group commit's fdatasync covered their records —
the write-ahead rule. Worker lifecycle (workers.py) and task lifecycle (engine.py) build
on it; scheduler.py runs the loop.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from supervisor import failpoints
from supervisor.core.config import Config
from supervisor.core.model import (
    Cause,
    Entity,
    Event,
    Severity,
    State,
    Task,
    Transition,
)
from supervisor.core.queue import DispatchQueue, Timers
from supervisor.store.directory import Store
from supervisor.workers import wire
from supervisor.workers.pool import Pool

if TYPE_CHECKING:
    from supervisor.workers.health import Health

log = structlog.get_logger("orchd.scheduler")

# Longest a durable-only record (no effect waits on it) stays unsynced.
SYNC_LAG_S = 0.05
# An fdatasync faster than this runs on the loop; a slower disk gets a worker thread so the
# loop keeps serving while it waits.
INLINE_SYNC_S = 0.002

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


class Writer:
    """Owns the State: the only code that changes it."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        state: State,
        pool: Pool,
        inbox: Inbox,
        inbox_send: MemoryObjectSendStream[Any],
        *,
        clock: Callable[[], float] = failpoints.wall,
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
        self.deferred: list[Any] = []
        self._retry_writes_at = 0.0
        self._next_notes = 0.0
        self._sync_s = 0.0  # how long the last fdatasync took
        # `lazy` commits need no sync of their own; `urgent` says one is owed.
        self.lazy = False
        self.urgent = False
        self._last_sync = self.now
        self.last_step = self.now
        self._next_checkpoint = self._next_metrics = 0.0
        self._next_snapshot = self.now + cfg.store.snapshot_interval_s
        self._snapshot_seq = state.last_seq
        self._last_metrics: tuple[float, int] = (self.now, 0)
        self._next_worker = 1
        self.health: Health | None = None  # set by the daemon

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
        obj = self.state.check_entity(rec)
        self.store.write(rec)  # write-ahead: logged before it is applied or acted on
        self.state.apply_checked(rec, obj)
        if not self.lazy:
            self.urgent = True
        self.counters["transitions"] = self.counters.get("transitions", 0) + 1
        if entity == "task":
            self._after_task(self.state.data.tasks[id_], frm or "")
        return rec

    def effect(self, fn: Callable[[], Awaitable[object]]) -> None:
        """Run `fn` once the records committed so far are durable."""
        self.effects.append(fn)

    def background(self, fn: Callable[[], Coroutine[Any, Any, object]]) -> None:
        """Run `fn` as its own task once durable (for slow effects: kills, spawns)."""

        async def guarded() -> None:
            # A side effect that fails (a kill, a spawn, a derived file) is logged; it must
            # never take the daemon down with it.
            try:
                await fn()
            except Exception:
                log.exception("background_effect_failed", effect=getattr(fn, "__qualname__", "?"))

        async def start() -> None:
            assert self._tg is not None
            self._tg.start_soon(guarded)

        self.effects.append(start)

    def emit(self, event: str, severity: Severity, **fields: Any) -> None:
        ev = Event(event=event, severity=severity, ts=self.now, **fields)
        try:
            self.store.append_event(ev)
        except OSError as exc:  # a full disk must not stop the engine; the log line remains
            log.error("event_not_written", event=event, error=str(exc))
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

    def sync_due(self) -> float | None:
        """When written-but-unsynced records must be synced even with nobody waiting."""
        if self.store.written_seq > self.store.synced_seq:
            return self._last_sync + SYNC_LAG_S
        return None

    async def flush(self, *, force: bool = False) -> None:
        """Group commit, then the effects and replies that waited on it.

        The sync is what makes effects and replies safe (the write-ahead rule), so it runs
        whenever one waits, and after every record but those committed as `lazy` (a pid
        learnt from Started, which nothing visible depends on and which recovery can do
        without): those ride along with the next sync, at most SYNC_LAG_S later."""
        if self.store.written_seq > self.store.synced_seq:
            due = self.sync_due()
            if (
                force
                or self.urgent
                or self.effects
                or self.calls
                or (due is not None and self.clock() >= due)
            ):
                started = self.clock()
                if self._sync_s < INLINE_SYNC_S:
                    # A fast disk: waking a thread costs more than the fdatasync itself.
                    self.store.sync()
                else:
                    await anyio.to_thread.run_sync(self.store.sync)
                self._last_sync = self.clock()
                self._sync_s = self._last_sync - started
                self.urgent = False
        effects, self.effects = self.effects, []
        for fn in effects:
            try:
                await fn()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                log.warning("effect_failed", error=str(exc))
            except Exception:
                log.exception("effect_failed")
        calls, self.calls = self.calls, []
        for call in calls:
            call.finish()

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` inside the scheduler and return its result once durable."""
        c = Call(fn, *args)
        await self.inbox_send.send(c)
        return await c.wait()

    def healthy(self, limit: float) -> bool:
        """The loop stepped within `limit` seconds (for the systemd watchdog)."""
        return self.clock() - self.last_step < limit

    # Implemented by engine.TaskEngine; declared here so the worker side can call them.
    def stop_task(self, task: Task, reason: str, *, direct: bool = False) -> None:
        """Begin killing a running attempt."""
        raise NotImplementedError

    def _after_task(self, task: Task, frm: str) -> None:
        """Bookkeeping after a task's transition."""
        raise NotImplementedError

    def _on_finished(self, wid: str, msg: wire.Finished) -> None:
        """An attempt is over: decide the task's outcome."""
        raise NotImplementedError
