"""The engine's loop, the one writer of state: a batch of inputs in, one step decided by
the pure machine, its records appended as one batch; the group commit (commit.py) makes
them durable and then releases the effects and replies that waited on them, while the
loop goes on; derived files (derived.py) never run ahead of the log.

When the log refuses a step (a full disk, EFBIG), the step is taken back whole and the
engine is read-only: it says so (an event, the journal, `orchctl status`), keeps
answering queries, refuses changes with an error that says nothing was changed, holds
agents' messages in order, and tries again every WRITE_RETRY_S until the log takes writes.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from supervisor import failpoints
from supervisor.core import quiesce
from supervisor.core import shutdown as drain
from supervisor.core.config import Config
from supervisor.core.effects import Published
from supervisor.core.errors import StoreWriteError
from supervisor.core.inputs import AgentMessage, HealthReport, Input
from supervisor.core.machine import Machine
from supervisor.core.model import Event, State, Transition, WorkerState
from supervisor.core.views import status_line, status_view
from supervisor.engine.call import Call, ReadOnly
from supervisor.engine.commit import GroupCommit
from supervisor.engine.derived import DerivedFiles
from supervisor.engine.effects import Effects
from supervisor.engine.ports import Agents, Durable
from supervisor.engine.recovery import recover
from supervisor.store import archive

log = structlog.get_logger("orchd.engine")

# After a failed append (a full disk), how long before the engine tries to write again.
WRITE_RETRY_S = 1.0
# A step that holds the loop longer than this is logged (`slow_step`), with what it did.
SLOW_STEP_S = 0.25
# How many of the latest records the engine keeps for followers that start late
# (`ws_follow` after a submission): a few steps' worth, never the history.
RECENT_RECORDS = 4096


Inbox = MemoryObjectReceiveStream[Input | Call]


def _nothing(_: Machine) -> None:
    """A call that only makes the loop step (`Engine.wake`)."""


class Engine:
    """Owns the machine; runs steps until stopped (see the module docstring)."""

    def __init__(
        self,
        cfg: Config,
        store: Durable,
        state: State,
        pool: Agents,
        inbox: Inbox,
        inbox_send: MemoryObjectSendStream[Any],
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = failpoints.wall,
        rand: Callable[[], float] = random.random,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.store, self.pool = store, pool
        # systemd's notify protocol, for recovery's EXTEND_TIMEOUT_USEC (None: not used).
        self.notify = notify
        self.inbox, self.inbox_send = inbox, inbox_send
        self.clock, self.wall = clock, wall
        # Health reports received before this (clock) are taken as stalled: see `_step`.
        self._trust_health_from = 0.0
        self.m = Machine(cfg, state, store, rand=rand, now=clock(), wall=wall())
        self.fx = Effects(self.m, store, pool, inbox_send)
        self.stopped = anyio.Event()
        self.commit = GroupCommit(store, self.fx.run, clock)
        self._deferred: list[Input] = []
        self._read_only_since = 0.0
        self._retry_at = 0.0
        now = self.m.now
        self.last_step = now
        self.steps = 0  # how many times the loop turned (a figure for tests and metrics)
        self.derived = DerivedFiles(self.m, store, self.fx, clock, self.commit.settle, self.wake)
        self._recent: deque[Transition] = deque(maxlen=RECENT_RECORDS)

    @property
    def state(self) -> State:
        return self.m.state

    @property
    def read_only(self) -> str | None:
        """Why the log refuses writes, while it does (the machine holds it, for display)."""
        return self.m.read_only

    @property
    def cfg(self) -> Config:
        """The settings in force (a reload changes them inside a step)."""
        return self.m.cfg

    # -- the loop ------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with anyio.create_task_group() as tg:
            self.fx.tg = tg
            await tg.start(self.commit.run)
            # Files of workstreams retired by a daemon that died before deleting them.
            await anyio.to_thread.run_sync(
                archive.drop_leftovers, self.store.state_dir, set(self.state.data.workstreams)
            )
            await recover(self.m, self.transact, self.pool, self.notify)
            task_status.started()
            while not self.stopped.is_set():
                await self._step()
            await self.commit.settle()
            tg.cancel_scope.cancel()

    def _wake_at(self) -> float:
        now = self.clock()
        due = [self.derived.next_due(writable=self.read_only is None), now + 1.0]
        if self.read_only is not None and now < self._retry_at:
            # Waiting to try the log again: timers would only make steps it refuses.
            due.append(self._retry_at)
        elif (timer := self.m.rt.next_due()) is not None:
            due.append(timer)
        return min(due)

    async def _step(self) -> None:
        if (stall := failpoints.arg("loop_stall_file")) is not None:
            while os.path.exists(stall):  # a stuck engine (a test hook)
                await anyio.sleep(0.02)
        self.last_step = self.clock()
        self.steps += 1
        wait = max(0.0, self._wake_at() - self.last_step)
        batch: list[Input | Call] = []
        with anyio.move_on_after(wait):
            batch.append(await self.inbox.receive())
        while len(batch) < 1024:
            try:
                batch.append(self.inbox.receive_nowait())
            except anyio.WouldBlock:
                break
        now = self.clock()
        waiting = self.read_only is not None and now < self._retry_at
        inputs: list[Input] = []
        calls: list[Call] = []
        for item in batch:
            if isinstance(item, Call):
                calls.append(item)
                continue
            if isinstance(item, AgentMessage):
                self.m.rt.beat(item.worker_id, now)  # a sign of life, whatever happens next
            if isinstance(item, HealthReport):
                if self.read_only is not None:
                    continue  # a stale round would judge heartbeats held back meanwhile
                if now < self._trust_health_from and not item.stalled:
                    # Probed around a step that held the loop: the agents' pipes were not
                    # read meanwhile, so their heartbeat ages say nothing yet.
                    item = msgspec.structs.replace(item, stalled=True)
            inputs.append(item)
        if waiting:
            self._deferred += inputs
            inputs = []
        else:
            inputs, self._deferred = self._deferred + inputs, []
        self._decide(now, inputs, calls, settle=not waiting)
        took = self.clock() - now
        h = self.cfg.health
        if took > h.unresponsive_after_s / 2:
            # Until the readers have caught up with what queued meanwhile.
            settle_s = max(2 * h.heartbeat_interval_s, h.health_check_interval_s)
            self._trust_health_from = self.clock() + settle_s
        if took > SLOW_STEP_S:
            log.warning(
                "slow_step",
                seconds=round(took, 3),
                inputs=len(inputs),
                calls=[getattr(c.fn, "__name__", "?") for c in calls],
            )
        await self.derived.write(writable=self.read_only is None)

    def wake(self) -> None:
        """Make the loop step soon (a background write is done: the next may be due)."""
        with contextlib.suppress(
            anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError
        ):
            self.inbox_send.send_nowait(Call(_nothing))

    def _decide(self, now: float, inputs: list[Input], calls: list[Call], *, settle: bool) -> None:
        m = self.m
        m.begin(now, self.wall())
        for inp in inputs:
            m.handle(inp)
        for call in calls:
            self._run_call(call)
        if settle:
            m.settle()
        step = m.decided()
        if step.records:
            try:
                self.store.write_batch(step.records)
            except StoreWriteError as exc:
                m.abort()
                log.error("store_write_failed", records=len(step.records), error=str(exc))
                self._enter_read_only(str(exc))
                self._deferred = inputs + self._deferred
                self._answer_read_only(calls)
                return
        m.keep()
        if self.read_only is not None and step.records:
            self._leave_read_only()
        self._recent.extend(step.records)
        effects = step.effects
        if step.records and self.fx.record_followers:
            effects = [*effects, Published(step.records)]
        waiting = []
        for call in calls:
            if call.query:
                call.finish()  # a query: nothing of its own to make durable
            else:
                waiting.append(call)
        self.commit.submit(effects, waiting, urgent=step.urgent)

    def _run_call(self, call: Call) -> None:
        before = len(self.m.txn.records)
        try:
            call.result = self.m.run(call.fn, *call.args)
        except Exception as exc:  # refused, or a bug: it travels back to the caller
            call.error = exc
        if call.query and len(self.m.txn.records) != before:
            call.query = False  # it recorded something after all: answered once durable

    def _answer_read_only(self, calls: list[Call]) -> None:
        """After a refused append: queries are answered from the state as the log has it;
        a request that would change something is told that nothing was changed."""
        m = self.m
        assert self.read_only is not None
        for call in calls:
            m.begin(self.m.now, self.m.wall)
            call.error = None
            self._run_call(call)
            if m.decided().records:
                m.abort()
                call.error = ReadOnly(self.read_only)
            else:
                m.keep()
            call.finish()

    def _enter_read_only(self, why: str) -> None:
        now = self.clock()
        if self.read_only is None or now >= self._retry_at:
            # A refused request while waiting does not push the next try further away.
            self._retry_at = now + WRITE_RETRY_S
        if self.read_only is None:
            self.m.read_only, self._read_only_since = why, self.clock()
            # Published at once: it is about the log itself, so no record can cover it.
            self.fx.publish(
                Event(
                    event="store_read_only",
                    severity="critical",
                    ts=self.wall(),
                    message=f"{why} — no change is accepted until the log takes writes; "
                    f"retrying every {WRITE_RETRY_S:g}s",
                )
            )

    def _leave_read_only(self) -> None:
        down = self.clock() - self._read_only_since
        self.m.read_only = None
        self.fx.publish(
            Event(
                event="store_writable",
                severity="info",
                ts=self.wall(),
                message=f"the log takes writes again after {down:.1f}s read-only",
                data={"read_only_s": round(down, 3)},
            )
        )

    # -- group commit, then effects ------------------------------------------------------

    async def call(self, fn: Callable[..., Any], *args: Any, query: bool = False) -> Any:
        """Run `fn(machine, *args)` inside a step; its result once durable (a `query`: at
        the end of the step, see Call)."""
        c = Call(fn, *args, query=query)
        await self.inbox_send.send(c)
        return await c.wait()

    async def transact(self, fn: Callable[[Machine], None]) -> None:
        """Run `fn` as a step of its own and make it durable now (start-up, shutdown).
        Raises StoreWriteError when the log refuses it (the step is taken back)."""
        m = self.m
        m.begin(self.clock(), self.wall())
        try:
            fn(m)
            step = m.decided()
            if step.records:
                self.store.write_batch(step.records)
        except BaseException:
            m.abort()
            raise
        m.keep()
        self._recent.extend(step.records)
        self.commit.submit(step.effects, [], urgent=True)
        await self.commit.settle()

    async def drain(self) -> None:
        """Clean stop: no new dispatch, running trees killed and recorded as interrupted,
        workers recorded as shut down (the pool stops their processes on exit)."""
        grace = self.cfg.shutdown_grace_s
        await self._call_until(drain.begin, False, within=grace)
        if not await self._settled(grace):
            # An agent did not answer in time: kill those trees from here.
            await self._call_until(drain.begin, True, within=grace)
            await self._settled(self.cfg.tasks.kill_grace_s + 5.0)
        await self.fx.flush_notes()
        await self._call_until(drain.end, within=grace)
        # The workers' shutdown is on record: an agent that does not stop may be killed.
        self.pool.shutdown_recorded()
        self.stopped.set()

    async def _call_until(self, fn: Callable[..., Any], *args: Any, within: float) -> None:
        """`call`, tried again while the log refuses writes, for at most `within` seconds."""
        with anyio.move_on_after(within):
            while True:
                try:
                    await self.call(fn, *args)
                    return
                except ReadOnly:
                    await anyio.sleep(WRITE_RETRY_S)
        log.error("drain_not_recorded", step=getattr(fn, "__name__", "?"))

    async def _settled(self, limit: float) -> bool:
        with anyio.move_on_after(limit):
            while any(True for _ in self.m.running_tasks()):
                await anyio.sleep(0.02)
            return True
        return False

    # -- what the rest of the daemon may ask of the engine -------------------------------

    async def send(self, inp: Input) -> None:
        """Hand the engine an input (a health report, …)."""
        await self.inbox_send.send(inp)

    def follow_events(self) -> MemoryObjectReceiveStream[Event]:
        """A stream of every event from now on; closed by the engine if it falls behind."""
        return self.fx.followers.add()

    def recent_records(self, after: int, upto: int) -> list[Transition] | None:
        """The records with after < seq <= upto, or None when the oldest of them is no
        longer held. Only records up to a seq known durable may be asked for."""
        recent = self._recent
        if after >= upto:
            return []
        if not recent or recent[0].seq > after + 1:
            return None
        return [r for r in recent if after < r.seq <= upto]

    def follow_records(self) -> MemoryObjectReceiveStream[list[Transition]]:
        """Every step's records from now on, once durable; closed if it falls behind."""
        return self.fx.record_followers.add()

    def record_intervention(self, entry: dict[str, Any]) -> None:
        """Append an operator's action to interventions.log (an OSError is the caller's);
        a rotated file removed to make room (only with `rotation.interventions_keep` set)
        is said in an event and the journal: the audit trail never loses one silently."""
        for path in self.store.append_intervention(entry):
            self.fx.publish(
                Event(
                    event="interventions_removed",
                    severity="warning",
                    ts=self.wall(),
                    message=f"{path.name} removed: older than the "
                    "rotation.interventions_keep rotated files kept",
                    data={"path": str(path)},
                )
            )

    def probe_targets(self) -> list[tuple[str, int, int | None]]:
        """(worker, pid, start ticks) of every worker whose agent health probes watch (a
        remote agent is not a process here: its heartbeats speak for it)."""
        watched = (WorkerState.IDLE, WorkerState.BUSY, WorkerState.UNRESPONSIVE)
        return [
            (w.id, w.pid, w.pid_start_ticks)
            for w in self.state.data.workers.values()
            if w.state in watched and w.pid and not w.host
        ]

    def status_line(self) -> str:
        """The one line systemd shows (`systemctl status`)."""
        line = f"{status_line(status_view(self.state))}; containment {self.m.containment.mode}"
        return f"READ-ONLY (the log refuses writes); {line}" if self.read_only else line

    def drain_state(self) -> tuple[bool, int]:
        """(an operator drained the daemon, tasks running): cheap, for noticing a change."""
        return self.state.data.draining(), quiesce.running_count(self.m)

    def healthy(self, limit: float) -> bool:
        """The loop stepped within `limit` seconds (for the systemd watchdog)."""
        return self.clock() - self.last_step < limit
