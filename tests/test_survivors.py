"""Survivors of a kill, decided in the pure core (tests/rig.py, no processes): a task whose
attempt left processes alive after its kill is held back, durably, until they are gone;
the hold is re-checked on a timer and released by itself."""

from __future__ import annotations

from typing import Any

from supervisor.core.effects import CheckSurvivors, KillTree
from supervisor.core.lifecycle import stop_task
from supervisor.core.model import TaskState, equal_states
from supervisor.core.policy import StopReason
from supervisor.core.survivors import RECHECK_S
from tests.rig import Rig, config

STUCK = (4343, 777)


def _cmd(tid: str, **fields: Any) -> dict[str, Any]:
    return {"id": tid, "command": f"run {tid}"} | fields


def _direct_kill_with_a_survivor(rig: Rig, reason: StopReason) -> str:
    """Run task t and kill its attempt from the daemon; one process outlives the kill."""
    rig.submit("ws", [_cmd("t")])
    wid = next(iter(rig.pool.current))
    rig.pool.start(wid, pid=4242)
    rig.deliver()
    aid = rig.task("t").attempts[-1].attempt_id
    rig.pool.survivors[aid] = (STUCK,)
    rig.pool.stuck.add(STUCK)
    rig.run(lambda m: stop_task(m, m.state.data.tasks[rig.full("t")], reason, direct=True))
    rig.deliver()
    return aid


def test_a_survivor_holds_the_task_back_until_it_is_gone() -> None:
    """A reassigned task whose killed tree left a process is recorded queued but not
    dispatched (an event names the pid) while idle workers wait; once the re-check finds
    the process gone it is released and runs; the log replays to the same state."""
    rig = Rig(config(workers=2))
    aid = _direct_kill_with_a_survivor(rig, StopReason.REASSIGN)
    assert any(isinstance(e, KillTree) for e in rig.effects)
    task = rig.task("t")
    assert task.state == TaskState.QUEUED and task.survivors == [list(STUCK)]
    (ev,) = rig.events("task_tree_survivors")
    assert ev.data == {"attempt_id": aid, "pids": [STUCK[0]]} and "4343" in (ev.message or "")
    for _ in range(3):
        rig.advance(RECHECK_S)
        assert rig.task("t").state == TaskState.QUEUED and len(rig.task("t").attempts) == 1
    assert sum(isinstance(e, CheckSurvivors) for e in rig.effects) >= 3
    assert rig.idle_workers()
    rig.pool.stuck.clear()
    rig.advance(RECHECK_S)
    task = rig.task("t")
    assert task.survivors == [] and task.state == TaskState.RUNNING and len(task.attempts) == 2
    assert len(rig.events("task_released")) == 1
    replayed = rig.store.replay()
    assert equal_states(replayed.data, rig.state.data)


def test_a_held_retry_waits_past_its_back_off() -> None:
    """A timed-out attempt with a survivor: its retry is not queued when its back-off ends,
    only once the survivor is gone."""
    rig = Rig(config(workers=1, backoff_base_s=0.5))
    _direct_kill_with_a_survivor(rig, StopReason.TIMEOUT)
    task = rig.task("t")
    assert task.state == TaskState.PENDING and task.retry_count == 1 and task.survivors
    rig.advance(5.0)
    rig.advance(RECHECK_S)
    assert rig.task("t").state == TaskState.PENDING
    rig.pool.stuck.clear()
    rig.advance(RECHECK_S)
    assert rig.task("t").state == TaskState.RUNNING and rig.task("t").survivors == []


def test_a_kill_without_survivors_holds_nothing() -> None:
    """No survivor, no hold: the reassigned task runs again at once, no event."""
    rig = Rig(config(workers=2))
    rig.submit("ws", [_cmd("t")])
    wid = next(iter(rig.pool.current))
    rig.run(lambda m: stop_task(m, m.state.data.tasks["t"], StopReason.REASSIGN, direct=True))
    rig.deliver()
    assert wid and rig.task("t").state == TaskState.RUNNING and not rig.task("t").survivors
    assert not rig.events("task_tree_survivors")
