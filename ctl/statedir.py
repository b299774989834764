"""`orchctl state …`: validate, backups, repair and restore of a state directory.

Without --state-dir they are about the running daemon's own directory: validate and
backups ask the daemon (it reads its files in a worker thread), repair and restore refuse
(exit 5: stop the daemon first). With --state-dir DIR they work on DIR offline, taking its
lock themselves through supervisor.store.maintenance; repair and restore ask to confirm.
With neither a daemon nor --state-dir there is nothing to work on (exit 7).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ctl import confirm, render
from ctl.client import Client, DaemonUnreachable, RemoteError
from ctl.exitcodes import (
    EXIT_CORRUPT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_WRONG_STATE,
)
from supervisor.control.frames import EXIT_CODES

STOP_FIRST = "stop the daemon first (systemctl stop orchd)"


def add_commands(sub: Any) -> None:
    """Add the `state` command and its actions to orchctl's subparsers `sub`."""
    # `sub` is what ArgumentParser.add_subparsers returns, whose class argparse keeps private.
    st = sub.add_parser(
        "state", help="state directory tools (the daemon's, or --state-dir offline)"
    ).add_subparsers(dest="state_cmd", required=True, metavar="ACTION")
    for name, text in (
        ("validate", "check the log segments, snapshot, backups and checkpoints"),
        ("backups", "list the backups (full copies and restore points), oldest first"),
        ("repair", "cut a torn log tail, rebuild a damaged snapshot (daemon stopped)"),
        ("restore", "make current.json from any listed backup or the kept log (daemon stopped)"),
    ):
        sp = st.add_parser(name, help=text)
        sp.add_argument(
            "--state-dir",
            help="work on this state directory offline (default: ask the running daemon)",
        )
        if name == "restore":
            how = sp.add_mutually_exclusive_group(required=True)
            how.add_argument("--from-backup", metavar="latest|FILE")
            how.add_argument("--from-transitions", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Run the parsed `state` action, print its outcome; the exit code."""
    if args.state_dir is None:
        return _online(args, None)
    return _offline(args)


def _online(args: argparse.Namespace, wanted: str | None) -> int:
    """Ask the daemon on --socket; `wanted` is the --state-dir it has to be running on."""
    try:
        with Client(args.socket) as client:
            status = client.call("status")
            running_on = str(status["state_dir"])
            if wanted is not None and not _same_dir(wanted, running_on):
                print(
                    f"orchctl: {wanted} is in use by an orchd other than the one on "
                    f"{args.socket} (that one runs on {running_on}); {STOP_FIRST}, or pass "
                    "that daemon's --socket",
                    file=sys.stderr,
                )
                return EXIT_WRONG_STATE
            if args.state_cmd in ("repair", "restore"):
                print(
                    f"orchctl: orchd is running on {running_on}; {STOP_FIRST}, then run "
                    f"`orchctl state {args.state_cmd} --state-dir {running_on} …`",
                    file=sys.stderr,
                )
                return EXIT_WRONG_STATE
            out = client.call(f"state_{args.state_cmd}")
    except DaemonUnreachable as exc:
        if wanted is not None:
            print(
                f"orchctl: {wanted} is in use by a running orchd, and none answers on "
                f"{args.socket}; {STOP_FIRST}, or pass that daemon's --socket",
                file=sys.stderr,
            )
            return EXIT_WRONG_STATE
        print(
            f"orchctl: {exc}; to work on a state directory offline, pass --state-dir DIR",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    except RemoteError as exc:
        print(f"orchctl: {exc.message}", file=sys.stderr)
        return EXIT_CODES.get(exc.code, EXIT_FAILED)
    return _print(args, out)


def _same_dir(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _offline(args: argparse.Namespace) -> int:
    # Imported here: the rest of orchctl stays light and needs only the protocol.
    from supervisor.core.errors import StoreCorrupt, StoreLocked
    from supervisor.store import maintenance

    d = args.state_dir
    out: dict[str, Any]
    try:
        if args.state_cmd == "validate":
            problems = maintenance.validate_state(d)
            out = {"ok": not problems, "problems": problems}
        elif args.state_cmd == "backups":
            out = {"backups": [str(p) for p in maintenance.list_backups(d)]}
        else:
            refused = _confirm_offline(args)
            if refused is not None:
                return refused
            if args.state_cmd == "repair":
                out = {"done": maintenance.repair_state(d)}
            elif args.from_transitions:
                out = {"done": [maintenance.restore_from_transitions(d)]}
            else:
                out = {"done": [maintenance.restore_from_backup(d, args.from_backup)]}
    except StoreLocked:
        if args.state_cmd == "validate":
            return _online(args, d)  # its own daemon answers for it
        print(f"orchctl: {d} is in use by a running orchd; {STOP_FIRST}", file=sys.stderr)
        return EXIT_WRONG_STATE
    except StoreCorrupt as exc:
        print(f"orchctl: {exc}", file=sys.stderr)
        return EXIT_CORRUPT
    except (FileNotFoundError, OSError) as exc:
        print(f"orchctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return _print(args, out)


def _confirm_offline(args: argparse.Namespace) -> int | None:
    """repair and restore replace files: the plan is made by the same functions with
    `dry_run` (which also refuses a directory a daemon holds, before anything is asked),
    then confirmed. None to go on, else the exit code."""
    from supervisor.store import maintenance

    if args.yes:
        return None
    d = args.state_dir
    if args.state_cmd == "repair":
        plan = maintenance.repair_state(d, dry_run=True)
        if not plan:
            return None  # nothing to repair: nothing to lose either
    elif args.from_transitions:
        plan = [maintenance.restore_from_transitions(d, dry_run=True)]
    else:
        plan = [maintenance.restore_from_backup(d, args.from_backup, dry_run=True)]
    return confirm.ask(f"orchctl state {args.state_cmd}", [f"  {p}" for p in plan], yes=args.yes)


def _print(args: argparse.Namespace, out: dict[str, Any]) -> int:
    if args.json:
        print(render.to_json(out))
    elif "problems" in out:
        print("state is consistent" if out["ok"] else "\n".join(out["problems"]))
    elif "backups" in out:
        print("\n".join(out["backups"]) or "no backups")
    else:
        print("\n".join(out["done"]) or "nothing to repair")
    return EXIT_OK if out.get("ok", True) else EXIT_CORRUPT
