"""The decision core driven directly: a Machine stepped by tests/rig.py against a
MemoryStore, a FakePool and a FakeClock. No processes, sockets or disk; each test takes
milliseconds."""

from __future__ import annotations

from typing import Any

import pytest

from supervisor.control import actions
from supervisor.control import protocol as p
from supervisor.core import wire
from supervisor.core.effects import Archive, KillTree
from supervisor.core.errors import OperatorError
from supervisor.core.lifecycle import stop_task
from supervisor.core.machine import Machine
from supervisor.core.model import State, TaskState, equal_states
from supervisor.core.policy import STOP_RULES, StopReason
from tests.rig import Rig, config


def cmd(tid: str, **fields: Any) -> dict[str, Any]:
    return {"id": tid, "command": f"run {tid}"} | fields


def assert_replays(rig: Rig) -> None:
    """The live state is exactly what replaying the kept records gives."""
    replayed = rig.store.replay()
    assert equal_states(replayed.data, rig.state.data)
    assert replayed.graph.unmet == rig.state.graph.unmet


def running_on(rig: Rig) -> dict[str, str]:
    """worker id -> task id of the attempt the pool is running there."""
    return {w: run.task_id for w, run in rig.pool.current.items()}


def finish(rig: Rig, task_id: str, **how: Any) -> None:
    """The agent running `task_id` reports its attempt over (success by default)."""
    wid = next(w for w, t in running_on(rig).items() if t == task_id)
    rig.pool.finish(wid, **how)
    rig.deliver()


def armed_timers(rig: Rig) -> dict[tuple[str, str], float]:
    rt = rig.m.rt
    return {
        (kind, tid): when
        for tid in rig.state.data.tasks
        for kind in ("timeout", "backoff", "queue_alert", "resource_alert")
        if (when := rt.armed(kind, tid)) is not None
    }


def runtime_view(rig: Rig) -> dict[str, Any]:
    """What the runtime shows through its methods: idle workers, which timers are armed,
    generations, blocked workstreams, back-off deadlines. (A timer fired by a step that is
    taken back is armed again at that step's time, so it stays due: only which timers are
    armed is compared. The dispatch queue may keep a stale entry, skipped when popped, so
    its length is not compared either.)"""
    rt, data = rig.m.rt, rig.state.data
    return {
        "idle": sorted(rt.idle()),
        "timers": sorted(armed_timers(rig)),
        "generations": {w: rt.generation(w) for w in data.workers},
        "blocked": sorted(ws for ws in data.workstreams if rt.is_blocked(ws)),
        "backoff_until": {t: rt.backoff_until(t) for t in data.tasks},
        "draining": rt.draining,
    }


# -- dispatch ------------------------------------------------------------------------------


def test_dispatch_order_is_priority_then_submission() -> None:
    """Queued tasks go out highest priority first, then in submission order."""
    rig = Rig(config(workers=1))
    rig.m.rt.set_draining()  # hold dispatch until everything is queued
    rig.submit("ws-a", [cmd("a0"), cmd("a5", priority=5), cmd("a1", priority=1)])
    rig.submit("ws-b", [cmd("b5", priority=5), cmd("b0")])
    rig.m.rt.draining = False
    order = []
    for _ in range(5):
        rig.step()
        (task_id,) = running_on(rig).values()
        order.append(task_id)
        finish(rig, task_id)
    assert order == ["a5", "b5", "a1", "a0", "b0"]
    assert not rig.bad_runs


def test_diamond_runs_in_dependency_order() -> None:
    """a -> (b, c) -> d: b and c start only after a, d only after both."""
    rig = Rig(config(workers=3))
    rig.submit(
        "ws-d",
        [
            cmd("a"),
            cmd("b", depends_on=["a"]),
            cmd("c", depends_on=["a"]),
            cmd("d", depends_on=["b", "c"]),
        ],
    )
    assert sorted(running_on(rig).values()) == ["a"]
    finish(rig, "a")
    assert sorted(running_on(rig).values()) == ["b", "c"]
    finish(rig, "b")
    assert sorted(running_on(rig).values()) == ["c"]
    assert rig.task("d").state == TaskState.PENDING
    finish(rig, "c")
    assert sorted(running_on(rig).values()) == ["d"]
    finish(rig, "d")
    assert rig.state.data.workstreams["ws-d"].state == "completed"
    assert [r.task_id for _, r in rig.pool.runs] in (list("abcd"), list("acbd"))
    assert_replays(rig)


def test_resource_limit_one_never_has_two_holders() -> None:
    """Four tasks on a resource with max_holders 1 run one at a time, whatever is idle."""
    rig = Rig(config(workers=3, resources={"repo": 1}))
    rig.submit("ws-r", [cmd(f"t{i}", resources=["repo"]) for i in range(4)])
    done: list[str] = []
    while len(done) < 4:
        holders = rig.state.graph.holders_of("repo")
        running = [t for t in rig.state.data.tasks.values() if t.state == TaskState.RUNNING]
        assert len(holders) <= 1 and len(running) == 1, (holders, running)
        assert len(rig.idle_workers()) == 2  # idle workers do not help: the resource is full
        (tid,) = running_on(rig).values()
        finish(rig, tid)
        done.append(tid)
    assert done == ["t0", "t1", "t2", "t3"]
    assert rig.state.data.workstreams["ws-r"].state == "completed"


# -- timeouts and back-off -----------------------------------------------------------------


def test_timeout_kills_then_backs_off_with_one_retry_spent() -> None:
    """A timeout sends Kill; the killed attempt leaves the task pending, retry_count 1,
    not_before = wall + 2·base, and it runs again when the back-off ends."""
    rig = Rig(config(workers=1, backoff_base_s=1.0))
    rig.submit("ws-t", [cmd("slow", timeout_s=10, max_retries=3)])
    rig.pool.answer_kill = False
    wid = next(iter(running_on(rig)))
    rig.advance(9.9)
    assert rig.task("slow").state == TaskState.RUNNING and not rig.pool.kills_sent
    rig.advance(0.1)
    (kill,) = rig.pool.kills_sent
    assert kill[0] == wid and kill[1].reason == "timeout"
    assert rig.task("slow").stopping == "timeout" and len(rig.events("task_timeout")) == 1
    finish(rig, "slow", phase="command", killed=True, signal=15)
    task = rig.task("slow")
    assert task.state == TaskState.PENDING and task.retry_count == 1
    assert task.failure_kind == "timeout" and task.attempts[-1].failure_kind == "timeout"
    assert task.not_before == pytest.approx(rig.clock.wall + 2.0)
    assert rig.m.rt.armed("backoff", "slow") == pytest.approx(rig.clock.now + 2.0)
    rig.advance(1.99)
    assert rig.task("slow").state == TaskState.PENDING
    rig.advance(0.01)
    assert rig.task("slow").state == TaskState.RUNNING and len(rig.task("slow").attempts) == 2
    assert_replays(rig)


@pytest.mark.parametrize("jump", [700.0, -700.0])
@pytest.mark.parametrize("when", ["while_running", "while_backing_off"])
def test_wall_clock_step_neither_fires_nor_delays_deadlines(jump: float, when: str) -> None:
    """A ±700 s wall-clock step fires no timeout or back-off early and delays none: both
    run on the monotonic clock."""
    rig = Rig(config(workers=1, backoff_base_s=1.0))
    rig.submit("ws-w", [cmd("t", timeout_s=10, max_retries=3)])
    if when == "while_running":
        rig.clock.step_wall(jump)
        rig.advance(9.9)
        assert rig.task("t").state == TaskState.RUNNING and rig.task("t").stopping is None
        rig.advance(0.1)  # timed out on time; the fake agent answers the Kill at once
        assert len(rig.events("task_timeout")) == 1
        assert rig.task("t").retry_count == 1 and rig.task("t").failure_kind == "timeout"
        return
    rig.advance(10.0)  # timed out, killed (the fake agent answers Kill)
    assert rig.task("t").state == TaskState.PENDING and rig.task("t").retry_count == 1
    rig.clock.step_wall(jump)
    rig.advance(1.99)
    assert rig.task("t").state == TaskState.PENDING
    rig.advance(0.01)
    assert rig.task("t").state == TaskState.RUNNING


def test_persisted_not_before_becomes_a_monotonic_deadline_once() -> None:
    """A not_before seen after a wall step is turned into the monotonic time left, once;
    later wall steps do not move it."""
    rig = Rig(config(workers=1, backoff_base_s=4.0, backoff_max_s=60.0))
    rig.submit("ws-n", [cmd("t", max_retries=3)])
    finish(rig, "t", phase="command", exit_code=1)
    due = rig.m.rt.armed("backoff", "t")
    assert due == pytest.approx(rig.clock.now + 8.0)
    rig.clock.step_wall(-700)
    rig.advance(4.0)
    rig.clock.step_wall(+1400)
    rig.advance(3.9)
    assert rig.task("t").state == TaskState.PENDING
    rig.advance(0.1)
    assert rig.task("t").state == TaskState.RUNNING


# -- workers lost --------------------------------------------------------------------------


@pytest.mark.parametrize("uptime", [0.5, 10.0], ids=["young", "established"])
def test_worker_exit_reassigns_its_task_without_spending_a_retry(uptime: float) -> None:
    """The agent of a busy worker dies: its task goes back to queued (retry count
    unchanged, the attempt marked reassigned) and runs on another worker."""
    rig = Rig(config(workers=1))
    rig.submit("ws-x", [cmd("t", max_retries=2)])
    (wid,) = running_on(rig)
    rig.advance(uptime)
    rig.pool.die(wid)
    rig.deliver()
    rig.advance(5.0)  # a young worker's restart waits out its back-off
    moves = [r for r in rig.store.records if r.from_ == "running" and r.to != "running"]
    assert moves[0].to == "queued" and moves[0].cause == "health"
    assert "retry_count" not in moves[0].changes
    first = rig.task("t").attempts[0]
    assert first.reassigned and first.failure_kind == "worker_lost" and first.worker_id == wid
    task = rig.task("t")
    assert task.retry_count == 0 and task.state == TaskState.RUNNING and len(task.attempts) == 2
    assert rig.pool.alive[task.attempts[1].worker_id] != rig.pool.spawns[0][1]  # a new agent
    assert len(rig.events("task_reassigned")) == 1
    assert any(isinstance(e, KillTree) for e in rig.effects)
    finish(rig, "t")
    assert rig.task("t").state == TaskState.COMPLETED
    assert_replays(rig)


# -- failures ------------------------------------------------------------------------------


def test_critical_final_failure_blocks_the_workstream() -> None:
    """A critical task that fails for good stops new dispatch in its workstream, which
    fails (and is archived) once nothing in it runs; other workstreams carry on."""
    rig = Rig(config(workers=2))
    rig.submit("ws-c", [cmd("a", max_retries=1), cmd("b"), cmd("c")])
    rig.submit("ws-o", [cmd("o")])
    assert sorted(running_on(rig).values()) == ["a", "b"]
    finish(rig, "a", phase="command", exit_code=1)
    assert rig.task("a").state == TaskState.FAILED
    assert rig.m.rt.is_blocked("ws-c")
    assert rig.task("c").state == TaskState.QUEUED  # not dispatched though a worker is idle
    assert sorted(running_on(rig).values()) == ["b", "o"]
    assert rig.state.data.workstreams["ws-c"].state == "running"  # b still runs
    finish(rig, "b")
    assert rig.state.data.workstreams["ws-c"].state == "failed"
    assert rig.task("c").state == TaskState.QUEUED and "c" not in running_on(rig).values()
    assert any(isinstance(e, Archive) and e.workstream_id == "ws-c" for e in rig.effects)
    assert len(rig.events("task_failed")) == 1 and len(rig.events("workstream_failed")) == 1
    finish(rig, "o")
    assert rig.state.data.workstreams["ws-o"].state == "completed"
    assert [r.task_id for _, r in rig.pool.runs] == ["a", "b", "o"]
    assert_replays(rig)


@pytest.mark.parametrize("how", ["retry", "reassign"])
def test_blocked_workstream_fails_when_its_last_running_task_goes_back(how: str) -> None:
    """A critical task fails for good while another task of its workstream runs; when that
    one goes back to pending (a retry) or queued (its worker died), nothing in the
    workstream can run any more: it fails."""
    rig = Rig(config(workers=2))
    rig.submit("ws-w", [cmd("a", max_retries=1), cmd("b", max_retries=3)])
    finish(rig, "a", phase="command", exit_code=1)
    assert rig.m.rt.is_blocked("ws-w") and rig.task("b").state == TaskState.RUNNING
    if how == "retry":
        finish(rig, "b", phase="command", exit_code=1)
    else:
        rig.advance(10.0)
        rig.pool.die(next(w for w, t in running_on(rig).items() if t == "b"))
        rig.deliver()
    for _ in range(5):
        rig.advance(10.0)
    assert rig.next_due() is None and not running_on(rig)  # nothing will ever happen
    assert rig.state.data.workstreams["ws-w"].state == "failed"


@pytest.mark.parametrize("case", ["critical-failed", "dependency-failed"])
def test_retry_in_a_failed_workstream_does_not_leave_it_running_forever(case: str) -> None:
    """Retrying a task that cannot run leaves its failed workstream failed (or the task
    runs): never `running` with nothing that can run."""
    rig = Rig(config(workers=2))
    if case == "critical-failed":
        rig.submit("ws-r", [cmd("n", max_retries=1, critical=False), cmd("c", max_retries=1)])
        finish(rig, "n", phase="command", exit_code=1)
        finish(rig, "c", phase="command", exit_code=1)
        retried = "n"
    else:
        rig.submit(
            "ws-r",
            [cmd("c", max_retries=1, critical=False), cmd("n", depends_on=["c"], max_retries=1)],
        )
        finish(rig, "c", phase="command", exit_code=1)
        retried = "n"  # pending behind a dependency that failed for good
    assert rig.state.data.workstreams["ws-r"].state == "failed"
    out = rig.run(actions.retry, p.RetryParams(task_id=retried))
    assert not isinstance(out, Exception)
    for _ in range(5):
        rig.advance(10.0)
    ws = rig.state.data.workstreams["ws-r"]
    assert rig.task(retried).state == TaskState.COMPLETED or ws.state == "failed", (
        ws.state,
        rig.task(retried).state,
    )


def test_non_critical_final_failure_lets_the_rest_run() -> None:
    """A non-critical task's final failure blocks nothing: the independent task runs and
    the workstream fails only when nothing can run any more."""
    rig = Rig(config(workers=1))
    rig.submit("ws-n", [cmd("a", max_retries=1, critical=False), cmd("b")])
    finish(rig, "a", phase="command", exit_code=3)
    assert not rig.m.rt.is_blocked("ws-n")
    finish(rig, "b")
    assert rig.state.data.workstreams["ws-n"].state == "failed"


def test_cancelling_the_failed_critical_task_lets_its_workstream_dispatch_again() -> None:
    """A critical task's final failure stops dispatch in its workstream; once no critical
    task is failed (the operator cancelled it), the queued task runs and the workstream
    completes."""
    rig = Rig(config(workers=2))
    rig.submit("ws-c", [cmd("a", max_retries=1), cmd("b"), cmd("c")])
    finish(rig, "a", phase="command", exit_code=1)
    assert rig.m.rt.is_blocked("ws-c") and rig.task("c").state == TaskState.QUEUED
    rig.run(actions.cancel, p.CancelParams(task_id="a"))
    rig.deliver()
    assert not rig.m.rt.is_blocked("ws-c")
    assert rig.task("c").state == TaskState.RUNNING
    finish(rig, "b")
    finish(rig, "c")
    assert rig.state.data.workstreams["ws-c"].state == "completed"
    assert_replays(rig)


# -- the refused write ---------------------------------------------------------------------


def test_refused_write_takes_the_whole_step_back() -> None:
    """A step whose batch the log refuses leaves the state equal to a replay of the kept
    records and the runtime as it was; once writes succeed its inputs are handled again:
    the timeout fires, the task whose back-off ended is dispatched, and the idle worker
    (idle all along) takes it."""
    rig = Rig(config(workers=3, backoff_base_s=1.0))
    rig.submit("ws-1", [cmd("slow", timeout_s=5), cmd("a"), cmd("b", max_retries=3)])
    finish(rig, "b", phase="command", exit_code=1)  # b backs off for 2 s
    assert sorted(running_on(rig).values()) == ["a", "slow"]
    (idle,) = rig.idle_workers()
    assert rig.task("b").state == TaskState.PENDING and rig.m.rt.armed("backoff", "b")
    before_rt = runtime_view(rig)
    before = rig.store.written_seq
    effects_before = len(rig.effects)

    rig.store.fail_writes = True
    rig.pool.finish(next(w for w, t in running_on(rig).items() if t == "a"))
    rig.clock.advance(6.0)  # slow's timeout and b's back-off are both due
    step, _ = rig.step(rig.box.take())
    assert step is None and rig.aborted == 1
    assert rig.store.written_seq == before == rig.state.last_seq
    assert_replays(rig)
    assert runtime_view(rig) == before_rt  # timers armed, worker idle, nothing dequeued
    due = armed_timers(rig)
    assert due[("timeout", "slow")] <= rig.clock.now and due[("backoff", "b")] <= rig.clock.now
    assert rig.task("a").state == TaskState.RUNNING and rig.task("b").state == TaskState.PENDING
    assert rig.idle_workers() == [idle] and rig.state.data.workers[idle].state == "idle"
    assert len(rig.effects) == effects_before and not rig.pool.kills_sent
    assert len(rig.box) == 1  # the Finished waits for the log

    rig.store.fail_writes = False
    rig.deliver()
    assert rig.task("a").state == TaskState.COMPLETED
    b = rig.task("b")
    assert b.state == TaskState.RUNNING and len(b.attempts) == 2 and b.retry_count == 1
    assert len(rig.events("task_timeout")) == 1
    assert [k.attempt_id for _, k in rig.pool.kills_sent] == [
        rig.task("slow").attempts[0].attempt_id
    ]
    assert rig.task("slow").retry_count == 1  # killed on time, one retry spent
    assert_replays(rig)
    assert not rig.bad_runs


def test_refused_write_of_a_backoff_end_runs_the_task_later() -> None:
    """A back-off that ends in refused steps ends again in the first step that is kept."""
    rig = Rig(config(workers=1, backoff_base_s=1.0))
    rig.submit("ws-b", [cmd("t", max_retries=3)])
    finish(rig, "t", phase="command", exit_code=1)
    rig.store.fail_next_writes(3)
    for _ in range(3):
        rig.advance(2.0)
        assert rig.task("t").state == TaskState.PENDING
        assert_replays(rig)
    assert rig.store.refused == 3
    rig.advance(0.0)
    assert rig.task("t").state == TaskState.RUNNING and len(rig.task("t").attempts) == 2
    assert_replays(rig)


def test_refused_first_dispatch_leaves_no_phantom_attempt() -> None:
    """A refused step that dispatched a task for the first time leaves it with no attempt
    (as the log has it); the next kept step dispatches it as attempt 1, once."""
    rig = Rig(config(workers=1))
    rig.submit("ws-q", [cmd("a"), cmd("b")])
    rig.store.fail_next_writes(1)
    rig.pool.finish(next(iter(running_on(rig))))
    rig.deliver()  # refused: a stays running, b queued, no worker idle
    assert rig.task("a").state == TaskState.RUNNING and rig.task("b").state == TaskState.QUEUED
    assert rig.idle_workers() == []
    assert rig.task("b").attempts == []
    rig.deliver()  # the Finished again, now written: a done, b dispatched
    b = rig.task("b")
    assert rig.task("a").state == TaskState.COMPLETED and b.state == TaskState.RUNNING
    assert [a.number for a in b.attempts] == [1]
    assert [r.task_id for _, r in rig.pool.runs] == ["a", "b"]
    assert_replays(rig)


# -- operator requests ---------------------------------------------------------------------


def test_operator_request_that_raises_leaves_no_record() -> None:
    """A request that commits, emits and changes the runtime and then raises is taken back
    alone: no record, no event, no runtime change; the step's other inputs are kept."""
    rig = Rig(config(workers=1))
    rig.submit("ws-o", [cmd("a"), cmd("b")])
    rt_before = runtime_view(rig)

    def half_done(m: Machine) -> None:
        m.commit("task", "b", "cancelled", "operator")
        m.emit("task_cancelled", "info", task_id="b")
        m.rt.block("ws-o")
        m.rt.arm("timeout", "b", m.now + 1)
        raise OperatorError("wrong_state", "refused half-way")

    step, err = rig.step((), half_done)
    assert isinstance(err, OperatorError)
    assert step is not None and step.records == [] and step.effects == []
    assert rig.task("b").state == TaskState.QUEUED
    assert runtime_view(rig) == rt_before
    assert_replays(rig)

    rig.pool.finish(next(iter(running_on(rig))))
    step, err = rig.step(rig.box.take(), half_done)
    assert isinstance(err, OperatorError) and step is not None
    assert all(r.id != "b" or r.to == "running" for r in step.records)
    assert rig.task("a").state == TaskState.COMPLETED
    assert rig.task("b").state == TaskState.RUNNING
    assert not rig.events("task_cancelled")
    assert_replays(rig)


# -- leaving running -----------------------------------------------------------------------


def _assert_left_running_clean(rig: Rig, task_id: str) -> None:
    task = rig.task(task_id)
    assert task.state != TaskState.RUNNING
    assert (task.worker_id, task.pid, task.stopping) == (None, None, None)
    leave = [
        r
        for r in rig.store.records
        if r.entity == "task" and r.from_ == "running" and r.to != "running"
    ]
    for rec in leave:
        assert rec.changes["worker_id"] is None and rec.changes["pid"] is None
        assert rec.changes["stopping"] is None
    assert_replays(rig)
    replayed = rig.store.replay().data.tasks[task_id]
    assert (replayed.worker_id, replayed.pid, replayed.stopping) == (None, None, None)


@pytest.mark.parametrize("direct", [False, True], ids=["agent-kills", "daemon-kills"])
@pytest.mark.parametrize("reason", list(STOP_RULES), ids=str)
def test_leaving_running_clears_worker_pid_and_stopping_for_every_stop_reason(
    reason: StopReason, direct: bool
) -> None:
    """Whatever the stop reason and whoever kills the tree, the task that leaves running
    has no worker, pid or stopping mark (live and replayed)."""
    rig = Rig(config(workers=1))
    rig.submit("ws-s", [cmd("t", max_retries=2)])
    (wid,) = running_on(rig)
    rig.pool.start(wid, pid=4242)
    rig.deliver()
    assert rig.task("t").pid == 4242
    rig.run(lambda m: stop_task(m, m.state.data.tasks["t"], reason, direct=direct))
    rig.deliver()
    rig.advance(5.0)
    task = rig.task("t")
    expected = STOP_RULES[reason].to
    if reason == StopReason.REASSIGN:
        # Queued again and, the worker being free, running its next attempt.
        assert len(task.attempts) == 2 and task.attempts[0].reassigned
        assert task.state == TaskState.RUNNING and task.pid is None and task.stopping is None
        rec = next(r for r in rig.store.records if r.from_ == "running" and r.to == "queued")
        assert rec.changes["worker_id"] is None and rec.changes["stopping"] is None
        return
    if expected is None:
        expected = TaskState.PENDING  # the retry rule: one retry spent of two
        assert task.retry_count == 1
    assert task.state in (expected, TaskState.RUNNING)
    if task.state == TaskState.RUNNING:  # back-off over, running again: look at attempt 1
        assert len(task.attempts) == 2
        rec = next(r for r in rig.store.records if r.from_ == "running" and r.to != "running")
        assert rec.to == expected
        assert rec.changes["worker_id"] is None and rec.changes["pid"] is None
        assert rec.changes["stopping"] is None
        return
    _assert_left_running_clean(rig, "t")


@pytest.mark.parametrize("max_retries", [1, 3])
@pytest.mark.parametrize(
    ("phase", "exit_code"),
    [("done", 0), ("command", 1), ("validate", 0), ("spawn", None)],
)
def test_leaving_running_clears_worker_pid_and_stopping_for_every_phase(
    phase: str, exit_code: int | None, max_retries: int
) -> None:
    """An attempt that ends by itself in any phase, final or not, leaves the task with no
    worker, pid or stopping mark."""
    rig = Rig(config(workers=1, backoff_base_s=30.0, backoff_max_s=60.0))
    rig.submit("ws-p", [cmd("t", max_retries=max_retries)])
    (wid,) = running_on(rig)
    rig.pool.start(wid, pid=4343)
    rig.deliver()
    finish(rig, "t", phase=phase, exit_code=exit_code)
    task = rig.task("t")
    if phase == "done":
        assert task.state == TaskState.COMPLETED
    else:
        assert task.state == (TaskState.FAILED if max_retries == 1 else TaskState.PENDING)
        kind = {"command": "exit_code", "validate": "validation", "spawn": "spawn_error"}[phase]
        assert task.failure_kind == kind
    _assert_left_running_clean(rig, "t")
    assert rig.state.data.workers[wid].state == "idle" and rig.idle_workers() == [wid]


def test_stale_messages_from_a_replaced_agent_are_ignored() -> None:
    """A Finished from a dead agent's generation changes nothing (an event says so)."""
    rig = Rig(config(workers=1))
    rig.submit("ws-g", [cmd("t")])
    (wid,) = running_on(rig)
    old_gen = rig.pool.alive[wid]
    aid = rig.pool.current[wid].attempt_id
    rig.advance(10.0)
    rig.pool.die(wid)
    rig.deliver()
    seq = rig.store.written_seq
    from supervisor.core.inputs import AgentMessage

    rig.step([AgentMessage(wid, old_gen, wire.Finished(attempt_id=aid, phase="done"))])
    assert rig.store.written_seq == seq
    assert rig.events("stale_agent_message")
    assert rig.task("t").state != TaskState.COMPLETED


def test_fakes_replay_from_scratch_matches() -> None:
    """The MemoryStore's replay starts from an empty State and applies every record."""
    rig = Rig(config(workers=2))
    rig.submit("ws-f", [cmd("a"), cmd("b", depends_on=["a"])])
    state = State()
    for rec in rig.store.records:
        state.apply(rec)
    assert equal_states(state.data, rig.state.data)
