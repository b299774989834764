"""Workstream runs against the real daemon with real orchctl processes: the README's
example submitted again and again, each run with its own ids and logs; bare task ids
refused when ambiguous; a resubmission that overlaps an earlier run sharing the
`git_repo_write` resource correctly; `submit --wait` exiting with the run's verdict."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ROOT, Daemon, assert_no_leftovers

EXAMPLE = str(ROOT / "config" / "examples" / "build.toml")
TASKS = ("fetch", "compile", "lint", "package")


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    # The example writes under $TMPDIR/orchd-example/<run>: this test's own directory.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    # Three workers: a later run's fetch can run beside an earlier run's compile and lint.
    d = Daemon(tmp_path, {"workers": {"count": 3}}).start()
    try:
        yield d
    finally:
        d.stop()
        assert_no_leftovers()


def submitted_id(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, r.stderr
    out: str = json.loads(r.stdout)["workstream_id"]
    return out


def holder_intervals(d: Daemon, ws_ids: list[str]) -> list[tuple[float, float, str]]:
    """(start, end, task) of every attempt of a task that uses git_repo_write."""
    out = []
    for ws in ws_ids:
        for t in d.call("ws_show", workstream=ws)["tasks"]:
            if "git_repo_write" in t.get("resources", []):
                out.extend((a["started_at"], a["ended_at"], t["id"]) for a in t["attempts"])
    return sorted(out)


def test_readme_example_three_runs_each_its_own_ids_and_logs(daemon: Daemon) -> None:
    """The example submitted three times in a row (each while the one before still runs)
    makes nightly-1, -2, -3; all complete, each with its own logs; the shared resource
    never has two holders; a bare `retry compile` is refused as ambiguous (exit 2, the
    three full names newest first, nothing recorded) and `retry nightly-3/compile` works."""
    ids = []
    for n in range(3):
        ids.append(submitted_id(daemon.ctl("--json", "submit", EXAMPLE)))
        if n < 2:  # the next one goes in while this one is still going (compile sleeps 1 s)
            daemon.wait_task(f"{ids[-1]}/compile", ("running", "completed"))
    assert ids == ["nightly-1", "nightly-2", "nightly-3"]
    for ws in ids:
        shown = daemon.wait_ws(ws, "completed", timeout=60)
        assert [t["id"] for t in shown["tasks"]] == [f"{ws}/{t}" for t in TASKS]
        assert {t["name"] for t in shown["tasks"]} == set(TASKS)
    for earlier, later in itertools.pairwise(ids):
        went_in = daemon.call("ws_show", workstream=later)["submitted_at"]
        assert went_in < daemon.call("ws_show", workstream=earlier)["ended_at"], (
            f"{later} was submitted while {earlier} was still going"
        )

    spans = holder_intervals(daemon, ids)
    assert len(spans) == 6  # fetch and package of three runs
    for (_, end, a), (start, _, b) in itertools.pairwise(spans):
        assert end <= start, f"{a} and {b} held git_repo_write at once"

    for ws in ids:
        log = daemon.state_dir / "logs" / ws / "package.log"
        assert f"task {ws}/package" in log.read_text() and "packaged app" in log.read_text()
        r = daemon.ctl("logs", f"{ws}/lint")
        assert r.returncode == 0 and "lint clean" in r.stdout, r.stderr

    seq = daemon.call("status")["last_seq"]
    r = daemon.ctl("retry", "compile")
    assert r.returncode == 2, r
    assert "ambiguous" in r.stderr
    places = [r.stderr.index(f"nightly-{n}/compile") for n in (3, 2, 1)]
    assert places == sorted(places), r.stderr
    assert daemon.call("status")["last_seq"] == seq

    r = daemon.ctl("--json", "retry", "nightly-3/compile")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["task_id"] == "nightly-3/compile"
    daemon.wait_ws("nightly-3", "completed", timeout=60)
    assert len(daemon.task("nightly-3/compile")["attempts"]) == 2
    assert len(daemon.task("nightly-2/compile")["attempts"]) == 1

    # The pipeline's runs, newest first, and its name for the newest run.
    listed = daemon.ctl_json("ws", "list", "--name", "nightly")
    assert [w["id"] for w in listed] == ["nightly-3", "nightly-2", "nightly-1"]
    assert daemon.ctl_json("ws", "show", "nightly")["id"] == "nightly-3"
    r = daemon.ctl("show", "compile", "--workstream", "nightly-1")
    assert r.returncode == 0 and "nightly-1/compile" in r.stdout, r.stderr


def test_run_numbers_survive_a_restart(daemon: Daemon) -> None:
    """After a restart the next run of a pipeline gets the next number (the counter is
    in the state), a bare id of the only run resolves, and an explicit id that exists is
    refused with exit 5 naming the way out."""
    assert submitted_id(daemon.ctl("--json", "submit", EXAMPLE)) == "nightly-1"
    daemon.wait_ws("nightly-1", "completed", timeout=60)
    daemon.stop()
    daemon.start()
    # One run: the guide's bare `orchctl retry task-001` style works on it.
    assert daemon.ctl_json("show", "compile")["id"] == "nightly-1/compile"
    assert submitted_id(daemon.ctl("--json", "submit", EXAMPLE)) == "nightly-2"
    r = daemon.ctl("submit", EXAMPLE, "--id", "nightly-1")
    assert r.returncode == 5 and "--id" in r.stderr and "exists already" in r.stderr, r
    daemon.wait_ws("nightly-2", "completed", timeout=60)


def test_submit_wait_prints_transitions_and_exits_with_the_verdict(daemon: Daemon) -> None:
    """`submit --wait` prints a line per task transition and exits 0 on completion; with
    --json every line is an object; a failed run exits 1."""
    r = daemon.ctl("submit", EXAMPLE, "--wait")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any("nightly-1/compile" in x and "-> running" in x for x in lines), r.stdout
    assert any("nightly-1/package" in x and "-> completed" in x for x in lines), r.stdout
    assert lines[-1] == "workstream nightly-1 completed"

    r = daemon.ctl("--json", "submit", EXAMPLE, "--wait")
    assert r.returncode == 0, r.stderr
    objs = [json.loads(x) for x in r.stdout.splitlines()]
    assert objs[0]["kind"] == "submitted" and objs[0]["workstream_id"] == "nightly-2"
    assert objs[-1] == {"kind": "verdict", "workstream_id": "nightly-2", "state": "completed"}
    # Every move from the submission on, even of a task done before the follow began.
    fetch = [(o.get("from"), o["to"]) for o in objs if o.get("id") == "nightly-2/fetch"]
    assert fetch == [("pending", "queued"), ("queued", "running"), ("running", "completed")]
    moves = [(o["id"], o["to"]) for o in objs if o["kind"] == "task"]
    assert ("nightly-2/package", "completed") in moves

    bad = daemon.tmp / "bad.toml"
    bad.write_text('name = "broken"\n[[tasks]]\nid = "x"\ncommand = "exit 3"\nmax_retries = 0\n')
    r = daemon.ctl("submit", str(bad), "--wait")
    assert r.returncode == 1, r
    assert "broken-1/x" in r.stdout and "workstream broken-1 failed" in r.stdout


def test_submit_wait_exits_7_when_the_daemon_dies(daemon: Daemon) -> None:
    """A follower whose daemon is killed does not hang: it exits 7 (unreachable)."""
    slow = daemon.tmp / "slow.toml"
    slow.write_text('name = "slow"\n[[tasks]]\nid = "s"\ncommand = "sleep 30"\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctl", "--socket", daemon.socket, "submit", str(slow), "--wait"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        # Its first line is the submission; the task's line comes from the follow stream.
        while "slow-1/s" not in (line := proc.stdout.readline()):
            assert line, proc.stderr.read() if proc.stderr else ""
        daemon.wait_task("slow-1/s", "running")
        daemon.kill()
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 7, (out, err)
    assert "closed the connection" in err or "not running" in err
    daemon.start()  # for the fixture's clean stop (the task is retried as interrupted)


def test_a_follower_that_goes_away_leaves_the_daemon_undisturbed(daemon: Daemon) -> None:
    """Killing `submit --wait` mid-run ends its stream quietly: the run completes, the
    daemon answers, and its log shows no error from the dropped follower."""
    flag = daemon.tmp / "go"
    gated = daemon.tmp / "gated.toml"
    wait_for_flag = f"while [ ! -e {flag} ]; do sleep 0.05; done"
    gated.write_text(f'name = "gated"\n[[tasks]]\nid = "g"\ncommand = "{wait_for_flag}"\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctl", "--socket", daemon.socket, "submit", str(gated), "--wait"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        while "gated-1/g" not in (line := proc.stdout.readline()):
            assert line
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    flag.touch()
    daemon.wait_ws("gated-1", "completed")
    assert daemon.call("status")["workstreams"] == {"completed": 1}
    out = daemon.output.read_text()
    assert "Traceback" not in out and '"level":"error"' not in out, out[-3000:]
