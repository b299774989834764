"""Apply a task's resource limits, then become the task's command (exec wrapper).

    python -m supervisor.workers.limits [--memory-mb N] [--cpu-s N] [--open-files N]
                                [--status-fd FD] -- argv...

The agent spawns tasks without a preexec_fn (which would forbid the fast vfork path and is
unsafe with threads), so limits are set by this tiny program in the child instead. It
imports only the standard library, so the agent can run it by file path with `python -I
-S` from any working directory. With --status-fd, a failed exec is reported as text on
that descriptor; a successful exec closes it (close-on-exec) with nothing written, which
is how the agent tells "could not start" from "started and failed".
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from typing import NoReturn

EXEC_FAILED = 127


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="supervisor.workers.limits")
    parser.add_argument("--memory-mb", type=int)
    parser.add_argument("--cpu-s", type=int)
    parser.add_argument("--open-files", type=int)
    parser.add_argument("--status-fd", type=int)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("no command given after --")
    return args


def _lower(which: int, soft: int, hard_extra: int = 0) -> None:
    # Only ever lower: an unprivileged process may not raise a hard limit.
    _, cur_hard = resource.getrlimit(which)
    hard = soft + hard_extra
    if cur_hard != resource.RLIM_INFINITY:
        hard = min(hard, cur_hard)
        soft = min(soft, hard)
    resource.setrlimit(which, (soft, hard))


def apply_limits(memory_mb: int | None, cpu_s: int | None, open_files: int | None) -> None:
    """Set RLIMIT_AS, RLIMIT_CPU and RLIMIT_NOFILE for this process and what it execs."""
    if memory_mb is not None:
        _lower(resource.RLIMIT_AS, memory_mb * 1024 * 1024)
    if cpu_s is not None:
        # SIGXCPU at the soft limit lets the task notice; SIGKILL one second later.
        _lower(resource.RLIMIT_CPU, cpu_s, hard_extra=1)
    if open_files is not None:
        _lower(resource.RLIMIT_NOFILE, open_files)


def main(argv: list[str] | None = None) -> NoReturn:
    args = _parse(sys.argv[1:] if argv is None else argv)
    status_fd: int | None = args.status_fd
    try:
        apply_limits(args.memory_mb, args.cpu_s, args.open_files)
        if status_fd is not None:
            os.set_inheritable(status_fd, False)
        os.execvp(args.command[0], args.command)
    except (OSError, ValueError) as exc:
        text = f"{args.command[0]}: {exc}"
        if status_fd is not None:
            os.write(status_fd, text.encode(errors="replace"))
        sys.stderr.write(f"supervisor.workers.limits: {text}\n")
        sys.stderr.flush()
        os._exit(EXEC_FAILED)


if __name__ == "__main__":
    main()
