"""The decision core under random work and random faults, in-process.

A Hypothesis state machine drives the Machine through tests/rig.py (a MemoryStore, a
FakePool, a FakeClock): it submits random DAG workstreams, lets agents finish attempts
(success, failure, a failed validation or spawn), lets time pass (timeouts, back-offs),
steps the wall clock, kills agents, silences their heartbeats, cancels and retries tasks,
pauses and unpauses workstreams, drains and undrains the daemon, retires finished
workstreams (by hand, and by age after a wall step), and makes the log refuse
writes at random (a refused step is taken back and its inputs
are handled again later). After every step:

- the live state equals a replay of the durable log (and so do the graph's counts);
- no resource has more holders than its limit;
- a busy worker runs exactly one running task and every running task has its worker;
- the idle workers the runtime knows are exactly the workers recorded idle;
- every Run sent names the task's current running attempt;
- a running task not being stopped has its timeout armed, a ready pending task its
  back-off, and a queued task waits only for a reason (no idle worker, a full resource,
  a blocked or paused workstream, a drained daemon);
- no task starts an attempt while an operator holds it (paused, drained) throughout.

At the end, writes succeed and agents behave: the rig steps time forward until nothing is
due, and then nothing that could run is left waiting and the pool has its size again.
Size: ORCHD_TORTURE_SIZE examples (default 30).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar, cast

import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from supervisor.control import actions
from supervisor.control import protocol as p
from supervisor.control import quiesce_actions as hold
from supervisor.control import ws_actions as ws_ops
from supervisor.core.config import RetentionConfig
from supervisor.core.inputs import HealthReport, Probe
from supervisor.core.model import TaskState, WorkerState, equal_states
from tests.rig import Rig, config

SIZE = int(os.environ.get("ORCHD_TORTURE_SIZE", "30"))
RESOURCES = {"r1": 1, "r2": 2}
WORKERS = 3
ACTIVE_WS = ("pending", "running")


F = TypeVar("F", bound=Callable[..., None])


def checked(fn: F) -> F:
    """An invariant that marks the machine broken when it fails (teardown then skips the
    final checks, which would only bury the first failure)."""

    @functools.wraps(fn)
    def run(self: CoreMachine) -> None:
        try:
            fn(self)
        except AssertionError:
            self.broken = True
            raise

    return cast(F, run)


class CoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        cfg = config(workers=WORKERS, resources=RESOURCES, backoff_max_s=8.0)
        # Finished workstreams are retired 600 s after they ended: a wall step does it.
        cfg = msgspec.structs.replace(
            cfg, retention=RetentionConfig(keep_finished_s=600.0, keep_failed_s=600.0)
        )
        self.rig = Rig(cfg)
        self.ws_count = 0
        self.silent: set[str] = set()
        self.broken = False  # an invariant failed: teardown adds nothing to the report
        # task id -> (attempts, held by an operator) at the last check
        self.seen: dict[str, tuple[int, bool]] = {}

    # -- work -------------------------------------------------------------------------

    @rule(data=st.data(), n=st.integers(1, 5))
    def submit(self, data: st.DataObject, n: int) -> None:
        ws = f"ws-{self.ws_count}"
        self.ws_count += 1
        ids = [f"{ws}-t{i}" for i in range(n)]
        tasks: list[dict[str, Any]] = []
        for i, tid in enumerate(ids):
            task: dict[str, Any] = {"id": tid, "command": f"step {i}"}
            if i:  # depending only on earlier tasks keeps the graph acyclic
                task["depends_on"] = data.draw(
                    st.lists(st.sampled_from(ids[:i]), unique=True, max_size=2)
                )
            task["resources"] = data.draw(
                st.lists(st.sampled_from(sorted(RESOURCES)), unique=True, max_size=2)
            )
            task["max_retries"] = data.draw(st.integers(1, 3))
            task["timeout_s"] = data.draw(st.sampled_from([3.0, 8.0, 20.0]))
            task["critical"] = data.draw(st.booleans())
            task["priority"] = data.draw(st.integers(0, 2))
            if data.draw(st.booleans()):
                task["no_retry_exit_codes"] = [2]
            tasks.append(task)
        self.rig.submit(ws, tasks)
        self.rig.deliver()

    def _running_agents(self) -> list[str]:
        return sorted(self.rig.pool.current)

    @precondition(lambda self: bool(self.rig.pool.current))
    @rule(
        data=st.data(),
        how=st.sampled_from(["done", "done", "exit", "exit-no-retry", "validate", "spawn"]),
        started=st.booleans(),
    )
    def finish(self, data: st.DataObject, how: str, started: bool) -> None:
        wid = data.draw(st.sampled_from(self._running_agents()))
        pool = self.rig.pool
        if started:
            pool.start(wid)
        phase, exit_code = {
            "done": ("done", 0),
            "exit": ("command", 1),
            "exit-no-retry": ("command", 2),  # fails at once where listed as not worth it
            "validate": ("validate", 0),
            "spawn": ("spawn", None),
        }[how]
        pool.finish(wid, phase=phase, exit_code=exit_code)
        self.rig.deliver()

    @precondition(lambda self: bool(self.rig.pool.current))
    @rule(data=st.data())
    def started(self, data: st.DataObject) -> None:
        self.rig.pool.start(data.draw(st.sampled_from(self._running_agents())))
        self.rig.deliver()

    @rule(seconds=st.sampled_from([0.0, 0.3, 1.0, 2.5, 4.0, 9.0]))
    def advance(self, seconds: float) -> None:
        self.rig.advance(seconds)

    @rule(jump=st.sampled_from([700.0, -700.0, 30.0, -30.0]))
    def wall_step(self, jump: float) -> None:
        self.rig.clock.step_wall(jump)
        self.rig.step(self.rig.box.take())
        self.rig.deliver()

    @precondition(lambda self: bool(self.rig.pool.alive))
    @rule(data=st.data())
    def agent_dies(self, data: st.DataObject) -> None:
        self.rig.pool.die(data.draw(st.sampled_from(sorted(self.rig.pool.alive))))
        self.rig.deliver()

    @precondition(lambda self: bool(self.rig.pool.alive))
    @rule(data=st.data())
    def agent_goes_silent(self, data: st.DataObject) -> None:
        self.silent.add(data.draw(st.sampled_from(sorted(self.rig.pool.alive))))

    @rule()
    def agents_speak_again(self) -> None:
        self.silent.clear()

    @rule()
    def health_round(self) -> None:
        self._health(self.silent)

    def _health(self, silent: set[str]) -> None:
        rig = self.rig
        for wid in sorted(rig.pool.alive):
            if wid not in silent:
                rig.pool.heartbeat(wid)
        probes = {
            w.id: Probe(pid=w.pid, ok=True, status="sleeping")
            for w in rig.state.data.workers.values()
            if w.pid is not None and w.state != WorkerState.SHUTDOWN
        }
        rig.box.send_nowait(HealthReport(probes=probes))
        rig.deliver()

    @rule(n=st.integers(1, 4))
    def log_refuses_writes(self, n: int) -> None:
        self.rig.store.fail_next_writes(n)

    @rule(data=st.data())
    def operator_cancels(self, data: st.DataObject) -> None:
        tasks = sorted(self.rig.state.data.tasks)
        if tasks:
            tid = data.draw(st.sampled_from(tasks))
            self.rig.run(actions.cancel, p.CancelParams(task_id=tid))
            self.rig.deliver()

    @rule(data=st.data())
    def operator_retries(self, data: st.DataObject) -> None:
        tasks = sorted(self.rig.state.data.tasks)
        if tasks:
            tid = data.draw(st.sampled_from(tasks))
            self.rig.run(actions.retry, p.RetryParams(task_id=tid))
            self.rig.deliver()

    @rule(data=st.data(), pause=st.booleans())
    def operator_pauses_or_unpauses(self, data: st.DataObject, pause: bool) -> None:
        wss = sorted(self.rig.state.data.workstreams)
        if wss:
            ws = data.draw(st.sampled_from(wss))
            if pause:
                self.rig.run(hold.ws_pause, p.WsPauseParams(workstream=ws))
            else:
                self.rig.run(hold.ws_unpause, p.WsUnpauseParams(workstream=ws))
            self.rig.deliver()

    @rule(data=st.data())
    def operator_retires(self, data: st.DataObject) -> None:
        """`ws retire` (refused unless the workstream is finished and nothing of it runs)."""
        wss = sorted(self.rig.state.data.workstreams)
        if wss:
            ws = data.draw(st.sampled_from(wss))
            self.rig.run(ws_ops.ws_retire, p.WsRetireParams(workstream=ws))
            self.rig.deliver()

    @rule(drain=st.booleans())
    def operator_drains_or_undrains(self, drain: bool) -> None:
        if drain:
            self.rig.run(hold.drain, p.DrainParams())
        else:
            self.rig.run(hold.undrain, p.UndrainParams())
        self.rig.deliver()

    # -- after every step ---------------------------------------------------------------

    @invariant()
    @checked
    def nothing_starts_while_held(self) -> None:
        data = self.rig.state.data
        drained = data.draining()
        now = {
            t.id: (len(t.attempts), drained or data.workstreams[t.workstream_id].paused)
            for t in data.tasks.values()
        }
        for tid, (n, held) in now.items():
            before = self.seen.get(tid)
            if before is not None and before[1] and held:
                assert n <= before[0], f"{tid} started while held"
        self.seen = now

    @invariant()
    @checked
    def live_state_equals_a_replay_of_the_log(self) -> None:
        live, replayed = self.rig.state, self.rig.store.replay()
        assert equal_states(replayed.data, live.data)
        assert replayed.graph.unmet == live.graph.unmet
        assert {r: sorted(h) for r, h in replayed.graph.holders.items() if h} == {
            r: sorted(h) for r, h in live.graph.holders.items() if h
        }

    @invariant()
    @checked
    def no_resource_over_its_limit(self) -> None:
        data = self.rig.state.data
        for rid, res in data.resources.items():
            holders = [
                t.id for t in data.tasks.values() if t.state == "running" and rid in t.resources
            ]
            assert len(holders) <= res.max_holders, (rid, holders)

    @invariant()
    @checked
    def busy_workers_and_running_tasks_match(self) -> None:
        data = self.rig.state.data
        for w in data.workers.values():
            if w.state == WorkerState.BUSY:
                assert w.task_id is not None, w
                t = data.tasks[w.task_id]
                assert t.state == TaskState.RUNNING and t.worker_id == w.id, (w, t)
                assert t.attempts[-1].attempt_id == w.attempt_id
        for t in data.tasks.values():
            if t.state != TaskState.RUNNING:
                assert (t.worker_id, t.pid, t.stopping) == (None, None, None), t
                continue
            assert t.worker_id is not None, t
            w = data.workers[t.worker_id]
            assert w.task_id == t.id and w.attempt_id == t.attempts[-1].attempt_id, (t, w)
            if t.stopping is None:
                assert w.state in (WorkerState.BUSY, WorkerState.UNRESPONSIVE), (t, w)

    @invariant()
    @checked
    def idle_workers_are_the_recorded_idle_ones(self) -> None:
        recorded = {w.id for w in self.rig.state.data.workers.values() if w.state == "idle"}
        assert set(self.rig.m.rt.idle()) == recorded

    @invariant()
    @checked
    def every_run_sent_has_its_running_attempt(self) -> None:
        assert not self.rig.bad_runs

    @invariant()
    @checked
    def nothing_waits_without_a_reason(self) -> None:
        rig = self.rig
        data, rt, graph = rig.state.data, rig.m.rt, rig.state.graph
        for t in data.tasks.values():
            ws = data.workstreams[t.workstream_id]
            if t.state == TaskState.RUNNING and t.stopping is None:
                assert rt.armed("timeout", t.id) is not None, t
            elif t.state == TaskState.PENDING and graph.unmet.get(t.id) == 0:
                if ws.state in ACTIVE_WS:
                    assert rt.armed("backoff", t.id) is not None, t
            elif t.state == TaskState.QUEUED and rt.has_idle() and not rt.draining:
                assert (
                    rt.is_blocked(t.workstream_id)
                    or ws.paused
                    or data.draining()
                    or any(
                        len(graph.holders_of(r)) >= data.resources[r].max_holders
                        for r in t.resources
                    )
                ), t

    # -- the end: writes succeed, agents behave ------------------------------------------

    def teardown(self) -> None:
        if self.broken:
            return
        rig = self.rig
        rig.store.fail_writes = False
        rig.store.fail_next_writes(0)
        rig.run(hold.undrain, p.UndrainParams())
        for ws_id in sorted(rig.state.data.workstreams):
            rig.run(hold.ws_unpause, p.WsUnpauseParams(workstream=ws_id))
        for _ in range(2000):
            rig.deliver()
            if rig.pool.current:
                for wid in sorted(rig.pool.current):
                    rig.pool.finish(wid)
                continue
            self._health(set())
            due = rig.next_due()
            if due is None and not len(rig.box):
                break
            rig.advance(0.0 if due is None else max(0.0, due - rig.clock.now) + 0.01)
        else:
            raise AssertionError("never quiescent")
        self.live_state_equals_a_replay_of_the_log()
        data, rt, graph = rig.state.data, rig.m.rt, rig.state.graph
        stuck = []
        for t in data.tasks.values():
            ws = data.workstreams[t.workstream_id]
            blocked = rt.is_blocked(t.workstream_id)
            if t.state == TaskState.RUNNING:
                stuck.append(f"{t.id} still running")
            elif (
                t.state == TaskState.PENDING
                and graph.unmet.get(t.id) == 0
                and ws.state in ACTIVE_WS
                and not blocked
            ):
                stuck.append(f"{t.id} pending, ready, back-off over")
            elif t.state == TaskState.QUEUED and rt.has_idle() and not blocked:
                stuck.append(f"{t.id} queued while a worker is idle")
        for ws in data.workstreams.values():
            if ws.state in ACTIVE_WS:
                stuck.append(
                    f"workstream {ws.id} still {ws.state} with nothing to run: "
                    + ", ".join(
                        f"{tid} {data.tasks[tid].state}"
                        f"{' critical' if data.tasks[tid].critical else ''}"
                        f" unmet={graph.unmet.get(tid)}"
                        for tid in ws.task_ids
                    )
                    + f"; blocked={rt.is_blocked(ws.id)}"
                )
        assert not stuck, stuck
        live = [w for w in data.workers.values() if w.state != WorkerState.SHUTDOWN]
        assert len(live) == WORKERS and all(w.state == WorkerState.IDLE for w in live), live
        assert sorted(rig.pool.alive) == sorted(w.id for w in live)


CoreMachine.TestCase.settings = settings(
    max_examples=SIZE,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestMachineProperty = CoreMachine.TestCase
TestMachineProperty.__doc__ = (
    "Under random work, faults and clock steps the live state equals a replay of the log, "
    "nothing is held twice or lost, and once writes succeed every task that can run runs."
)
