"""Find and kill an attempt's whole process tree. I/O edge: psutil, signals, prctl.

Shared by the worker agent (killing its own attempts) and the daemon (killing the tree of
an agent that cannot answer, or of an attempt found running after a restart).

An attempt's processes are found three ways, because each alone can miss some:
- the root (only after its start time matched: a pid is never signalled on its number
  alone, since the number may have been reused) and the root's descendants;
- the descendants of a given parent, typically the agent, which is a child subreaper so
  that double-forked escapees are re-parented to it rather than to init;
- every process whose environment carries ``ORCHD_ATTEMPT_ID=<marker>``.

A process's identity is its pid and its start time in clock ticks since boot (field 22 of
/proc/PID/stat). Unlike a create time in epoch seconds (ticks / HZ + the boot time), it
does not move when the clock is stepped: the kernel's boot time (`btime` in /proc/stat)
is derived from the wall clock, so every epoch create time shifts with a clock step and
stops matching what was recorded. Records written before start ticks carry the epoch
create time; those are still compared as before (a mismatch fails safe: the process is
not signalled, and only the marker sweep finds the tree).

All functions here block; async callers run them in a worker thread. None of them ever
waits for (reaps) a process: the caller may own a child watcher that expects to collect
its children's exit statuses, so a zombie simply counts as gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Iterable, Mapping

import msgspec
import psutil

MARKER_ENV = "ORCHD_ATTEMPT_ID"
# The spool of the agent that started a (leased) attempt: what a sweep is scoped to.
SPOOL_ENV = "ORCHD_AGENT_SPOOL"
_PR_SET_CHILD_SUBREAPER = 36
# psutil derives create_time from start ticks (1/100 s), so a genuinely different process
# differs by at least 0.01 s; half of that absorbs float noise only.
_CREATE_TIME_TOLERANCE = 0.005
# Variables that belong to the service manager's relationship with orchd itself; a task
# inheriting them could ping our watchdog or claim our sockets.
_PRIVATE_EXACT = frozenset({"NOTIFY_SOCKET"})
_PRIVATE_PREFIXES = ("WATCHDOG_", "LISTEN_")
_SWEEP_ROUNDS = 5
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_btime: float | None = None
_btime_read_at = 0.0
_SWEEP_WAIT_S = 1.0


class KillReport(msgspec.Struct, frozen=True, kw_only=True):
    """What `kill_tree` did: every pid it signalled and any it could not get rid of, the
    latter as (pid, start ticks), so that they can be checked again safely later."""

    signalled: tuple[int, ...]
    survivors: tuple[tuple[int, int], ...]
    group_signalled: bool

    @property
    def survivor_pids(self) -> list[int]:
        return [pid for pid, _ in self.survivors]


def set_child_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process instead of init (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def process_identity(pid: int) -> tuple[int, int] | None:
    """(pid, start ticks) of a live process, or None when there is no such process."""
    try:
        return pid, start_ticks(pid)
    except (OSError, ValueError, IndexError):
        return None


def start_ticks(pid: int) -> int:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat):
    monotonic, never moved by a clock step. One unbuffered read of /proc/<pid>/stat (this
    is on the spawn path of every task). Raises OSError when there is no such process."""
    return int(_stat_fields(pid)[19])


def _stat_fields(pid: int) -> list[bytes]:
    fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    # Fields after the command name, which is in parentheses and may contain anything;
    # the start time is the 20th of them (field 22 of the whole line).
    return data[data.rindex(b")") + 2 :].split(None, 20)


def create_time(pid: int) -> float:
    """The process's start time in epoch seconds, computed exactly as psutil computes it.

    psutil.Process(pid) costs about a millisecond (it re-reads /proc/stat on every call);
    this is on the spawn path of every task, so it reads only /proc/<pid>/stat, with one
    unbuffered read, and keeps the boot time for a second. Raises OSError when there is no
    such process. Moves with the boot time when the clock is stepped: for display only,
    identities use `start_ticks`."""
    return float(_stat_fields(pid)[19]) / _CLOCK_TICKS + _boot_time()


def _boot_time() -> float:
    global _btime, _btime_read_at
    now = time.monotonic()
    if _btime is None or now - _btime_read_at > 1.0:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime"):
                    _btime, _btime_read_at = float(line.split()[1]), now
                    break
            else:
                raise OSError("no btime line in /proc/stat")
    assert _btime is not None
    return _btime


def inheritable_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment minus what is orchd's alone: NOTIFY_SOCKET, WATCHDOG_*, LISTEN_*."""
    return {
        k: v
        for k, v in environ.items()
        if k not in _PRIVATE_EXACT and not k.startswith(_PRIVATE_PREFIXES)
    }


def verified(
    pid: int, ticks: int | None, *, legacy_create_time: float | None = None
) -> psutil.Process | None:
    """The process `pid` if it still is the one that started at `ticks` (start ticks since
    boot). Without ticks, a record from before them: compared by its epoch create time
    (which a clock step since then makes fail, safely). Nothing known: None."""
    if pid <= 0 or (ticks is None and not legacy_create_time):
        return None
    try:
        # The Process is made first: psutil fixes its own (monotonic) identity now, so if the
        # pid is reused after the check below, psutil refuses to signal the newcomer.
        proc = psutil.Process(pid)
        if ticks is not None:
            if start_ticks(pid) == ticks and proc.is_running():
                return proc
        elif (
            legacy_create_time is not None
            and abs(proc.create_time() - legacy_create_time) <= _CREATE_TIME_TOLERANCE
        ):
            return proc
    except (psutil.Error, OSError, ValueError, IndexError):
        pass
    return None


def identity_of(proc: psutil.Process) -> tuple[int, int] | None:
    """(pid, start ticks) of a psutil process, None once it is gone."""
    ident = process_identity(proc.pid)
    return ident if ident is not None and proc.is_running() else None


def find_marked(marker: str, *, prefix: bool = False) -> list[psutil.Process]:
    """Every process (but this one) whose ORCHD_ATTEMPT_ID equals (or starts with) `marker`."""
    me = os.getpid()
    found = []
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            value = proc.environ().get(MARKER_ENV)
        except psutil.Error:
            # Gone, a zombie, or another user's process: none of them is ours to find.
            continue
        if value is not None and (value.startswith(marker) if prefix else value == marker):
            found.append(proc)
    return found


def find_tree(
    pid: int | None,
    ticks: int | None,
    marker: str | None,
    *,
    children_of: int | psutil.Process | None = None,
    legacy_create_time: float | None = None,
) -> list[psutil.Process]:
    """The attempt's processes: verified root and its descendants, `children_of`'s
    descendants (a pid of our own child, or a verified Process), and every process
    carrying the marker."""
    found: dict[int, psutil.Process] = {}

    def add(procs: Iterable[psutil.Process]) -> None:
        for p in procs:
            found.setdefault(p.pid, p)

    if pid is not None and pid > 0:
        root = verified(pid, ticks, legacy_create_time=legacy_create_time)
        if root is not None:
            add([root])
            add(_descendants(root))
    if children_of is not None:
        with contextlib.suppress(psutil.Error):
            parent = (
                children_of
                if isinstance(children_of, psutil.Process)
                else psutil.Process(children_of)
            )
            # Listed from /proc even while the parent is stopped: it need not answer.
            add(_descendants(parent))
    if marker:
        add(find_marked(marker))
    found.pop(os.getpid(), None)
    return list(found.values())


def kill_tree(
    pgid: int | None,
    pid: int | None,
    ticks: int | None,
    marker: str | None,
    grace_s: float,
    *,
    children_of: int | psutil.Process | None = None,
    legacy_create_time: float | None = None,
) -> KillReport:
    """SIGTERM the attempt's group and tree, SIGKILL what is left after `grace_s`, then sweep
    (by marker and descendants) until nothing is left. Blocks for up to grace_s + a few s."""
    signalled: set[int] = set()

    def find() -> list[psutil.Process]:
        return find_tree(
            pid, ticks, marker, children_of=children_of, legacy_create_time=legacy_create_time
        )

    procs = find()
    # pgid 0 (or less) would mean our own group to killpg: never.
    group = pgid is not None and pgid > 0 and _group_is_ours(pgid, procs)
    if group:
        assert pgid is not None
        _killpg(pgid, signal.SIGTERM)
        # A stopped process would hold a TERM pending forever; let it act on it.
        _killpg(pgid, signal.SIGCONT)
    for proc in procs:
        if _signal(proc, signal.SIGTERM):
            signalled.add(proc.pid)
            _signal(proc, signal.SIGCONT)
    survivors = _wait_gone(procs, grace_s)
    if group and pgid is not None and _group_is_ours(pgid, survivors):
        _killpg(pgid, signal.SIGKILL)
    for proc in survivors:
        _signal(proc, signal.SIGKILL)
    _wait_gone(survivors, _SWEEP_WAIT_S)
    # Processes forked while we were signalling, or adopted by a subreaper meanwhile.
    left: list[psutil.Process] = []
    for _ in range(_SWEEP_ROUNDS):
        left = [p for p in find() if alive(p)]
        if not left:
            break
        for proc in left:
            if _signal(proc, signal.SIGKILL):
                signalled.add(proc.pid)
        left = _wait_gone(left, _SWEEP_WAIT_S)
    return KillReport(
        signalled=tuple(sorted(signalled)),
        survivors=_identities(left),
        group_signalled=group,
    )


def kill_process(proc: psutil.Process, grace_s: float) -> bool:
    """SIGTERM (and SIGCONT, should it be stopped) one verified process, SIGKILL it after
    `grace_s`; True once it is gone. For an agent of a previous life, which is not our
    child (nothing here waits for it)."""
    if not alive(proc):
        return True
    _signal(proc, signal.SIGTERM)
    _signal(proc, signal.SIGCONT)
    if not _wait_gone([proc], grace_s):
        return True
    _signal(proc, signal.SIGKILL)
    return not _wait_gone([proc], _SWEEP_WAIT_S)


def kill_survivors(survivors: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """SIGKILL again the survivors of an earlier kill that are still the same processes
    (pid + start ticks); those still there after a short wait."""
    procs = [p for pid, ticks in survivors if (p := verified(pid, ticks)) is not None]
    for proc in procs:
        _signal(proc, signal.SIGKILL)
    return _identities(_wait_gone(procs, 0.2))


def living(idents: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Those of (pid, start ticks) that are still the same, live (not zombie) processes."""
    return tuple(
        sorted(
            (pid, ticks)
            for pid, ticks in idents
            if (p := verified(pid, ticks)) is not None and alive(p)
        )
    )


def _identities(procs: Iterable[psutil.Process]) -> tuple[tuple[int, int], ...]:
    out = []
    for proc in procs:
        ident = identity_of(proc)
        if ident is not None:
            out.append(ident)
    return tuple(sorted(out))


def alive(proc: psutil.Process) -> bool:
    """True while the process runs; a zombie has finished and counts as gone."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _descendants(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def _group_is_ours(pgid: int, procs: Iterable[psutil.Process]) -> bool:
    # A process group id stays taken while any member exists, so if a verified member of
    # the tree is in group `pgid`, the group is the attempt's and not a reuse of the number.
    for proc in procs:
        try:
            if proc.is_running() and os.getpgid(proc.pid) == pgid:
                return True
        except (OSError, psutil.Error):
            continue
    return False


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _signal(proc: psutil.Process, sig: signal.Signals) -> bool:
    # psutil checks the create time before signalling, so a reused pid is left alone.
    try:
        proc.send_signal(sig)
        return True
    except psutil.Error:
        return False


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Poll until every process is gone or a zombie; returns those still running."""
    deadline = time.monotonic() + timeout_s
    interval = 0.002
    left = [p for p in procs if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
        interval = min(interval * 2, 0.05)
        left = [p for p in left if alive(p)]
    return left


class SweepReport(msgspec.Struct, frozen=True, kw_only=True):
    """What `sweep_foreign` did: the attempt ids it found alive and killed, the pids it
    signalled, and the processes that outlived it as (pid, start ticks)."""

    killed: tuple[str, ...]
    pids: tuple[int, ...]
    survivors: tuple[tuple[int, int], ...]


def find_foreign(live: set[str], scope: str) -> dict[int, tuple[psutil.Process, str]]:
    """Every process of this user (but this one) started by an agent with spool `scope`
    and marked with an attempt id not in `live`."""
    me, uid = os.getpid(), os.getuid()
    found: dict[int, tuple[psutil.Process, str]] = {}
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.uids().real != uid:
                continue
            env = proc.environ()
        except psutil.Error:
            continue
        value = env.get(MARKER_ENV)
        if value and value not in live and env.get(SPOOL_ENV) == scope:
            found[proc.pid] = (proc, value)
    return found


def sweep_foreign(live: Iterable[str], scope: str, grace_s: float) -> SweepReport:
    """Kill every process of this user that an agent with spool `scope` started, marked
    with an attempt id not in `live`: SIGTERM (and SIGCONT), SIGKILL after `grace_s`, then
    sweep again until none is left. For a newly started agent on a host where an earlier
    one may have left attempts behind.

    Scoped to the spool, because the host may hold attempts that are not the daemon's to
    judge: those of workers on the daemon's own host (when it is this host), of agents
    with a spool of their own (another daemon's, a test's)."""
    keep = set(live)
    signalled: set[int] = set()
    killed: set[str] = set()
    procs = find_foreign(keep, scope)
    for proc, marker in procs.values():
        killed.add(marker)
        if _signal(proc, signal.SIGTERM):
            signalled.add(proc.pid)
            _signal(proc, signal.SIGCONT)
    survivors = _wait_gone([p for p, _ in procs.values()], grace_s)
    for proc in survivors:
        _signal(proc, signal.SIGKILL)
    _wait_gone(survivors, _SWEEP_WAIT_S)
    left: list[psutil.Process] = []
    for _ in range(_SWEEP_ROUNDS):
        again = find_foreign(keep, scope)
        left = [p for p, _ in again.values() if alive(p)]
        if not left:
            break
        for proc, marker in again.values():
            killed.add(marker)
            if _signal(proc, signal.SIGKILL):
                signalled.add(proc.pid)
        left = _wait_gone(left, _SWEEP_WAIT_S)
    return SweepReport(
        killed=tuple(sorted(killed)),
        pids=tuple(sorted(signalled)),
        survivors=_identities(left),
    )
