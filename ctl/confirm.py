"""Confirmation of the commands that throw work away (cancel of a running task, skip,
ws rollback|retry|resume, worker shutdown --force, state restore|repair).

The daemon is asked for the plan first (the request with `dry_run`, decided by the same
code as the real one); on a terminal the plan is shown and the operator answers y or n;
with no terminal and no --yes orchctl refuses at once. Nothing here talks to the daemon:
the caller does, and passes the plan in.
"""

from __future__ import annotations

import sys
from typing import Any

from ctl.exitcodes import EXIT_FAILED, EXIT_USAGE

# The requests that can throw work away, asked for a plan before they are sent.
PREVIEWED = frozenset({"skip", "cancel", "ws_rollback", "ws_retry", "ws_resume", "worker_shutdown"})

# Exit codes: no terminal to ask on and no --yes; the operator answered no.
EXIT_NEEDS_YES = EXIT_USAGE
EXIT_DECLINED = EXIT_FAILED


def previewed(method: str, params: dict[str, Any]) -> bool:
    """Whether `method` with `params` may throw work away, so its plan is asked for."""
    if method == "worker_shutdown":
        return bool(params.get("force"))
    return method in PREVIEWED


def asks(method: str, plan: dict[str, Any]) -> bool:
    """Whether the plan throws work away: a cancel only when it kills an attempt (a queued
    or pending task loses nothing); the others whenever they change anything."""
    if method == "cancel":
        return bool(plan["kills"])
    return bool(plan["changes"] or plan["kills"])


def _fields(changes: dict[str, Any]) -> str:
    shown = [f"{k}={v}" for k, v in changes.items() if v not in (None, [], {})]
    return f" ({', '.join(shown)})" if shown else ""


def plan_lines(plan: dict[str, Any]) -> list[str]:
    """The plan as lines for a person: the attempts killed first, then every change."""
    lines = [
        f"  kill attempt {k['attempt']} of task {k['task_id']} (on {k['worker_id']})"
        for k in plan["kills"]
    ]
    for c in plan["changes"]:
        fields = dict(c["changes"])
        stopping = fields.pop("stopping", None)
        if c["from"] == c["to"] and stopping:
            lines.append(f"  {c['entity']} {c['id']}: stop it ({stopping})")
        elif c["from"] == c["to"]:
            lines.append(f"  {c['entity']} {c['id']}: stays {c['to']}{_fields(fields)}")
        else:
            lines.append(f"  {c['entity']} {c['id']}: {c['from']} -> {c['to']}{_fields(fields)}")
    return lines


def ask(what: str, lines: list[str], *, yes: bool) -> int | None:
    """Confirm `what` (shown with the plan `lines`): None to go on; else the exit code
    (no terminal and no --yes: EXIT_NEEDS_YES; answered no or end of input: EXIT_DECLINED).
    The plan and the question go to stderr, so that --json output stays clean."""
    if yes:
        return None
    err = sys.stderr
    err.write(f"{what} will:\n" + "\n".join(lines) + "\n")
    if sys.stdin is None or not sys.stdin.isatty():  # None: started with fd 0 closed
        err.write(
            f"orchctl: {what} throws work away and needs confirmation; nothing was changed. "
            "Run it on a terminal to be asked, or add --yes\n"
        )
        return EXIT_NEEDS_YES
    err.write("Go ahead? [y/N] ")
    err.flush()
    answer = sys.stdin.readline().strip().lower()
    if answer in ("y", "yes"):
        return None
    err.write(("\n" if not answer else "") + "orchctl: not done; nothing was changed\n")
    return EXIT_DECLINED
