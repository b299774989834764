"""Placement with the real daemon: workers on other hosts through the local `env`
transport (the agent runs on this machine exactly as a remote one, with ORCHD_FAKE_HOST
naming its host), real tasks that write down where they ran, real orchctl."""

from __future__ import annotations

import itertools
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import FAKE_HOST_TRANSPORT, Daemon, assert_no_leftovers, to_toml

# A task's command: where it ran (the agent's fake host; unset on the daemon's own).
WHERE = 'echo "${ORCHD_FAKE_HOST:-local}" > %s'


@pytest.fixture
def farm(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon with one local worker, build-2 (label gpu) and build-3 (labels gpu, big),
    one worker each, and git_repo_write per host."""
    yield from _farm(tmp_path, local=1, per_host=1, counts=(1, 1))


def _farm(
    tmp_path: Path, *, local: int, per_host: int, counts: tuple[int, int]
) -> Iterator[Daemon]:
    hosts = [
        {"host": "build-2", "count": counts[0], "labels": ["gpu"]},
        {"host": "build-3", "count": counts[1], "labels": ["gpu", "big"]},
    ]
    d = Daemon(
        tmp_path,
        {
            "workers": {
                "count": local,
                "hosts": [
                    h | {"transport": FAKE_HOST_TRANSPORT, "python": sys.executable} for h in hosts
                ],
            },
            # Placement is not about health: timings that a loaded machine's slow agent
            # start (a fresh interpreter each) does not trip.
            "health": {
                "unresponsive_after_s": 3.0,
                "shutdown_after_s": 10.0,
                "agent_lease_s": 3.0,
            },
            "resources": {"git_repo_write": {"max_holders": per_host, "per_host": True}},
        },
    )
    d.start()
    try:
        Daemon.wait_for(
            lambda: sum(w["state"] == "idle" for w in d.workers()) == local + sum(counts),
            20.0,
            "every worker idle",
        )
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
        assert_no_leftovers()


def ws_file(tasks: list[dict[str, Any]], head: str = "") -> str:
    """A workstream file. Each task may be retried often: on this machine every remote
    agent that starts sweeps the user's marked processes that its daemon does not list for
    its host (the fake hosts all being this machine, other daemons' attempts too), and a
    swept attempt is only retried; where it ran, and the probes, are what is checked."""
    out = [head]
    for t in tasks:
        t = {"max_retries": 10} | t
        out.append("[[tasks]]")
        out.extend(f"{k} = {json.dumps(v)}" for k, v in t.items())
    return "\n".join(out) + "\n"


def wait_done(d: Daemon, ws_id: str) -> None:
    """Wait for the workstream to complete; on a timeout, show the tasks, the workers and
    the last events (what a loaded machine's slow start made of them)."""
    try:
        d.wait_ws(ws_id, "completed", timeout=60)
    except AssertionError:
        print(d.ctl("tasks").stdout, d.ctl("workers").stdout)
        print([(e["event"], e.get("message")) for e in d.events()][-20:])
        raise


def test_runs_on_lands_on_the_named_host(farm: Daemon, tmp_path: Path) -> None:
    """Tasks naming a host, a label and `local` run on a worker of that host; orchctl
    shows each worker's host and where each attempt ran."""
    out = tmp_path / "where"
    out.mkdir()
    want = {"b2": "build-2", "big": "build-3", "here": "local"}
    runs_on = {"b2": "build-2", "big": "big", "here": "local"}
    farm.submit(
        ws_file(
            [{"id": t, "command": WHERE % (out / t), "runs_on": runs_on[t]} for t in want],
            'id = "ws-place"',
        )
    )
    wait_done(farm, "ws-place")
    assert {t: (out / t).read_text().strip() for t in want} == want
    for t, host in want.items():
        shown = farm.ctl_json("show", f"ws-place/{t}")
        assert shown["runs_on"] == runs_on[t]
        assert shown["attempts"][-1]["host"] == host
    workers = farm.ctl_json("workers")
    assert sorted(w["host"] for w in workers) == ["build-2", "build-3", "local"]
    table = farm.ctl("workers").stdout
    assert table.splitlines()[0].split()[2] == "HOST"
    assert "build-2" in table and "build-3" in table
    detail = farm.ctl("show", "ws-place/b2").stdout
    assert "runs on:    build-2" in detail and "@build-2" in detail


def test_pinned_workstream_runs_every_task_on_its_host(farm: Daemon, tmp_path: Path) -> None:
    """A workstream with `host = "build-3"` runs all its tasks there (a chain and a fan);
    a contradicting runs_on is refused with the file, naming the hosts."""
    out = tmp_path / "where"
    out.mkdir()
    names = ["a", "b", "c", "d"]
    tasks = [{"id": t, "command": WHERE % (out / t)} for t in names]
    tasks[1]["depends_on"] = ["a"]
    tasks[2]["depends_on"] = ["a"]
    tasks[3]["depends_on"] = ["b", "c"]
    tasks[3]["runs_on"] = "big"  # agrees: build-3 carries it
    farm.submit(ws_file(tasks, 'id = "ws-pin"\nhost = "build-3"'))
    wait_done(farm, "ws-pin")
    assert {(out / t).read_text().strip() for t in names} == {"build-3"}
    bad = tmp_path / "bad.toml"
    bad.write_text(
        ws_file([{"id": "x", "command": "true", "runs_on": "build-2"}], 'host = "build-3"')
    )
    r = farm.ctl("submit", str(bad))
    assert r.returncode != 0
    assert "contradicts the workstream's `host` 'build-3'" in r.stderr
    unknown = tmp_path / "unknown.toml"
    unknown.write_text(ws_file([{"id": "x", "command": "true", "runs_on": "build-9"}]))
    r = farm.ctl("submit", str(unknown))
    assert r.returncode != 0
    assert "known: local, build-2, build-3, gpu, big" in r.stderr


@pytest.fixture
def wide_farm(tmp_path: Path) -> Iterator[Daemon]:
    """Two local workers and two on build-2; git_repo_write one holder per host."""
    yield from _farm(tmp_path, local=2, per_host=1, counts=(2, 0))


def test_per_host_resource_has_one_holder_per_host(wide_farm: Daemon, tmp_path: Path) -> None:
    """git_repo_write per host: a flock probe per host is never found held by another
    task on the same host, while holders on the two hosts run at the same time."""
    probe = tmp_path / "probe"
    probe.mkdir()
    log = probe / "intervals"
    # Each task takes its host's lock without waiting; finding it taken is a clash.
    cmd = (
        'h="${ORCHD_FAKE_HOST:-local}"; '
        f'flock -n "{probe}/lock-$h" sh -c \'s=$(date +%s.%N); sleep 0.3; '
        f'echo "$0 $s $(date +%s.%N)" >> "{log}"\' "$h" || echo "CLASH $h" >> "{log}"'
    )
    n = 8
    wide_farm.submit(
        ws_file(
            [{"id": f"w{i}", "command": cmd, "resources": ["git_repo_write"]} for i in range(n)],
            'id = "ws-res"',
        )
    )
    wait_done(wide_farm, "ws-res")
    lines = log.read_text().splitlines()
    assert not [x for x in lines if x.startswith("CLASH")], lines
    spans: dict[str, list[tuple[float, float]]] = {}
    for line in lines:
        host, start, end = line.split()
        spans.setdefault(host, []).append((float(start), float(end)))
    assert sorted(spans) == ["build-2", "local"]
    assert sum(len(v) for v in spans.values()) == n
    for host, held in spans.items():
        held.sort()
        for (_, end), (start, _) in itertools.pairwise(held):
            assert start >= end, f"two holders on {host} at once: {held}"
    overlap = any(a0 < b1 and b0 < a1 for a0, a1 in spans["local"] for b0, b1 in spans["build-2"])
    assert overlap, f"the two hosts never held their instance at the same time: {spans}"
    shown = wide_farm.ctl_json("show", "ws-res/w0")
    assert shown["attempts"][-1]["host"] in ("build-2", "local")
    res = {r["id"]: r for r in wide_farm.ctl_json("resources")}
    assert res["git_repo_write"]["per_host"] is True


def test_reload_without_the_host_makes_its_tasks_wait(farm: Daemon, tmp_path: Path) -> None:
    """A reload that drops build-3 while a task for it is queued: the task waits, named by
    a task_host_missing event; a reload that brings build-3 back runs it there."""
    assert farm.proc is not None
    out = tmp_path / "where"
    out.mkdir()
    gate = tmp_path / "gate"
    hold = f"while [ ! -e {gate} ]; do sleep 0.05; done"
    farm.submit(
        ws_file(
            [
                {"id": "hold", "command": hold, "runs_on": "build-3"},
                {"id": "next", "command": WHERE % (out / "next"), "runs_on": "build-3"},
            ],
            'id = "ws-gone"',
        )
    )
    farm.wait_task("ws-gone/hold", "running")
    full = dict(farm.cfg)
    without = json.loads(json.dumps(full))
    without["workers"]["hosts"] = [h for h in full["workers"]["hosts"] if h["host"] != "build-3"]
    farm.config_path.write_text(to_toml(without))
    farm.proc.send_signal(signal.SIGHUP)
    ev = farm.wait_event("task_host_missing")
    assert ev["tasks"] == ["ws-gone/next"]
    assert "build-3" in ev["message"] and "known: local, build-2" in ev["message"]
    gate.touch()  # the holder ends; its worker goes with its host
    farm.wait_task("ws-gone/hold", "completed")
    assert farm.task("ws-gone/next")["state"] == "queued"
    assert "no configured host is 'build-3'" in farm.ctl("debug", "ws-gone/next").stdout
    farm.config_path.write_text(to_toml(full))
    farm.proc.send_signal(signal.SIGHUP)
    wait_done(farm, "ws-gone")
    assert (out / "next").read_text().strip() == "build-3"
