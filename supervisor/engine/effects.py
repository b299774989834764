"""Carries out the effects of a step once its records are durable: messages to agents,
kills, spawns and retirements (slow ones as tasks of their own, reporting back through
the inbox), events (events.jsonl, the journal, followers) and derived files.

A failing effect is logged and never takes the daemon down; what it should have achieved
is re-derived from the state (a lost Send shows as a silent worker, a failed spawn comes
back as SpawnFailed).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

import anyio
import structlog
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from supervisor import failpoints
from supervisor.core import lifecycle
from supervisor.core.effects import (
    Archive,
    CheckSurvivors,
    DropFiles,
    Effect,
    Emit,
    KillStarting,
    KillTree,
    Note,
    Published,
    Renew,
    Retire,
    Send,
    Spawn,
    WriteArchive,
)
from supervisor.core.inputs import (
    Archived,
    Replace,
    Retired,
    Spawned,
    SpawnFailed,
    SurvivorsChecked,
    TreeKilled,
)
from supervisor.core.machine import Machine
from supervisor.core.model import Event, Transition, WorkerState
from supervisor.engine.ports import Agents, Durable
from supervisor.store import archive

log = structlog.get_logger("orchd.engine")

# How many events a follower may fall behind before it is told so and closed.
FOLLOWER_BACKLOG = 1000
_LEVELS = {"critical": "critical", "error": "error", "warning": "warning"}


T = TypeVar("T")


class Followers(Generic[T]):
    """The streams of `events -f` clients (or of `ws_follow`'s, of records); one that
    falls behind is closed, not dropped silently: the server then tells its client and
    ends the stream."""

    def __init__(self) -> None:
        self._streams: list[MemoryObjectSendStream[T]] = []

    def __bool__(self) -> bool:
        return bool(self._streams)

    def add(self) -> MemoryObjectReceiveStream[T]:
        send, recv = anyio.create_memory_object_stream[T](FOLLOWER_BACKLOG)
        self._streams.append(send)
        return recv

    def publish(self, ev: T) -> None:
        for stream in list(self._streams):
            try:
                stream.send_nowait(ev)
            except anyio.WouldBlock:
                log.warning("event_follower_behind", backlog=FOLLOWER_BACKLOG)
                stream.close()
                self._streams.remove(stream)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                stream.close()  # its follower has gone
                self._streams.remove(stream)


class Effects:
    """The engine's hands (see the module docstring)."""

    def __init__(
        self,
        m: Machine,
        store: Durable,
        pool: Agents,
        inbox: MemoryObjectSendStream[Any],
    ) -> None:
        self.m, self.store, self.pool, self.inbox = m, store, pool, inbox
        self.followers: Followers[Event] = Followers()
        # Each item is one step's records (a follower that falls behind is closed).
        self.record_followers: Followers[list[Transition]] = Followers()
        self.tg: TaskGroup | None = None
        self._notes: dict[str, list[tuple[float, str]]] = {}
        self._flushing = False  # the workers' log lines are being written in a thread

    async def run(self, eff: Effect) -> None:
        match eff:
            case Send(worker_id=wid, msg=msg):
                await self.pool.send(wid, msg)
            case Emit(event=ev):
                self.publish(ev)
            case Published(records=records):
                self.record_followers.publish(records)
            case Note(worker_id=wid, ts=ts, text=text):
                self._notes.setdefault(wid, []).append((ts, text))
            case KillTree():
                self._background(lambda: self._kill_tree(eff))
            case Spawn():
                self._background(lambda: self._spawn(eff))
            case Renew(worker_id=wid, on=on):
                self.pool.renew(wid, on)
            case Retire():
                self._background(lambda: self._retire(eff))
            case KillStarting():
                self._background(lambda: self._kill_starting(eff))
            case CheckSurvivors():
                self._background(lambda: self._check_survivors(eff))
            case WriteArchive():
                self._background(lambda: self._write_archive(eff))
            case DropFiles(workstream_id=ws_id):
                failpoints.crash_point("retire_recorded")
                self._background(
                    lambda: anyio.to_thread.run_sync(
                        archive.drop_files, self.store.state_dir, ws_id
                    )
                )
            case Archive(workstream_id=ws_id, payload=payload):
                self._background(
                    lambda: anyio.to_thread.run_sync(
                        self.store.write_json, f"archive/{ws_id}.json", payload
                    )
                )

    def publish(self, ev: Event) -> None:
        """events.jsonl, the journal, the followers (for an event that is due now)."""
        try:
            self.store.append_event(ev)
        except OSError as exc:  # a full disk must not stop the engine; the log line remains
            log.error("event_not_written", event=ev.event, error=str(exc))
        fields: dict[str, Any] = {
            k: v
            for k, v in (
                ("task_id", ev.task_id),
                ("workstream_id", ev.workstream_id),
                ("worker_id", ev.worker_id),
                ("resource_id", ev.resource_id),
                ("tasks", ev.tasks),
                ("message", ev.message),
            )
            if v is not None
        }
        if ev.data:
            fields["data"] = ev.data
        getattr(log, _LEVELS.get(ev.severity, "info"))(ev.event, severity=ev.severity, **fields)
        self.followers.publish(ev)

    def has_notes(self) -> bool:
        return bool(self._notes)

    def write_notes(self) -> None:
        """Hand the pending lines for the workers' own logs to a worker thread (one flush
        at a time: lines that come meanwhile wait for the next)."""
        if self._flushing or not self._notes:
            return
        notes, self._notes = self._notes, {}
        if self.tg is None:
            self._write_notes(notes)
            return
        self._flushing = True
        self.tg.start_soon(self._flush, notes)

    async def flush_notes(self) -> None:
        """Write every pending line now, and wait for it (a clean stop)."""
        while self._flushing:
            await anyio.sleep(0.01)
        notes, self._notes = self._notes, {}
        if notes:
            await anyio.to_thread.run_sync(self._write_notes, notes)

    async def _flush(self, notes: dict[str, list[tuple[float, str]]]) -> None:
        try:
            await anyio.to_thread.run_sync(self._write_notes, notes)
        finally:
            self._flushing = False

    def _write_notes(self, notes: dict[str, list[tuple[float, str]]]) -> None:
        """In a worker thread: each worker's lines appended to its log (rotated by the
        store at its size)."""
        for wid, lines in notes.items():
            try:
                self.store.append_worker_log(wid, lines)
            except OSError as exc:  # a full disk is no reason to stop the engine
                log.warning("worker_log_failed", worker_id=wid, error=str(exc))

    # -- slow effects, each a task of its own ------------------------------------------

    def _background(self, fn: Callable[[], Coroutine[Any, Any, object]]) -> None:
        async def guarded() -> None:
            # A side effect that fails (a kill, a spawn, a derived file) is logged; it must
            # never take the daemon down with it.
            try:
                await fn()
            except Exception:
                log.exception("background_effect_failed")

        assert self.tg is not None
        self.tg.start_soon(guarded)

    async def _kill_tree(self, eff: KillTree) -> None:
        left = await self.pool.kill(eff.worker_id, task_tree=eff.tree, grace_s=eff.grace_s)
        await self.inbox.send(TreeKilled(eff.worker_id, eff.attempt_id, left))

    async def _check_survivors(self, eff: CheckSurvivors) -> None:
        left = await self.pool.kill_survivors(eff.survivors)
        log.info("survivors_checked", task_id=eff.task_id, left=[pid for pid, _ in left])
        await self.inbox.send(SurvivorsChecked(eff.task_id, left))

    async def _spawn(self, eff: Spawn) -> None:
        if eff.delay_s:
            await anyio.sleep(eff.delay_s)
            # Retired (or restarted again) during the delay: that start is not wanted.
            if not lifecycle.spawn_wanted(self.m, eff.worker_id, eff.restarts):
                return
        host = None
        if eff.host:
            host = next((h for h in self.m.cfg.workers.hosts if h.host == eff.host), None)
            if host is None:
                await self.inbox.send(
                    SpawnFailed(eff.worker_id, f"host {eff.host} is no longer in the config")
                )
                return
        try:
            gen = await self.pool.spawn(
                eff.worker_id, host, lease_s=eff.lease_s, kill_grace_s=eff.kill_grace_s
            )
        except OSError as exc:
            await self.inbox.send(SpawnFailed(eff.worker_id, str(exc)))
            return
        pid, ticks = self.pool.identity(eff.worker_id) or (0, None)
        await self.inbox.send(Spawned(eff.worker_id, gen, pid, ticks))

    async def _retire(self, eff: Retire) -> None:
        stopped = False
        if eff.remote:
            self.pool.renew(eff.worker_id, False)  # its leases end here (core/fencing.py)
        if eff.graceful:
            stopped = await self.pool.stop(eff.worker_id, eff.grace_s)
        left = await self.pool.kill(eff.worker_id, task_tree=eff.tree, grace_s=eff.grace_s)
        # A remote attempt's end is known only when its agent, asked to stop, exited by
        # itself (it kills its attempt first); else the lease rule settles it.
        if eff.attempt_id is not None and (stopped or not eff.remote):
            await self.inbox.send(TreeKilled(eff.worker_id, eff.attempt_id, left))
        await self.inbox.send(Retired(eff.worker_id))
        if eff.replace:
            await self.inbox.send(Replace(eff.worker_id, eff.same_id, eff.cause))

    async def _write_archive(self, eff: WriteArchive) -> None:
        """A retiring workstream's archive, in a worker thread; the loop hears how it went."""
        ws_id = eff.workstream_id
        try:
            path = await anyio.to_thread.run_sync(
                archive.write_archive, self.store.state_dir, ws_id, eff.document
            )
        except (OSError, ValueError) as exc:
            log.error("archive_not_written", workstream_id=ws_id, error=str(exc))
            await self.inbox.send(Archived(ws_id, error=str(exc)))
            return
        rel = str(path.relative_to(self.store.state_dir))
        await self.inbox.send(Archived(ws_id, path=rel))

    async def _kill_starting(self, eff: KillStarting) -> None:
        w = self.m.state.data.workers.get(eff.worker_id)
        if w is not None and w.state == WorkerState.STARTING and w.restarts == eff.restarts:
            await self.pool.kill(eff.worker_id, task_tree=None, grace_s=eff.grace_s)
