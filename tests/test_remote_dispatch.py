"""Dispatch to a remote worker in the decision core (tests/rig.py): what a Run carries
there that it carries here, and what it does not. No processes."""

from __future__ import annotations

from supervisor.core.config import Config, HealthConfig, HostConfig, TasksConfig, WorkersConfig
from supervisor.core.context import Containment
from tests.rig import Rig

BASE = "/sys/fs/cgroup/orchd-test"


def test_a_remote_attempt_gets_no_cgroup_of_the_daemons_host() -> None:
    """With containment "cgroup", an attempt here runs in a cgroup of the daemon's subtree
    (in its Run and its record), and an attempt on another host in none: that host's agent
    cannot make a cgroup of the daemon's (its shim holds the attempt instead)."""
    cfg = Config(
        workers=WorkersConfig(count=1, hosts=[HostConfig(host="b2", count=1)]),
        tasks=TasksConfig(kill_grace_s=0.5),
        health=HealthConfig(shutdown_after_s=6.0, agent_lease_s=2.0),
    )
    rig = Rig(cfg, boot=False)
    rig.m.containment = Containment(
        mode="cgroup", setting="auto", base=BASE, attempts=f"{BASE}/attempts"
    )
    rig.boot()
    rig.submit("ws", [{"id": "a", "command": "sleep 1"}, {"id": "b", "command": "sleep 1"}])
    rig.deliver()
    runs = dict(rig.sent_runs())
    workers = rig.state.data.workers
    assert sorted(workers[w].host for w in runs) == ["", "b2"]
    for wid, run in runs.items():
        recorded = rig.state.data.tasks[run.task_id].attempts[-1].cgroup
        if workers[wid].host:
            assert run.cgroup is None and recorded is None
        else:
            assert run.cgroup == f"{BASE}/attempts/{run.attempt_id}" == recorded
