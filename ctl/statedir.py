"""`orchctl state …`: the offline commands on a state directory (validate, backups, repair,
restore), run with the daemon stopped. Each takes the directory's lock itself, through
supervisor.store.maintenance; none needs the control socket.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ctl import render
from ctl.exitcodes import EXIT_CORRUPT, EXIT_FAILED, EXIT_OK, EXIT_WRONG_STATE


def add_commands(sub: Any) -> None:
    """Add the `state` command and its actions to orchctl's subparsers `sub`."""
    # `sub` is what ArgumentParser.add_subparsers returns, whose class argparse keeps private.
    st = sub.add_parser("state", help="offline state tools (daemon stopped)").add_subparsers(
        dest="state_cmd", required=True, metavar="ACTION"
    )
    for name, text in (
        ("validate", "check the log, snapshot, backups and checkpoints"),
        ("backups", "list the snapshot backups"),
        ("repair", "cut a torn log tail, rebuild a damaged snapshot"),
        ("restore", "make current.json from a backup or from the whole log"),
    ):
        sp = st.add_parser(name, help=text)
        sp.add_argument(
            "--state-dir", default=".state", help="the state directory (default .state)"
        )
        if name == "restore":
            how = sp.add_mutually_exclusive_group(required=True)
            how.add_argument("--from-backup", metavar="latest|FILE")
            how.add_argument("--from-transitions", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Run the parsed `state` action, print its outcome; the exit code."""
    # Imported here: the rest of orchctl stays light and needs only the protocol.
    from supervisor.core.errors import StoreCorrupt, StoreLocked
    from supervisor.store import maintenance

    out: dict[str, Any]
    try:
        if args.state_cmd == "validate":
            problems = maintenance.validate_state(args.state_dir)
            out = {"ok": not problems, "problems": problems}
        elif args.state_cmd == "backups":
            out = {"backups": [str(p) for p in maintenance.list_backups(args.state_dir)]}
        elif args.state_cmd == "repair":
            out = {"done": maintenance.repair_state(args.state_dir)}
        elif args.from_transitions:
            out = {"done": [maintenance.restore_from_transitions(args.state_dir)]}
        else:
            out = {"done": [maintenance.restore_from_backup(args.state_dir, args.from_backup)]}
    except StoreLocked:
        print(
            f"orchctl: {args.state_dir} is in use by a running orchd; stop it first "
            "(systemctl stop orchd)",
            file=sys.stderr,
        )
        return EXIT_WRONG_STATE
    except StoreCorrupt as exc:
        print(f"orchctl: {exc}", file=sys.stderr)
        return EXIT_CORRUPT
    except (FileNotFoundError, OSError) as exc:
        print(f"orchctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(render.to_json(out))
    elif "problems" in out:
        print("state is consistent" if out["ok"] else "\n".join(out["problems"]))
    elif "backups" in out:
        print("\n".join(out["backups"]) or "no backups")
    else:
        print("\n".join(out["done"]) or "nothing to repair")
    return EXIT_OK if out.get("ok", True) else EXIT_CORRUPT
