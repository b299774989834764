"""The next actions of `orchctl debug`: a numbered menu to pick one from on a terminal, or
the commands listed when there is no terminal. Reads the choice from stdin; runs nothing
itself (the caller runs the chosen command line).
"""

from __future__ import annotations

import sys
from typing import Any

from ctl.exitcodes import EXIT_OK, EXIT_USAGE


def choose(actions: list[dict[str, Any]]) -> list[str] | int:
    """Show `actions` as a numbered menu and ask for one: the orchctl arguments to run, or
    an exit code when there is nothing to run (no actions, Enter, a bad choice)."""
    if not actions:
        return EXIT_OK
    for i, a in enumerate(actions, 1):
        shown = " ".join("REASON" if x == "{reason}" else x for x in a["argv"])
        print(f"  {i}. {a['label']}: orchctl {shown}")
    choice = input(f"action [1-{len(actions)}, Enter to quit]: ").strip()
    if not choice:
        return EXIT_OK
    if not choice.isdigit() or not 1 <= int(choice) <= len(actions):
        print(f"orchctl: no action {choice!r}", file=sys.stderr)
        return EXIT_USAGE
    argv = list(actions[int(choice) - 1]["argv"])
    if "{reason}" in argv:
        reason = input("reason: ").strip()
        if not reason:
            print("orchctl: a reason is needed", file=sys.stderr)
            return EXIT_USAGE
        argv[argv.index("{reason}")] = reason
    return argv


def suggestions(actions: list[dict[str, Any]]) -> str:
    """The actions as commands to copy, each with its label; empty when there are none."""
    if not actions:
        return ""
    lines = ["next actions:"]
    for a in actions:
        argv = " ".join(x if x != "{reason}" else '"REASON"' for x in a["argv"])
        lines.append(f"    orchctl {argv}    # {a['label']}")
    return "\n".join(lines)
