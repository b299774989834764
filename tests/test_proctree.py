"""Process-tree finding and killing with real processes: groups, escapees, reused pids."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import psutil
import pytest

from supervisor.workers import proctree

MARK = f"test-proctree-{uuid.uuid4().hex[:8]}-"


# Every test here must leave no live child and no process carrying MARK (conftest.py).
pytestmark = pytest.mark.usefixtures("no_leftover_processes")


def _marked(name: str) -> dict[str, str]:
    return {**os.environ, proctree.MARKER_ENV: MARK + name}


def _until(predicate: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def _alive_marked(name: str) -> list[psutil.Process]:
    return [p for p in proctree.find_marked(MARK + name) if proctree.alive(p)]


def _names(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(p.name())
        except psutil.Error:
            out.append("?")
    return sorted(out)


def test_create_time_matches_psutil() -> None:
    """create_time reads /proc directly yet gives exactly psutil's value."""
    for pid in (1, os.getpid()):
        assert proctree.create_time(pid) == psutil.Process(pid).create_time()


def test_start_ticks_are_psutils_monotonic_create_time() -> None:
    """start_ticks is field 22 of /proc/PID/stat: psutil's create time, less the boot
    time, in clock ticks."""
    hz = os.sysconf("SC_CLK_TCK")
    for pid in (1, os.getpid()):
        since_boot = psutil.Process(pid).create_time() - psutil.boot_time()
        assert proctree.start_ticks(pid) == round(since_boot * hz)


def test_process_identity_of_a_reaped_process_is_none() -> None:
    """A pid that no longer exists has no identity; a live one is (pid, start ticks)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert proctree.process_identity(proc.pid) is None
    assert proctree.process_identity(os.getpid()) == (
        os.getpid(),
        proctree.start_ticks(os.getpid()),
    )


def test_find_tree_refuses_a_root_with_other_start_ticks() -> None:
    """A root whose start ticks do not match (a reused pid) is not part of any tree."""
    proc = subprocess.Popen(["sleep", "30"])
    try:
        ticks = proctree.start_ticks(proc.pid)
        assert [p.pid for p in proctree.find_tree(proc.pid, ticks, None)] == [proc.pid]
        assert proctree.find_tree(proc.pid, ticks + 1, None) == []
    finally:
        proc.kill()
        proc.wait()


def test_a_legacy_epoch_create_time_is_still_compared() -> None:
    """A record from before start ticks (epoch create time only) still finds its root when
    the boot time has not moved, and no other process."""
    proc = subprocess.Popen(["sleep", "30"])
    try:
        ct = psutil.Process(proc.pid).create_time()
        found = proctree.find_tree(proc.pid, None, None, legacy_create_time=ct)
        assert [p.pid for p in found] == [proc.pid]
        assert proctree.find_tree(proc.pid, None, None, legacy_create_time=ct + 1.0) == []
        assert proctree.find_tree(proc.pid, None, None) == []
    finally:
        proc.kill()
        proc.wait()


def test_find_tree_finds_descendants_and_marked_escapees() -> None:
    """Descendants come with the root; a setsid escapee re-parented away is found by marker."""
    proc = subprocess.Popen(
        ["sh", "-c", "sleep 30 & (setsid sleep 30 &); wait"],
        env=_marked("find"),
        start_new_session=True,
    )
    try:
        _until(lambda: len(_alive_marked("find")) == 3)
        tree = proctree.find_tree(proc.pid, proctree.start_ticks(proc.pid), MARK + "find")
        assert {p.pid for p in tree} == {p.pid for p in _alive_marked("find")}
        escapee = [p for p in tree if os.getsid(p.pid) != proc.pid]
        assert len(escapee) == 1 and escapee[0].ppid() != proc.pid
    finally:
        proctree.kill_tree(proc.pid, proc.pid, proctree.start_ticks(proc.pid), MARK + "find", 0.5)
        proc.wait()


def test_kill_tree_escalates_to_sigkill_for_a_term_ignoring_group() -> None:
    """A group that ignores SIGTERM is SIGKILLed after the grace period; nothing survives."""
    proc = subprocess.Popen(
        ["sh", "-c", "trap '' TERM; sleep 300 & while :; do sleep 0.05; done"],
        env=_marked("trap"),
        start_new_session=True,
    )
    _until(lambda: len(_alive_marked("trap")) >= 2)
    started = time.monotonic()
    report = proctree.kill_tree(
        proc.pid, proc.pid, proctree.start_ticks(proc.pid), MARK + "trap", 0.3
    )
    assert proc.wait(timeout=2) == -9
    assert time.monotonic() - started < 1.3
    assert report.group_signalled
    assert report.survivors == ()
    assert proc.pid in report.signalled
    assert _alive_marked("trap") == []


def test_kill_tree_finds_a_double_forked_escapee_by_marker() -> None:
    """An escapee in its own session, no longer a descendant, is killed via its marker."""
    proc = subprocess.Popen(
        ["sh", "-c", "(setsid sleep 300 &); sleep 300"],
        env=_marked("escape"),
        start_new_session=True,
    )
    # sh, its sleep and the escapee; the subshell that forks the escapee comes and goes
    # on the way, so wait for exactly those three (by name).
    _until(lambda: _names(_alive_marked("escape")) == ["sh", "sleep", "sleep"])
    report = proctree.kill_tree(
        proc.pid, proc.pid, proctree.start_ticks(proc.pid), MARK + "escape", 0.5
    )
    proc.wait(timeout=2)
    assert report.survivors == ()
    assert len(report.signalled) == 3
    assert _alive_marked("escape") == []


def test_kill_tree_never_signals_an_unverified_pid() -> None:
    """With start ticks that do not match, the process and its group are left alone."""
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        ticks = proctree.start_ticks(proc.pid)
        report = proctree.kill_tree(proc.pid, proc.pid, ticks + 500, None, 0.1)
        assert report.signalled == () and not report.group_signalled
        assert proc.poll() is None
        # pgid 0 would be our own group: it is never signalled either.
        report = proctree.kill_tree(0, 0, None, None, 0.1)
        assert report.signalled == () and not report.group_signalled
    finally:
        proc.kill()
        proc.wait()


def test_child_subreaper_adopts_orphans() -> None:
    """After set_child_subreaper, an orphaned grandchild is re-parented to the caller."""
    code = (
        "import os, subprocess, time, psutil\n"
        "from supervisor.workers import proctree\n"
        "ok = proctree.set_child_subreaper()\n"
        "subprocess.run(['sh', '-c', '(sleep 30 &)'])\n"
        "deadline = time.monotonic() + 3\n"
        "while time.monotonic() < deadline:\n"
        "    kids = psutil.Process().children()\n"
        "    if kids and all(k.name() == 'sleep' for k in kids): break\n"
        "    time.sleep(0.01)\n"
        "print(ok, [k.name() for k in kids])\n"
        "for k in kids: k.kill(); k.wait()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=10,
        cwd=os.path.dirname(os.path.dirname(proctree.__file__)),
        check=True,
    ).stdout
    assert out.strip() == "True ['sleep']"


def test_inheritable_env_drops_service_manager_variables() -> None:
    """NOTIFY_SOCKET, WATCHDOG_* and LISTEN_* never reach a child; the rest does."""
    env = proctree.inheritable_env(
        {
            "NOTIFY_SOCKET": "/run/x",
            "WATCHDOG_USEC": "1",
            "WATCHDOG_PID": "2",
            "LISTEN_FDS": "1",
            "LISTEN_PID": "3",
            "PATH": "/bin",
            "MY_LISTEN_X": "kept",
        }
    )
    assert env == {"PATH": "/bin", "MY_LISTEN_X": "kept"}
