"""supervisor/workers/cgroup.py on the real cgroup v2 file system (as root): the daemon's
subtree made and removed, a dead daemon's leftovers killed, a process born inside an
attempt's cgroup, a kill that takes the whole cgroup, accounting, and the refusals."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor.workers import cgroup
from tests.harness import ROOT


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root to make cgroups"
    mount = cgroup.mount_point()
    if mount is None:
        return "no cgroup v2 hierarchy mounted"
    home = cgroup.own_cgroup(mount)
    if home is None or not os.access(home, os.W_OK):
        return "the cgroup v2 hierarchy is not writable here"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))


def _until(pred: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A cgroup of this test's own under this process's cgroup; killed and removed after."""
    home = cgroup.own_cgroup()
    assert home is not None
    path = Path(home, f"orchd-test-{uuid.uuid4().hex[:10]}")
    path.mkdir()
    try:
        yield path
    finally:
        (path / "cgroup.kill").write_text("1")
        assert cgroup.wait_empty(str(path), 5.0)
        assert cgroup.remove_tree(str(path))


def _spawn_inside(path: Path, script: str) -> subprocess.Popen[bytes]:
    home = cgroup.own_cgroup()
    assert home is not None
    with cgroup.inside(str(path), home):
        return subprocess.Popen(["/bin/sh", "-c", script], start_new_session=True)


def _tagged(tag: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["cmdline"] == ["sleep", tag] and p.info["status"] != psutil.STATUS_ZOMBIE:
            out.append(p)
    return out


def test_a_child_is_born_inside_and_the_parent_comes_back(scratch: Path) -> None:
    """`inside`: what this process forks in the block is in the cgroup; this process is not."""
    home = cgroup.own_cgroup()
    proc = _spawn_inside(scratch, "exec sleep 30")
    try:
        assert cgroup.own_cgroup(pid=proc.pid) == str(scratch)
        assert cgroup.own_cgroup() == home
        assert cgroup.procs(str(scratch)) == [proc.pid]
        assert cgroup.populated(str(scratch))
    finally:
        proc.kill()
        proc.wait()
    assert cgroup.wait_empty(str(scratch), 2.0)


def test_kill_takes_escapees_stopped_and_term_ignoring_processes(scratch: Path) -> None:
    """A new session with a cleared environment, a stopped process and one that ignores
    SIGTERM: all gone after one kill, confirmed empty, and the cgroup removed."""
    tag = f"313.{uuid.uuid4().int % 10**6:06d}"
    attempt = scratch / "attempts-x"
    cgroup.create(str(attempt))
    proc = _spawn_inside(
        attempt,
        f"(setsid env -i sleep {tag} &); (trap '' TERM; exec sleep {tag}) & "
        f"sleep {tag} & p=$!; while [ \"$(ps -o args= -p $p)\" != 'sleep {tag}' ]; do :; done; "
        "kill -STOP $p; wait",
    )
    _until(lambda: sorted(p.status() for p in _tagged(tag)).count(psutil.STATUS_STOPPED) == 1)
    _until(lambda: len(_tagged(tag)) == 3)
    started = time.monotonic()
    report = cgroup.kill(str(attempt), 0.3)
    took = time.monotonic() - started
    proc.wait()
    assert report.empty and report.removed and report.cgroup_killed
    assert not report.survivors
    assert {p.pid for p in _tagged(tag)} == set()
    assert set(report.signalled) >= {proc.pid}
    assert not attempt.exists()
    assert took < 0.3 + 1.0


def test_kill_of_a_cgroup_that_leaves_on_term_needs_no_cgroup_kill(scratch: Path) -> None:
    """Processes that exit on SIGTERM are gone within the grace; cgroup.kill is not used,
    and with remove=False the cgroup stays (for its accounting)."""
    proc = _spawn_inside(scratch, "sleep 30 & sleep 30 & wait")
    _until(lambda: len(cgroup.procs(str(scratch))) == 3)
    report = cgroup.kill(str(scratch), 5.0, remove=False)
    proc.wait()
    assert report.empty and not report.cgroup_killed and not report.removed
    assert len(report.signalled) == 3
    assert scratch.exists()


def test_accounting_reads_cpu_time(scratch: Path) -> None:
    """cpu.stat's usage_usec is there without any controller: a busy loop shows up."""
    proc = _spawn_inside(
        scratch,
        f"exec {sys.executable} -c 'import time\nt=time.process_time()\n"
        "while time.process_time() - t < 0.3: pass'",
    )
    proc.wait()
    used = cgroup.usage(str(scratch))
    assert used.cpu_s is not None and used.cpu_s >= 0.25
    if cgroup.has_controller(str(scratch), "memory"):
        assert used.memory_peak_bytes is not None and used.memory_peak_bytes > 0
    else:
        assert used.memory_peak_bytes is None


def test_a_pid_outside_the_cgroup_is_never_signalled(scratch: Path) -> None:
    """The pid-reuse guard: a pid that is not (or no longer) in the cgroup is left alone."""
    outsider = subprocess.Popen(["sleep", "30"])
    try:
        assert not cgroup._signal_member(outsider.pid, str(scratch), signal.SIGKILL)
        assert outsider.poll() is None
    finally:
        outsider.kill()
        outsider.wait()


def test_kill_of_a_missing_cgroup_is_a_no_op(tmp_path: Path) -> None:
    """Killing a cgroup that is already gone reports it removed and signals nothing."""
    report = cgroup.kill(str(tmp_path / "gone"), 1.0)
    assert report.removed and report.empty and report.signalled == ()


_OPEN = """
import json, os, sys
from supervisor.workers import cgroup
h = cgroup.Hierarchy.open(sys.argv[1])
print(json.dumps({"base": h.base, "home": h.home, "made": h.made_base,
                  "stale": list(h.stale), "me": cgroup.own_cgroup(),
                  "attempts": os.path.isdir(h.attempts),
                  "agent_was": cgroup.own_cgroup(pid=int(sys.argv[3])) if sys.argv[3:] else None,
                  "old_alive": [os.path.exists(f"/proc/{p}") for p in sys.argv[3:]]}),
      flush=True)
if sys.argv[2:3] == ["hold"]:
    os.mkdir(h.attempt_path("t.1.abcdef"))
    sys.stdin.readline()
if sys.argv[2:3] == ["clear"]:
    print(json.dumps({"cleared": [k.path for k in h.clear_stale()]}), flush=True)
left = h.close()
print(json.dumps({"me": cgroup.own_cgroup(), "base_left": os.path.exists(h.base),
                  "killed": [k.path for k in left]}), flush=True)
"""


def _open_in_child(state_dir: Path, *extra: str) -> list[dict[str, Any]]:
    """Hierarchy.open and close in a child process (it moves itself between cgroups)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-c", _OPEN, str(state_dir), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        input="\n",
    )
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_hierarchy_is_made_entered_and_removed_again(tmp_path: Path) -> None:
    """As root on a writable hierarchy: orchd-<hash> under the current cgroup, the process
    in its daemon leaf, an attempts directory; close goes back and removes it all."""
    opened, closed = _open_in_child(tmp_path, "hold")
    home = cgroup.own_cgroup()
    assert opened["made"] and opened["home"] == home
    assert opened["base"] == os.path.join(str(home), cgroup.base_name(tmp_path))
    assert opened["me"] == os.path.join(opened["base"], "daemon")
    assert opened["attempts"] and opened["stale"] == []
    assert closed["me"] == home and not closed["base_left"]
    assert closed["killed"] == [os.path.join(opened["base"], "attempts", "t.1.abcdef")]


def test_a_dead_daemons_subtree_is_killed_and_removed_at_open(tmp_path: Path) -> None:
    """A leftover orchd-<hash> for the same state directory (a daemon that was SIGKILLed,
    its agent still there, stopped): nothing is signalled at open (recovery records why
    first), the agent is moved out of the daemon leaf, both are listed as stale, and
    clear_stale kills them."""
    home = cgroup.own_cgroup()
    assert home is not None
    base = Path(home, cgroup.base_name(tmp_path))
    (base / "daemon").mkdir(parents=True)
    (base / "attempts" / "t.1.000000").mkdir(parents=True)
    old_agent = _spawn_inside(base / "daemon", "exec sleep 30")
    old_task = _spawn_inside(base / "attempts" / "t.1.000000", "exec sleep 30")
    old_agent.send_signal(signal.SIGSTOP)
    try:
        pids = (str(old_agent.pid), str(old_task.pid))
        opened, cleared, closed = _open_in_child(tmp_path, "clear", *pids)
        assert opened["stale"] == [str(base / "attempts" / "t.1.000000"), str(base / "stale")]
        assert opened["agent_was"] == str(base / "stale")
        assert opened["old_alive"] == [True, True]
        assert cleared["cleared"] == opened["stale"]
        assert old_agent.wait(5) in (-signal.SIGTERM, -signal.SIGKILL)
        assert old_task.wait(5) in (-signal.SIGTERM, -signal.SIGKILL)
        assert not closed["base_left"] and closed["killed"] == []
    finally:
        for p in (old_agent, old_task):
            if p.poll() is None:
                p.kill()
                p.wait()
        if base.exists():
            (base / "cgroup.kill").write_text("1")
            cgroup.wait_empty(str(base), 5)
            cgroup.remove_tree(str(base))


def test_an_undelegated_unit_cgroup_is_refused(tmp_path: Path, scratch: Path) -> None:
    """A systemd unit's cgroup without Delegate=yes is not ours to change: Unavailable says
    so and names the fix."""
    unit = scratch / "fake.service"
    unit.mkdir()
    code = (
        "import sys\nfrom supervisor.workers import cgroup\n"
        "try:\n    cgroup.Hierarchy.open(sys.argv[1])\n"
        "except cgroup.Unavailable as e:\n    print(e)\n"
    )
    enter = f'echo $$ > {unit}/cgroup.procs && exec "$@"'
    r = subprocess.run(
        ["sh", "-c", enter, "sh", sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert "not delegated" in r.stdout and "Delegate=yes" in r.stdout
    assert list(unit.iterdir()) and not (unit / "daemon").exists()


def test_a_kill_racing_with_the_removal_of_its_cgroup_does_not_fail(
    scratch: Path, tmp_path: Path
) -> None:
    """Regression: the daemon killing an attempt's cgroup while its agent removes it saw
    ENODEV from the open cgroup.events and gave up the whole kill; now it is "gone"."""
    attempt, ready = scratch / "raced", tmp_path / "ready"
    cgroup.create(str(attempt))
    proc = _spawn_inside(attempt, f"trap '' TERM; touch {ready}; while :; do sleep 0.05; done")
    try:
        _until(ready.exists)
        result: list[cgroup.CgroupKill] = []
        killer = threading.Thread(target=lambda: result.append(cgroup.kill(str(attempt), 5.0)))
        killer.start()
        time.sleep(0.3)  # the killer waits out its grace on cgroup.events
        (attempt / "cgroup.kill").write_text("1")
        assert cgroup.wait_empty(str(attempt), 5.0)
        # Whichever side removes it first (here, or the killer once it saw it empty), the
        # kill must end without an error.
        with contextlib.suppress(FileNotFoundError):
            attempt.rmdir()
        killer.join(10)
        assert not killer.is_alive() and result and result[0].empty
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
