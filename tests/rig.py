"""A test rig that runs the decision core the way engine/loop.py does, in-process and
synchronously: a step opens at the fake clock's time, takes inputs (and an operator
request), settles, and its records go to a MemoryStore as one batch; a refused batch
aborts the step and its inputs are handled again later, a kept one has its effects carried
out against a FakePool at once (the "sync" is instant). No processes, sockets or disk.

What the rig does with an effect is what engine/effects.py does with it, minus the
waiting: a delayed Spawn waits on the fake clock; a KillTree or Retire reports back
through the same inbox messages (TreeKilled, Replace).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from supervisor.control import actions
from supervisor.control import protocol as p
from supervisor.core import lifecycle, wire
from supervisor.core.config import Config, HealthConfig, ResourceConfig, TasksConfig
from supervisor.core.config import WorkersConfig as WorkersCfg
from supervisor.core.effects import (
    Archive,
    CheckSurvivors,
    DropFiles,
    Effect,
    Emit,
    KillStarting,
    KillTree,
    Note,
    Retire,
    Send,
    Spawn,
    WriteArchive,
)
from supervisor.core.errors import StoreWriteError
from supervisor.core.inputs import (
    Archived,
    Input,
    Replace,
    Retired,
    Spawned,
    SpawnFailed,
    SurvivorsChecked,
    TreeKilled,
)
from supervisor.core.machine import Machine, Step
from supervisor.core.model import State, Task, TaskState, WorkerState
from tests.fakes import FakeClock, FakePool, ListBox, MemoryStore


def config(
    *,
    workers: int = 2,
    resources: dict[str, int] | None = None,
    **tasks: Any,
) -> Config:
    """Settings with small timings; `tasks` overrides TasksConfig fields."""
    t = {"kill_grace_s": 0.5, "backoff_base_s": 1.0, "backoff_max_s": 8.0} | tasks
    return Config(
        workers=WorkersCfg(count=workers),
        tasks=TasksConfig(**t),
        health=HealthConfig(
            heartbeat_interval_s=1.0,
            health_check_interval_s=1.0,
            unresponsive_after_s=3.0,
            shutdown_after_s=6.0,
            restart_backoff_base_s=0.5,
            restart_backoff_max_s=4.0,
        ),
        resources={r: ResourceConfig(max_holders=n) for r, n in (resources or {}).items()},
    )


def workstream_toml(ws_id: str, tasks: Iterable[dict[str, Any]]) -> str:
    """A workstream file: `tasks` are [[tasks]] tables as dicts."""
    out = [f'id = "{ws_id}"']
    for t in tasks:
        out.append("[[tasks]]")
        for key, value in t.items():
            out.append(f"{key} = {msgspec.json.encode(value).decode()}")
    return "\n".join(out) + "\n"


class Rig:
    """The machine, a MemoryStore, a FakePool and a FakeClock, stepped by hand."""

    def __init__(self, cfg: Config | None = None, *, boot: bool = True) -> None:
        self.cfg = cfg or config()
        self.clock = FakeClock()
        self.store = MemoryStore()
        self.box = ListBox()
        self.pool = FakePool(self.box)
        self.m = Machine(
            self.cfg,
            State(),
            self.store,
            rand=lambda: 0.5,
            now=self.clock.now,
            wall=self.clock.wall,
        )
        self.delayed: list[tuple[float, Spawn]] = []
        self.notes: list[Note] = []
        self.effects: list[Effect] = []  # every effect carried out, in order
        self.aborted = 0
        # Retention: the archive documents "written", the workstreams whose files went.
        self.archives: dict[str, bytes] = {}
        self.dropped: list[str] = []
        # With `hold_archived`, an archive's Archived waits in `held` (still being written).
        self.hold_archived = False
        # When set, every archive "fails" with this error.
        self.archive_error: str | None = None
        self.held: list[Input] = []
        # Send(Run) effects whose attempt was not the task's running attempt when sent.
        self.bad_runs: list[str] = []
        if boot:
            self.boot()

    @property
    def state(self) -> State:
        return self.m.state

    def task(self, task_id: str) -> Task:
        """A task by its full name, or by its bare id when one workstream has it."""
        return self.m.state.data.tasks[self.full(task_id)]

    def full(self, task_id: str) -> str:
        """The full name of a task given by its bare id (unique in the tests that do)."""
        tasks = self.m.state.data.tasks
        if task_id in tasks:
            return task_id
        (found,) = [t for t in tasks.values() if t.name == task_id]
        return found.id

    # -- stepping ----------------------------------------------------------------------

    def step(
        self,
        inputs: Iterable[Input] = (),
        call: Callable[..., Any] | None = None,
        *args: Any,
        settle: bool = True,
    ) -> tuple[Step | None, Any]:
        """One step: (the step if its records were kept, else None; the call's result or
        the exception it raised). A refused step's inputs go back to the front of the box."""
        m = self.m
        inputs = list(inputs)
        m.begin(self.clock.now, self.clock.wall)
        for inp in inputs:
            m.handle(inp)
        result: Any = None
        if call is not None:
            try:
                result = m.run(call, *args)
            except Exception as exc:  # refused: travels back to the caller, as in the loop
                result = exc
        if settle:
            m.settle()
        step = m.decided()
        if step.records:
            try:
                self.store.write_batch(step.records)
            except StoreWriteError:
                m.abort()
                self.aborted += 1
                self.box.items[:0] = inputs
                return None, result
        m.keep()
        self.store.sync()
        for eff in step.effects:
            self._carry_out(eff)
        return step, result

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """An operator request in a step of its own; its result (or the exception)."""
        return self.step((), fn, *args)[1]

    def submit(self, ws_id: str, tasks: Iterable[dict[str, Any]]) -> Any:
        return self.run(actions.submit, p.SubmitParams(text=workstream_toml(ws_id, tasks)))

    def deliver(self, limit: int = 10_000) -> None:
        """Handle what the agents said, one batch a step, until the box is empty (or a
        step is refused: its inputs wait for the log)."""
        for _ in range(limit):
            if not self.box.items:
                return
            if self.step(self.box.take())[0] is None:
                return
        raise AssertionError("the inbox never emptied")

    def advance(self, seconds: float) -> None:
        """Time passes: delayed spawns that fell due happen, then a step settles."""
        self.clock.advance(seconds)
        due = [s for when, s in self.delayed if when <= self.clock.now]
        self.delayed = [(w, s) for w, s in self.delayed if w > self.clock.now]
        for spawn in due:
            if lifecycle.spawn_wanted(self.m, spawn.worker_id, spawn.restarts):
                self._spawn(spawn.worker_id)
        self.step(self.box.take())
        self.deliver()

    def next_due(self) -> float | None:
        """The earliest monotonic time something is due (a timer or a delayed spawn)."""
        dues = [w for w, _ in self.delayed]
        t = self.m.rt.next_due()
        if t is not None:
            dues.append(t)
        return min(dues, default=None)

    def boot(self) -> None:
        """Resources from the settings and the pool's workers, then their hellos."""

        def start(m: Machine) -> None:
            for rid, rc in m.cfg.resources.items():
                m.commit("resource", rid, "defined", "config", max_holders=rc.max_holders)
            for _ in range(m.cfg.worker_count):
                lifecycle.spawn_worker(m, lifecycle.new_worker_id(m), "recovery")

        self.step((), start)
        self.deliver()

    # -- effects -----------------------------------------------------------------------

    def _carry_out(self, eff: Effect) -> None:
        self.effects.append(eff)
        pool = self.pool
        match eff:
            case Send(worker_id=wid, msg=msg):
                if isinstance(msg, wire.Run):
                    self._check_run(wid, msg)
                pool.send_now(wid, msg)
            case Emit(event=ev):
                self.store.append_event(ev)
            case Note():
                self.notes.append(eff)
            case KillTree(worker_id=wid, attempt_id=aid, tree=t):
                left = pool.kill_now(wid, t)
                self.box.send_nowait(TreeKilled(wid, aid, left))
            case Spawn(worker_id=wid, delay_s=delay):
                if delay:
                    self.delayed.append((self.clock.now + delay, eff))
                else:
                    self._spawn(wid)
            case Retire():
                tree = eff.tree
                if eff.graceful:
                    pool.stop_now(eff.worker_id)
                left = pool.kill_now(eff.worker_id, tree)
                if eff.attempt_id is not None:
                    self.box.send_nowait(TreeKilled(eff.worker_id, eff.attempt_id, left))
                self.box.send_nowait(Retired(eff.worker_id))
                if eff.replace:
                    self.box.send_nowait(Replace(eff.worker_id, eff.same_id, eff.cause))
            case KillStarting(worker_id=wid, restarts=restarts):
                w = self.m.state.data.workers.get(wid)
                if w is not None and w.state == WorkerState.STARTING and w.restarts == restarts:
                    pool.kill_now(wid, None)
            case CheckSurvivors(task_id=tid, survivors=surv):
                left = tuple(x for x in surv if x in pool.stuck)
                self.box.send_nowait(SurvivorsChecked(tid, left))
            case Archive(workstream_id=ws_id, payload=payload):
                self.store.write_json(f"archive/{ws_id}.json", payload)
            case WriteArchive(workstream_id=ws_id, document=doc):
                # The archive is "written" at once: the machine hears so in the next step.
                self.archives[ws_id] = doc
                done = (
                    Archived(ws_id, error=self.archive_error)
                    if self.archive_error
                    else Archived(ws_id, path=f"archive/{ws_id}.tar.gz")
                )
                if self.hold_archived:
                    self.held.append(done)
                else:
                    self.box.send_nowait(done)
            case DropFiles(workstream_id=ws_id):
                self.dropped.append(ws_id)

    def _spawn(self, wid: str) -> None:
        try:
            gen = self.pool.spawn_now(wid)
        except OSError as exc:
            self.box.send_nowait(SpawnFailed(wid, str(exc)))
            return
        self.box.send_nowait(Spawned(wid, gen))

    def _check_run(self, wid: str, run: wire.Run) -> None:
        task = self.m.state.data.tasks.get(run.task_id)
        ok = (
            task is not None
            and task.state == TaskState.RUNNING
            and task.worker_id == wid
            and bool(task.attempts)
            and task.attempts[-1].attempt_id == run.attempt_id
            and self.m.state.data.workers[wid].attempt_id == run.attempt_id
        )
        if not ok:
            self.bad_runs.append(f"Run {run.attempt_id} to {wid}")

    # -- views -------------------------------------------------------------------------

    def sent_runs(self) -> list[tuple[str, wire.Run]]:
        return [
            (e.worker_id, e.msg)
            for e in self.effects
            if isinstance(e, Send) and isinstance(e.msg, wire.Run)
        ]

    def events(self, name: str) -> list[Any]:
        return [e for e in self.store.events if e.event == name]

    def idle_workers(self) -> list[str]:
        return sorted(self.m.rt.idle())

    def workers_in(self, state: str) -> list[str]:
        return sorted(w.id for w in self.m.state.data.workers.values() if w.state == state)
