"""`orchctl state …` online by default: with a daemon running, validate and backups are
answered by it about its own state directory (wherever orchctl runs from), repair and
restore refuse until it is stopped; --state-dir stays the offline path; with neither a
daemon nor --state-dir, exit 7. Real orchd, real orchctl processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.harness import ROOT, Daemon, assert_no_leftovers
from tests.test_operator import ws_file


def orchctl(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real orchctl, run from `cwd`, with stdin closed to a terminal (/dev/null)."""
    return subprocess.run(
        [sys.executable, "-m", "ctl", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k != "ORCHD_SOCKET"}
        | {"PYTHONPATH": str(ROOT)},
    )


def _elsewhere(tmp: Path) -> Path:
    """A working directory with a `.state` of its own that is no state directory at all."""
    cwd = tmp / "elsewhere"
    (cwd / ".state").mkdir(parents=True)
    (cwd / ".state" / "current.json").write_text("not a snapshot")
    return cwd


def test_validate_asks_the_daemon_about_its_own_state_dir(daemon: Daemon, tmp_path: Path) -> None:
    """Run from a directory whose .state is not the daemon's: validate and backups answer
    about the daemon's state directory (not `.state is not a state directory`)."""
    daemon.submit(ws_file("ws-a", {"id": "a", "command": "true"}))
    daemon.wait_ws("ws-a", "completed")
    daemon.wait_for(lambda: (daemon.state_dir / "current.json").exists(), 30, "a snapshot")
    # A later snapshot keeps the first one as a backup.
    daemon.submit(ws_file("ws-a2", {"id": "a2", "command": "true"}), "a2.toml")
    daemon.wait_ws("ws-a2", "completed")
    daemon.wait_for(lambda: any((daemon.state_dir / "backups").glob("*")), 30, "a backup")
    cwd = _elsewhere(tmp_path)
    r = orchctl(cwd, "--socket", daemon.socket, "state", "validate")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "state is consistent"
    out = json.loads(orchctl(cwd, "state", "validate", "--json", "--socket", daemon.socket).stdout)
    assert out == {"ok": True, "problems": [], "state_dir": str(daemon.state_dir)}
    listed = json.loads(
        orchctl(cwd, "--json", "--socket", daemon.socket, "state", "backups").stdout
    )
    assert listed["backups"] and all(
        Path(b).parent == daemon.state_dir / "backups" for b in listed["backups"]
    )
    # --state-dir naming the running daemon's own directory is answered by that daemon.
    r = orchctl(
        cwd, "--socket", daemon.socket, "state", "validate", "--state-dir", str(daemon.state_dir)
    )
    assert r.returncode == 0 and "consistent" in r.stdout, r.stderr
    # The daemon answered, and went on answering: status is served while it validated.
    assert daemon.call("status")["state_dir"] == str(daemon.state_dir)
    # Its directory, asked of a socket nobody listens on: in use, so exit 5, not 7.
    r = orchctl(
        cwd,
        "--socket",
        str(tmp_path / "nobody.sock"),
        "state",
        "validate",
        "--state-dir",
        str(daemon.state_dir),
    )
    assert r.returncode == 5 and "in use by a running orchd" in r.stderr, r.stderr


def test_validate_online_names_a_damaged_file(daemon: Daemon, tmp_path: Path) -> None:
    """A damaged checkpoint in the live directory is reported by the daemon's validate
    (exit 65, the file named), while tasks keep running and finishing."""
    daemon.submit(ws_file("ws-b", {"id": "b", "command": "true"}))
    daemon.wait_ws("ws-b", "completed")
    daemon.wait_for(lambda: any((daemon.state_dir / "checkpoints").glob("*.json")), 10, "cp")
    victim = sorted((daemon.state_dir / "checkpoints").glob("ws-b_*.json"))[0]
    victim.write_bytes(victim.read_bytes()[:-5] + b"xxxx\n")
    daemon.submit(ws_file("ws-c", {"id": "c", "command": "sleep 0.3"}), "c.toml")
    r = orchctl(_elsewhere(tmp_path), "--socket", daemon.socket, "state", "validate")
    assert r.returncode == 65, r.stderr
    assert f"checkpoints/{victim.name} is damaged" in r.stdout
    daemon.wait_ws("ws-c", "completed")


def test_repair_and_restore_refuse_while_the_daemon_runs(daemon: Daemon, tmp_path: Path) -> None:
    """repair and restore with the daemon running: exit 5, `stop the daemon first`, with or
    without --state-dir, before any question is asked; nothing is done to the state."""
    cwd = _elsewhere(tmp_path)
    daemon.submit(ws_file("ws-e", {"id": "e", "command": "true"}))
    daemon.wait_ws("ws-e", "completed")
    daemon.wait_for(lambda: (daemon.state_dir / "current.json").exists(), 10, "a snapshot")
    seq = daemon.call("status")["last_seq"]
    for extra in ([], ["--state-dir", str(daemon.state_dir)]):
        for action in (["repair"], ["restore", "--from-transitions"]):
            r = orchctl(cwd, "--socket", daemon.socket, "state", *action, *extra)
            assert r.returncode == 5, (action, extra, r.stderr)
            assert "stop the daemon first (systemctl stop orchd)" in r.stderr
            assert "[y/N]" not in r.stderr and " will:" not in r.stderr
    # The daemon may still record its own work (a worker going idle); none of the operator's.
    log = (daemon.state_dir / "transitions.jsonl").read_text().splitlines()
    later = [json.loads(line) for line in log if json.loads(line)["seq"] > seq]
    assert [r for r in later if r["cause"] == "operator"] == []


def test_no_daemon_and_no_state_dir_exits_7(tmp_path: Path) -> None:
    """With no daemon on the socket and no --state-dir, every state action exits 7 saying
    to pass --state-dir; with --state-dir the offline path works."""
    cwd = _elsewhere(tmp_path)
    sock = str(tmp_path / "nobody.sock")
    for action in (["validate"], ["backups"], ["repair"], ["restore", "--from-transitions"]):
        r = orchctl(cwd, "--socket", sock, "state", *action)
        assert r.returncode == 7, (action, r.stderr)
        assert "orchd is not running" in r.stderr and "--state-dir" in r.stderr
    (tmp_path / "d").mkdir()
    d = Daemon(tmp_path / "d").start()
    try:
        d.submit(ws_file("ws-d", {"id": "d", "command": "true"}))
        d.wait_ws("ws-d", "completed")
    finally:
        assert d.stop() == 0
        assert_no_leftovers()
    r = orchctl(cwd, "--socket", sock, "state", "validate", "--state-dir", str(d.state_dir))
    assert r.returncode == 0 and "consistent" in r.stdout, r.stderr
