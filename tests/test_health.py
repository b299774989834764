"""Worker health end to end: the real orchd process and real agents, stopped with SIGSTOP,
crash-looping at start, and handled by operator commands through orchctl."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.harness import FAST, Daemon, assert_no_leftovers, orchd_processes

HEALTH = FAST["health"]
CHECK_S = HEALTH["health_check_interval_s"]
SHUTDOWN_S = HEALTH["shutdown_after_s"]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path).start()
    try:
        yield d
    finally:
        _stop(d)


def _stop(d: Daemon) -> None:
    # A test that failed half-way may leave an agent stopped: let it act on the drain.
    for proc in orchd_processes():
        try:
            if proc.status() == psutil.STATUS_STOPPED:
                proc.resume()
        except psutil.NoSuchProcess:
            pass
    if d.proc is not None and d.proc.poll() is None:
        d.stop()
    assert_no_leftovers()


def submit_one(d: Daemon, task_id: str, command: str, **extra: Any) -> None:
    fields = "".join(f"\n{k} = {json.dumps(v)}" for k, v in extra.items())
    d.submit(
        f'id = "ws-{task_id}"\n[[tasks]]\nid = "{task_id}"\ncommand = {json.dumps(command)}'
        + fields
        + "\n",
        f"{task_id}.toml",
    )


def running_on(d: Daemon, task_id: str) -> dict[str, Any]:
    """The worker running `task_id`, once the task's process is known."""
    found: dict[str, Any] = {}

    def check() -> bool:
        t = d.task(task_id)
        if t["state"] != "running" or t.get("pid") is None:
            return False
        found.update(next(w for w in d.workers() if w["id"] == t["worker_id"]))
        return found.get("state") == "busy"

    Daemon.wait_for(check, 10, f"{task_id} to run on a busy worker")
    return found


def transitions(d: Daemon) -> list[dict[str, Any]]:
    path = d.state_dir / "transitions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def marked(prefix: str) -> list[psutil.Process]:
    """Live processes of attempts whose id starts with `prefix`."""
    out = []
    for proc in orchd_processes():
        try:
            if proc.environ().get("ORCHD_ATTEMPT_ID", "").startswith(prefix):
                out.append(proc)
        except psutil.NoSuchProcess:
            pass
    return out


def live_workers(d: Daemon) -> list[dict[str, Any]]:
    return [w for w in d.workers() if w["state"] in ("idle", "busy")]


def test_stopped_busy_worker_recovers_and_its_task_completes_in_place(daemon: Daemon) -> None:
    """SIGSTOP of a busy worker makes it unresponsive; SIGCONT before shutdown_after_s
    recovers it, and its task completes on the same worker with no retry spent."""
    flag = daemon.tmp / "go"
    submit_one(daemon, "steady", f"while [ ! -e {flag} ]; do sleep 0.05; done; echo done")
    w = running_on(daemon, "steady")
    os.kill(w["pid"], signal.SIGSTOP)
    ev = daemon.wait_event("worker_unresponsive", worker_id=w["id"])
    assert ev["severity"] == "error" and ev["task_id"] == "ws-steady/steady"
    state = next(x for x in daemon.workers() if x["id"] == w["id"])
    assert state["state"] == "unresponsive" and state["task_id"] == "ws-steady/steady"
    # The task finishes while its agent is stopped; the result comes after SIGCONT.
    flag.touch()
    os.kill(w["pid"], signal.SIGCONT)
    rec = daemon.wait_event("worker_recovered", worker_id=w["id"])
    assert rec["severity"] == "info"
    t = daemon.wait_task("steady", "completed")
    assert t["retry_count"] == 0 and len(t["attempts"]) == 1
    assert t["attempts"][0]["worker_id"] == w["id"]
    assert not daemon.events("worker_shutdown")
    Daemon.wait_for(
        lambda: next(x for x in daemon.workers() if x["id"] == w["id"])["state"] == "idle",
        5,
        "the worker to be idle again",
    )
    assert next(x for x in daemon.workers() if x["id"] == w["id"])["pid"] == w["pid"]


def test_stopped_busy_worker_is_shut_down_and_its_task_reassigned(daemon: Daemon) -> None:
    """A busy worker left stopped is shut down at shutdown_after_s (± a check), killed with
    its task's tree, replaced, and its task completes on another worker with no retry spent."""
    submit_one(daemon, "moved", "sleep 300 & sleep 300; echo never", timeout_s=60)
    w = running_on(daemon, "moved")
    first = daemon.task("moved")["attempts"][0]["attempt_id"]
    Daemon.wait_for(lambda: len(marked(first)) >= 2, 5, "the task's tree to be up")
    agent = psutil.Process(w["pid"])
    os.kill(w["pid"], signal.SIGSTOP)
    unresp = daemon.wait_event("worker_unresponsive", worker_id=w["id"])
    down = daemon.wait_event("worker_shutdown", timeout=SHUTDOWN_S + 5, worker_id=w["id"])
    assert down["severity"] == "error" and down["task_id"] == "ws-moved/moved"
    gap = down["ts"] - unresp["ts"]
    assert SHUTDOWN_S <= gap <= SHUTDOWN_S + CHECK_S + 0.3, gap
    # The task goes back to queued (reassigned, no retry spent) and runs elsewhere.
    t = daemon.wait_task("moved", "running")
    Daemon.wait_for(lambda: len(daemon.task("moved")["attempts"]) == 2, 5, "a second attempt")
    t = daemon.task("moved")
    assert t["retry_count"] == 0
    a0 = t["attempts"][0]
    assert a0["failure_kind"] == "worker_lost" and a0["reassigned"] is True
    assert t["attempts"][1]["worker_id"] != w["id"]
    Daemon.wait_for(lambda: not agent.is_running(), 5, "the stopped agent to die")
    Daemon.wait_for(lambda: not marked(first), 5, "the first attempt's tree to be gone")
    Daemon.wait_for(lambda: len(live_workers(daemon)) == 2, 5, "the pool to be back to 2")
    shown = next(x for x in daemon.workers() if x["id"] == w["id"])
    assert shown["state"] == "shutdown"


def cause_of(d: Daemon, worker_id: str, to: str) -> list[str]:
    """The causes of the worker's moves into state `to` (not field updates), in log order."""
    return [
        r["cause"]
        for r in transitions(d)
        if r["entity"] == "worker" and r["id"] == worker_id and r["to"] == to != r.get("from")
    ]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_operator_restart_reassigns_the_task_and_keeps_the_id(daemon: Daemon) -> None:
    """`worker restart` on a busy worker: its task runs again with no retry spent, the
    worker comes back under the same id with a new process, and the log says `operator`."""
    flag = daemon.tmp / "go"
    submit_one(daemon, "job", f"while [ ! -e {flag} ]; do sleep 0.05; done")
    w = running_on(daemon, "job")
    first = daemon.task("job")["attempts"][0]["attempt_id"]
    out = daemon.ctl_json("worker", "restart", w["id"])
    assert out["worker_id"] == w["id"] and out["reassigned_task"] == "ws-job/job" and out["seq"] > 0
    Daemon.wait_for(lambda: len(daemon.task("job")["attempts"]) == 2, 10, "a second attempt")
    flag.touch()
    t = daemon.wait_task("job", "completed")
    assert t["retry_count"] == 0
    assert t["attempts"][0]["failure_kind"] == "worker_lost" and t["attempts"][0]["reassigned"]
    Daemon.wait_for(lambda: gone(w["pid"]), 5, "the old agent to be gone")
    # On another host the agent's end reaches its tree a moment after the transport's.
    Daemon.wait_for(lambda: not marked(first), 5, "the first attempt's tree to be gone")
    again: dict[str, Any] = {}

    def back() -> bool:
        again.update(next(x for x in daemon.workers() if x["id"] == w["id"]))
        return again["state"] in ("idle", "busy")

    Daemon.wait_for(back, 10, "the worker to be back")
    assert again["pid"] != w["pid"] and again["restarts"] >= 1
    # The pool has its size again (a remote worker's heartbeats may lag a moment).
    Daemon.wait_for(lambda: len(live_workers(daemon)) == 2, 10, "both workers up")
    assert cause_of(daemon, w["id"], "shutdown") == ["operator"]
    assert cause_of(daemon, w["id"], "starting")[-1] == "operator"
    assert daemon.wait_event("worker_restarted", worker_id=w["id"])["task_id"] == "ws-job/job"


@pytest.mark.parametrize("reassign", [True, False], ids=["reassign", "no-reassign"])
def test_forced_shutdown_of_a_busy_worker(daemon: Daemon, reassign: bool) -> None:
    """`worker shutdown --force` kills a busy worker and its task's tree and replaces it;
    with --reassign the task runs elsewhere with no retry spent, without it the attempt
    fails as worker_lost and spends a retry."""
    flag = daemon.tmp / "go"
    submit_one(daemon, "job", f"sleep 300 & while [ ! -e {flag} ]; do sleep 0.05; done")
    w = running_on(daemon, "job")
    first = daemon.task("job")["attempts"][0]["attempt_id"]
    Daemon.wait_for(lambda: len(marked(first)) >= 2, 5, "the task's tree to be up")
    args = ["--yes", "worker", "shutdown", w["id"], "--force"]
    args += ["--reassign"] if reassign else []
    out = daemon.ctl_json(*args)
    assert out["worker_id"] == w["id"] and out["task_id"] == "ws-job/job"
    assert out["reassigned"] is reassign
    Daemon.wait_for(lambda: gone(w["pid"]) and not marked(first), 5, "agent and tree gone")
    Daemon.wait_for(lambda: len(daemon.task("job")["attempts"]) == 2, 10, "a second attempt")
    flag.touch()
    t = daemon.wait_task("job", "completed")
    a0 = t["attempts"][0]
    assert a0["failure_kind"] == "worker_lost"
    assert t["attempts"][1]["worker_id"] != w["id"]
    if reassign:
        assert t["retry_count"] == 0 and a0["reassigned"] is True
    else:
        assert t["retry_count"] == 1 and not a0.get("reassigned")
    shown = next(x for x in daemon.workers() if x["id"] == w["id"])
    assert shown["state"] == "shutdown"
    Daemon.wait_for(lambda: len(live_workers(daemon)) == 2, 10, "a replacement worker")
    assert cause_of(daemon, w["id"], "shutdown") == ["operator"]
    ev = daemon.wait_event("worker_shutdown", worker_id=w["id"])
    assert ev["severity"] == "error" and ev["task_id"] == "ws-job/job"


def test_worker_commands_exit_codes(daemon: Daemon) -> None:
    """Worker commands exit 3 for an unknown worker, 5 for a busy worker shut down without
    --force or a worker already shut down, and 7 once the daemon is gone."""
    for args in (
        ("worker", "check", "worker-999"),
        ("worker", "restart", "worker-999"),
        ("worker", "logs", "worker-999"),
        ("worker", "shutdown", "worker-999", "--force"),
    ):
        r = daemon.ctl(*args)
        assert r.returncode == 3, (args, r.returncode, r.stderr)
        assert "worker-999" in r.stderr and not r.stdout
    submit_one(daemon, "busy", "sleep 300")
    w = running_on(daemon, "busy")
    r = daemon.ctl("worker", "shutdown", w["id"])
    assert r.returncode == 5 and "--force" in r.stderr
    assert next(x for x in daemon.workers() if x["id"] == w["id"])["state"] == "busy"
    daemon.wait_for(
        lambda: any(x["state"] == "idle" for x in daemon.workers()), 10, "an idle worker"
    )
    idle = next(x for x in daemon.workers() if x["state"] == "idle")
    assert daemon.ctl_json("worker", "shutdown", idle["id"])["task_id"] is None
    assert daemon.ctl("worker", "restart", idle["id"]).returncode == 5
    daemon.ctl_json("--yes", "cancel", "busy")
    daemon.wait_task("busy", "cancelled")
    daemon.stop()
    r = daemon.ctl("worker", "check", w["id"])
    assert r.returncode == 7 and r.stderr


def test_worker_check_and_logs_show_health_and_history(tmp_path: Path) -> None:
    """While a stopped worker is unresponsive its task stays on it and no new task is given
    to it; `worker check` reports the stopped process and for how long, and `worker logs`
    shows the task it took, the missed heartbeats and the recovery."""
    d = Daemon(tmp_path, {"workers": {"count": 1}, "health": {"shutdown_after_s": 6.0}}).start()
    try:
        flag = d.tmp / "go"
        submit_one(d, "first", f"while [ ! -e {flag} ]; do sleep 0.05; done")
        w = running_on(d, "first")
        attempt = d.task("first")["attempts"][0]["attempt_id"]
        os.kill(w["pid"], signal.SIGSTOP)
        d.wait_event("worker_unresponsive", worker_id=w["id"])
        submit_one(d, "second", "true")
        d.wait_task("second", "queued")
        after = HEALTH["unresponsive_after_s"] + CHECK_S
        Daemon.wait_for(
            lambda: d.workers()[0]["last_heartbeat_age_s"] > after, 5, "heartbeats to be missed"
        )
        check = d.ctl_json("worker", "check", w["id"])
        assert check["state"] == "unresponsive" and check["task_id"] == "ws-first/first"
        assert check["health"]["status"] == "stopped" and check["health"]["ok"] is False
        assert check["health"]["unresponsive_for_s"] > 0
        assert check["health"]["rss_bytes"] > 0 and check["health"]["open_fds"] > 0
        human = d.ctl("worker", "check", w["id"])
        assert human.returncode == 0 and "unresponsive" in human.stdout
        assert "stopped" in human.stdout
        assert d.task("second")["state"] == "queued"
        assert d.task("first")["state"] == "running"
        # The task ends while its agent is stopped; its result is taken after SIGCONT.
        flag.touch()
        Daemon.wait_for(lambda: not marked(attempt), 5, "the task's process to exit")
        os.kill(w["pid"], signal.SIGCONT)
        d.wait_event("worker_recovered", worker_id=w["id"])
        assert d.wait_task("first", "completed")["retry_count"] == 0
        second = d.wait_task("second", "completed")
        assert second["attempts"][0]["worker_id"] == w["id"]
        assert not d.events("worker_shutdown") and not d.events("late_result")
        logs = d.ctl("worker", "logs", w["id"])
        assert logs.returncode == 0
        for needle in (
            "took task ws-first/first",
            "unresponsive: last heartbeat",
            "recovered: heartbeats resumed",
            "took task ws-second/second",
        ):
            assert needle in logs.stdout, logs.stdout
    finally:
        _stop(d)


def test_timeout_of_a_task_on_a_stopped_worker_kills_both(tmp_path: Path) -> None:
    """A task whose worker is stopped still times out: the daemon kills the agent and the
    task's tree itself, records a timeout, and replaces the worker; nothing hangs."""
    d = Daemon(tmp_path).start()
    try:
        submit_one(d, "stuck", "sleep 300 & sleep 300", timeout_s=1.0, max_retries=1)
        w = running_on(d, "stuck")
        first = d.task("stuck")["attempts"][0]["attempt_id"]
        os.kill(w["pid"], signal.SIGSTOP)
        d.wait_event("worker_unresponsive", worker_id=w["id"])
        t = d.wait_task("stuck", "failed", timeout=10)
        assert t["failure_kind"] == "timeout" and t["retry_count"] == 1
        ev = d.wait_event("worker_shutdown", worker_id=w["id"])
        assert "timeout" in ev["message"]
        assert gone(w["pid"]) and not marked(first)
        assert cause_of(d, w["id"], "shutdown") == ["timeout"]
        Daemon.wait_for(lambda: len(live_workers(d)) == 2, 10, "a replacement worker")
        assert not d.events("late_result")
    finally:
        _stop(d)


def test_long_busy_task_is_never_taken_for_unresponsive(daemon: Daemon) -> None:
    """A healthy worker busy for longer than shutdown_after_s is never reported or killed."""
    submit_one(daemon, "long", f"sleep {SHUTDOWN_S + 0.5}")
    t = daemon.wait_task("long", "completed", timeout=15)
    assert len(t["attempts"]) == 1
    assert not daemon.events("worker_unresponsive") and not daemon.events("worker_shutdown")


@pytest.mark.parametrize("python", ["/nonexistent/python", "/bin/false"], ids=["missing", "exits"])
def test_crash_looping_worker_backs_off(tmp_path: Path, python: str) -> None:
    """A worker that cannot start is restarted with growing delays and an event each time,
    never in a tight loop, and the daemon keeps answering."""
    d = Daemon(tmp_path, {"workers": {"count": 1, "python": python}}).start()
    try:
        Daemon.wait_for(lambda: len(d.events("worker_start_failed")) >= 4, 10, "4 failed starts")
        evs = d.events("worker_start_failed")
        assert {e["worker_id"] for e in evs} == {"worker-001"}
        assert all(e["severity"] == "error" for e in evs)
        delays = [e["data"]["delay_s"] for e in evs[:4]]
        assert delays == [0.2, 0.4, 0.8, 1.6]
        gaps = [b["ts"] - a["ts"] for a, b in itertools.pairwise(evs[:4])]
        for gap, delay in zip(gaps, delays, strict=False):
            assert gap >= delay, (gaps, delays)
        status = d.ctl_json("status")
        assert status["workers"].get("idle", 0) == 0
        assert d.ctl("worker", "check", "worker-001").returncode == 0
    finally:
        _stop(d)


def test_worker_that_never_says_hello_is_killed_and_restarted(tmp_path: Path) -> None:
    """An agent that starts but never says hello is killed after shutdown_after_s and
    restarted with back-off, with events."""
    fake = tmp_path / "hangs.sh"
    fake.write_text("#!/bin/sh\nexec sleep 300\n")
    fake.chmod(0o755)
    d = Daemon(tmp_path, {"workers": {"count": 1, "python": str(fake)}}).start()
    try:
        ev = d.wait_event("worker_start_timeout", timeout=SHUTDOWN_S + 5, worker_id="worker-001")
        assert ev["severity"] == "error"
        failed = d.wait_event("worker_start_failed", worker_id="worker-001")
        assert failed["data"]["delay_s"] == HEALTH["restart_backoff_base_s"]
        assert d.ctl_json("status")["workers"] == {"starting": 1}
    finally:
        _stop(d)


FAKE_AGENT = """
import sys
from supervisor.core import wire
args = sys.argv[sys.argv.index("--worker-id") + 1]
sys.stdout.buffer.write(wire.frame(wire.Hello(worker_id=args, pid=__import__("os").getpid(),
    create_time=__import__("psutil").Process().create_time())))
sys.stdout.flush()
sys.stdin.buffer.read(1)  # says nothing more; leaves at the first word or EOF
"""


def test_silent_worker_is_unresponsive_then_shut_down(tmp_path: Path) -> None:
    """An agent that runs but stops heartbeating (psutil sees nothing wrong) is made
    unresponsive after unresponsive_after_s and shut down after shutdown_after_s."""
    script = tmp_path / "silent.py"
    script.write_text(FAKE_AGENT)
    wrapper = tmp_path / "silent.sh"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {script} "$@"\n')
    wrapper.chmod(0o755)
    d = Daemon(tmp_path, {"workers": {"count": 1, "python": str(wrapper)}}).start()
    try:
        ev = d.wait_event("worker_unresponsive", worker_id="worker-001")
        assert ev["data"]["process"] != "stopped"
        assert ev["data"]["heartbeat_age_s"] >= HEALTH["unresponsive_after_s"]
        down = d.wait_event("worker_shutdown", timeout=SHUTDOWN_S + 5, worker_id="worker-001")
        assert SHUTDOWN_S <= down["ts"] - ev["ts"] <= SHUTDOWN_S + CHECK_S + 0.3
        Daemon.wait_for(
            lambda: any(w["id"] != "worker-001" and w["state"] == "idle" for w in d.workers()),
            5,
            "a replacement",
        )
    finally:
        _stop(d)


def test_daemon_stops_cleanly_with_a_stopped_busy_worker(tmp_path: Path) -> None:
    """SIGTERM while a busy worker is stopped: the daemon kills that worker and its task's
    tree itself, exits 0 promptly, and the attempt is recorded as interrupted."""
    d = Daemon(tmp_path).start()
    submit_one(d, "held", "sleep 300 & sleep 300")
    w = running_on(d, "held")
    first = d.task("held")["attempts"][0]["attempt_id"]
    os.kill(w["pid"], signal.SIGSTOP)
    d.wait_event("worker_unresponsive", worker_id=w["id"])
    assert d.stop(timeout=10) == 0
    assert gone(w["pid"]) and not marked(first)
    assert_no_leftovers(timeout=1.0)
    d2 = Daemon(tmp_path, d.cfg).start()
    try:
        t = d2.task("held")
        assert t["attempts"][0]["failure_kind"] == "interrupted" and t["retry_count"] == 0
    finally:
        d2.call("cancel", task_id="held")
        d2.wait_task("held", "cancelled")
        _stop(d2)


def test_worker_shut_down_during_its_backoff_is_not_started_again(tmp_path: Path) -> None:
    """A crash-looping worker shut down by the operator while it waits out its back-off is
    not started again when the delay ends (only its replacement is)."""
    starts = tmp_path / "starts.txt"
    fake = tmp_path / "fails.sh"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {starts}\nexit 1\n')
    fake.chmod(0o755)
    d = Daemon(tmp_path, {"workers": {"count": 1, "python": str(fake)}}).start()

    def started(wid: str) -> int:
        text = starts.read_text() if starts.exists() else ""
        return sum(1 for line in text.splitlines() if f"--worker-id {wid} " in line)

    try:
        Daemon.wait_for(lambda: len(d.events("worker_start_failed")) >= 2, 10, "two failed starts")
        out = d.ctl_json("worker", "shutdown", "worker-001")
        assert out["worker_id"] == "worker-001"
        before = started("worker-001")
        # The replacement's third start comes after worker-001's pending delay has ended.
        Daemon.wait_for(lambda: started("worker-002") >= 3, 10, "the replacement's restarts")
        assert started("worker-001") == before
        assert next(w for w in d.workers() if w["id"] == "worker-001")["state"] == "shutdown"
    finally:
        _stop(d)
