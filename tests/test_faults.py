"""Issue 7's fault paths against the real daemon: one regression test per observed defect,
with real write errors (the live daemon's RLIMIT_FSIZE) or ORCHD_FAILPOINT hooks. After
each fault, once writes succeed again: the work completes or times out as configured, no
worker is stuck, the pool is back to its size, nothing is recorded twice, and
`orchctl state validate` is clean.

Fault placement is by bytes: the limit is set to the log's size plus an upper bound of the
records meant to land first (faultkit.record_bytes), so the next one fails; each test
checks the log ends where it meant the fault to hit before it judges the daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ctl.client import Client
from supervisor.store.logfile import seal
from tests.faultkit import (
    FaultDaemon,
    FileWatch,
    Follower,
    WriteFault,
    assert_pool_back,
    follow_socket,
    last_seq,
    read_frame,
    records,
    stop_and_validate,
    wait_quiet,
    wait_task_state,
)
from tests.harness import RUN_TAG, Daemon, assert_no_leftovers, marker_processes

Start = Callable[..., FaultDaemon]


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Start]:
    """Starts FaultDaemons on tmp_path; after the test each is stopped (its file-size limit
    lifted first) and none of their agents or tasks may be left."""
    started: list[FaultDaemon] = []

    def start(overrides: dict[str, Any] | None = None, failpoint: str | None = None) -> FaultDaemon:
        d = FaultDaemon(tmp_path, overrides, failpoint).start()
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            with contextlib.suppress(OSError):
                resource.prlimit(d.pid, resource.RLIMIT_FSIZE, (-1, -1))
            d.stop()
    assert_no_leftovers()


def task(tid: str, command: str, **fields: Any) -> str:
    lines = [f'[[tasks]]\nid = "{tid}"\ncommand = {json.dumps(command)}']
    lines += [f"{k} = {json.dumps(v)}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


def ws(ws_id: str, *tasks: str) -> str:
    return f'id = "{ws_id}"\n' + "".join(tasks)


def wait_for_file(path: Path) -> str:
    """A command that runs until `path` exists (the test decides when it ends)."""
    return f"while [ ! -e {path} ]; do sleep 0.05; done"


def wait_running_with_pid(d: Daemon, task_id: str) -> dict[str, Any]:
    d.wait_task(task_id, "running")
    Daemon.wait_for(lambda: d.task(task_id).get("pid") is not None, 10, f"{task_id}'s pid")
    return d.task(task_id)


def assert_step_refused_whole(d: FaultDaemon, seq: int) -> None:
    """Nothing of the refused step is in the log, and the daemon says it is read-only."""
    assert last_seq(d) == seq, f"part of a refused step landed: {records(d.state_dir)[seq:]}"
    status = d.call("status")
    assert status["read_only"], status
    assert "READ-ONLY" in d.ctl("status").stdout
    assert d.events("store_read_only"), "no store_read_only event"
    assert '"store_read_only"' in d.output.read_text(errors="replace"), "not in the journal"


def assert_writable_again(d: FaultDaemon) -> None:
    """Once writes succeed, the daemon says so and is no longer read-only."""
    Daemon.wait_for(lambda: bool(d.events("store_writable")), 5, "store_writable")
    assert d.call("status")["read_only"] is None


def test_start_attempt_write_error_leaves_no_task_running_without_a_run(
    start_daemon: Start,
) -> None:
    """A write error on the step that starts an attempt (task running, worker busy): the
    step is refused whole, and once writes succeed the task runs and completes and the
    worker takes the next task."""
    d = start_daemon()
    release = d.tmp / "release"
    d.submit(
        ws(
            "ws-start",
            task("hold", wait_for_file(release)),
            task("victim", "sleep 0.3", timeout_s=5.0, depends_on=["hold"]),
        )
    )
    wait_running_with_pid(d, "hold")
    wait_quiet(d)
    seq = last_seq(d)
    fault = WriteFault(d)
    before = d.write_failures()
    # hold's end makes victim ready: its step records hold completed, victim queued and
    # running and the worker busy, all in one batch, which the log refuses whole.
    fault.block()
    release.touch()
    fault.wait_failed(before, "the step that starts victim")
    assert_step_refused_whole(d, seq)
    fault.lift()
    wait_task_state(d, "victim", ("completed",), 8.0, "its timeout is 5 s and writes succeed again")
    assert_writable_again(d)
    d.submit(ws("ws-later", task("later", "true")), "later.toml")
    wait_task_state(d, "later", ("completed",), 5.0, "a worker is idle")
    d.wait_ws("ws-start", "completed")
    assert_pool_back(d, 2)
    stop_and_validate(d)


def test_timeout_due_during_write_errors_still_fires(start_daemon: Start) -> None:
    """A timeout that falls due while every write fails fires once writes succeed: the task
    is killed and fails as a timeout."""
    d = start_daemon()
    d.submit(ws("ws-timeout", task("slow", "sleep 30", timeout_s=1.0, max_retries=1)))
    t = wait_running_with_pid(d, "slow")
    due = t["attempts"][0]["started_at"] + 1.0
    wait_quiet(d)
    fault = WriteFault(d)
    before = d.write_failures()
    fault.block()
    fault.wait_failed(before, "the timeout's stopping record", timeout=due - time.time() + 5)
    # Writes keep failing for a while after the timeout was due (issue: 3 s with a 2 s timeout).
    Daemon.wait_for(lambda: time.time() > due + 1.5, 5, "1.5 s of write errors past the timeout")
    assert d.task("slow").get("stopping") is None, "fault placement: the stop was recorded"
    fault.lift()
    done = wait_task_state(d, "slow", ("failed",), 4.0, "timeout due 1.5 s before writes resumed")
    assert done["failure_kind"] == "timeout" and len(done["attempts"]) == 1
    Daemon.wait_for(lambda: not marker_processes("slow."), 3, "the timed-out tree to be gone")
    d.wait_ws("ws-timeout", "failed")
    assert_pool_back(d, 2)
    stop_and_validate(d)


def test_ready_tasks_survive_a_write_error(start_daemon: Start) -> None:
    """A task made ready (its dependency ended) and a task whose retry back-off runs out,
    both while writes fail, are queued and run once writes succeed."""
    d = start_daemon({"tasks": {"backoff_base_s": 1.0}})
    release, counter = d.tmp / "release", d.tmp / "counter"
    flaky = f"n=$(cat {counter} 2>/dev/null || echo 0); echo $((n+1)) > {counter}; test $n -ge 1"
    d.submit(
        ws(
            "ws-ready",
            task("hold", wait_for_file(release)),
            task("gated", "true", depends_on=["hold"]),
            task("flaky", flaky, max_retries=3),
        )
    )
    wait_running_with_pid(d, "hold")
    d.wait_for(lambda: d.task("flaky").get("not_before") is not None, 10, "flaky's back-off")
    not_before = d.task("flaky")["not_before"]  # 2 s after its failure (2 x base)
    wait_quiet(d)
    assert time.time() < not_before - 0.5, "the back-off ran out before the fault was placed"
    seq = last_seq(d)
    fault = WriteFault(d)
    before = d.write_failures()
    fault.block()
    release.touch()  # hold's end makes gated ready, in a step the log refuses
    fault.wait_failed(before, "the step that ends hold")
    assert_step_refused_whole(d, seq)
    # The back-off runs out while writes still fail.
    Daemon.wait_for(lambda: time.time() > not_before + 0.5, 5, "flaky's back-off to run out")
    fault.lift()
    states: dict[str, str] = {}

    def both_done() -> bool:
        states.update({t: d.task(t)["state"] for t in ("gated", "flaky")})
        return set(states.values()) == {"completed"}

    try:
        Daemon.wait_for(both_done, 4.0, "gated and flaky to complete")
    except AssertionError:
        raise AssertionError(
            f"4 s after writes succeed again: gated (made ready during the write error) is "
            f"{states['gated']}, flaky (back-off ran out during it) is {states['flaky']}"
        ) from None
    d.wait_ws("ws-ready", "completed")
    assert_pool_back(d, 2)
    stop_and_validate(d)


def test_finished_with_failing_worker_release_does_not_wedge_worker(start_daemon: Start) -> None:
    """A write error on the step that completes a task and frees its worker: once writes
    succeed the task is completed, the worker idle again (no late result), and it runs the
    next task."""
    d = start_daemon()
    release, finish = d.tmp / "release", d.tmp / "finish"
    d.submit(
        ws(
            "ws-finish",
            task("hold", wait_for_file(release)),
            task("done", wait_for_file(finish)),
        )
    )
    wait_running_with_pid(d, "hold")
    wid = wait_running_with_pid(d, "done")["worker_id"]
    wait_quiet(d)
    seq = last_seq(d)
    fault = WriteFault(d)
    before = d.write_failures()
    fault.block()  # done's step: completed and its worker idle, refused as one batch
    finish.touch()
    fault.wait_failed(before, f"done's step ({wid} to idle)")
    assert_step_refused_whole(d, seq)
    fault.lift()

    def worker() -> dict[str, Any]:
        return next(w for w in d.workers() if w["id"] == wid)

    try:
        Daemon.wait_for(lambda: worker()["state"] == "idle", 5, f"{wid} to be idle")
    except AssertionError:
        w = worker()
        raise AssertionError(
            f"{wid} is {w['state']} on {w['task_id']} (which is "
            f"{d.task('done')['state']}) 5 s after writes succeed again; late results: "
            f"{[e.get('message') for e in d.events('late_result')]}"
        ) from None
    assert not d.events("late_result"), d.events("late_result")
    # hold keeps the other worker: the next task needs this one.
    d.submit(ws("ws-next", task("next", "true")), "next.toml")
    wait_task_state(d, "next", ("completed",), 5.0, f"{wid} is idle")
    release.touch()
    d.wait_ws("ws-finish", "completed")
    assert_pool_back(d, 2)
    stop_and_validate(d)


def test_replacement_spawn_failure_does_not_shrink_pool(start_daemon: Start) -> None:
    """A worker whose agent cannot be spawned (spawn_fail) and a dead worker whose
    replacement's starting record fails to write are both made good: the pool keeps its
    size and runs work."""
    d = start_daemon(failpoint="spawn_fail:1")
    d.wait_event("worker_spawn_failed", timeout=10)
    assert_pool_back(d, 2)
    victim = live_idle_worker(d)
    d.wait_for(
        lambda: time.time() - (victim["started_at"] or 0) > 0.5 + 0.2, 5, "a worker past its youth"
    )
    wait_quiet(d)
    seq = last_seq(d)
    fault = WriteFault(d)
    before = d.write_failures()
    fault.block()  # the exit's step: the worker shut down and its replacement starting
    os.kill(victim["pid"], signal.SIGKILL)
    fault.wait_failed(before, "the step of the worker's exit")
    assert_step_refused_whole(d, seq)
    fault.lift()
    assert_pool_back(d, 2, timeout=6.0)
    d.submit(ws("ws-after", task("a1", "true"), task("a2", "true")))
    d.wait_ws("ws-after", "completed")
    stop_and_validate(d)


def live_idle_worker(d: Daemon) -> dict[str, Any]:
    Daemon.wait_for(lambda: any(w["state"] == "idle" for w in d.workers()), 5, "an idle worker")
    return next(w for w in d.workers() if w["state"] == "idle")


def test_refused_request_changed_nothing(start_daemon: Start) -> None:
    """A request refused for a write error leaves no record of it behind (its error says
    nothing changed, and that is true); the same request succeeds once writes do."""
    d = start_daemon()
    counter = d.tmp / "counter"
    once = f"n=$(cat {counter} 2>/dev/null || echo 0); echo $((n+1)) > {counter}; test $n -ge 1"
    d.submit(ws("ws-refused", task("once", once, max_retries=1)))
    d.wait_ws("ws-refused", "failed")
    Daemon.wait_for((d.state_dir / "archive" / "ws-refused.json").exists, 5, "the archive")
    size = wait_quiet(d)
    seq = last_seq(d)
    fault = WriteFault(d)
    fault.block()  # the retry's records (task pending, workstream reopened) are refused
    r = d.ctl("retry", "once")
    assert r.returncode == 1 and "nothing was changed" in r.stderr, (r.returncode, r.stderr)
    after = records(d.state_dir)
    assert after[-1]["seq"] == seq and d.log_path.stat().st_size == size, (
        f"the refused retry said the state is unchanged, yet left {after[seq:]}"
    )
    assert d.task("once")["state"] == "failed"
    assert d.call("ws_show", workstream="ws-refused")["state"] == "failed"
    fault.lift()
    assert d.ctl("retry", "once").returncode == 0
    wait_task_state(d, "once", ("completed",), 5.0, "retried once writes succeed")
    d.wait_ws("ws-refused", "completed")
    assert_pool_back(d, 2)
    stop_and_validate(d)


def test_follower_gets_no_event_before_its_sync(start_daemon: Start) -> None:
    """With a 0.5 s fdatasync, neither an `events -f` follower nor events.jsonl sees an
    event sooner than 0.5 s after its record was written to the log."""
    slow = 0.5
    d = start_daemon(failpoint=f"sync_delay:{slow}")
    watch = FileWatch(d.state_dir)
    follower = Follower(d.socket)
    try:
        d.call("submit", text=ws("ws-probe", task("probe", "true")), source="probe.toml")
        follower.wait("workstream_submitted", workstream_id="ws-probe")  # it is registered
        out = d.call("submit", text=ws("ws-sync", task("quick", "true")), source="sync.toml")
        d.wait_ws("ws-sync", "completed")
        done = next(
            r["seq"]
            for r in records(d.state_dir)
            if (r["entity"], r["id"], r["to"]) == ("workstream", "ws-sync", "completed")
        )
        early = []
        for name, seq in (("workstream_submitted", out["seq"]), ("workstream_completed", done)):
            (got, _), *_ = follower.wait(name, workstream_id="ws-sync")
            written = watch.record_seen[seq]

            def seen_in_file(name: str = name) -> list[float]:
                return [
                    t
                    for t, e in watch.event_seen
                    if e["event"] == name and e.get("workstream_id") == "ws-sync"
                ]

            # The file is polled every 2 ms: its line may be seen just after the frame.
            Daemon.wait_for(lambda: bool(seen_in_file()), 2, f"{name} in events.jsonl")
            line = seen_in_file()[0]
            for where, when in (("the follower", got), ("events.jsonl", line)):
                if when - written < slow - 0.05:
                    early.append(
                        f"{name} reached {where} {when - written:+.3f}s after record {seq}"
                    )
        assert not early, (
            f"events seen before the {slow}s fdatasync that covers their record: {early}"
        )
    finally:
        follower.close()
        watch.close()
    assert_pool_back(d, 2)
    stop_and_validate(d)


def test_clock_step_forward_and_back_fires_no_timeout_early_or_late(
    start_daemon: Start, tmp_path: Path
) -> None:
    """The wall clock stepped +700 s and then -700 s while tasks run: every timeout fires
    3 s after its attempt started (within one check interval), a task inside its timeout
    completes, the back-off between attempts keeps its length, and no worker goes
    unresponsive."""
    tol = 0.1 + 0.4  # one health check interval, plus what the kill and the record take
    offset = tmp_path / "wall-offset"
    offset.write_text("0")
    d = start_daemon(failpoint=f"wall_offset_file:{offset}")
    follower = Follower(d.socket)
    try:
        d.submit(
            ws(
                "ws-clock",
                task("capped", "sleep 30", timeout_s=3.0, max_retries=2, critical=False),
                task("inside", "sleep 2", timeout_s=3.0),
            )
        )
        follower.wait("workstream_submitted", workstream_id="ws-clock")  # it is registered
        start = wait_running_with_pid(d, "capped")["attempts"][0]["started_at"]  # offset 0
        wait_running_with_pid(d, "inside")
        Daemon.wait_for(lambda: time.time() > start + 0.5, 5, "0.5 s into the attempt")
        offset.write_text("700")
        Daemon.wait_for(lambda: time.time() > start + 1.5, 5, "1.5 s into the attempt")
        offset.write_text("-700")
        (fired, _), *_ = follower.wait("task_timeout", task_id="capped", timeout=10)
        assert abs(fired - (start + 3.0)) <= tol, (
            f"capped's first timeout fired {fired - start:.2f}s after it started (timeout 3 s)"
        )
        inside = wait_task_state(d, "inside", ("completed",), 5.0, "it needs 2 s of its 3")
        assert len(inside["attempts"]) == 1, inside["attempts"]
        # Attempt 2 starts and times out under the -700 s clock: both measured in it.
        t = wait_task_state(d, "capped", ("failed",), 12.0, "two 3 s attempts")
        first, second = t["attempts"]
        gap = second["started_at"] - first["ended_at"]
        assert abs(gap - 0.2 * 2) <= tol, f"back-off of {gap:.2f}s where 0.4 s was due"
        fired2 = follower.wait("task_timeout", 2, task_id="capped")[1][0]
        started2 = second["started_at"] + 700  # recorded on the -700 s clock
        assert abs(fired2 - (started2 + 3.0)) <= tol, (
            f"capped's second timeout fired {fired2 - started2:.2f}s after it started"
        )
    finally:
        follower.close()
        offset.write_text("0")
    sick = [e["event"] for e in d.events() if e["event"].startswith("worker_")]
    assert not sick, f"worker health changed by the clock steps: {sick}"
    assert all(w.get("restarts", 0) == 0 for w in d.workers()), d.workers()
    assert_pool_back(d, 2)
    stop_and_validate(d)


@pytest.mark.parametrize("damage", ["wrong-type", "unknown-reference"])
def test_applicable_checksummed_bad_record_exits_65(tmp_path: Path, damage: str) -> None:
    """A record with a good checksum that cannot be applied (a wrong type, a dependency on
    no task) stops orchd with exit 65 naming the file, the line and an `orchctl state`
    command; no traceback."""
    d = Daemon(tmp_path).start()
    # A cycle: both tasks stay pending, so records about a pending task stay legal.
    d.submit(ws("ws-bad", task("x", "true", depends_on=["y"]), task("y", "true", depends_on=["x"])))
    assert d.stop() == 0
    log = d.state_dir / "transitions.jsonl"
    seq = last_seq(d)
    if damage == "wrong-type":
        bad = {
            "seq": seq + 1, "ts": time.time(), "entity": "task", "id": "x",
            "from": "pending", "to": "queued", "cause": "auto",
            "changes": {"attempt": {"attempt_id": 5, "number": 1, "worker_id": "worker-001",
                                    "started_at": time.time()}},
        }  # fmt: skip
    else:
        bad = {
            "seq": seq + 1, "ts": time.time(), "entity": "task", "id": "x",
            "from": "pending", "to": "pending", "cause": "operator",
            "changes": {"depends_on": ["no-such-task"]},
        }  # fmt: skip
    # A good record after it: the damage is inside the log, not a torn end.
    good = {
        "seq": seq + 2, "ts": time.time(), "entity": "resource", "id": "git_repo_write",
        "from": "defined", "to": "defined", "cause": "operator", "changes": {"max_holders": 1},
    }  # fmt: skip
    with log.open("ab") as f:
        for rec in (bad, good):
            f.write(seal(json.dumps(rec, separators=(",", ":")).encode()))
    line = len(log.read_bytes().splitlines()) - 1
    err_path = tmp_path / "orchd.err"
    with err_path.open("wb") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "--config", str(d.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=err_file,
            cwd=tmp_path,
            env=dict(os.environ) | {"ORCHD_TEST_RUN": RUN_TAG},
            start_new_session=True,
        )
    try:
        Daemon.wait_for(
            lambda: proc.poll() is not None or answers(d.socket), 20, "orchd to exit or serve"
        )
        started = proc.poll() is None
        if started:
            proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert_no_leftovers()
    err = err_path.read_text()
    assert not started, f"orchd started and served on a log whose line {line} cannot be applied"
    assert proc.returncode == 65, (
        f"orchd exited {proc.returncode}, not 65: {err.strip().splitlines()[-1:]}"
    )
    assert "Traceback" not in err, err
    assert "transitions.jsonl" in err and f"line {line}" in err and "orchctl state" in err, err


def answers(sock: str) -> bool:
    try:
        with Client(sock, timeout_s=2) as c:
            c.call("status")
        return True
    except Exception:
        return False


def test_slow_follower_is_told_and_closed(start_daemon: Start) -> None:
    """A follower that reads nothing while more than 1,000 events are produced is sent an
    error frame and its connection is closed; the daemon serves on."""
    d = start_daemon()
    sock = follow_socket(d.socket, timeout_s=3.0)
    try:
        # Read up to one event, so the follow is known to be registered; then never again.
        d.call("submit", text=ws("ws-probe", task("probe", "true")), source="probe.toml")
        first = read_frame(sock)
        assert first is not None and first["ok"], first
        # One event per dependency cycle: 1,200 cycles are 1,201 events in one step.
        cycles = "".join(
            task(f"c{i}a", "true", depends_on=[f"c{i}b"])
            + task(f"c{i}b", "true", depends_on=[f"c{i}a"])
            for i in range(1200)
        )
        out = d.call("submit", text=ws("ws-burst", cycles), source="burst.toml")
        assert len(out["cycles"]) == 1200
        frames: list[dict[str, Any]] = []
        closed = False
        try:
            while (frame := read_frame(sock)) is not None:
                frames.append(frame)
            closed = True
        except TimeoutError:
            pass
        errors = [f for f in frames if not f.get("ok")]
        assert errors and closed, (
            f"a follower left behind got {len(frames)} events, "
            f"{'an error frame' if errors else 'no error frame'}, and its connection "
            f"{'was closed' if closed else 'stayed open (silent for 3 s)'}"
        )
        assert errors[-1] is frames[-1] and errors[-1]["error"]["message"], errors[-1]
    finally:
        sock.close()
    assert d.call("status")["draining"] is False
    stop_and_validate(d)
