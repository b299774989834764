"""Every path by which the daemon kills a task, in process containment (session, subreaper
and marker sweep, no cgroups), against the real daemon and real processes: a SIGSTOPped
worker shut down, a timeout, `orchctl cancel`, a daemon SIGKILL and restart, a tree of 200
processes, recovery of 10 interrupted attempts that ignore SIGTERM, and a clock step of the
boot time. The escapee `(setsid env -i sleep …&)` is in a session of its own with a cleared
environment, so neither its process group nor the attempt marker finds it; only the
agent (a child subreaper that adopted it) does.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor.store.logfile import seal
from supervisor.workers import proctree
from tests.harness import (
    Daemon,
    assert_no_leftovers,
    event_matches,
    marker_processes,
    orchd_processes,
)

GRACE_S = 0.3
PROCESS_MODE = {
    "workers": {"count": 2, "containment": "process"},
    "tasks": {"kill_grace_s": GRACE_S},
}


def _overrides(**extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(PROCESS_MODE))
    for key, value in extra.items():
        out.setdefault(key, {}).update(value)
    return out


def _resume_all() -> None:
    for proc in orchd_processes():
        try:
            if proc.status() == psutil.STATUS_STOPPED:
                proc.resume()
        except psutil.NoSuchProcess:
            pass


def _finish(*daemons: Daemon, seconds: str | None = None) -> None:
    """Stop every daemon still running; nothing of theirs may be left (escapees included:
    they carry no marker and no test tag, so they are looked up by their command line)."""
    _resume_all()
    for d in daemons:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
    try:
        assert_no_leftovers()
    finally:
        if seconds is not None:
            left = _sleepers(seconds)
            for proc in left:
                proc.kill()
            assert not left, f"escapees left behind: {[p.pid for p in left]}"


@pytest.fixture
def seconds() -> str:
    """A sleep length no other test uses: it names this test's escapee."""
    return f"313.{random.randrange(10**6):06d}"


def _sleepers(seconds: str) -> list[psutil.Process]:
    """Live `sleep SECONDS` processes (the escapee, found by its command line alone)."""
    out = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["cmdline"] == ["sleep", seconds] and proc.info["status"] != "zombie":
            out.append(proc)
    return out


def _escapee_command(tmp: Path, seconds: str, rest: str = "sleep 300") -> str:
    """The first attempt starts the escapee; any later one only runs `rest`."""
    flag = tmp / f"escaped-{seconds}"
    return f"if [ ! -e {flag} ]; then touch {flag}; (setsid env -i sleep {seconds} &); fi; {rest}"


def _submit(d: Daemon, task_id: str, command: str, **extra: Any) -> None:
    fields = "".join(f"\n{k} = {json.dumps(v)}" for k, v in extra.items())
    d.submit(
        f'id = "ws-{task_id}"\n[[tasks]]\nid = "{task_id}"\ncommand = {json.dumps(command)}'
        f"{fields}\n",
        f"{task_id}.toml",
    )


def _running(d: Daemon, task_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(task, its busy worker) once the task's process is known."""
    found: dict[str, Any] = {}

    def check() -> bool:
        t = d.task(task_id)
        if t["state"] != "running" or t.get("pid") is None:
            return False
        w = next(w for w in d.workers() if w["id"] == t["worker_id"])
        found.update(task=t, worker=w)
        return bool(w["state"] == "busy")

    Daemon.wait_for(check, 40, f"{task_id} to run on a busy worker")
    return found["task"], found["worker"]


def _escapee(seconds: str) -> psutil.Process:
    box: list[psutil.Process] = []

    def up() -> bool:
        box[:] = _sleepers(seconds)
        return len(box) == 1

    Daemon.wait_for(up, 10, f"the escapee sleep {seconds}")
    return box[0]


def _gone_within(procs: list[psutil.Process], within_s: float, what: str) -> None:
    """psutil finds none of `procs` alive within `within_s`."""
    Daemon.wait_for(lambda: not any(proctree.alive(p) for p in procs), within_s, what)


def _agent(worker: dict[str, Any]) -> psutil.Process:
    return psutil.Process(worker["pid"])


# --- the escapee, by every kill path ---------------------------------------------------


def test_escapee_of_a_stopped_worker_shut_down_at_shutdown_after_s(
    tmp_path: Path, seconds: str
) -> None:
    """A SIGSTOPped worker shut down at shutdown_after_s: its attempt's tree, the
    env-cleared setsid escapee included, is killed before the agent, within the grace."""
    d = Daemon(tmp_path, _overrides()).start()
    try:
        _submit(d, "held", _escapee_command(tmp_path, seconds))
        task, worker = _running(d, "held")
        escapee, agent = _escapee(seconds), _agent(worker)
        first = task["attempts"][-1]["attempt_id"]
        agent.suspend()
        d.wait_event("worker_shutdown", timeout=15, worker_id=worker["id"])
        _gone_within([escapee], GRACE_S + 1.0, "the escapee to be killed")
        _gone_within([agent], GRACE_S + 1.0, "the stopped agent to be killed")
        assert not marker_processes(first)
        assert not d.events("task_tree_survivors")
        Daemon.wait_for(lambda: len(d.task("held")["attempts"]) == 2, 15, "the reassigned attempt")
        t = d.wait_task("held", "running")  # reassigned, on another worker
        assert t["worker_id"] != worker["id"] and t["retry_count"] == 0
        assert t["attempts"][0]["failure_kind"] == "worker_lost"
    finally:
        _finish(d, seconds=seconds)


@pytest.mark.parametrize("stopped", [False, True], ids=["healthy", "stopped"])
def test_escapee_of_a_timed_out_attempt(tmp_path: Path, seconds: str, stopped: bool) -> None:
    """A timeout kills the escapee, whether the agent handles it or (stopped) the daemon."""
    d = Daemon(tmp_path, _overrides()).start()
    try:
        _submit(d, "slow", _escapee_command(tmp_path, seconds), timeout_s=1.5, max_retries=1)
        _, worker = _running(d, "slow")
        escapee, agent = _escapee(seconds), _agent(worker)
        if stopped:
            agent.suspend()
        d.wait_event("task_timeout", task_id="slow")
        if stopped:  # unresponsive at its timeout: the daemon retires it with the tree
            d.wait_event("worker_shutdown", worker_id=worker["id"])
        _gone_within([escapee], GRACE_S + 1.0, "the escapee")
        t = d.wait_task("slow", "failed")
        assert t["failure_kind"] == "timeout"
        if stopped:
            _gone_within([agent], GRACE_S + 1.0, "the stopped agent to be killed")
    finally:
        _finish(d, seconds=seconds)


@pytest.mark.parametrize("stopped", [False, True], ids=["healthy", "stopped"])
def test_escapee_of_a_cancelled_task(tmp_path: Path, seconds: str, stopped: bool) -> None:
    """`orchctl cancel` kills the escapee, whether the agent handles it or (stopped, so
    unresponsive) the daemon kills the tree and then the agent."""
    d = Daemon(tmp_path, _overrides()).start()
    try:
        _submit(d, "doomed", _escapee_command(tmp_path, seconds))
        _, worker = _running(d, "doomed")
        escapee, agent = _escapee(seconds), _agent(worker)
        if stopped:
            agent.suspend()
            d.wait_event("worker_unresponsive", worker_id=worker["id"])
        r = d.ctl("--yes", "cancel", "doomed")
        assert r.returncode == 0, r.stderr
        _gone_within([escapee], GRACE_S + 1.0, "the escapee")
        assert d.wait_task("doomed", "cancelled")["state"] == "cancelled"
        if stopped:
            _gone_within([agent], GRACE_S + 1.0, "the stopped agent to be killed")
    finally:
        _finish(d, seconds=seconds)


@pytest.mark.parametrize("stopped", [False, True], ids=["healthy", "stopped"])
def test_escapee_after_a_daemon_sigkill_and_restart(
    tmp_path: Path, seconds: str, stopped: bool
) -> None:
    """After kill -9 of the daemon, the escapee is gone: killed by its agent at EOF, or,
    when that agent is stopped, by the next daemon's recovery (the old agent's children,
    found by its recorded pid and start ticks), before it answers on its socket."""
    d = Daemon(tmp_path, _overrides()).start()
    d2 = Daemon(tmp_path, d.cfg)
    try:
        _submit(d, "cut", _escapee_command(tmp_path, seconds))
        _, worker = _running(d, "cut")
        escapee, agent = _escapee(seconds), _agent(worker)
        if stopped:
            agent.suspend()
        d.kill()
        if stopped:
            assert proctree.alive(escapee) and proctree.alive(agent)
        d2.start()
        _gone_within([escapee, agent], GRACE_S + 1.0, "the escapee and the old agent")
        t = d2.task("cut")
        assert t["attempts"][0]["failure_kind"] == "interrupted" and t["retry_count"] == 0
        assert not d2.events("task_tree_survivors")
    finally:
        _finish(d, d2, seconds=seconds)


# --- a big tree ------------------------------------------------------------------------

# Four sessions of 40 sleeps under a shell each, a job-control shell putting 34 sleeps in
# process groups of their own, and one double-forked escapee: 200 processes below the
# attempt's own shell.
_BIG_TREE = (
    "for s in 1 2 3 4; do setsid sh -c 'for i in $(seq 40); do sleep 300 & done; wait' & done; "
    "bash -c 'set -m; for i in $(seq 34); do sleep 300 & done; wait' & "
    "(setsid sleep 300 &); "
    "wait"
)


@pytest.mark.parametrize("stopped", [False, True], ids=["healthy", "stopped"])
def test_two_hundred_children_in_sessions_and_groups_killed_on_timeout(
    tmp_path: Path, stopped: bool
) -> None:
    """A task with 200 sleeping children in several sessions and process groups is killed
    whole on timeout: by its agent, or by the daemon when the agent is stopped."""
    d = Daemon(tmp_path, _overrides()).start()
    try:
        _submit(d, "big", _BIG_TREE, timeout_s=6.0, max_retries=1)
        task, worker = _running(d, "big")
        aid = task["attempts"][-1]["attempt_id"]
        Daemon.wait_for(lambda: len(marker_processes(aid)) >= 201, 15, "200 children")
        procs = marker_processes(aid)
        sessions = {os.getsid(p.pid) for p in procs}
        groups = {os.getpgid(p.pid) for p in procs}
        assert len(sessions) >= 6 and len(groups) >= 30
        agent = _agent(worker)
        if stopped:
            agent.suspend()
        d.wait_event("task_timeout", timeout=15, task_id="big")
        if stopped:  # unresponsive at its timeout: the daemon retires it with the tree
            d.wait_event("worker_shutdown", worker_id=worker["id"])
        _gone_within(procs, GRACE_S + 1.0, "the 201 processes")
        assert d.wait_task("big", "failed")["failure_kind"] == "timeout"
        assert not marker_processes(aid)
    finally:
        _finish(d)


# --- recovery --------------------------------------------------------------------------


def _kill_lines(d: Daemon, markers: set[str]) -> list[dict[str, Any]]:
    out = []
    for line in d.output.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "task_tree_killed" and rec.get("marker") in markers:
            out.append(rec)
    return out


def test_recovery_kills_ten_term_ignoring_attempts_within_one_grace(tmp_path: Path) -> None:
    """Ten interrupted attempts that ignore SIGTERM, nine of their agents stopped: after
    kill -9 of the daemon the next one kills every tree at once (one shared grace: the
    kills overlap), then every old agent, and only then says READY=1 (after telling
    systemd to extend its start timeout) and listens; each task runs again."""
    n, grace = 10, 1.0
    # Ten agents on a loaded machine: generous health timings, so that none is taken for
    # unresponsive (and its task reassigned) before the crash this test is about.
    slow_health = {"unresponsive_after_s": 10.0, "shutdown_after_s": 30.0}
    d = Daemon(
        tmp_path,
        _overrides(workers={"count": n}, tasks={"kill_grace_s": grace}, health=slow_health),
    ).start()
    d2 = Daemon(tmp_path, d.cfg)
    notify_path = str(tmp_path / "notify.sock")
    try:
        for i in range(n):
            flag = tmp_path / f"ignored-{i}"
            _submit(
                d,
                f"t{i}",
                f"if [ ! -e {flag} ]; then touch {flag}; trap '' TERM; fi; "
                "while :; do sleep 0.05; done",
            )
        running = [_running(d, f"t{i}") for i in range(n)]
        markers = {t["attempts"][-1]["attempt_id"] for t, _ in running}
        trees = [p for m in markers for p in marker_processes(m)]
        agents = [_agent(w) for _, w in running]
        for agent in agents[1:]:
            agent.suspend()
        d.kill()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
            ns.bind(notify_path)
            began = time.monotonic()
            d2.start(env_extra={"NOTIFY_SOCKET": notify_path})
            ready_s = time.monotonic() - began
            ns.settimeout(5)
            said: list[str] = []
            while not any("READY=1" in s for s in said):
                said.append(ns.recv(4096).decode())
        print(
            f"recovery of {n} TERM-ignoring attempts, grace {grace}s: socket after {ready_s:.2f}s"
        )
        assert not any(proctree.alive(p) for p in trees + agents)
        # The one healthy agent killed its own tree at EOF; the daemon killed the others.
        held = {t["attempts"][-1]["attempt_id"] for t, _ in running[1:]}
        first: dict[str, dict[str, Any]] = {}
        for rec in _kill_lines(d2, held):
            first.setdefault(rec["marker"], rec)
        assert set(first) == held, "every stopped agent's attempt tree was killed"
        # One shared grace: every kill began before any of them ended.
        assert max(r["began"] for r in first.values()) < min(r["ended"] for r in first.values())
        assert all(r["grace_s"] == grace for r in first.values())
        # systemd was asked to wait longer before READY=1 came.
        ready_at = next(i for i, s in enumerate(said) if "READY=1" in s)
        assert any("EXTEND_TIMEOUT_USEC=" in s for s in said[:ready_at])
        ev = d2.events("recovery_kill")
        assert len(ev) == 1 and len(ev[0]["data"]["attempts"]) == n
        assert len(ev[0]["data"]["agents"]) == n
        for i in range(n):
            t = d2.task(f"t{i}")
            (cut,) = [a for a in t["attempts"] if a["attempt_id"] in markers]
            assert cut["failure_kind"] == "interrupted" and t["retry_count"] == 0
        assert not d2.events("task_tree_survivors")
    finally:
        _finish(d, d2)


# --- identity across a clock step of the boot time --------------------------------------

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nsenter") is None,
    reason="needs root, unshare and nsenter (a private mount namespace)",
)


def _fake_stat(path: Path, shift_s: int) -> Path:
    """/proc/stat with its btime moved by `shift_s` (as a clock step moves it)."""
    lines = Path("/proc/stat").read_text().splitlines()
    out = [
        f"btime {int(line.split()[1]) + shift_s}" if line.startswith("btime ") else line
        for line in lines
    ]
    path.write_text("\n".join(out) + "\n")
    return path


def _btime_seen_by(pid: int) -> int:
    for line in Path(f"/proc/{pid}/root/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return int(line.split()[1])
    raise AssertionError("no btime")


def _in_namespace(stat: Path) -> list[str]:
    """A wrapper: a private mount namespace with `stat` bound over /proc/stat, then exec."""
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'mount --bind {stat} /proc/stat && exec "$@"',
        "sh",
    ]


def _real_btime() -> int:
    return _btime_seen_by(os.getpid())


@needs_root
def test_identities_match_after_a_boot_time_step_across_a_restart(
    tmp_path: Path, seconds: str
) -> None:
    """The next daemon sees a boot time 1000 s later (a clock step): the recorded start
    ticks still match, so it kills the old (stopped) agent and the attempt's root, which
    carries no marker (`exec env -i`), found by its pid + start ticks alone."""
    d = Daemon(tmp_path, _overrides()).start()
    d2 = Daemon(tmp_path, d.cfg)
    try:
        _submit(d, "root", f"exec env -i sleep {seconds}")
        task, worker = _running(d, "root")
        root, agent = psutil.Process(task["pid"]), _agent(worker)
        assert root.cmdline() == ["sleep", seconds]
        agent.suspend()
        d.kill()
        d2.start(prefix=_in_namespace(_fake_stat(tmp_path / "stat", 1000)))
        assert d2.proc is not None
        assert _btime_seen_by(d2.proc.pid) == _real_btime() + 1000
        _gone_within([root, agent], GRACE_S + 1.0, "the root and the old agent")
    finally:
        _finish(d, d2, seconds=seconds)


@needs_root
def test_a_boot_time_step_while_running_leaves_workers_healthy_and_kills_right(
    tmp_path: Path, seconds: str
) -> None:
    """A boot time step under a running daemon: health probes still recognise every agent
    (no worker taken for gone), and a timeout still kills the unmarked root by identity."""
    d = Daemon(tmp_path, _overrides()).start(prefix=_in_namespace(_fake_stat(tmp_path / "s0", 0)))
    try:
        assert d.proc is not None
        _submit(d, "before", "true")
        d.wait_task("before", "completed")
        subprocess.run(
            [
                "nsenter",
                f"--mount=/proc/{d.proc.pid}/ns/mnt",
                "mount",
                "--bind",
                str(_fake_stat(tmp_path / "s1", 1000)),
                "/proc/stat",
            ],
            check=True,
        )
        assert _btime_seen_by(d.proc.pid) == _real_btime() + 1000
        # Longer than unresponsive_after_s and many health rounds: a probe that took the
        # agents for reused pids would have reported them by the time this completes.
        _submit(d, "after", "sleep 1.5")
        d.wait_task("after", "completed")
        assert not d.events("worker_unresponsive")
        assert not d.events("worker_shutdown")
        _submit(d, "root", f"exec env -i sleep {seconds}", timeout_s=1.0, max_retries=1)
        task, _ = _running(d, "root")
        root = psutil.Process(task["pid"])
        d.wait_event("task_timeout", task_id="root")
        _gone_within([root], GRACE_S + 1.0, "the timed-out root")
    finally:
        _finish(d, seconds=seconds)


@pytest.fixture(autouse=True)
def _no_stray_stopped_agents() -> Iterator[None]:
    yield
    _resume_all()


# --- survivors -------------------------------------------------------------------------

FREEZER = Path("/sys/fs/cgroup/freezer")


@pytest.fixture
def frozen_cgroup(seconds: str) -> Iterator[Path]:
    """A cgroup v1 freezer group: its processes, once frozen, cannot die of SIGKILL until
    they are thawed (a real survivor, as a process in uninterruptible sleep would be)."""
    if os.geteuid() != 0 or not (FREEZER / "cgroup.procs").exists():
        pytest.skip("needs root and the cgroup v1 freezer")
    cg = FREEZER / f"orchd-test-{seconds.replace('.', '-')}"
    cg.mkdir()
    try:
        yield cg
    finally:
        (cg / "freezer.state").write_text("THAWED\n")
        for pid in (cg / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        Daemon.wait_for(lambda: not (cg / "cgroup.procs").read_text().strip(), 5, "empty")
        cg.rmdir()


def _survivors_checked(d: Daemon, task_id: str) -> list[dict[str, Any]]:
    out = []
    for line in d.output.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if rec.get("event") == "survivors_checked" and event_matches(rec, {"task_id": task_id}):
                out.append(rec)
    return out


@pytest.mark.parametrize("stopped", [False, True], ids=["agent-kill", "daemon-kill"])
def test_survivors_hold_the_task_back_until_they_are_gone(
    tmp_path: Path, seconds: str, frozen_cgroup: Path, stopped: bool
) -> None:
    """An escapee that cannot die (frozen) survives the kill: an event names its pid, the
    task is held back (no new attempt while it lives, through several re-checks) whether
    the agent (timeout) or the daemon (a stopped worker shut down) killed the tree; once
    it is thawed it dies, the task is released and runs again."""
    d = Daemon(tmp_path, _overrides()).start()
    try:
        freeze = f"echo \\$\\$ > {frozen_cgroup}/cgroup.procs; exec sleep {seconds}"
        flag = tmp_path / f"escaped-{seconds}"
        command = (
            f'if [ ! -e {flag} ]; then touch {flag}; (setsid env -i sh -c "{freeze}" &); fi; '
            "sleep 300"
        )
        extra = {} if stopped else {"timeout_s": 1.5, "max_retries": 3}
        _submit(d, "stuck", command, **extra)
        _, worker = _running(d, "stuck")
        escapee = _escapee(seconds)
        Daemon.wait_for(
            lambda: str(escapee.pid) in (frozen_cgroup / "cgroup.procs").read_text().split(),
            5,
            "the escapee in the freezer",
        )
        (frozen_cgroup / "freezer.state").write_text("FROZEN\n")
        Daemon.wait_for(
            lambda: (frozen_cgroup / "freezer.state").read_text().strip() == "FROZEN", 5, "frozen"
        )
        if stopped:
            _agent(worker).suspend()
        ev = d.wait_event("task_tree_survivors", timeout=30, task_id="stuck")
        assert escapee.pid in ev["data"]["pids"]
        assert d.task("stuck")["survivors"]
        Daemon.wait_for(lambda: len(_survivors_checked(d, "stuck")) >= 2, 10, "two re-checks")
        t = d.task("stuck")
        assert t["state"] != "running" and len(t["attempts"]) == 1
        (frozen_cgroup / "freezer.state").write_text("THAWED\n")
        d.wait_event("task_released", timeout=10, task_id="stuck")
        _gone_within([escapee], 1.0, "the thawed escapee")
        t = d.wait_task("stuck", "running", timeout=15)
        assert len(t["attempts"]) == 2 and not t.get("survivors")
    finally:
        _finish(d, seconds=seconds)


# --- write-ahead -----------------------------------------------------------------------


def _transitions(d: Daemon) -> list[dict[str, Any]]:
    path = d.state_dir / "transitions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_start_timeout_kill_follows_its_record_and_the_agent_identity_is_on_record(
    tmp_path: Path,
) -> None:
    """An agent that never says hello: its pid and start ticks are recorded when it is
    spawned (before any hello), and its kill at shutdown_after_s follows a record of why
    (the worker's stopping = start_timeout); the process it names is then gone."""
    fake = tmp_path / "hangs.sh"
    fake.write_text("#!/bin/sh\nexec sleep 300\n")
    fake.chmod(0o755)
    d = Daemon(tmp_path, _overrides(workers={"count": 1, "python": str(fake)})).start()
    try:
        d.wait_event("worker_start_timeout", timeout=15, worker_id="worker-001")
        recs = [r for r in _transitions(d) if r["entity"] == "worker" and r["id"] == "worker-001"]
        spawned = next(r for r in recs if r["to"] == "starting" and r["changes"].get("pid"))
        why = next(r for r in recs if r["changes"].get("stopping") == "start_timeout")
        assert spawned["seq"] < why["seq"] and why["cause"] == "health"
        pid, ticks = spawned["changes"]["pid"], spawned["changes"]["pid_start_ticks"]
        Daemon.wait_for(
            lambda: proctree.process_identity(pid) != (pid, ticks), 5, "the hung agent killed"
        )
    finally:
        _finish(d)


def test_a_crash_while_a_stopped_worker_is_retired_leaves_its_agent_on_record(
    tmp_path: Path,
) -> None:
    """The daemon dies while it kills a stopped worker's TERM-ignoring tree: the worker's
    shutdown record still carries the agent's pid and start ticks, so the next daemon
    finds and kills that agent (and the tree) before it listens."""
    d = Daemon(tmp_path, _overrides(tasks={"kill_grace_s": 3.0})).start()
    d2 = Daemon(tmp_path, d.cfg)
    try:
        _submit(d, "deaf", "trap '' TERM; while :; do sleep 0.05; done")
        task, worker = _running(d, "deaf")
        tree = marker_processes(task["attempts"][-1]["attempt_id"])
        agent = _agent(worker)
        agent.suspend()
        d.wait_event("worker_shutdown", timeout=15, worker_id=worker["id"])
        d.kill()  # within the tree's 3 s grace: the kill was under way
        recs = [r for r in _transitions(d) if r["entity"] == "worker" and r["id"] == worker["id"]]
        shut = next(r for r in recs if r["to"] == "shutdown")
        assert "pid" not in shut["changes"] and shut["changes"]["stopping"] == "health"
        assert proctree.alive(agent)
        d2.start()
        _gone_within([agent, *tree], 1.0, "the old agent and its tree")
        assert d2.task("deaf")["attempts"][0]["failure_kind"] == "interrupted"
    finally:
        _finish(d, d2)


# --- records from before start ticks ---------------------------------------------------


def _as_legacy(state_dir: Path) -> int:
    """Rewrite the log as the daemon wrote it before start ticks: every pid_start_ticks
    becomes the epoch pid_create_time psutil would give; the snapshot and its backups go,
    so the start replays the whole log. How many identities were rewritten."""
    hz, btime = os.sysconf("SC_CLK_TCK"), psutil.boot_time()
    rewritten = 0

    def legacy(changes: dict[str, Any]) -> None:
        nonlocal rewritten
        ticks = changes.pop("pid_start_ticks", None)
        if ticks is not None:
            changes["pid_create_time"] = ticks / hz + btime
            rewritten += 1

    path = state_dir / "transitions.jsonl"
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        rec.pop("crc")
        changes = rec.get("changes", {})
        legacy(changes)
        legacy(changes.get("attempt_update", {}))
        out.append(seal(json.dumps(rec, separators=(",", ":")).encode()))
    path.write_bytes(b"".join(out))
    (state_dir / "current.json").unlink(missing_ok=True)
    shutil.rmtree(state_dir / "backups", ignore_errors=True)
    return rewritten


def test_a_log_from_before_start_ticks_replays_and_its_identities_still_match(
    tmp_path: Path, seconds: str
) -> None:
    """State written before start ticks (epoch pid_create_time only) replays, and its
    identities are still compared: the restarted daemon kills the stopped old agent and
    the attempt's unmarked root, which only those identities find."""
    d = Daemon(tmp_path, _overrides()).start()
    d2 = Daemon(tmp_path, d.cfg)
    try:
        _submit(d, "old", f"exec env -i sleep {seconds}")
        task, worker = _running(d, "old")
        root, agent = psutil.Process(task["pid"]), _agent(worker)
        agent.suspend()
        d.kill()
        assert _as_legacy(d.state_dir) >= 2  # the agent's and the attempt's
        d2.start()
        _gone_within([root, agent], GRACE_S + 1.0, "the root and the old agent")
        t = d2.task("old")
        assert t["attempts"][0]["failure_kind"] == "interrupted"
        assert "pid_create_time" in t["attempts"][0] and "pid_start_ticks" not in t["attempts"][0]
    finally:
        _finish(d, d2, seconds=seconds)
