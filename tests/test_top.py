"""`orchctl top`: the live screen under a real terminal (tmux), the plain print through a pipe,
the screen model without a terminal, and rich kept out of every other command's start."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctl import top, topview
from tests.harness import ROOT, Daemon, assert_no_leftovers

# One task holds git_repo_write, one waits for it, one waits for that one.
HELD = """
id = "ws-top"
[[tasks]]
id = "holder"
command = "sleep 30"
resources = ["git_repo_write"]
timeout_s = 120
[[tasks]]
id = "blocked"
command = "true"
resources = ["git_repo_write"]
[[tasks]]
id = "after"
command = "true"
depends_on = ["blocked"]
"""


@pytest.fixture
def busy(sock_dir: Path) -> Iterator[Daemon]:
    """A daemon where `holder` runs and `blocked` is queued on git_repo_write."""
    d = Daemon(sock_dir).start()
    try:
        d.submit(HELD)
        d.wait_task("holder", "running")
        d.wait_task("blocked", "queued")
        yield d
    finally:
        d.stop()
        assert_no_leftovers()


class Tmux:
    """A tmux server of its own (its own socket, no config file), killed afterwards."""

    def __init__(self, name: str) -> None:
        self.base = ["tmux", "-L", f"orchd-test-{os.getpid()}-{name}", "-f", "/dev/null"]

    def __call__(self, *args: str) -> str:
        r = subprocess.run(
            [*self.base, *args], capture_output=True, text=True, timeout=30, check=True
        )
        return r.stdout

    def screen(self, *, escapes: bool = False) -> str:
        return self("capture-pane", "-p", *(["-e"] if escapes else []), "-t", "top")

    def wait_screen(self, *needles: str, timeout: float = 20.0) -> str:
        found = ""

        def shown() -> bool:
            nonlocal found
            found = self.screen()
            return all(n in found for n in needles)

        try:
            Daemon.wait_for(shown, timeout, f"{needles} on the screen")
        except AssertionError:
            raise AssertionError(f"screen was:\n{found}") from None
        return found

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=30)


def _top_in_tmux(d: Daemon, tmux: Tmux, rc_file: Path, env: str = "", args: str = "") -> None:
    ctl = f"{shlex.quote(sys.executable)} -m ctl --socket {shlex.quote(d.socket)} top {args}"
    # The shell outlives top (Ctrl-C only runs its trap), writes top's exit status, and
    # stays so the screen after top can be looked at; kill-server ends it.
    command = (
        f"trap true INT; cd {shlex.quote(str(ROOT))} && "
        f"env PYTHONPATH={shlex.quote(str(ROOT))} {env} {ctl}; "
        f"echo $? > {shlex.quote(str(rc_file))}; sleep 60"
    )
    tmux("new-session", "-d", "-s", "top", "-x", "160", "-y", "50", command)


def _wait_rc(rc_file: Path) -> str:
    Daemon.wait_for(lambda: rc_file.exists() and rc_file.read_text().strip() != "", 10, "exit")
    return rc_file.read_text().strip()


needs_tmux = pytest.mark.skipif(
    shutil.which("tmux") is None, reason="needs tmux (.ci/run installs it)"
)


@needs_tmux
def test_top_under_tmux_shows_running_queued_and_workers_and_q_exits_0(
    busy: Daemon, tmp_path: Path
) -> None:
    """On a real terminal the screen shows the running task with its elapsed time against
    its timeout, the queued task and the resource it waits on, the workers and the
    resource's holder; an event redraws it at once; `q` exits 0."""
    tmux, rc_file = Tmux("live"), tmp_path / "rc"
    try:
        _top_in_tmux(busy, tmux, rc_file)
        screen = tmux.wait_screen(
            "Running (1)",
            "Waiting (2)",
            "resource git_repo_write is full (held by ws-top/holder)",
            "resource_exhausted",  # the alert after resource_wait_alert_s, live or not
        )
        lines = screen.splitlines()
        running = next(line for line in lines if line.startswith("ws-top/holder "))
        assert "ws-top" in running and "/ 2m00s" in running
        blocked = next(line for line in lines if line.startswith("ws-top/blocked "))
        assert "queued" in blocked
        after = next(line for line in lines if line.startswith("ws-top/after "))
        assert "waits for 1 unmet dependency: ws-top/blocked (queued)" in after
        worker = busy.task("holder")["worker_id"]
        assert any(line.split()[:2] == [worker, "busy"] and "holder" in line for line in lines)
        assert any(line.split()[:3] == ["git_repo_write", "1/1", "ws-top/holder"] for line in lines)
        # colour on a terminal (cyan for the running worker)
        assert "\x1b[36m" in tmux.screen(escapes=True)
        # An event (a new workstream) shows up without waiting for a refresh.
        busy.submit('id = "ws-late"\n[[tasks]]\nid = "late"\ncommand = "true"\n', "late.toml")
        tmux.wait_screen("workstream_submitted", "ws-late")
        tmux("send-keys", "-t", "top", "q")
        assert _wait_rc(rc_file) == "0"
        assert "Running (1)" not in tmux.screen()  # the terminal's own screen is back
    finally:
        tmux.kill()


@needs_tmux
def test_top_redraws_at_once_when_the_terminal_is_resized(busy: Daemon, tmp_path: Path) -> None:
    """With a long interval and nothing happening, a resize of the terminal still redraws
    the screen at once, fitted to the new width."""
    tmux, rc_file = Tmux("resize"), tmp_path / "rc"
    try:
        _top_in_tmux(busy, tmux, rc_file, args="--interval 600")
        wide = tmux.wait_screen("Running (1)", "(held by ws-top/holder)")
        assert "WAITS ON" in wide
        tmux("resize-window", "-t", "top", "-x", "60", "-y", "40")
        narrow = tmux.wait_screen("Running (1)", "…", timeout=10)
        assert all(len(line) <= 60 for line in narrow.splitlines())
        assert "(held by ws-top/holder)" not in narrow  # the reason is clipped to fit
        tmux("send-keys", "-t", "top", "q")
        assert _wait_rc(rc_file) == "0"
    finally:
        tmux.kill()


@needs_tmux
def test_top_honours_no_color_and_ctrl_c_exits_0(busy: Daemon, tmp_path: Path) -> None:
    """With NO_COLOR the live screen has no colour; Ctrl-C leaves it with exit 0 and the
    terminal back in its normal screen."""
    tmux, rc_file = Tmux("nocolour"), tmp_path / "rc"
    try:
        _top_in_tmux(busy, tmux, rc_file, env="NO_COLOR=1")
        tmux.wait_screen("Running (1)", "holder")
        assert "\x1b[3" not in tmux.screen(escapes=True)  # no foreground colour at all
        tmux("send-keys", "-t", "top", "C-c")
        assert _wait_rc(rc_file) == "0"
        assert "Running (1)" not in tmux.screen()  # the alternate screen is gone
    finally:
        tmux.kill()


def test_top_through_a_pipe_prints_plain_snapshots(busy: Daemon) -> None:
    """Not on a terminal, `top -n 2` prints two plain text snapshots (no escapes) and
    exits 0; `--json` prints one JSON object a line."""
    r = busy.ctl("top", "-n", "2", "--interval", "0.2")
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout
    assert r.stdout.count("RUNNING (1)") == 2
    blocked = next(line for line in r.stdout.splitlines() if line.startswith("ws-top/blocked "))
    assert (
        " ".join(blocked.split()[2:])
        == "queued resource git_repo_write is full (held by ws-top/holder)"
    )
    r = busy.ctl("--json", "top", "-n", "1")
    snap = json.loads(r.stdout)
    assert [t["id"] for t in snap["tasks"] if t["state"] == "running"] == ["ws-top/holder"]
    assert snap["why"]["ws-top/blocked"].startswith("queued: resource git_repo_write")


def test_a_pending_tasks_reason_follows_its_dependency_at_once(sock_dir: Path) -> None:
    """top keeps a pending task's reason between snapshots only while its dependencies
    look the same: once the dependency starts, the next snapshot says so."""
    d = Daemon(sock_dir).start()
    source = top.Source(d.socket)
    try:
        d.submit(HELD.replace('command = "true"', 'command = "sleep 30"'))
        d.wait_task("blocked", "queued")
        assert source.take(None).why["ws-top/after"].endswith("blocked (queued)")
        assert source.take(None).why["ws-top/after"].endswith("blocked (queued)")
        d.call("cancel", task_id="holder")
        d.wait_task("blocked", "running")
        assert source.take(None).why["ws-top/after"].endswith("blocked (running)")
    finally:
        source.close()
        d.stop()
        assert_no_leftovers()


def test_top_without_a_daemon_exits_7(tmp_path: Path) -> None:
    """With no daemon on the socket, top says so and exits 7 at once."""
    r = subprocess.run(
        [sys.executable, "-m", "ctl", "--socket", str(tmp_path / "none.sock"), "top"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 7 and "orchd is not running" in r.stderr


def test_status_does_not_import_rich(tmp_path: Path) -> None:
    """`orchctl status` starts without loading rich (or the top module): -X importtime."""
    r = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "ctl",
            "--socket",
            str(tmp_path / "s"),
            "status",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 7
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if "|" in line}
    assert "ctl.cli" in imported
    assert not {m for m in imported if m.split(".")[0] == "rich" or m == "ctl.top"}


# --- the screen model, without a terminal ------------------------------------------------


def _task(tid: str, state: str, **kw: object) -> dict[str, object]:
    return {
        "id": tid,
        "workstream_id": "ws",
        "state": state,
        "timeout_s": 100.0,
        "max_retries": 3,
        "retry_count": 0,
    } | kw


def test_screen_shows_elapsed_against_timeout_and_waits_in_order() -> None:
    """Running tasks show elapsed/timeout and its share, longest first; queued tasks come
    before pending ones, each with the daemon's reason."""
    snap = topview.Snapshot(
        taken_at=1000.0,
        tasks=[
            _task("late", "running", worker_id="w2", attempts=[{"started_at": 990.0}]),
            _task("early", "running", worker_id="w1", attempts=[{"started_at": 925.0}]),
            _task("dep", "pending", order=1),
            _task("q", "queued", order=2),
        ],
        why={"q": "queued: resource r is full (held by early)", "dep": "waits for 1"},
    )
    scr = topview.screen(snap, now=1000.0)
    running, waiting = scr.sections[0], scr.sections[1]
    assert running.rows[0] == ["early", "ws", "w1", "1m15s / 1m40s 75%", "0/3"]
    assert running.rows[1][3] == "10.0s / 1m40s 10%"
    assert [r[0] for r in waiting.rows] == ["q", "dep"]
    assert waiting.rows[0][2:] == ["queued", "resource r is full (held by early)"]
    text = topview.plain(scr)
    assert "RUNNING (2)" in text and "WAITING (2)" in text and "\x1b" not in text


def test_screen_cut_to_height_keeps_every_section_and_counts_the_rest() -> None:
    """On a short screen each section keeps a few rows, the last one saying how many more
    there are; the total fits the height."""
    snap = topview.Snapshot(
        taken_at=0.0,
        tasks=[_task(f"t{i}", "queued", order=i) for i in range(50)],
        workers=[{"id": f"w{i}", "state": "idle", "last_heartbeat_age_s": 0.1} for i in range(9)],
    )
    scr = topview.screen(snap, now=0.0, height=30)
    waiting, workers = scr.sections[1], scr.sections[2]
    assert waiting.hidden == 50 - len(waiting.rows) and waiting.hidden > 0
    assert len(topview.plain(scr).splitlines()) <= 30
    assert workers.rows  # a lower section still gets rows
    assert f"… {waiting.hidden} more" in topview.plain(scr)


def test_screen_narrowed_to_width_clips_only_the_free_text() -> None:
    """On a narrow screen the reason column is clipped with an ellipsis so each row fits;
    the ids before it stay whole."""
    why = "waits for 3 unmet dependencies: " + ", ".join(f"dep-{i} (pending)" for i in range(9))
    snap = topview.Snapshot(
        taken_at=0.0, tasks=[_task("a-long-task-id", "pending")], why={"a-long-task-id": why}
    )
    waiting = topview.screen(snap, now=0.0, width=80).sections[1]
    row = waiting.rows[0]
    assert row[0] == "a-long-task-id" and row[3].endswith("…")
    widths = [max(len(h), len(c)) for h, c in zip(waiting.headers, row, strict=True)]
    assert sum(widths) + topview.LIVE_GAP * 3 == 80


def test_screen_says_when_the_daemon_is_unreachable() -> None:
    """A snapshot that failed keeps the last events and says what went wrong."""
    snap = topview.Snapshot(taken_at=0.0, error="orchd is not running")
    assert "orchd is not running (trying again)" in topview.plain(topview.screen(snap, 0.0))
