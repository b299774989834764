"""A SIGKILL at each step of sealing a segment, making and pruning backups and compacting
the log (crash_at failpoints) loses nothing acknowledged and leaves a valid directory."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ctl.client import DaemonUnreachable, RemoteError
from supervisor.store.segments import sealed_segments
from tests.harness import ROOT, Daemon, assert_no_leftovers

# Small enough that every step happens within a few workstreams.
STORE: dict[str, Any] = {
    "store": {
        "snapshot_interval_s": 0.2,
        "checkpoint_interval_s": 0.2,
        "metrics_interval_s": 0.5,
        "segment_bytes": 4096,
        "backups_keep": 3,
        "backups_full": 2,
    }
}
# Each point with the time it is reached at which the daemon dies: late enough that some
# work completed before.
POINTS = [
    "roll_renamed@5",
    "roll_created@5",
    "roll_done@5",
    "backup_point_written@2",
    "snapshot_installed@6",
    "backup_prune@2",
    "compact_unlink@2",
    "compact_done@2",
]


def _ws(n: int) -> str:
    tasks = "".join(f'[[tasks]]\nid = "t{i}"\ncommand = "true"\n' for i in range(6))
    return f'id = "ws-{n}"\n{tasks}'


def _completed(d: Daemon) -> set[str]:
    return {t["id"] for t in d.call("tasks") if t["state"] == "completed"}


def _until_done(d: Daemon, ws: str) -> None:
    """Wait until `ws` completed, or the daemon died."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if d.call("ws_show", workstream=ws)["state"] == "completed":
                return
        except (DaemonUnreachable, RemoteError, OSError, EOFError):
            return
        time.sleep(0.02)
    raise AssertionError(f"{ws} did not complete")


@pytest.mark.parametrize("point", POINTS)
def test_a_crash_at_each_step_loses_nothing(tmp_path: Path, point: str) -> None:
    """Work runs until the daemon SIGKILLs itself at `point` (the COUNT-th time there);
    after a restart without the failpoint every acknowledged workstream and completed
    task is there, and `orchctl state validate` finds nothing wrong."""
    d = Daemon(tmp_path, STORE, failpoint=f"crash_at:{point}").start()
    submitted: list[str] = []
    durable: set[str] = set()
    try:
        deadline = time.monotonic() + 90
        n = 0
        while d.proc is not None and d.proc.poll() is None:
            assert time.monotonic() < deadline, f"the daemon never reached {point}"
            try:
                seen = _completed(d)
                d.call("submit", text=_ws(n))
            except (DaemonUnreachable, RemoteError, OSError, EOFError):
                break  # it died under the call: nothing of this one was acknowledged
            # The submit's reply waited for its records to be durable, and every record
            # before them: so were the completions seen before it.
            submitted.append(f"ws-{n}")
            durable |= seen
            _until_done(d, f"ws-{n}")
            n += 1
        assert d.proc is not None
        assert d.proc.wait(20) == -signal.SIGKILL
        d.kill()
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.kill()
    assert submitted and durable
    d2 = Daemon(tmp_path, STORE).start()
    try:
        names = {w["id"] for w in d2.call("ws_list")}
        assert set(submitted) <= names, set(submitted) - names
        assert durable <= _completed(d2), durable - _completed(d2)
        for ws in submitted[-2:]:
            d2.wait_ws(ws, "completed")
    finally:
        d2.stop()
    assert_no_leftovers()
    r = subprocess.run(
        [sys.executable, "-m", "ctl", "state", "validate", "--state-dir", str(d2.state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 0 and "state is consistent" in r.stdout, r.stdout + r.stderr
    assert sealed_segments(d2.state_dir), "the log was sealed into segments"


def test_online_validate_stays_clean_while_segments_are_sealed_and_deleted(
    tmp_path: Path,
) -> None:
    """`orchctl state validate` asked of a daemon that seals and compacts its log as it
    works finds nothing wrong, every time."""
    d = Daemon(tmp_path, STORE).start()
    try:
        # Before its first snapshot a daemon's directory has records and no current.json,
        # which validate reports: start from the first one.
        d.wait_for((d.state_dir / "current.json").exists, 10, "the first snapshot")
        for n in range(8):
            d.call("submit", text=_ws(n))
            out = d.call("state_validate")
            assert out["ok"], out["problems"]
            _until_done(d, f"ws-{n}")
        assert len(sealed_segments(d.state_dir)) >= 2
        assert sealed_segments(d.state_dir)[0].first > 1, "old segments were deleted"
        r = d.ctl("state", "validate")
        assert r.returncode == 0 and "state is consistent" in r.stdout, r.stdout + r.stderr
    finally:
        d.stop()
    assert_no_leftovers()
