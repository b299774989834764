"""Remote workers in the decision core, stepped in-process (tests/rig.py): workers per
host, the Sweep before anything else, an exit of the transport as unresponsive, the
lease rule for a given-up attempt's resources, late frames, transport faults and their
back-off. No processes; each test takes milliseconds."""

from __future__ import annotations

from typing import Any

import msgspec

from supervisor.control import actions
from supervisor.control import protocol as p
from supervisor.core import reconfigure, wire
from supervisor.core.config import Config, HealthConfig, HostConfig, ResourceConfig, TasksConfig
from supervisor.core.config import WorkersConfig as WorkersCfg
from supervisor.core.effects import CheckSurvivors, KillTree, Renew, Retire, Spawn
from supervisor.core.inputs import AgentExited, AgentMessage, HealthReport
from supervisor.core.model import TaskState, WorkerState
from tests.rig import Rig

LEASE_S, GRACE_S, HEARTBEAT_S, SHUTDOWN_S = 2.0, 0.5, 1.0, 6.0


def remote_config(local: int = 0, remote: int = 1, **health: Any) -> Config:
    """`local` workers here and `remote` on host b2, with a lease of LEASE_S."""
    h = {
        "heartbeat_interval_s": HEARTBEAT_S,
        "health_check_interval_s": 1.0,
        "unresponsive_after_s": 3.0,
        "shutdown_after_s": SHUTDOWN_S,
        "restart_backoff_base_s": 0.5,
        "restart_backoff_max_s": 4.0,
        "agent_lease_s": LEASE_S,
    } | health
    return Config(
        workers=WorkersCfg(count=local, hosts=[HostConfig(host="b2", count=remote)]),
        tasks=TasksConfig(kill_grace_s=GRACE_S, backoff_base_s=1.0, backoff_max_s=8.0),
        health=HealthConfig(**h),
        resources={"git_repo_write": ResourceConfig(max_holders=1)},
    )


def remote_ids(rig: Rig) -> list[str]:
    return sorted(w.id for w in rig.state.data.workers.values() if w.host and w.state != "shutdown")


def health_round(rig: Rig, *, beats: bool = True) -> None:
    """One health check (every live agent heartbeats first, unless `beats` is False)."""
    if beats:
        for wid in sorted(rig.pool.alive):
            rig.pool.heartbeat(wid)
    rig.box.send_nowait(HealthReport(probes={}))
    rig.deliver()


def start_one(rig: Rig, **task: Any) -> str:
    """A one-task workstream whose task runs on the remote worker; that worker's id."""
    rig.submit("ws", [{"id": "t", "command": "true"} | task])
    rig.deliver()
    (wid,) = [w for w, _ in rig.sent_runs()]
    rig.pool.start(wid)
    rig.deliver()
    return wid


def test_workers_per_host_name_their_host_and_spawn_through_it() -> None:
    """Each [[workers.hosts]] count becomes workers with `host` set, ids naming the host
    (one path component), and Spawn effects that carry the host."""
    rig = Rig(remote_config(local=1, remote=2))
    workers = rig.state.data.workers
    assert sorted(w.host for w in workers.values()) == ["", "b2", "b2"]
    for wid in remote_ids(rig):
        assert wid.endswith("@b2") and "/" not in wid
    spawns = [e for e in rig.effects if isinstance(e, Spawn)]
    assert sorted(s.host for s in spawns) == ["", "b2", "b2"]


def test_remote_hello_sends_sweep_first_and_holds_the_host_until_swept() -> None:
    """A remote agent's first frame is its Sweep (listing what is live on its host), and
    no task starts on the host until the Swept answer."""
    rig = Rig(remote_config(), boot=False)
    rig.pool.answer_sweep = False
    rig.boot()
    (wid,) = remote_ids(rig)
    rig.submit("ws", [{"id": "t", "command": "true"}])
    rig.deliver()
    assert rig.sent_runs() == []
    sent = [msg for w, msg in rig.pool.sent if w == wid]
    assert [type(m) for m in sent] == [wire.Sweep]
    assert sent[0] == wire.Sweep(live=[])
    rig.box.send_nowait(AgentMessage(wid, rig.pool.alive[wid], wire.Swept()))
    rig.deliver()
    assert [w for w, _ in rig.sent_runs()] == [wid]


def test_transport_exit_is_unresponsive_and_the_task_is_reassigned_at_shutdown_after_s() -> None:
    """The transport exits mid-task: the worker is unresponsive, the task stays running
    with its resource until shutdown_after_s, then is reassigned without spending a
    retry; its second attempt completes, once."""
    rig = Rig(remote_config(remote=2))
    wid = start_one(rig, resources=["git_repo_write"])
    rig.pool.die(wid, 255)
    rig.deliver()
    assert rig.state.data.workers[wid].state == WorkerState.UNRESPONSIVE
    task = rig.task("t")
    assert task.state == TaskState.RUNNING
    assert rig.state.graph.holders_of("git_repo_write") == [task.id]
    for _ in range(int(SHUTDOWN_S) - 1):
        rig.advance(1.0)
        health_round(rig)
    assert rig.task("t").state == TaskState.RUNNING
    rig.advance(1.5)
    health_round(rig)
    task = rig.task("t")
    assert task.retry_count == 0
    assert task.state in (TaskState.QUEUED, TaskState.RUNNING)
    assert rig.events("task_reassigned")
    # No kill from here: the attempt is on its host.
    assert not [e for e in rig.effects if isinstance(e, KillTree)]
    assert all(e.tree is None for e in rig.effects if isinstance(e, Retire))
    rig.deliver()
    (second,) = [w for w, run in rig.sent_runs()[1:]]
    rig.pool.start(second)
    rig.pool.finish(second)
    rig.deliver()
    assert rig.task("t").state == TaskState.COMPLETED
    assert len(rig.events("task_completed")) == 1


def cancel_lost_and_wait_out_the_fence(rig: Rig, wid: str) -> None:
    """The transport of `wid` (running task `t` with git_repo_write) exits, no new
    agent's sweep confirms anything, and `t` is cancelled: it stays running with its
    resource until LEASE_S + GRACE_S + HEARTBEAT_S after the last frame, then is
    cancelled."""
    rig.pool.answer_sweep = False
    last_frame = rig.clock.now
    rig.pool.die(wid, 255)
    rig.deliver()
    tid: str = rig.task("t").id
    rig.run(actions.cancel, p.CancelParams(task_id=tid))
    rig.deliver()
    due = last_frame + LEASE_S + GRACE_S + HEARTBEAT_S
    while rig.clock.now + 0.25 < due:
        assert rig.task("t").state == TaskState.RUNNING
        assert rig.state.graph.holders_of("git_repo_write") == [tid]
        rig.advance(0.25)
    rig.advance(0.5)
    assert rig.task("t").state == TaskState.CANCELLED


def test_resources_of_a_lost_attempt_are_held_until_its_lease_and_grace_have_passed() -> None:
    """A cancel while the transport is gone cannot be confirmed: the task keeps its
    resource until agent_lease_s + kill_grace_s (and a heartbeat) since the last frame,
    then is settled."""
    rig = Rig(remote_config())
    wid = start_one(rig, resources=["git_repo_write"])
    cancel_lost_and_wait_out_the_fence(rig, wid)
    assert rig.state.graph.holders_of("git_repo_write") == []
    assert rig.events("attempt_fenced")


def test_a_shorter_lease_reloaded_never_shortens_the_fence_of_an_agent_started_before() -> None:
    """The worker record keeps the lease and kill grace its agent was started with (and
    its Spawn carried them); after a reload to a far shorter lease and grace, a lost
    attempt of that agent is still held for the old lease + grace, not the new."""
    rig = Rig(remote_config())
    (spawn,) = [e for e in rig.effects if isinstance(e, Spawn) and e.host == "b2"]
    assert (spawn.lease_s, spawn.kill_grace_s) == (LEASE_S, GRACE_S)
    wid = start_one(rig, resources=["git_repo_write"])
    assert (rig.state.data.workers[wid].lease_s, rig.state.data.workers[wid].kill_grace_s) == (
        LEASE_S,
        GRACE_S,
    )
    short = remote_config(agent_lease_s=0.25)
    short = msgspec.structs.replace(
        short, tasks=msgspec.structs.replace(short.tasks, kill_grace_s=0.05)
    )
    rig.run(reconfigure.apply, short, "test")
    cancel_lost_and_wait_out_the_fence(rig, wid)
    # An agent started after the reload is given (and recorded with) the new lease.
    later = [e for e in rig.effects if isinstance(e, Spawn) and e.host == "b2"][-1]
    assert (later.lease_s, later.kill_grace_s) == (0.25, 0.05)


def test_unresponsive_remote_worker_has_its_leases_held_back_then_renewed() -> None:
    """A remote worker that stops heartbeating is unresponsive and its leases are held
    back (Renew off); heartbeats back in time recover it and renew them."""
    rig = Rig(remote_config())
    (wid,) = remote_ids(rig)
    rig.advance(3.5)
    health_round(rig, beats=False)
    assert rig.state.data.workers[wid].state == WorkerState.UNRESPONSIVE
    assert Renew(wid, False) in rig.effects
    health_round(rig)
    assert rig.state.data.workers[wid].state == WorkerState.IDLE
    assert Renew(wid, True) in rig.effects


def test_late_finished_of_a_given_up_attempt_is_an_event_never_a_completion() -> None:
    """After the reassign, the old attempt's Finished (from the old agent's spool, told by
    a new agent) is a late_frame event: the task is not completed by it."""
    rig = Rig(remote_config(remote=2))
    wid = start_one(rig)
    old = rig.pool.current[wid].attempt_id
    rig.pool.die(wid, 255)
    rig.deliver()
    for _ in range(int(SHUTDOWN_S) + 2):
        rig.advance(1.0)
        health_round(rig)
    assert rig.task("t").state == TaskState.RUNNING  # its second attempt
    other = next(w for w in remote_ids(rig) if w != wid)
    late = wire.Finished(attempt_id=old, phase="done", exit_code=0, fenced=True)
    rig.box.send_nowait(AgentMessage(other, rig.pool.alive[other], late))
    rig.deliver()
    assert rig.task("t").state == TaskState.RUNNING
    assert not rig.events("task_completed")
    (ev,) = rig.events("late_frame")
    assert ev.data["attempt_id"] == old and ev.data["fenced"] is True


def test_transport_failing_before_hello_is_an_event_with_its_stderr_and_backs_off() -> None:
    """A transport that exits before the hello: transport_failed names the host, the exit
    code and ssh's last line; the restarts back off (growing delays, no tight loop)."""
    rig = Rig(remote_config(), boot=False)
    rig.pool.hello_on_spawn = False
    rig.boot()
    (wid,) = remote_ids(rig)
    err = "ssh: connect to host b2 port 22: Connection refused"
    delays = []
    for _ in range(3):
        gen = rig.pool.alive[wid]
        del rig.pool.alive[wid]
        rig.box.send_nowait(AgentExited(wid, gen, 255, err))
        rig.deliver()
        spawn = [e for e in rig.effects if isinstance(e, Spawn)][-1]
        delays.append(spawn.delay_s)
        assert spawn.host == "b2"
        rig.advance(spawn.delay_s)
    evs = rig.events("transport_failed")
    assert len(evs) == 3
    assert evs[0].data == {"host": "b2", "returncode": 255, "stderr": err}
    assert err in (evs[0].message or "")
    assert delays == sorted(delays) and delays[0] > 0 and delays[-1] > delays[0]


def test_new_agent_sweep_confirms_a_given_up_attempt_dead() -> None:
    """An attempt given up on b2 (its worker retired while unreachable) is settled as soon
    as a new agent's sweep of b2 answers, before its lease would run out; that sweep did
    not list it as live."""
    rig = Rig(remote_config())
    wid = start_one(rig)
    rig.pool.answer_sweep = False
    tid = rig.task("t").id
    rig.pool.die(wid, 255)
    rig.deliver()
    rig.run(actions.cancel, p.CancelParams(task_id=tid))
    rig.deliver()
    assert rig.task("t").state == TaskState.RUNNING
    (new,) = [w for w in remote_ids(rig) if w != wid]
    (sweep,) = [m for w, m in rig.pool.sent if w == new]
    assert sweep == wire.Sweep(live=[])
    rig.box.send_nowait(AgentMessage(new, rig.pool.alive[new], wire.Swept()))
    rig.deliver()
    assert rig.task("t").state == TaskState.CANCELLED


def test_survivors_reported_by_a_remote_agent_are_never_signalled_from_here() -> None:
    """A remote agent's Finished naming survivors (pids of its host) is an event: the
    daemon never checks or SIGKILLs those pids on its own host."""
    rig = Rig(remote_config())
    wid = start_one(rig)
    run = rig.pool.current.pop(wid)
    msg = wire.Finished(
        attempt_id=run.attempt_id, phase="command", exit_code=1, survivors=((1, 12345),)
    )
    rig.box.send_nowait(AgentMessage(wid, rig.pool.alive[wid], msg))
    rig.deliver()
    assert not [e for e in rig.effects if isinstance(e, CheckSurvivors)]
    (ev,) = rig.events("remote_survivors")
    assert ev.data["pids"] == [1]
    assert not rig.task("t").survivors


def test_sweep_lists_every_live_attempt_and_holds_remote_dispatch_until_answered() -> None:
    """A new remote agent's Sweep lists the daemon's live attempts on any host (two host
    names may be one machine); until it is answered no task starts on a remote worker,
    while local workers go on (their attempts hold no lease, no sweep touches them)."""
    rig = Rig(remote_config(local=2, remote=2))
    rig.submit("ws", [{"id": "a", "command": "true", "runs_on": "local"}])
    rig.deliver()
    (local,) = [w for w, _ in rig.sent_runs()]
    live_attempt = rig.pool.current[local].attempt_id
    rig.pool.answer_sweep = False
    restarted, _other = remote_ids(rig)
    rig.pool.die(restarted, 0)  # idle when it exits: restarted, and the new agent sweeps
    rig.deliver()
    sweep = [m for w, m in rig.pool.sent if w == restarted][-1]
    assert isinstance(sweep, wire.Sweep) and sweep.live == [live_attempt]
    rig.submit("ws2", [{"id": "c", "command": "true", "runs_on": "b2"}])
    rig.submit("ws3", [{"id": "b", "command": "true", "runs_on": "local"}])
    rig.deliver()
    assert rig.task("b").state == TaskState.RUNNING
    assert rig.task("c").state == TaskState.QUEUED  # b2's other worker is idle, yet it waits
    rig.box.send_nowait(AgentMessage(restarted, rig.pool.alive[restarted], wire.Swept()))
    rig.deliver()
    assert rig.task("c").state == TaskState.RUNNING


def test_an_agent_that_never_answers_its_sweep_is_retired() -> None:
    """A Sweep unanswered for unresponsive_after_s: a sweep_timeout event, the agent
    retired and replaced by one that is swept in turn."""
    rig = Rig(remote_config(remote=1), boot=False)
    rig.pool.answer_sweep = False
    rig.boot()
    (wid,) = remote_ids(rig)
    rig.advance(3.5)
    health_round(rig)
    (ev,) = rig.events("sweep_timeout")
    assert ev.worker_id == wid
    assert rig.state.data.workers[wid].state == WorkerState.SHUTDOWN
    (new,) = remote_ids(rig)  # its replacement, swept in turn
    assert new != wid and isinstance([m for w, m in rig.pool.sent if w == new][-1], wire.Sweep)
