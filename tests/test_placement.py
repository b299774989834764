"""Placement in the decision core (tests/rig.py, no processes): a task's `runs_on`, a
workstream pinned to a host, per-host resources, the waits and events when a host is
missing, and the views that show where things run."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from ctl import render
from supervisor.control import actions
from supervisor.control import protocol as p
from supervisor.core import reconfigure
from supervisor.core.config import Config, ConfigError, HostConfig, ResourceConfig, parse_config
from supervisor.core.errors import OperatorError, WorkstreamFileError
from supervisor.core.figures import resource_figures
from supervisor.core.machine import Machine
from supervisor.core.model import State, TaskState, equal_states
from supervisor.core.placement import Hosts
from supervisor.core.submission import parse_workstream
from supervisor.core.views import task_view, worker_view
from tests.rig import Rig, config, workstream_toml

# No workers of their own (count 0): the tests give local workers a host instead.
HOSTS = [
    HostConfig(host="build-2", count=0, labels=["gpu"]),
    HostConfig(host="build-3", count=0, labels=["gpu", "big"]),
]


def placed_config(*, workers: int = 3, per_host: dict[str, int] | None = None, **kw: Any) -> Config:
    """Settings with two remote hosts (build-2 gpu, build-3 gpu+big) and `per_host`
    resources, besides the rig's usual ones."""
    cfg = config(workers=workers, **kw)
    res = dict(cfg.resources)
    for rid, n in (per_host or {}).items():
        res[rid] = ResourceConfig(max_holders=n, per_host=True)
    return msgspec.structs.replace(
        cfg,
        workers=msgspec.structs.replace(cfg.workers, hosts=list(HOSTS)),
        resources=res,
    )


def place_workers(rig: Rig, hosts: dict[str, str]) -> None:
    """Give workers their hosts (as the pool records them when it starts them)."""

    def go(m: Machine) -> None:
        for wid, host in hosts.items():
            w = m.state.data.workers[wid]
            m.commit("worker", wid, str(w.state), "config", host=host)

    rig.run(go)


def farm(cfg: Config | None = None) -> Rig:
    """A rig with worker-001 local, worker-002 on build-2, worker-003 on build-3."""
    rig = Rig(cfg or placed_config())
    place_workers(rig, {"worker-002": "build-2", "worker-003": "build-3"})
    return rig


def cmd(tid: str, **fields: Any) -> dict[str, Any]:
    return {"id": tid, "command": f"run {tid}"} | fields


def host_of_run(rig: Rig) -> dict[str, str]:
    """bare task id -> host of the worker its attempt was sent to."""
    workers = rig.state.data.workers
    return {
        run.task_id.rpartition("/")[2]: workers[wid].host or "local" for wid, run in rig.sent_runs()
    }


def finish(rig: Rig, task_id: str) -> None:
    wid = next(w for w, r in rig.pool.current.items() if r.task_id.endswith("/" + task_id))
    rig.pool.finish(wid)
    rig.deliver()


def assert_replays(rig: Rig) -> None:
    """Replaying the log gives the live state, resource holders included."""
    replayed = rig.store.replay()
    assert equal_states(replayed.data, rig.state.data)
    assert replayed.graph.holders == {k: v for k, v in rig.state.graph.holders.items() if v} | {
        k: v for k, v in replayed.graph.holders.items() if not v
    }


# -- matching ------------------------------------------------------------------------------


def test_runs_on_a_host_lands_on_that_hosts_worker() -> None:
    """A task naming a host runs on that host's worker, whatever is idle elsewhere."""
    rig = farm()
    rig.submit("ws", [cmd("b3", runs_on="build-3")])
    assert host_of_run(rig) == {"b3": "build-3"}
    assert rig.task("b3").attempts[-1].host == "build-3"
    assert_replays(rig)


def test_runs_on_local_and_labels() -> None:
    """`local` is the daemon's own host; a label is any host that carries it."""
    rig = farm()
    rig.submit("ws", [cmd("here", runs_on="local"), cmd("big", runs_on="big")])
    assert host_of_run(rig) == {"here": "local", "big": "build-3"}


def test_label_goes_to_whichever_labelled_host_is_free() -> None:
    """Two tasks on label gpu take build-2 and build-3; a third waits for one of them."""
    rig = farm()
    rig.submit("ws", [cmd(f"g{i}", runs_on="gpu") for i in range(3)])
    assert sorted(host_of_run(rig).values()) == ["build-2", "build-3"]
    assert rig.task("g2").state == TaskState.QUEUED
    first = next(iter(host_of_run(rig)))
    finish(rig, first)
    assert rig.task("g2").state == TaskState.RUNNING
    assert host_of_run(rig)["g2"] == host_of_run(rig)[first]
    # The local worker stayed idle all along: nothing of label gpu may run there.
    assert "worker-001" in rig.idle_workers()


def test_task_for_a_busy_host_does_not_hold_up_others() -> None:
    """A high-priority task bound for a busy host waits while lower-priority tasks run
    on the hosts that are free (its lane is simply not served)."""
    rig = farm()
    rig.submit("ws1", [cmd("long", runs_on="build-2")])
    rig.submit("ws2", [cmd("urgent", runs_on="build-2", priority=9), cmd("a"), cmd("b")])
    assert rig.task("urgent").state == TaskState.QUEUED
    assert host_of_run(rig)["long"] == "build-2"
    assert {host_of_run(rig)["a"], host_of_run(rig)["b"]} == {"local", "build-3"}
    finish(rig, "long")
    assert host_of_run(rig)["urgent"] == "build-2"


def test_pinned_workstream_runs_every_task_on_its_host() -> None:
    """A workstream with `host` runs each of its tasks on that host, one after another
    when it has one worker, while other hosts stay idle."""
    rig = farm()
    text = (
        'id = "ws"\nhost = "build-2"\n'
        + workstream_toml(
            "x", [cmd("t1"), cmd("t2", runs_on="gpu"), cmd("t3", depends_on=["t1"])]
        ).split("\n", 1)[1]
    )
    rig.run(actions.submit, p.SubmitParams(text=text))
    assert rig.state.data.workstreams["ws"].host == "build-2"
    assert {t.runs_on for t in rig.state.data.tasks.values()} == {"build-2"}
    for _ in range(3):
        running = [t for t in rig.state.data.tasks.values() if t.state == TaskState.RUNNING]
        assert len(running) == 1
        finish(rig, running[0].name)
    assert set(host_of_run(rig).values()) == {"build-2"}
    assert rig.state.data.workstreams["ws"].state == "completed"
    assert_replays(rig)


# -- per-host resources ---------------------------------------------------------------------


def test_per_host_resource_allows_one_holder_per_host() -> None:
    """A per-host resource with max_holders 1 has one holder on each host at once: three
    tasks run on three hosts, a fourth waits, and takes the host that frees first."""
    rig = farm(placed_config(per_host={"git_repo_write": 1}))
    rig.submit("ws", [cmd(f"w{i}", resources=["git_repo_write"]) for i in range(4)])
    running = {t.name: t for t in rig.state.data.tasks.values() if t.state == TaskState.RUNNING}
    assert len(running) == 3
    holds = sorted(h for t in running.values() for h in t.holds)
    assert holds == ["git_repo_write@build-2", "git_repo_write@build-3", "git_repo_write@local"]
    graph = rig.state.graph
    assert all(len(graph.holders_of(h)) == 1 for h in holds)
    assert rig.task("w3").state == TaskState.QUEUED
    finish(rig, "w1")
    assert rig.task("w3").state == TaskState.RUNNING
    assert rig.task("w3").holds == rig.task("w1").holds
    assert_replays(rig)


def test_per_host_resource_full_on_the_idle_host_waits_for_a_release() -> None:
    """A task whose per-host resource is full on the only host with an idle worker waits
    (the idle worker stays idle), and goes when the holder there ends."""
    cfg = placed_config(workers=2, per_host={"repo": 1})
    rig = Rig(cfg)
    place_workers(rig, {"worker-001": "build-2", "worker-002": "build-2"})
    rig.submit("ws", [cmd("first", resources=["repo"]), cmd("second", resources=["repo"])])
    assert rig.task("first").state == TaskState.RUNNING
    assert rig.task("second").state == TaskState.QUEUED
    assert len(rig.idle_workers()) == 1
    view = next(r for r in resource_figures(rig.m) if r["id"] == "repo")
    assert view["holders_by_host"] == {"build-2": [rig.full("first")]}
    assert view["waiting"] == [rig.full("second")]
    table = render.resources_table([view])
    assert f"build-2:{rig.full('first')}" in table and "(1/host)" in table
    finish(rig, "first")
    assert rig.task("second").state == TaskState.RUNNING
    assert rig.task("second").holds == ["repo@build-2"]


def test_per_host_wait_ends_when_another_host_gets_an_idle_worker() -> None:
    """A task blocked by a full per-host resource on every idle host goes to a host whose
    worker becomes idle later without any release (a worker that comes back)."""
    cfg = placed_config(workers=3, per_host={"repo": 1})
    rig = Rig(cfg)
    place_workers(rig, {w: "build-2" for w in ("worker-001", "worker-002")})
    place_workers(rig, {"worker-003": "build-3"})
    rig.run(lambda m: m.rt.take_idle("worker-003"))  # as health does for a silent worker
    rig.submit("ws", [cmd("a", resources=["repo"]), cmd("b", resources=["repo"])])
    assert rig.task("b").state == TaskState.QUEUED
    rig.run(lambda m: m.rt.set_idle("worker-003"))  # it recovered
    assert rig.task("b").state == TaskState.RUNNING
    assert rig.task("b").holds == ["repo@build-3"]


def test_per_host_and_global_resources_together() -> None:
    """A global resource limits across hosts while a per-host one limits on each."""
    rig = farm(placed_config(per_host={"repo": 2}, resources={"licence": 1}))
    rig.submit("ws", [cmd(f"t{i}", resources=["licence", "repo"]) for i in range(2)])
    states = sorted(str(t.state) for t in rig.state.data.tasks.values())
    assert states == ["queued", "running"]
    running = next(t for t in rig.state.data.tasks.values() if t.state == TaskState.RUNNING)
    assert running.holds[0] == "licence" and running.holds[1].startswith("repo@")


def test_rollback_of_a_placed_dispatch_leaves_nothing_behind() -> None:
    """A step that placed tasks but could not be written is taken back whole: the tasks
    are queued again, hold nothing, and go out once the log takes writes."""
    rig = farm(placed_config(per_host={"repo": 1}))
    rig.store.fail_next_writes(1)
    rig.submit("ws", [cmd("a", resources=["repo"], runs_on="gpu")])
    assert rig.aborted == 1
    assert not rig.state.data.tasks
    assert not any(rig.state.graph.holders.values())
    rig.submit("ws", [cmd("a", resources=["repo"], runs_on="gpu")])
    assert rig.task("a").state == TaskState.RUNNING
    assert_replays(rig)


# -- hosts that go away ---------------------------------------------------------------------


def test_reload_without_the_host_makes_its_tasks_wait_with_an_event() -> None:
    """A queued task whose host a reload removed waits, reported by an event naming the
    known hosts; a reload that brings the host back lets it run."""
    rig = farm()
    rig.submit("busy", [cmd("hold", runs_on="build-3")])
    rig.submit("ws", [cmd("next", runs_on="build-3")])
    assert rig.task("next").state == TaskState.QUEUED
    without = msgspec.structs.replace(
        rig.m.cfg, workers=msgspec.structs.replace(rig.m.cfg.workers, hosts=HOSTS[:1])
    )
    rig.run(reconfigure.apply, without, "test")
    (ev,) = rig.events("task_host_missing")
    assert ev.tasks == [rig.full("next")]
    assert "build-3" in ev.message and "build-2" in ev.message
    finish(rig, "hold")  # its worker is retired: its host is gone
    assert rig.task("next").state == TaskState.QUEUED
    assert rig.state.data.workers["worker-003"].state == "shutdown"
    # Submitting for a host that is gone is refused outright.
    refused = rig.submit("ws2", [cmd("late", runs_on="build-3")])
    assert isinstance(refused, OperatorError) and "known: local, build-2, gpu" in str(refused)
    # The host comes back with a worker of its own (started through its transport).
    hosts = [HOSTS[0], msgspec.structs.replace(HOSTS[1], count=1)]
    back = msgspec.structs.replace(
        rig.m.cfg, workers=msgspec.structs.replace(rig.m.cfg.workers, hosts=hosts)
    )
    rig.run(reconfigure.apply, back, "test")
    rig.deliver()
    assert rig.task("next").state == TaskState.RUNNING


# -- submission -----------------------------------------------------------------------------


def parse(text: str, hosts: Hosts | None = None) -> Any:
    cfg = placed_config(per_host={"repo": 1})
    return parse_workstream(
        text.encode(),
        source="ws.toml",
        defaults=cfg.tasks,
        known_resources={"repo"},
        existing_task_ids=(),
        new_id=lambda: "ws-new",
        hosts=hosts if hosts is not None else Hosts(cfg),
    )


def problems(text: str) -> list[str]:
    with pytest.raises(WorkstreamFileError) as exc:
        parse(text)
    return exc.value.problems


def test_unknown_runs_on_is_refused_listing_the_known_names() -> None:
    """A `runs_on` naming no host or label is refused with every name it may use."""
    (msg,) = problems('[[tasks]]\nid = "a"\ncommand = "x"\nruns_on = "gpu2"\n')
    assert "`runs_on` 'gpu2' names no configured host or label" in msg
    assert "known: local, build-2, build-3, gpu, big" in msg


def test_pinned_host_must_be_a_host_and_agree_with_runs_on() -> None:
    """A workstream's `host` is one host (a label is refused, saying so); a task's
    `runs_on` that contradicts it is refused; one that agrees is fine."""
    (msg,) = problems('host = "gpu"\n[[tasks]]\nid = "a"\ncommand = "x"\n')
    assert "is a label (of build-2, build-3)" in msg
    (msg,) = problems('host = "nowhere"\n[[tasks]]\nid = "a"\ncommand = "x"\n')
    assert "not a configured host (known: local, build-2, build-3)" in msg
    (msg,) = problems('host = "build-2"\n[[tasks]]\nid = "a"\ncommand = "x"\nruns_on = "big"\n')
    assert "contradicts the workstream's `host` 'build-2'" in msg and "build-3" in msg
    ws, tasks = parse('host = "build-2"\n[[tasks]]\nid = "a"\ncommand = "x"\nruns_on = "gpu"\n')
    assert ws.host == "build-2" and tasks[0].runs_on == "build-2"
    ws, tasks = parse('host = "local"\n[[tasks]]\nid = "a"\ncommand = "x"\n')
    assert tasks[0].runs_on == "local"


def test_without_hosts_only_local_is_known() -> None:
    """With no [[workers.hosts]], `local` is the one name a task may use."""
    (msg,) = problems_with(Hosts(), '[[tasks]]\nid = "a"\ncommand = "x"\nruns_on = "build-2"\n')
    assert "(known: local)" in msg
    _, tasks = parse('[[tasks]]\nid = "a"\ncommand = "x"\nruns_on = "local"\n', Hosts())
    assert tasks[0].runs_on == "local"


def problems_with(hosts: Hosts, text: str) -> list[str]:
    with pytest.raises(WorkstreamFileError) as exc:
        parse(text, hosts)
    return exc.value.problems


def test_a_resource_instance_by_name_is_refused_with_the_way_to_say_it() -> None:
    """`repo@build-2` in `resources` is refused, pointing at `repo` plus `runs_on`."""
    (msg,) = problems('[[tasks]]\nid = "a"\ncommand = "x"\nresources = ["repo@build-2"]\n')
    assert "unknown resource 'repo@build-2'" in msg
    assert "`runs_on = 'build-2'`" in msg


def test_config_refuses_hosts_a_runs_on_could_not_tell_apart() -> None:
    """A host listed twice, a host or label named `local`, a label that is another host's
    name: each refused with its place."""
    text = """
[[workers.hosts]]
host = "a"
labels = ["b"]
[[workers.hosts]]
host = "b"
labels = ["local"]
[[workers.hosts]]
host = "a"
[[workers.hosts]]
host = "local"
"""
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "orchd.toml")
    msg = str(exc.value)
    assert "label 'b' of 'a'" in msg
    assert "label 'local' of 'b'" in msg
    assert "host 'a' is listed twice" in msg
    assert "`host` 'local' cannot name a host" in msg
    cfg = parse_config("[resources.repo]\nper_host = true\nmax_holders = 2\n")
    assert cfg.resources["repo"].per_host and Hosts(cfg).per_host == {"repo"}


# -- views ----------------------------------------------------------------------------------


def test_views_show_hosts_runs_on_and_where_attempts_ran() -> None:
    """Workers show their host, tasks their runs_on and each attempt's host, in JSON and
    in the tables."""
    rig = farm()
    rig.submit("ws", [cmd("a", runs_on="gpu"), cmd("b")])
    workers = [worker_view(w, None) for w in rig.state.data.workers.values()]
    assert {w["id"]: w["host"] for w in workers} == {
        "worker-001": "local",
        "worker-002": "build-2",
        "worker-003": "build-3",
    }
    table = render.workers_table(workers)
    assert table.splitlines()[0].split()[:3] == ["WORKER", "STATE", "HOST"]
    assert "build-3" in table
    tv = task_view(rig.task("a"))
    assert tv["runs_on"] == "gpu" and tv["attempts"][0]["host"].startswith("build-")
    assert task_view(rig.task("b"))["runs_on"] is None
    tasks_table = render.tasks_table([tv, task_view(rig.task("b"))])
    assert "RUNS_ON" in tasks_table.splitlines()[0] and "gpu" in tasks_table
    detail = render.task_detail(tv)
    assert "runs on:    gpu" in detail and "@build-" in detail


def test_snapshot_rebuilds_per_host_holders() -> None:
    """A state loaded from its data alone (a snapshot) has the same holders per host."""
    rig = farm(placed_config(per_host={"repo": 1}))
    rig.submit("ws", [cmd(f"t{i}", resources=["repo"]) for i in range(3)])
    loaded = State(msgspec.convert(msgspec.to_builtins(rig.state.data), type(rig.state.data)))
    live = {k: sorted(v) for k, v in rig.state.graph.holders.items() if v}
    assert {k: sorted(v) for k, v in loaded.graph.holders.items() if v} == live
    assert len(live) == 3


def test_tasks_for_a_busy_host_are_not_touched_while_others_run() -> None:
    """Hundreds of tasks queued for a busy host stay in their lane, unlooked-at, while
    tasks that may run anywhere go through the other workers (no scan per idle worker)."""
    rig = farm()
    rig.submit("busy", [cmd("hold", runs_on="build-2")])
    rig.submit("many", [cmd(f"m{i}", runs_on="build-2") for i in range(300)])
    rt = rig.m.rt
    assert len(rt.lane_tasks("build-2")) == 300
    rig.submit("free", [cmd(f"f{i}") for i in range(20)])
    for i in range(20):
        finish(rig, f"f{i}")
    assert all(rig.task(f"f{i}").state == TaskState.COMPLETED for i in range(20))
    assert len(rt.lane_tasks("build-2")) == 300  # never popped, never parked
    assert not list(rt.parked_resources())
    finish(rig, "hold")
    assert rig.task("m0").state == TaskState.RUNNING
    assert len(rt.lane_tasks("build-2")) == 299
