"""`orchctl submit FILE --wait`: follows a run to its verdict, printing a line per task
transition (one JSON object a line with --json), and returns the exit code: 0 when the
run completed, 1 when it failed or was cancelled. If the daemon goes away meanwhile, the
client's DaemonUnreachable reaches the caller (exit 7): it never waits on a dead socket.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Final

from ctl import render
from ctl.client import Client, RemoteError
from ctl.exitcodes import EXIT_FAILED, EXIT_OK

# A run in one of these states is over; `completed` and `merged` are a success.
FINISHED: Final = frozenset({"completed", "failed", "cancelled", "merged"})
SUCCEEDED: Final = frozenset({"completed", "merged"})
# How often a follow that the daemon dropped (it fell behind) is taken up again.
_MAX_REFOLLOWS: Final = 100


def verdict_code(state: str) -> int:
    return EXIT_OK if state in SUCCEEDED else EXIT_FAILED


def task_line(item: dict[str, Any], colour: bool) -> str:
    """One task transition as a human line: time, full name, from -> to, and detail."""
    when = time.strftime("%H:%M:%S", time.localtime(item["ts"])) if item.get("ts") else ""
    frm = item.get("from") or "-"
    extra = []
    if item.get("worker_id"):
        extra.append(f"on {item['worker_id']}")
    if item.get("failure_kind"):
        extra.append(str(item["failure_kind"]))
    if item.get("skipped"):
        extra.append("skipped")
    if item.get("cause") == "operator":
        extra.append("by an operator")
    detail = f" ({', '.join(extra)})" if extra else ""
    return f"{when} {item['id']}  {frm} -> {render.paint(item['to'], colour)}{detail}".lstrip()


def verdict_line(ws_id: str, state: str, colour: bool) -> str:
    line = f"workstream {ws_id} {render.paint(state, colour)}"
    if state not in SUCCEEDED:
        line += f": see `orchctl ws analyze {ws_id}`"
    return line


def wait(
    socket_path: str, ws_id: str, *, json_lines: bool, colour: bool, after_seq: int | None = None
) -> int:
    """Follow `ws_id` until it is finished; its verdict as an exit code. `after_seq` (the
    submission's seq) asks for the changes since then first, so that none is missed."""
    known: dict[str, str] = {}

    def say(obj: dict[str, Any], human: str | None) -> None:
        text = render.compact(obj) if json_lines else human
        if text is not None:
            print(text, flush=True)

    for _ in range(_MAX_REFOLLOWS):
        try:
            with Client(socket_path) as client:
                for item in client.stream("ws_follow", workstream=ws_id, after_seq=after_seq):
                    kind = item["kind"]
                    # A follow taken up again asks for what came after the last one seen.
                    after_seq = max(after_seq or 0, item["seq"])
                    if kind == "snapshot":
                        # Where the run stands (again, after a dropped follow): a line for
                        # each task whose state is news.
                        for tid, st in item["tasks"].items():
                            if known.get(tid) != st:
                                say(
                                    {"kind": "task", "id": tid, "from": known.get(tid), "to": st},
                                    f"{tid}  {render.paint(st, colour)}",
                                )
                                known[tid] = st
                        state = item["state"]
                    elif kind == "task":
                        known[item["id"]] = item["to"]
                        say(item, task_line(item, colour))
                        continue
                    else:
                        state = item["to"]
                        say(item, None if state in FINISHED else f"workstream {ws_id} {state}")
                    if state in FINISHED:
                        if json_lines:
                            say({"kind": "verdict", "workstream_id": ws_id, "state": state}, None)
                        else:
                            say({}, verdict_line(ws_id, state, colour))
                        return verdict_code(state)
        except RemoteError as exc:
            if exc.code != "unavailable":
                raise
            # The daemon dropped this follower (it fell behind): follow again.
            print(f"orchctl: {exc.message}", file=sys.stderr)
            time.sleep(0.2)
    raise RemoteError("failed", f"gave up following {ws_id}; see `orchctl ws show {ws_id}`")
