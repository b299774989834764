"""The execution engine end to end: the real orchd process, real agents and shell commands,
driven through orchctl and the control socket."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.harness import Daemon, assert_no_leftovers, marker_processes


def make_daemon(tmp_path: Path, **overrides: object) -> Daemon:
    return Daemon(tmp_path, dict(overrides)).start()


STAMP = "date +%s.%N; sleep {s}; date +%s.%N"


def stamps(d: Daemon, task_id: str) -> list[float]:
    return [float(x) for x in re.findall(r"^\d{10}\.\d+$", d.log(task_id), re.M)]


def test_diamond_runs_in_dependency_order(daemon: Daemon) -> None:
    """A diamond a -> (b, c) -> d runs each task only after its dependencies ended."""
    out = daemon.submit(f"""
id = "ws-diamond"
[[tasks]]
id = "a"
command = "{STAMP.format(s=0.2)}"
[[tasks]]
id = "b"
command = "{STAMP.format(s=1.0)}"
depends_on = ["a"]
[[tasks]]
id = "c"
command = "{STAMP.format(s=1.0)}"
depends_on = ["a"]
[[tasks]]
id = "d"
command = "{STAMP.format(s=0.1)}"
depends_on = ["b", "c"]
""")
    assert out["workstream_id"] == "ws-diamond" and out["tasks"] == 4 and out["seq"] >= 1
    daemon.wait_ws("ws-diamond", "completed")
    a, b, c, d = (stamps(daemon, t) for t in "abcd")
    assert a[1] <= b[0] and a[1] <= c[0]
    assert max(b[1], c[1]) <= d[0]
    # b and c are independent and there are two workers: they overlap.
    assert b[0] < c[1] and c[0] < b[1]
    shown = daemon.ctl_json("show", "d")
    assert (
        shown["state"] == "completed" and shown["retry_count"] == 0 and len(shown["attempts"]) == 1
    )
    assert "=== attempt 1" in daemon.log("d")


@pytest.mark.parametrize(
    "command",
    [
        "sleep 300 & sleep 300",
        "trap '' TERM; sleep 300",
        "(setsid sleep 300 &); sleep 300",
    ],
    ids=["grandchildren", "ignores-term", "double-fork-escapee"],
)
def test_timeout_kills_whole_tree_and_backs_off(tmp_path: Path, command: str) -> None:
    """A task past its timeout is killed with every descendant, retried after 2·base then
    4·base, and fails for good after max_retries, with warning and error events."""
    d = make_daemon(tmp_path, tasks={"kill_grace_s": 0.3, "backoff_base_s": 0.3})
    try:
        d.submit(f"""
id = "ws-timeout"
[[tasks]]
id = "slow"
command = {json.dumps(command)}
timeout_s = 0.5
max_retries = 3
""")
        seen_attempts: set[int] = set()
        deadline = time.monotonic() + 30
        while True:
            t = d.task("slow")
            for a in t["attempts"]:
                if a.get("ended_at") is not None and a["number"] not in seen_attempts:
                    seen_attempts.add(a["number"])
                    # Within grace + 1 s of the attempt's end no process of its tree is left.
                    prefix = a["attempt_id"]
                    Daemon.wait_for(
                        lambda p=prefix: not marker_processes(p),
                        1.0 + 0.3,
                        f"tree of {prefix} gone",
                    )
            if t["state"] == "failed":
                break
            assert time.monotonic() < deadline, t
            time.sleep(0.02)
        assert t["retry_count"] == 3 and t["failure_kind"] == "timeout"
        attempts = t["attempts"]
        assert [a["failure_kind"] for a in attempts] == ["timeout"] * 3
        for a in attempts:
            assert a["ended_at"] - (a["started_at"] + 0.5) < 0.3 + 1.0
        gaps = [attempts[i + 1]["started_at"] - attempts[i]["ended_at"] for i in range(2)]
        assert 0.6 <= gaps[0] < 0.6 + 0.5, gaps  # 2 · base
        assert 1.2 <= gaps[1] < 1.2 + 0.5, gaps  # 4 · base
        timeouts = d.events("task_timeout")
        assert len(timeouts) == 3 and {e["severity"] for e in timeouts} == {"warning"}
        failed = d.events("task_failed")
        assert (
            len(failed) == 1
            and failed[0]["severity"] == "error"
            and failed[0]["task_id"] == "ws-timeout/slow"
        )
        assert not marker_processes("slow.")
    finally:
        d.stop()
        assert_no_leftovers()


def test_no_retry_exit_code_and_memory_limit(daemon: Daemon) -> None:
    """An exit code in no_retry_exit_codes fails at once; an rlimits memory cap stops a task
    that allocates past it."""
    daemon.submit("""
id = "ws-limits"
[[tasks]]
id = "usage"
command = "exit 2"
no_retry_exit_codes = [2]
max_retries = 3
critical = false
[[tasks]]
id = "hog"
command = ["python3", "-c", "x = bytearray(400 * 1024 * 1024); print('allocated')"]
rlimits = { memory_mb = 100 }
max_retries = 1
critical = false
[[tasks]]
id = "modest"
command = ["python3", "-c", "x = bytearray(10 * 1024 * 1024); print('allocated')"]
rlimits = { memory_mb = 300 }
""")
    usage = daemon.wait_task("usage", "failed")
    assert len(usage["attempts"]) == 1 and usage["attempts"][0]["exit_code"] == 2
    assert usage["failure_kind"] == "exit_code"
    hog = daemon.wait_task("hog", "failed")
    assert hog["attempts"][0]["exit_code"] not in (0, None)
    hog_output = [line for line in daemon.log("hog").splitlines() if not line.startswith("===")]
    assert "allocated" not in hog_output and any("MemoryError" in line for line in hog_output)
    assert daemon.wait_task("modest", "completed")["retry_count"] == 0


def test_flaky_task_completes_after_two_retries(daemon: Daemon) -> None:
    """A task that fails twice then succeeds ends completed with retry_count 2."""
    counter = daemon.tmp / "counter"
    daemon.submit(f"""
id = "ws-flaky"
[[tasks]]
id = "flaky"
command = "n=$(cat {counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {counter}; test $n -ge 3"
max_retries = 3
""")
    t = daemon.wait_task("flaky", "completed")
    assert t["retry_count"] == 2
    assert [a.get("exit_code") for a in t["attempts"]] == [1, 1, 0]
    assert counter.read_text().strip() == "3"


def test_exclusive_resource_is_never_held_twice(tmp_path: Path) -> None:
    """Three tasks needing git_repo_write (max_holders 1) never overlap, and waiting longer
    than the alert emits resource_exhausted once."""
    d = make_daemon(tmp_path, workers={"count": 3}, tasks={"resource_wait_alert_s": 0.2})
    try:
        body = "\n".join(
            f"""
[[tasks]]
id = "git-{i}"
command = "{STAMP.format(s=0.4)}"
resources = ["git_repo_write"]"""
            for i in range(3)
        )
        d.submit('id = "ws-res"\n' + body)
        d.wait_ws("ws-res", "completed")
        spans = sorted((s[0], s[1]) for s in (stamps(d, f"git-{i}") for i in range(3)))
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start, spans
        ev = d.events("resource_exhausted")
        assert ev and ev[0]["severity"] == "critical" and ev[0]["resource_id"] == "git_repo_write"
        assert len(ev) == 1
    finally:
        d.stop()
        assert_no_leftovers()


def test_cycle_is_reported_and_the_rest_runs(daemon: Daemon) -> None:
    """A dependency cycle is reported with its tasks; they stay pending while the rest runs."""
    out = daemon.submit("""
id = "ws-cycle"
[[tasks]]
id = "x"
command = "true"
depends_on = ["y"]
[[tasks]]
id = "y"
command = "true"
depends_on = ["x"]
[[tasks]]
id = "z"
command = "true"
""")
    assert out["cycles"] == [["ws-cycle/x", "ws-cycle/y"]]
    daemon.wait_task("z", "completed")
    ev = daemon.wait_event("dependency_cycle_detected")
    assert ev["severity"] == "critical" and ev["tasks"] == ["ws-cycle/x", "ws-cycle/y"]
    assert daemon.task("x")["state"] == "pending" and daemon.task("y")["state"] == "pending"


def test_critical_failure_fails_and_archives_the_workstream(daemon: Daemon) -> None:
    """A critical task's final failure fails the workstream and writes archive/<ws>.json."""
    daemon.submit("""
id = "ws-crit"
[[tasks]]
id = "breaks"
command = "exit 1"
max_retries = 1
[[tasks]]
id = "after"
command = "true"
depends_on = ["breaks"]
""")
    daemon.wait_ws("ws-crit", "failed")
    ev = daemon.wait_event("workstream_failed", workstream_id="ws-crit")
    assert ev["severity"] == "critical"
    archive = daemon.state_dir / "archive" / "ws-crit.json"
    Daemon.wait_for(archive.exists, 5, "the archive file")
    data = json.loads(archive.read_text())
    assert data["workstream"]["id"] == "ws-crit"
    assert {t["id"]: t["state"] for t in data["tasks"]} == {
        "ws-crit/breaks": "failed",
        "ws-crit/after": "pending",
    }


def test_non_critical_failure_lets_independent_branches_finish(daemon: Daemon) -> None:
    """A non-critical task's failure does not stop its workstream's independent branches."""
    daemon.submit("""
id = "ws-noncrit"
[[tasks]]
id = "optional"
command = "exit 3"
critical = false
max_retries = 1
[[tasks]]
id = "downstream"
command = "true"
depends_on = ["optional"]
[[tasks]]
id = "branch-1"
command = "sleep 0.3"
[[tasks]]
id = "branch-2"
command = "true"
depends_on = ["branch-1"]
""")
    daemon.wait_ws("ws-noncrit", "failed")
    assert daemon.task("branch-2")["state"] == "completed"
    assert daemon.task("downstream")["state"] == "pending"


def test_killed_worker_is_replaced_and_its_task_runs_elsewhere(daemon: Daemon) -> None:
    """SIGKILL of a busy worker: it is replaced, its task runs again on another worker
    without spending a retry, and nothing is lost."""
    daemon.submit("""
id = "ws-kill"
[[tasks]]
id = "long"
command = "sleep 1; echo done"
""")
    t = daemon.wait_task("long", "running")
    Daemon.wait_for(lambda: daemon.task("long").get("pid") is not None, 10, "the task's pid")
    t = daemon.task("long")
    victim = t["worker_id"]
    worker = next(w for w in daemon.workers() if w["id"] == victim)
    os.kill(worker["pid"], signal.SIGKILL)
    done = daemon.wait_task("long", "completed")
    assert done["retry_count"] == 0
    assert (
        done["attempts"][0]["failure_kind"] == "worker_lost" and done["attempts"][0]["reassigned"]
    )
    assert done["attempts"][-1]["worker_id"] != victim
    # The replacement may still be starting (an agent takes over a second to start on a
    # loaded machine, longer than the reassigned task runs).
    Daemon.wait_for(
        lambda: len([w for w in daemon.workers() if w["state"] in ("idle", "busy")]) == 2,
        10,
        "the pool to be back to two workers",
    )
    assert daemon.events("worker_exited")


def test_sigterm_drains_running_tasks(tmp_path: Path) -> None:
    """SIGTERM with tasks running: exit 0 within the grace period, no task process left,
    the attempts recorded as interrupted."""
    d = make_daemon(tmp_path)
    d.submit("""
id = "ws-drain"
[[tasks]]
id = "one"
command = "sleep 300"
[[tasks]]
id = "two"
command = "trap '' TERM; sleep 300"
""")
    d.wait_task("one", "running")
    d.wait_task("two", "running")
    Daemon.wait_for(lambda: len(marker_processes("")) >= 2, 10, "both tasks to run")
    started = time.monotonic()
    assert d.stop(timeout=15) == 0
    assert time.monotonic() - started < 5.0 + 1.0
    assert_no_leftovers(timeout=1.0)
    d2 = Daemon(tmp_path, d.cfg).start()
    try:
        t = d2.task("one")
        assert t["attempts"][0]["failure_kind"] == "interrupted" and t["retry_count"] == 0
    finally:
        d2.stop()


def test_thousand_short_tasks_leave_no_zombie_and_no_fd(tmp_path: Path) -> None:
    """1,000 short tasks: every one completes, no zombie is left and the daemon's open file
    descriptors are back at their baseline."""
    d = make_daemon(tmp_path)
    try:
        proc = psutil.Process(d.proc.pid)  # type: ignore[union-attr]
        d.submit('id = "warm"\n[[tasks]]\nid = "warm-0"\ncommand = "true"\n', "warm.toml")
        d.wait_ws("warm", "completed")
        baseline = proc.num_fds()
        tasks = "\n".join(f'[[tasks]]\nid = "t{i}"\ncommand = ["true"]' for i in range(1000))
        d.submit('id = "ws-many"\n' + tasks, "many.toml")
        d.wait_ws("ws-many", "completed", timeout=120)
        zombies = [p for p in proc.children(recursive=True) if p.status() == psutil.STATUS_ZOMBIE]
        assert not zombies
        Daemon.wait_for(
            lambda: proc.num_fds() <= baseline, 5, f"fds back to {baseline} (now {proc.num_fds()})"
        )
    finally:
        d.stop()
        assert_no_leftovers()


def test_bad_workstream_is_refused_whole(daemon: Daemon) -> None:
    """A bad file is refused with every problem named, exit code 2, and nothing stored."""
    path = daemon.tmp / "bad.toml"
    path.write_text("""
id = "ws-bad"
[[tasks]]
id = "a"
command = "true"
colour = "blue"
[[tasks]]
id = "a"
command = "true"
depends_on = ["ghost"]
resources = ["no_such_resource"]
""")
    r = daemon.ctl("submit", str(path))
    assert r.returncode == 2
    for needle in ("colour", "duplicate", "ghost", "no_such_resource"):
        assert needle in r.stderr, r.stderr
    assert daemon.call("ws_list") == []
    assert daemon.call("tasks") == []


def test_crash_restart_interrupts_and_reruns(tmp_path: Path) -> None:
    """After SIGKILL of the daemon a running task's tree is gone and the task runs again on
    restart as an interrupted attempt, without spending a retry."""
    d = make_daemon(tmp_path)
    d.submit("""
id = "ws-crash"
[[tasks]]
id = "slowish"
command = "sleep 2; echo finished"
""")
    d.wait_task("slowish", "running")
    Daemon.wait_for(lambda: len(marker_processes("slowish.")) >= 1, 10, "the task to run")
    d.kill()
    Daemon.wait_for(lambda: not marker_processes("slowish."), 5, "the orphaned tree to be killed")
    d2 = Daemon(tmp_path, d.cfg).start()
    try:
        t = d2.wait_task("slowish", "completed")
        assert t["retry_count"] == 0
        assert t["attempts"][0]["failure_kind"] == "interrupted"
        assert d2.events("task_interrupted")
    finally:
        d2.stop()
        assert_no_leftovers()
