"""Retention against the real daemon, through the real orchctl: finished runs beyond the
count are archived and retired, shown and their logs read from the archive (also after a
restart), `ws retire` by hand, a backup from before a retirement restores, and a SIGKILL
at each step of a retirement loses nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from supervisor.store.backups import peek_seq
from tests.harness import ROOT, Daemon, assert_no_leftovers

PIPELINE = """name = "nightly"
[[tasks]]
id = "build"
command = "echo built-$RANDOM-ok"
[[tasks]]
id = "check"
command = ["sh", "-c", "echo checked"]
depends_on = ["build"]
"""


def two_tasks(ws_id: str) -> str:
    return (
        f'id = "{ws_id}"\n[[tasks]]\nid = "a"\ncommand = "echo hello-from-a"\n'
        '[[tasks]]\nid = "b"\ncommand = "echo hello-from-b"\ndepends_on = ["a"]\n'
    )


def ok(d: Daemon, *args: str) -> str:
    r = d.ctl(*args)
    assert r.returncode == 0, f"orchctl {' '.join(args)} exited {r.returncode}: {r.stderr}"
    return r.stdout


def live_ids(d: Daemon) -> list[str]:
    return [w["id"] for w in d.ctl_json("ws", "list")]


def offline(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ctl", "state", *args, "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_runs_beyond_the_count_are_archived_shown_and_their_logs_read_after_a_restart(
    tmp_path: Path,
) -> None:
    """keep_finished=1: once run 2 finishes, run 1 is archived whole (document, checkpoints,
    task logs), retired (out of `ws list`, its files deleted), shown by `ws show
    --archived` and its logs read by `orchctl logs`, before and after a restart; the run
    counter goes on."""
    d = Daemon(tmp_path, {"retention": {"keep_finished": 1}}).start()
    try:
        first = d.submit(PIPELINE)["workstream_id"]
        d.wait_ws(first, "completed")
        built = ok(d, "logs", f"{first}/build")
        assert "built-" in built
        second = d.submit(PIPELINE, "b.toml")["workstream_id"]
        d.wait_event("workstream_retired", workstream_id=first)
        assert live_ids(d) == [second]
        arch = d.state_dir / "archive" / f"{first}.tar.gz"
        with tarfile.open(arch) as tar:
            names = tar.getnames()
        assert "workstream.json" in names and "logs/build.log" in names
        assert any(n.startswith("checkpoints/") for n in names)
        # Its own files are gone (after the record: the event is published after it).
        d.wait_for(
            lambda: (
                not (d.state_dir / "logs" / first).exists()
                and not list((d.state_dir / "checkpoints").glob(f"{first}_*"))
            ),
            10,
            "the retired run's files to be deleted",
        )
        for _ in range(2):
            shown = d.ctl_json("ws", "show", "--archived", first)
            assert shown["id"] == first and shown["state"] == "completed"
            assert [t["name"] for t in shown["tasks"]] == ["build", "check"]
            assert all(t["attempts"] for t in shown["tasks"])
            assert "(retired; archive" in ok(d, "ws", "show", "--archived", first)
            assert ok(d, "logs", f"{first}/build") == built
            assert "checked" in ok(d, "logs", f"{first}/check")
            listed = {a["id"]: a for a in d.ctl_json("ws", "list", "--archived")}
            assert (listed[first]["name"], listed[first]["state"]) == ("nightly", "completed")
            assert listed[first]["tasks"] == 2
            assert first in ok(d, "ws", "list", "--archived")
            assert d.stop() == 0
            d.start()
            assert live_ids(d) == [second]
        r = d.ctl("ws", "show", first)
        assert r.returncode == 3 and "ws show --archived" in r.stderr
        shown_task = ok(d, "show", f"{first}/build", "--logs")
        assert "built-" in shown_task and "attempt" in shown_task
        # The next snapshot no longer holds it.
        d.wait_for(
            lambda: f'"{first}/build"' not in (d.state_dir / "current.json").read_text(),
            10,
            "a snapshot without the retired run",
        )
        third = d.submit(PIPELINE, "c.toml")["workstream_id"]
        assert third == "nightly-3"
        d.wait_event("workstream_retired", workstream_id=second)
        assert json.loads(ok(d, "--json", "state", "validate"))["ok"] is True
    finally:
        d.stop()
    assert_no_leftovers()


def test_ws_retire_by_hand_refuses_a_running_one_and_is_an_intervention(
    tmp_path: Path,
) -> None:
    """`orchctl ws retire` of a running workstream is refused (exit 5, what to do); of a
    failed one it prints the record's seq, and interventions.log has it."""
    gate = tmp_path / "gate"
    d = Daemon(tmp_path).start()
    try:
        d.submit(
            'id = "slow"\n[[tasks]]\nid = "s"\n'
            f'command = "while [ ! -e {gate} ]; do sleep 0.02; done"\n'
        )
        d.wait_task("slow/s", "running")
        r = d.ctl("ws", "retire", "slow")
        assert r.returncode == 5, r
        assert "only a finished one" in r.stderr and "running" in r.stderr
        gate.touch()
        d.submit('id = "bad"\n[[tasks]]\nid = "x"\ncommand = "exit 3"\nmax_retries = 0\n', "b.toml")
        d.wait_ws("bad", "failed")
        out = ok(d, "ws", "retire", "bad", "--reason", "triaged")
        assert "ok (seq " in out and "state=retired" in out
        assert "bad" not in live_ids(d)
        assert d.ctl_json("ws", "show", "--archived", "bad")["state"] == "failed"
        entries = [
            json.loads(x) for x in (d.state_dir / "interventions.log").read_text().splitlines()
        ]
        retire = [e for e in entries if e["method"] == "ws_retire"]
        assert [e["ok"] for e in retire] == [False, True]
        assert retire[1]["params"]["reason"] == "triaged"
    finally:
        d.stop()
    assert_no_leftovers()


def test_a_backup_from_before_a_retirement_restores(tmp_path: Path) -> None:
    """A backup taken while the run was live is restored with the daemon stopped: the
    restart replays the log's later records, the retirement among them (nothing recorded
    after the backup is lost), so the run stays retired; the state is valid, and the run's
    logs are read and it is shown from its archive."""
    d = Daemon(tmp_path, {"store": {"snapshot_interval_s": 0.2}}).start()
    try:
        d.submit(two_tasks("ws-r"))
        d.wait_ws("ws-r", "completed")
        assert d.stop() == 0  # a clean stop writes a snapshot with ws-r live
        d.start()
        out = ok(d, "ws", "retire", "ws-r")
        retired_at = int(re.search(r"ok \(seq (\d+)", out)[1])  # type: ignore[index]
        assert "ws-r" not in live_ids(d)
        assert d.stop() == 0
        # A backup (a full copy or a restore point) of a state before the retirement.
        backups = sorted((d.state_dir / "backups").iterdir())
        live_in = [b for b in backups if (peek_seq(b) or retired_at) < retired_at]
        assert live_in, "no backup from before the retirement"
        r = offline(d.state_dir, "restore", "--from-backup", live_in[-1].name, "--yes")
        assert r.returncode == 0, r.stderr
        assert "replayed at the next start" in r.stdout
        d.start()
        assert "ws-r" not in live_ids(d)  # the retirement, after the backup, was replayed
        # Its logs are read from the archive (its files were deleted).
        assert "\nhello-from-a\n" in ok(d, "logs", "ws-r/a")
        assert d.ctl_json("ws", "show", "--archived", "ws-r")["state"] == "completed"
        assert json.loads(ok(d, "--json", "state", "validate"))["ok"] is True
    finally:
        d.stop()
    assert_no_leftovers()


def test_a_live_workstream_whose_log_file_is_gone_is_read_from_its_archive(
    tmp_path: Path,
) -> None:
    """`orchctl logs` of a live task whose log file is gone (a restore put it back after
    its files were deleted) reads the copy in its archive."""
    d = Daemon(tmp_path).start()
    try:
        d.submit(two_tasks("ws-l"))
        d.wait_ws("ws-l", "completed")
        from supervisor.store import archive  # the store's own writer, as the daemon's

        archive.write_archive(d.state_dir, "ws-l", b'{"workstream": {"id": "ws-l"}}')
        (d.state_dir / "logs" / "ws-l" / "a.log").unlink()
        assert "hello-from-a" in ok(d, "logs", "ws-l/a")
    finally:
        d.stop()
    assert_no_leftovers()


@pytest.mark.parametrize(
    "point", ["retire_archive_tmp", "retire_archived", "retire_recorded", "retire_files"]
)
def test_a_sigkill_at_each_step_of_a_retirement_loses_nothing(tmp_path: Path, point: str) -> None:
    """The daemon dies at a step of `ws retire`; restarted, the state is valid and the run
    is either live (its logs in place) or archived (its files gone, its logs read from
    the archive), never neither; retiring it again then works."""
    d = Daemon(tmp_path, failpoint=f"crash_at:{point}").start()
    try:
        d.submit(two_tasks("ws-k"))
        d.wait_ws("ws-k", "completed")
        # A snapshot first, so that `state validate` has a current.json to check after.
        d.wait_for(lambda: (d.state_dir / "current.json").exists(), 10, "a snapshot")
        r = d.ctl("ws", "retire", "ws-k")
        # The files are deleted after the answer (it waits for the record only).
        assert r.returncode != 0 or point == "retire_files"
        assert d.proc is not None
        d.proc.wait(20)
        d.kill()
        d.failpoint = None
        d.start()
        assert json.loads(ok(d, "--json", "state", "validate"))["ok"] is True
        live = "ws-k" in live_ids(d)
        archived = (d.state_dir / "archive" / "ws-k.tar.gz").exists()
        assert live or archived
        if point in ("retire_archive_tmp", "retire_archived"):
            assert live  # the record was never written
        if not live:
            shown = d.ctl_json("ws", "show", "--archived", "ws-k")
            assert shown["state"] == "completed"
            # A start finishes the deletions the crash cut short.
            assert not (d.state_dir / "logs" / "ws-k").exists()
            assert not list((d.state_dir / "checkpoints").glob("ws-k_*"))
        else:
            ok(d, "ws", "retire", "ws-k")
        assert "hello-from-a" in ok(d, "logs", "ws-k/a")
        assert "hello-from-b" in ok(d, "logs", "ws-k/b")
        assert not list((d.state_dir / "archive").glob("*.tmp"))
        assert json.loads(ok(d, "--json", "state", "validate"))["ok"] is True
    finally:
        d.stop()
    assert_no_leftovers()


def test_runs_retire_by_age_after_a_clock_step_and_the_counts_return_to_baseline(
    tmp_path: Path,
) -> None:
    """keep_finished_s=1h: after a 2 h clock step every finished run is retired and
    `orchctl status` counts no workstream and no task again; a failed run stays until
    its own longer limit (keep_failed_s=1 day) has passed too."""
    offset = tmp_path / "wall-offset"
    d = Daemon(
        tmp_path,
        {"retention": {"keep_finished_s": 3600.0, "keep_failed_s": 86400.0}},
        failpoint=f"wall_offset_file:{offset}",
    ).start()
    try:
        base = d.call("status")
        assert sum(base["tasks"].values()) == 0
        for n in range(8):
            tasks = "".join(f'[[tasks]]\nid = "t{i}"\ncommand = ["true"]\n' for i in range(5))
            d.submit(f'id = "run-{n}"\n{tasks}', f"r{n}.toml")
        d.submit('id = "broken"\n[[tasks]]\nid = "x"\ncommand = "exit 1"\nmax_retries = 0\n')
        for n in range(8):
            d.wait_ws(f"run-{n}", "completed")
        d.wait_ws("broken", "failed")
        assert sum(d.call("status")["tasks"].values()) == 41
        offset.write_text("7200")

        def counts() -> tuple[int, int]:
            st = d.call("status")
            return sum(st["workstreams"].values()), sum(st["tasks"].values())

        d.wait_for(lambda: counts() == (1, 1), 15, "the finished runs to be retired")
        assert live_ids(d) == ["broken"]
        assert len(d.events("workstream_retired")) == 8
        offset.write_text(str(2 * 86400))
        d.wait_for(lambda: counts() == (0, 0), 15, "the failed run to be retired")
        assert len(list((d.state_dir / "archive").glob("*.tar.gz"))) == 9
        # Before its first snapshot (1 s) a daemon's directory has no current.json, which
        # validate reports: this run can be quicker than that.
        d.wait_for((d.state_dir / "current.json").exists, 10, "the first snapshot")
        assert json.loads(ok(d, "--json", "state", "validate"))["ok"] is True
    finally:
        d.stop()
    assert_no_leftovers()
