"""The dispatch rules of `ws pause` / `ws unpause` and `drain` / `undrain`, on the decision
core in-process (tests/rig.py: fakes, no processes)."""

from __future__ import annotations

from typing import Any

from supervisor.control import protocol as p
from supervisor.control import quiesce_actions as q
from supervisor.core.machine import Machine
from supervisor.core.model import State, TaskState, equal_states
from supervisor.core.views import status_line, status_view
from tests.rig import Rig, config


def cmd(tid: str, **fields: Any) -> dict[str, Any]:
    return {"id": tid, "command": f"run {tid}"} | fields


def running(rig: Rig) -> list[str]:
    """The bare ids of the tasks the pool runs (unique in these tests)."""
    return sorted(run.task_id.rpartition("/")[2] for run in rig.pool.current.values())


def finish(rig: Rig, task_id: str) -> None:
    wid = next(w for w, run in rig.pool.current.items() if run.task_id == rig.full(task_id))
    rig.pool.finish(wid)
    rig.deliver()


def assert_replays(rig: Rig) -> State:
    replayed = rig.store.replay()
    assert equal_states(replayed.data, rig.state.data)
    return replayed


def test_paused_workstream_starts_nothing_while_another_runs() -> None:
    """A paused workstream's running task finishes, its queued ones stay queued, and the
    freed worker goes to another workstream's task."""
    rig = Rig(config(workers=2))
    rig.submit("ws-a", [cmd("a1"), cmd("a2"), cmd("a3")])
    assert running(rig) == ["a1", "a2"]
    out = rig.run(q.ws_pause, p.WsPauseParams(workstream="ws-a"))
    assert out["seq"] is not None and out["running"] == 2
    rig.submit("ws-b", [cmd("b1"), cmd("b2")])
    finish(rig, "a1")
    assert running(rig) == ["a2", "b1"]
    finish(rig, "a2")
    assert running(rig) == ["b1", "b2"]
    assert rig.task("a3").state == TaskState.QUEUED
    finish(rig, "b1")
    finish(rig, "b2")
    assert running(rig) == [] and rig.task("a3").state == TaskState.QUEUED
    rig.run(q.ws_unpause, p.WsUnpauseParams(workstream="ws-a"))
    assert running(rig) == ["a3"]
    assert [e.workstream_id for e in rig.events("workstream_paused")] == ["ws-a"]
    assert [e.workstream_id for e in rig.events("workstream_unpaused")] == ["ws-a"]
    assert not rig.bad_runs
    assert_replays(rig)


def test_pause_survives_replay_and_a_fresh_machine_still_holds_dispatch() -> None:
    """The pause is a record: a machine built from the replayed log (a restart) still
    starts nothing in the paused workstream."""
    rig = Rig(config(workers=1))
    rig.m.rt.set_draining()  # hold dispatch until the pause is in
    rig.submit("ws-a", [cmd("a1")])
    rig.run(q.ws_pause, p.WsPauseParams(workstream="ws-a", reason="maintenance"))
    rig.m.rt.draining = False
    rig.step()
    assert running(rig) == []
    replayed = assert_replays(rig)
    assert replayed.data.workstreams["ws-a"].paused
    fresh = Machine(rig.cfg, replayed, rig.store, rand=lambda: 0.5)
    assert fresh.state.data.workstreams["ws-a"].paused


def test_pause_and_drain_twice_record_nothing_the_second_time() -> None:
    """Asking for the state something is already in is answered with no record."""
    rig = Rig()
    rig.submit("ws-a", [cmd("a1")])
    first = rig.run(q.ws_pause, p.WsPauseParams(workstream="ws-a"))
    seq = rig.state.last_seq
    again = rig.run(q.ws_pause, p.WsPauseParams(workstream="ws-a"))
    assert first["seq"] == seq and again["seq"] is None and rig.state.last_seq == seq
    assert rig.run(q.undrain, p.UndrainParams())["seq"] is None
    assert rig.run(q.drain, p.DrainParams())["seq"] == seq + 1
    assert rig.run(q.drain, p.DrainParams())["seq"] is None
    assert rig.run(q.ws_unpause, p.WsUnpauseParams(workstream="ws-a"))["seq"] == seq + 2
    assert rig.run(q.ws_unpause, p.WsUnpauseParams(workstream="ws-a"))["seq"] is None
    assert rig.state.last_seq == seq + 2


def test_drain_starts_nothing_anywhere_until_undrain() -> None:
    """After drain, running tasks finish and nothing starts; undrain starts the queue in
    its order; the status line says draining, then drained."""
    rig = Rig(config(workers=2))
    rig.submit("ws-a", [cmd("a1"), cmd("a2"), cmd("a3")])
    rig.run(q.drain, p.DrainParams(reason="kernel update"))
    line = status_line(status_view(rig.state))
    assert line.startswith("draining: 2 running;"), line
    rig.submit("ws-b", [cmd("b1", priority=9)])
    finish(rig, "a1")
    finish(rig, "a2")
    assert running(rig) == []
    assert rig.task("a3").state == rig.task("b1").state == TaskState.QUEUED
    assert status_line(status_view(rig.state)).startswith("drained: nothing running;")
    assert status_view(rig.state)["drain"]["reason"] == "kernel update"
    rig.run(q.undrain, p.UndrainParams())
    assert running(rig) == ["a3", "b1"]
    assert status_view(rig.state)["drain"] is None
    assert [e.event for e in rig.store.events if e.event.startswith("daemon_")] == [
        "daemon_draining",
        "daemon_undrained",
    ]
    replayed = assert_replays(rig)
    assert not replayed.data.draining()


def test_drain_survives_replay() -> None:
    """A drained daemon rebuilt from its log (a restart) is still drained."""
    rig = Rig()
    rig.run(q.drain, p.DrainParams())
    replayed = assert_replays(rig)
    assert replayed.data.draining()
    rig.submit("ws-a", [cmd("a1")])
    assert running(rig) == []


def test_no_queue_wait_alert_while_held_and_a_full_timeout_after() -> None:
    """A task held by a pause is not reported for its wait; once unpaused, it is reported
    only after a full queue_timeout_s more."""
    rig = Rig(config(workers=1, queue_timeout_s=5.0))
    rig.submit("ws-b", [cmd("b1", timeout_s=100.0)])  # keeps the only worker busy
    rig.submit("ws-a", [cmd("a1")])
    rig.run(q.ws_pause, p.WsPauseParams(workstream="ws-a"))
    rig.advance(10.0)
    assert rig.events("task_queue_timeout") == []
    rig.run(q.ws_unpause, p.WsUnpauseParams(workstream="ws-a"))
    rig.advance(4.0)
    assert rig.events("task_queue_timeout") == []
    rig.advance(1.5)
    assert [e.task_id for e in rig.events("task_queue_timeout")] == ["ws-a/a1"]


def test_pause_of_a_merged_workstream_is_refused() -> None:
    """Nothing in a merged workstream runs again: pausing it is a wrong-state error."""
    rig = Rig()
    rig.submit("ws-a", [cmd("a1")])
    finish(rig, "a1")
    rig.step((), lambda m: m.commit("workstream", "ws-a", "merged", "operator"))
    err = rig.run(q.ws_pause, p.WsPauseParams(workstream="ws-a"))
    assert getattr(err, "code", None) == "wrong_state"


def test_a_failure_block_lifted_while_paused_keeps_the_workstream_held() -> None:
    """A critical failure's dispatch stop lifted (a retry) while paused starts nothing;
    the unpause does."""
    rig = Rig(config(workers=1, max_retries=1))
    rig.submit("ws-a", [cmd("a1"), cmd("a2")])
    rig.pool.finish(next(iter(rig.pool.current)), phase="command", exit_code=1)
    rig.deliver()
    assert rig.task("a1").state == TaskState.FAILED and rig.m.rt.is_blocked("ws-a")
    rig.run(q.ws_pause, p.WsPauseParams(workstream="ws-a"))
    rig.step((), lambda m: m.commit("task", "ws-a/a1", "completed", "operator", skipped=True))
    rig.step()
    assert not rig.m.rt.is_blocked("ws-a")
    assert running(rig) == []
    rig.run(q.ws_unpause, p.WsUnpauseParams(workstream="ws-a"))
    assert running(rig) == ["a2"]
