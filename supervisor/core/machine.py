"""The decision core: inputs in, one step out. Pure: no I/O, no clock reads.

The loop (engine/loop.py) opens a step with the time, hands the machine every input of a
batch (`handle`, or `run` for an operator request), lets it settle (due timers, promotion,
dispatch) and takes the step: the records to append as one batch and the effects to carry
out once they are durable. If the append fails, `abort` takes the whole step back: the
state equals the log again and the runtime is as it was, so every input can be handled
again once the log takes writes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from supervisor.core import wire
from supervisor.core.context import Core
from supervisor.core.dispatch import dispatch, promote
from supervisor.core.effects import Effect
from supervisor.core.health import evaluate
from supervisor.core.inputs import (
    AgentExited,
    AgentMessage,
    Archived,
    HealthReport,
    Input,
    Replace,
    Retired,
    Spawned,
    SpawnFailed,
    SurvivorsChecked,
    TreeKilled,
)
from supervisor.core.lifecycle import (
    attempt_task,
    fresh,
    on_agent_exit,
    on_hello,
    on_replace,
    on_retired,
    on_spawn_failed,
    on_spawned,
    on_started,
)
from supervisor.core.model import Task, Transition
from supervisor.core.outcome import on_finished
from supervisor.core.retention import on_archived, sweep
from supervisor.core.survivors import hold, on_checked
from supervisor.core.timers import on_timers
from supervisor.core.txn import Txn

R = TypeVar("R")


class Step(msgspec.Struct):
    """What one step decided: records to append as one batch, effects for after the sync.
    `urgent` is False when every record may ride along with a later sync (a pid learnt
    from Started, which nothing visible depends on)."""

    records: list[Transition]
    effects: list[Effect]
    urgent: bool


Savepoint = tuple[tuple[int, int], int, int]


class Machine(Core):
    """Core plus the input table and the step protocol (see the module docstring)."""

    _lazy = 0

    def begin(self, now: float, wall: float) -> None:
        """Open a step at monotonic `now` and wall time `wall`."""
        self.now, self.wall = now, wall
        self.txn = Txn(self.state)
        self.effects = []
        self._lazy = 0
        self.rt.begin()

    def savepoint(self) -> Savepoint:
        return self.txn.mark(), self.rt.mark(), len(self.effects)

    def undo_to(self, sp: Savepoint) -> None:
        """Take back what was decided since `sp` (an operator request that was refused)."""
        self.txn.rollback(sp[0])
        self.rt.rollback(sp[1])
        del self.effects[sp[2] :]

    def handle(self, inp: Input) -> None:
        """Decide what one input means."""
        match inp:
            case AgentMessage(worker_id=wid, generation=gen, msg=msg):
                self._on_agent(wid, gen, msg)
            case AgentExited(worker_id=wid, generation=gen, returncode=rc):
                on_agent_exit(self, wid, gen, rc)
            case TreeKilled(worker_id=wid, attempt_id=aid, survivors=left):
                self._finished(
                    wid, wire.Finished(attempt_id=aid, phase="command", killed=True), left
                )
            case SurvivorsChecked(task_id=tid, left=left):
                on_checked(self, tid, left)
            case Spawned(worker_id=wid, generation=gen, pid=pid, start_ticks=ticks):
                if on_spawned(self, wid, gen, pid, ticks):
                    self._lazy += 1  # nothing waits on it: it rides with the next sync
            case SpawnFailed(worker_id=wid, message=message):
                on_spawn_failed(self, wid, message)
            case Retired(worker_id=wid):
                if on_retired(self, wid):
                    self._lazy += 1  # nothing waits on it: it rides with the next sync
            case Replace(worker_id=wid, same_id=same, cause=cause):
                on_replace(self, wid, same, cause)
            case HealthReport():
                evaluate(self, inp)
            case Archived(workstream_id=ws_id, path=path, error=error):
                on_archived(self, ws_id, path, error)

    def _finished(
        self, wid: str, msg: wire.Finished, left: tuple[tuple[int, int], ...] = ()
    ) -> None:
        """An attempt is over (by its agent's word or the daemon's kill); what outlived
        its kill holds its task back."""
        left = left or msg.survivors
        task = attempt_task(self, wid, msg.attempt_id) if left else None
        on_finished(self, wid, msg)
        if left:
            task = task or self._task_of_attempt(msg.attempt_id)
            if task is not None:
                hold(self, task, msg.attempt_id, left)

    def _task_of_attempt(self, attempt_id: str) -> Task | None:
        for task in self.state.data.tasks.values():
            if any(a.attempt_id == attempt_id for a in task.attempts):
                return task
        return None

    def _on_agent(self, wid: str, gen: int, msg: wire.FromAgent) -> None:
        if not fresh(self, wid, gen):
            self.emit("stale_agent_message", "warning", worker_id=wid, message=type(msg).__name__)
            return
        self.rt.beat(wid, self.now)
        if wid not in self.state.data.workers:
            return
        match msg:
            case wire.Hello():
                on_hello(self, wid, msg)
            case wire.Started():
                before = len(self.txn.records)
                if on_started(self, wid, msg):
                    self._lazy += len(self.txn.records) - before
            case wire.Finished():
                self._finished(wid, msg)
            case _:
                pass  # a heartbeat: its arrival was all it had to say

    def run(self, fn: Callable[..., R], *args: Any) -> R:
        """An operator's request: all of it, or (when it raises) none of it."""
        sp = self.savepoint()
        try:
            return fn(self, *args)
        except BaseException:
            self.undo_to(sp)
            raise

    def settle(self) -> None:
        """What follows from the time and from the inputs: due timers, readiness, dispatch,
        finished workstreams due to be retired."""
        on_timers(self)
        promote(self)
        dispatch(self)
        sweep(self)

    def decided(self) -> Step:
        """What the open step decided; then `keep` it (its records were written) or
        `abort` it (they could not be)."""
        records = self.txn.records
        return Step(list(records), list(self.effects), urgent=len(records) > self._lazy)

    def keep(self) -> None:
        """Close the step: its records are in the log."""
        self.rt.end()
        self.txn = Txn(self.state)
        self.effects = []

    def abort(self) -> None:
        """The step's records could not be written: take all of it back."""
        self.txn.rollback()
        self.rt.rollback()
        self.rt.end()
        self.txn = Txn(self.state)
        self.effects = []
