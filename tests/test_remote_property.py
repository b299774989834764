"""The decision core under random work and faults with two of its three workers remote
(tests/test_machine_property.py's state machine, same invariants): their transports exit
mid-task, their heartbeats stop, their sweeps are answered late (or a step that would
take the answer is refused), and old attempts' Finished frames come back late. A remote
attempt the daemon gave up keeps its task running (and its resources) until its lease
has surely run out; the invariants hold throughout, and at the end every task that can
run has run and the pool has its size again."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule

from supervisor.core import wire
from supervisor.core.config import HealthConfig, HostConfig
from supervisor.core.inputs import AgentMessage
from supervisor.core.model import TaskState
from tests import test_machine_property as base
from tests.rig import Rig, config

FINISHED = {TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED}


class RemoteMachine(base.CoreMachine):
    def __init__(self) -> None:
        super().__init__()
        cfg = config(workers=1, resources=base.RESOURCES, backoff_max_s=8.0)
        h = cfg.health
        cfg.workers.hosts = [HostConfig(host="b2", count=base.WORKERS - 1)]
        cfg.health = HealthConfig(
            heartbeat_interval_s=h.heartbeat_interval_s,
            health_check_interval_s=h.health_check_interval_s,
            unresponsive_after_s=h.unresponsive_after_s,
            shutdown_after_s=h.shutdown_after_s,
            restart_backoff_base_s=h.restart_backoff_base_s,
            restart_backoff_max_s=h.restart_backoff_max_s,
            agent_lease_s=2.0,
        )
        self.rig = Rig(cfg)
        self.old_attempts: list[tuple[str, str]] = []

    @rule(data=st.data(), done=st.booleans())
    def late_finished(self, data: st.DataObject, done: bool) -> None:
        """A remote agent reports an attempt it ran earlier (its own, or a fence its
        host's spool kept): any attempt id seen so far, to any live remote agent."""
        rig = self.rig
        rig.deliver()  # what the agents said before (held by a refused step) comes first
        if rig.box.items:
            return  # the log still refuses: those inputs wait, and so does this frame
        seen = sorted(a.attempt_id for t in rig.state.data.tasks.values() for a in t.attempts)
        remote = sorted(w for w in rig.pool.alive if rig.state.data.workers[w].host)
        if not seen or not remote:
            return
        wid = data.draw(st.sampled_from(remote))
        aid = data.draw(st.sampled_from(seen))
        if any(run.attempt_id == aid for run in rig.pool.current.values()):
            return  # not late: its agent still runs it
        task = next(
            t for t in rig.state.data.tasks.values() if aid in {a.attempt_id for a in t.attempts}
        )
        before = task.state
        msg = wire.Finished(
            attempt_id=aid, phase="done" if done else "command", exit_code=0, fenced=True
        )
        rig.box.send_nowait(AgentMessage(wid, rig.pool.alive[wid], msg))
        rig.deliver()
        now = rig.state.data.tasks.get(task.id)
        if now is None:  # its finished run was retired (an operator's retire took effect)
            assert before in FINISHED, (aid, before)
            return
        # A late frame never completes a task (a step refused meanwhile changes nothing).
        assert now.state != TaskState.COMPLETED or before == TaskState.COMPLETED, (aid, before)

    @invariant()
    @base.checked
    def idle_workers_are_the_recorded_idle_ones(self) -> None:
        # While a remote agent's Sweep is unanswered (its Swept waits behind a refused
        # step), idle workers are held back on purpose.
        if not self.rig.m.remote.sweeping():
            recorded = {w.id for w in self.rig.state.data.workers.values() if w.state == "idle"}
            assert set(self.rig.m.rt.idle()) == recorded


RemoteMachine.TestCase.settings = settings(
    max_examples=base.SIZE,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestRemoteProperty = RemoteMachine.TestCase
TestRemoteProperty.__doc__ = (
    "With remote workers under random work and faults, the live state equals a replay of "
    "the log, no resource is held twice, a late frame never completes a task, and once "
    "writes succeed every task that can run runs."
)
