"""How one step of an attempt is launched and logged: argv, environment, log lines. I/O edge.

Shared knowledge of the agent's spawn path kept apart from its event loop: the command as
argv (a string goes through /bin/sh -c), the limits wrapper prefix, the environment a task
starts from, and the header and result lines written into the task's log.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import anyio

from supervisor.core import wire
from supervisor.core.model import Rlimits
from supervisor.workers import limits, proctree, shim

# Set by the pool when it had to extend PYTHONPATH so that this package imports; the task
# environment gets the original value back (an empty value means "was not set").
ORIGINAL_PYTHONPATH_ENV = "ORCHD_ORIGINAL_PYTHONPATH"
TASK_ID_ENV = "ORCHD_TASK_ID"


def task_base_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment every task starts from: ours, minus what belongs to orchd only."""
    env = proctree.inheritable_env(environ)
    original = env.pop(ORIGINAL_PYTHONPATH_ENV, None)
    if original is not None:
        if original:
            env["PYTHONPATH"] = original
        else:
            env.pop("PYTHONPATH", None)
    return env


# (PATH, name) -> the file execvp would run; see `spawn`.
_resolved: dict[tuple[str, str], str] = {}


def command_argv(command: list[str] | str) -> list[str]:
    """A task command as argv: a list as is, a string through /bin/sh -c."""
    return ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)


def spawn(argv: list[str], env: dict[str, str], *, stdin: int, out: int) -> int | None:
    """Start `argv` in a new session with `stdin` on fd 0 and `out` on fds 1 and 2, by
    posix_spawn (one clone+exec, no error pipe); its pid, or None when it did not start.

    The caller then starts it through subprocess.Popen instead, which gives every failure
    (missing program, permission, bad format) the exact error it always gave. The program
    is looked up like execvp does, on the task's PATH; lookups are kept per (PATH, name), a
    failed spawn forgets its entry, and a program not found is never cached.

    Nothing but fds 0-2 reaches the child: every fd of ours is close-on-exec (Python's
    default, and `private_fds` at start for anything inherited)."""
    if not argv:
        return None
    name = argv[0]
    path = name
    if "/" not in name:
        key = (env.get("PATH", os.defpath), name)
        found = _resolved.get(key) or _which(name, os.get_exec_path(env))
        if found is None:
            return None
        path = _resolved[key] = found
    try:
        return os.posix_spawn(
            path,
            argv,
            env,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, stdin, 0),
                (os.POSIX_SPAWN_DUP2, out, 1),
                (os.POSIX_SPAWN_DUP2, out, 2),
            ],
            setsid=True,
            # What Popen's restore_signals does: Python ignores these, exec would keep that.
            setsigdef=_RESTORED_SIGNALS,
        )
    except (OSError, ValueError):
        if "/" not in name:
            _resolved.pop((env.get("PATH", os.defpath), name), None)
        return None


_RESTORED_SIGNALS = tuple(
    getattr(signal, n) for n in ("SIGPIPE", "SIGXFZ", "SIGXFSZ") if hasattr(signal, n)
)


def _which(name: str, dirs: list[str]) -> str | None:
    for d in dirs:
        candidate = os.path.join(d, name)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return None


def private_fds() -> None:
    """Make every open fd above 2 close-on-exec, so that a task started by `spawn` (which
    closes nothing itself) gets none of them, even ones this process inherited."""
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                continue  # the listing's own fd, closed by now


# Where a shim finds its lease pipe and its status pipe (see supervisor.workers.shim), and
# where its command's exec wrapper (the limits one) reports a failed exec.
SHIM_LEASE_FD = 3
SHIM_STATUS_FD = 4
SHIM_EXEC_STATUS_FD = 3


# The shim's own module from this checkout, through the import system, so that its
# compiled form is cached (a script run by path is compiled at every start).
_SHIM_MAIN = (
    f"import sys; sys.path.insert(0, {str(Path(shim.__file__).resolve().parents[2])!r}); "
    "from supervisor.workers.shim import main; main()"
)


def shim_argv(
    attempt_id: str,
    *,
    lease_s: float,
    kill_grace_s: float,
    spool: str,
    cwd: str | None,
    exec_wrapper: bool,
) -> list[str]:
    """The shim prefix for one step of a leased attempt; in isolated mode (-I -S, its
    package found by its path), so that neither the task's working directory nor its
    PYTHONPATH matter."""
    argv = [
        sys.executable,
        "-I",
        "-S",
        "-c",
        _SHIM_MAIN,
        "--attempt-id",
        attempt_id,
        "--lease-fd",
        str(SHIM_LEASE_FD),
        "--status-fd",
        str(SHIM_STATUS_FD),
        "--lease-s",
        repr(lease_s),
        "--kill-grace-s",
        repr(kill_grace_s),
        "--spool",
        spool,
    ]
    if cwd is not None:
        argv += ["--cwd", cwd]
    if exec_wrapper:
        argv += ["--exec-status-fd", str(SHIM_EXEC_STATUS_FD)]
    return [*argv, "--"]


def spawn_shim(
    argv: list[str], env: dict[str, str], *, stdin: int, out: int, lease_fd: int, status_fd: int
) -> int:
    """Start a shim (`shim_argv` + the command) in a new session: fds 0-2 as `spawn`, the
    lease pipe on SHIM_LEASE_FD and the status pipe on SHIM_STATUS_FD. Its pid; raises
    OSError when it could not start."""
    # A source among the target numbers could be overwritten by an earlier dup2 (or keep
    # its close-on-exec flag, dup2'd onto itself): such a one is copied out of the way.
    copies: list[int] = []

    def clear(fd: int) -> int:
        if fd > SHIM_STATUS_FD:
            return fd
        copies.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, SHIM_STATUS_FD + 1))
        return copies[-1]

    try:
        return os.posix_spawn(
            argv[0],
            argv,
            env,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, clear(stdin), 0),
                (os.POSIX_SPAWN_DUP2, clear(out), 1),
                (os.POSIX_SPAWN_DUP2, clear(out), 2),
                (os.POSIX_SPAWN_DUP2, clear(lease_fd), SHIM_LEASE_FD),
                (os.POSIX_SPAWN_DUP2, clear(status_fd), SHIM_STATUS_FD),
            ],
            setsid=True,
            setsigdef=_RESTORED_SIGNALS,
        )
    finally:
        for fd in copies:
            os.close(fd)


async def read_shim_status(fd: int) -> tuple[int, int] | str:
    """What a shim said about its command's start: (pid, start ticks) once it runs, or the
    reason it could not start."""
    text = await read_exec_status(fd)
    word, _, rest = text.strip().partition(" ")
    if word == "started":
        pid, _, ticks = rest.partition(" ")
        with contextlib.suppress(ValueError):
            return int(pid), int(ticks)
    if word == "error" and rest:
        return rest
    return f"the attempt's shim ended before starting the command ({text.strip() or 'no word'})"


def limits_argv(rl: Rlimits, status_fd: int) -> list[str]:
    """The exec-wrapper prefix that applies `rl`; run by path so any cwd works."""
    argv = [sys.executable, "-I", "-S", limits.__file__, "--status-fd", str(status_fd)]
    for flag, value in (
        ("--memory-mb", rl.memory_mb),
        ("--cpu-s", rl.cpu_s),
        ("--open-files", rl.open_files),
    ):
        if value is not None:
            argv += [flag, str(value)]
    return [*argv, "--"]


async def read_exec_status(fd: int) -> str:
    """Text the limits wrapper wrote before its exec failed; "" once exec succeeded."""
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    try:
        while True:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                await anyio.wait_readable(fd)
                continue
            if not data:
                return b"".join(chunks).decode(errors="replace")
            chunks.append(data)
    finally:
        os.close(fd)


def set_code(finished: wire.Finished, code: int, *, validate: bool) -> None:
    """Record a step's returncode (negative: the signal) in its Finished message."""
    if code < 0:
        finished.signal = -code
    elif validate:
        finished.validate_exit_code = code
    else:
        finished.exit_code = code


def describe(f: wire.Finished) -> str:
    """A result in words, for the log line that closes an attempt."""
    parts = [f.phase]
    if f.exit_code is not None:
        parts.append(f"exit {f.exit_code}")
    if f.validate_exit_code is not None:
        parts.append(f"validate exit {f.validate_exit_code}")
    if f.signal is not None:
        parts.append(f"signal {f.signal}")
    if f.killed:
        parts.append("killed")
    if f.message:
        parts.append(f.message)
    return ", ".join(parts)


def open_log(path: str) -> BinaryIO:
    """The task's log, opened for appending (its directory made if missing). Unbuffered,
    so our header lines and the command's own output land in order."""
    try:
        return open(path, "ab", buffering=0)
    except FileNotFoundError:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return open(path, "ab", buffering=0)


def write_line(out: BinaryIO, line: str) -> None:
    """Append one line of ours to a task's log."""
    out.write(line.encode(errors="replace") + b"\n")


def header(run: wire.Run, worker_id: str, word: str, command: list[str] | str) -> str:
    """The line that opens a step in the log: `=== attempt N task T worker W start|validate
    <ISO UTC> command: ... ===`."""
    shown = command if isinstance(command, str) else shlex.join(command)
    return (
        f"=== attempt {run.number} task {run.task_id} worker {worker_id} {word} {utc_now()} "
        f"command: {shown} ==="
    )


def footer(run: wire.Run, result: wire.Finished) -> str:
    """The line that closes an attempt in the log."""
    when = utc_now()
    return f"=== attempt {run.number} task {run.task_id} end {when} result: {describe(result)} ==="


def utc_now() -> str:
    """Now, as ISO 8601 UTC with milliseconds and a Z (`2024-05-01T12:00:00.123Z`)."""
    global _utc_second, _utc_prefix
    seconds, ns = divmod(time.time_ns(), 1_000_000_000)
    # Formatting the date and time costs more than the rest of a header line; it changes
    # once a second, so only the milliseconds are formatted each time.
    if seconds != _utc_second:
        _utc_second, _utc_prefix = seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{_utc_prefix}.{ns // 1_000_000:03d}Z"


def utc_at(epoch_s: float) -> str:
    """An epoch time as ISO 8601 UTC with milliseconds and a Z."""
    ms = int(epoch_s * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_s)) + f".{ms:03d}Z"


_utc_second = -1
_utc_prefix = ""
