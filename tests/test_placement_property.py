"""Placement in the decision core under random work, in-process (tests/rig.py).

A Hypothesis state machine submits tasks with random `runs_on` (none, `local`, a host, a
label) and random resources (a per-host one, a global one) to a farm of four workers on
three hosts, finishes random attempts and makes the log refuse writes at random. After
every step:

- the live state, resource holders included, equals a replay of the log;
- no per-host instance and no global resource has more holders than its limit;
- every running task runs on a host its `runs_on` allows;
- a queued task waits only for a reason: for every idle worker on a host it may use, a
  resource it needs is full there (work is never left undone beside an idle worker).

At the end every task has completed.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from supervisor.core.model import TaskState, equal_states
from supervisor.core.placement import instance
from tests.rig import Rig
from tests.test_placement import place_workers, placed_config

FARM = {"worker-001": "", "worker-002": "build-2", "worker-003": "build-2", "worker-004": "build-3"}
# build-2 (two workers) more often: two holders' worth of work on one host is where a
# per-host wait has to end on a release rather than on a worker becoming idle.
RUNS_ON = [None, "local", "build-2", "build-2", "build-2", "build-3", "gpu", "big"]


class PlacementMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.rig = Rig(placed_config(workers=4, per_host={"repo": 1}, resources={"lic": 1}))
        place_workers(self.rig, {w: h for w, h in FARM.items() if h})
        self.n = 0

    @rule(data=st.data(), k=st.integers(1, 4))
    def submit(self, data: st.DataObject, k: int) -> None:
        ws = f"ws-{self.n}"
        self.n += 1
        tasks: list[dict[str, Any]] = []
        for i in range(k):
            task: dict[str, Any] = {"id": f"t{i}", "command": "x", "max_retries": 20}
            runs_on = data.draw(st.sampled_from(RUNS_ON))
            if runs_on is not None:
                task["runs_on"] = runs_on
            task["resources"] = data.draw(
                st.sampled_from([[], ["repo"], ["repo"], ["lic"], ["repo", "lic"]])
            )
            task["priority"] = data.draw(st.integers(0, 2))
            tasks.append(task)
        self.rig.submit(ws, tasks)
        self.rig.deliver()

    @precondition(lambda self: bool(self.rig.pool.current))
    @rule(data=st.data(), ok=st.booleans())
    def finish(self, data: st.DataObject, ok: bool) -> None:
        wid = data.draw(st.sampled_from(sorted(self.rig.pool.current)))
        self.rig.pool.finish(wid, exit_code=0 if ok else 1)
        self.rig.deliver()

    @rule(seconds=st.sampled_from([0.5, 2.0, 10.0]))
    def advance(self, seconds: float) -> None:
        self.rig.advance(seconds)

    @rule(n=st.integers(1, 2))
    def log_refuses_writes(self, n: int) -> None:
        self.rig.store.fail_next_writes(n)

    @invariant()
    def live_state_equals_a_replay_of_the_log(self) -> None:
        replayed = self.rig.store.replay()
        live = self.rig.state
        assert equal_states(replayed.data, live.data)
        assert {r: sorted(h) for r, h in replayed.graph.holders.items() if h} == {
            r: sorted(h) for r, h in live.graph.holders.items() if h
        }

    @invariant()
    def no_resource_over_its_limit(self) -> None:
        data = self.rig.state.data
        held: dict[str, list[str]] = {}
        for t in data.tasks.values():
            if t.state == TaskState.RUNNING:
                host = data.workers[t.worker_id or ""].host
                for r in t.resources:
                    held.setdefault(instance(r, host) if r == "repo" else r, []).append(t.id)
        for key, holders in held.items():
            assert len(holders) <= 1, (key, holders)
            assert sorted(self.rig.state.graph.holders_of(key)) == sorted(holders)

    @invariant()
    def running_tasks_run_where_they_may(self) -> None:
        data, hosts = self.rig.state.data, self.rig.m.hosts
        for t in data.tasks.values():
            if t.state == TaskState.RUNNING:
                host = data.workers[t.worker_id or ""].host
                assert hosts.matches(t.runs_on or "", host), (t.id, t.runs_on, host)
                assert t.attempts[-1].host == host

    @invariant()
    def nothing_waits_beside_an_idle_worker_without_a_reason(self) -> None:
        rig = self.rig
        if rig.store.fail_writes or rig.box.items:
            return  # a refused step is handled again later
        data, rt, graph, hosts = rig.state.data, rig.m.rt, rig.state.graph, rig.m.hosts
        for t in data.tasks.values():
            if t.state != TaskState.QUEUED:
                continue
            for wid in rt.idle():
                host = data.workers[wid].host
                if not hosts.matches(t.runs_on or "", host):
                    continue
                full = [
                    r
                    for r in t.resources
                    if len(graph.holders_of(instance(r, host) if r == "repo" else r))
                    >= data.resources[r].max_holders
                ]
                assert full, f"{t.id} (runs_on {t.runs_on}) queued beside idle {wid} on {host!r}"

    def teardown(self) -> None:
        rig = self.rig
        rig.store.fail_next_writes(0)
        for _ in range(2000):
            rig.deliver()
            if rig.pool.current:
                for wid in sorted(rig.pool.current):
                    rig.pool.finish(wid)
                continue
            due = rig.next_due()
            if due is None and not len(rig.box):
                break
            rig.advance(0.0 if due is None else max(0.0, due - rig.clock.now) + 0.01)
        left = [t.id for t in rig.state.data.tasks.values() if t.state != TaskState.COMPLETED]
        assert not left, left


TestPlacement = PlacementMachine.TestCase
TestPlacement.settings = settings(
    max_examples=int(os.environ.get("ORCHD_TORTURE_SIZE", "30")),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
