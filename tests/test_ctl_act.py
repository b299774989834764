"""Commands that throw work away act when `y` is answered on a terminal (a real pty);
commands that lose nothing do not ask even without one. Real orchd, real orchctl. (Apart
from test_ctl_confirm.py: that module's shared daemon must not be alive here, where every
process left at the end is a leftover.)"""

from __future__ import annotations

from pathlib import Path

from tests.harness import Daemon, assert_no_leftovers
from tests.test_ctl_confirm import BAD, World, _offline_dir, _rerun, _set_up, ctl
from tests.test_operator import ws_file


def test_yes_on_a_terminal_acts_and_losing_nothing_does_not_ask(tmp_path: Path) -> None:
    """`y` on a terminal does each destructive command; retry of a failed task, resource
    set-limit, dep remove and cancel of a pending task do not ask even without a terminal;
    `--yes` after the arguments is taken as typed."""
    (tmp_path / "offline").mkdir()
    (tmp_path / "live").mkdir()
    offline = _offline_dir(tmp_path / "offline")
    live = Daemon(tmp_path / "live").start()
    try:
        _set_up(live)
        live.submit(BAD, "bad.toml")
        live.wait_task("bad", "failed")
        w = World(live, offline)
        sock = live.socket

        def yes(name: str) -> None:
            r = ctl(sock, w.argv(name), stdin="y\n")
            assert r.returncode == 0, r.stderr
            assert "[y/N]" in r.stderr and r.stdout.startswith("ok (seq ")

        # Losing nothing: done at once with no terminal.
        q = ws_file(
            "ws-q",
            {"id": "q1", "command": "sleep 600", "timeout_s": 900},
            {"id": "q2", "command": "true", "depends_on": ["q1"]},
            {"id": "q3", "command": "true", "depends_on": ["q1"]},
        )
        live.submit(q, "q.toml")
        live.wait_task("q1", "running")
        for argv in (
            ["retry", "bad"],
            ["resource", "set-limit", "git_repo_write", "2"],
            ["dep", "remove", "--from", "q3", "--to", "q1"],
            ["cancel", "q2"],  # pending: nothing is lost
        ):
            r = ctl(sock, argv, stdin="closed")
            assert r.returncode == 0 and "[y/N]" not in r.stderr, (argv, r.stderr)
        assert live.task("q2")["state"] == "cancelled"
        r = ctl(sock, ["cancel", "q1", "--yes"], stdin="closed")  # frees a worker
        assert r.returncode == 0, r.stderr
        live.wait_task("q1", "cancelled")
        live.wait_task("q3", "completed")
        live.wait_for(lambda: len(live.task("bad")["attempts"]) == 2, 10, "bad to run again")
        live.wait_task("bad", "failed")

        yes("ws-retry")
        live.wait_ws("ws-done", "completed")
        assert len(live.task("d1")["attempts"]) == 2
        yes("ws-resume")
        live.wait_ws("ws-done", "completed")
        assert len(live.task("d1")["attempts"]) == 3
        yes("skip")
        assert live.task("after")["skipped"] is True

        yes("worker-shutdown-force")
        _rerun(live, "long", 2)
        assert live.task("long")["attempts"][0]["failure_kind"] == "worker_lost"
        yes("ws-rollback")
        live.wait_for(
            lambda: any(
                a.get("failure_kind") == "interrupted" for a in live.task("long")["attempts"]
            ),
            10,
            "the rollback to stop long",
        )
        _rerun(live, "long", 3)

        yes("cancel-running")
        live.wait_task("long", "cancelled")

        r = ctl(sock, w.argv("state-repair"), stdin="y\n")
        assert r.returncode == 0 and "cut the torn tail" in r.stdout, r.stderr
        r = ctl(sock, w.argv("state-repair"), stdin="closed")  # nothing left: nothing to ask
        assert r.returncode == 0 and r.stdout.strip() == "nothing to repair", r.stderr
        r = ctl(sock, w.argv("state-restore"), stdin="y\n")
        assert r.returncode == 0 and "current.json rebuilt by replaying" in r.stdout, r.stderr
    finally:
        live.stop()
        assert_no_leftovers()
