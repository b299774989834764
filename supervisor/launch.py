"""How one step of an attempt is launched and logged: argv, environment, log lines. I/O edge.

Shared knowledge of the agent's spawn path kept apart from its event loop: the command as
argv (a string goes through /bin/sh -c), the limits wrapper prefix, the environment a task
starts from, and the header and result lines written into the task's log.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import anyio

from supervisor import limits, proctree, wire
from supervisor.model import Rlimits

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


def command_argv(command: list[str] | str) -> list[str]:
    """A task command as argv: a list as is, a string through /bin/sh -c."""
    return ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)


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
    """Now, as ISO 8601 UTC with milliseconds and a Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
