"""Replay benchmark of the state store.

Writes a realistic transitions log (a few big workstreams submitted up front, then every
task's life: queued, running with an attempt, pid learnt, completed; one task in twenty
fails once and is retried; workers go busy and idle) and measures:

1. a full replay from an empty state, against a bare `msgspec.json.decode` of every line
   of the same file measured in the same run (the target is a ratio of at most 3);
2. a start from a snapshot plus the last 1,000 records, for a state of 100,000 tasks
   (the target is under 1 s).

Usage: python bench/replay.py [RECORDS] [TASKS]   (or ORCHD_BENCH_RECORDS, ORCHD_BENCH_TASKS)
Defaults: 1,000,000 records and 100,000 tasks; `python bench/replay.py 100000 10000` is quick.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supervisor.core.model import Cause, Transition
from supervisor.store.directory import Store, read_state

TASKS_PER_WS = 10_000
WORKERS = 8
RECORDS_PER_TASK = 6.3  # 4 task + 2 worker records, plus the retried ones


class Gen:
    """Legal records, numbered from 1, for `n_tasks` tasks in workstreams of 10,000."""

    def __init__(self) -> None:
        self.seq = 0
        self.ts = 1_700_000_000.0

    def rec(self, entity: Any, id_: str, from_: str | None, to: str, **changes: Any) -> Transition:
        self.seq += 1
        self.ts += 0.001
        cause: Cause = "submit" if entity == "workstream" and from_ is None else "auto"
        return Transition(
            seq=self.seq,
            ts=self.ts,
            entity=entity,
            id=id_,
            from_=from_,
            to=to,
            cause=cause,
            changes=changes,
        )

    def records(self, n_tasks: int) -> Iterator[Transition]:
        r = self.rec
        yield r("resource", "git_repo_write", None, "defined", max_holders=1)
        for w in range(WORKERS):
            yield r("worker", f"w-{w}", None, "starting", pid=1000 + w, started_at=self.ts)
            yield r("worker", f"w-{w}", "starting", "idle")
        n_ws = (n_tasks + TASKS_PER_WS - 1) // TASKS_PER_WS
        for k in range(n_ws):
            ws = f"ws-{k:03d}"
            tasks = []
            for i in range(min(TASKS_PER_WS, n_tasks - k * TASKS_PER_WS)):
                task: dict[str, Any] = {
                    "id": f"{ws}-t{i:05d}",
                    "workstream_id": ws,
                    "command": ["make", "-C", f"/srv/build/{ws}", f"part{i}"],
                    "depends_on": [f"{ws}-t{i - 1:05d}"] if i % 10 else [],
                    "order": i,
                }
                if i % 50 == 0:
                    task["resources"] = ["git_repo_write"]
                tasks.append(task)
            yield r(
                "workstream",
                ws,
                None,
                "pending",
                workstream={"id": ws, "submitted_at": self.ts},
                tasks=tasks,
            )
        for k in range(n_ws):
            ws = f"ws-{k:03d}"
            yield r("workstream", ws, "pending", "running")
            for i in range(min(TASKS_PER_WS, n_tasks - k * TASKS_PER_WS)):
                yield from self.task_life(f"{ws}-t{i:05d}", f"w-{i % WORKERS}", fails=i % 20 == 7)
            yield r("workstream", ws, "running", "completed", ended_at=self.ts)

    def task_life(self, tid: str, w: str, *, fails: bool) -> Iterator[Transition]:
        r = self.rec
        for n in (1, 2) if fails else (1,):
            aid = f"{tid}-{n}"
            yield r("task", tid, "pending", "queued", queued_at=self.ts)
            attempt = {"attempt_id": aid, "number": n, "worker_id": w, "started_at": self.ts}
            yield r("task", tid, "queued", "running", worker_id=w, queued_at=None, attempt=attempt)
            yield r("worker", w, "idle", "busy", task_id=tid, attempt_id=aid)
            pid = 40_000 + self.seq % 20_000
            upd = {"pid": pid, "pid_create_time": self.ts}
            yield r("task", tid, "running", "running", pid=pid, attempt_update=upd)
            if n == 1 and fails:
                end = {"ended_at": self.ts, "exit_code": 1, "failure_kind": "exit_code"}
                yield r(
                    "task", tid, "running", "pending", worker_id=None, pid=None, retry_count=1,
                    failure_kind="exit_code", not_before=self.ts + 2.0, attempt_update=end,
                )  # fmt: skip
            else:
                end = {"ended_at": self.ts, "exit_code": 0}
                yield r(
                    "task",
                    tid,
                    "running",
                    "completed",
                    worker_id=None,
                    pid=None,
                    attempt_update=end,
                )
            yield r("worker", w, "busy", "idle", task_id=None, attempt_id=None)


def write_log(
    d: Path, n_tasks: int, *, limit: int | None = None, snapshot_before_end: int = 0
) -> int:
    """Write the records for `n_tasks` tasks (at most `limit`); return how many. With
    `snapshot_before_end`, a snapshot is taken that many records before the end."""
    gen = Gen()
    total = sum(1 for _ in Gen().records(n_tasks)) if snapshot_before_end else 0
    store = Store(d, fsync=False, segment_bytes=0)  # one file: the bare decode reads it
    state = store.open()
    keep_state = bool(snapshot_before_end)
    n = 0
    for rec in gen.records(n_tasks):
        if limit is not None and n >= limit:
            break
        store.write(rec)
        n += 1
        if keep_state:
            state.apply(rec)
            if n == total - snapshot_before_end:
                store.write_snapshot(state)
                keep_state = False
    store.close()
    return n


def bare_decode_time(log: Path) -> tuple[float, int]:
    lines = log.read_bytes().split(b"\n")
    lines.pop()
    decode = msgspec.json.decode
    t0 = time.perf_counter()
    for line in lines:
        decode(line)
    return time.perf_counter() - t0, len(lines)


def main() -> None:
    args = sys.argv[1:]
    n_records = int(args[0] if args else os.environ.get("ORCHD_BENCH_RECORDS", 1_000_000))
    n_tasks = int(args[1] if len(args) > 1 else os.environ.get("ORCHD_BENCH_TASKS", 100_000))
    with tempfile.TemporaryDirectory(prefix="orchd-bench-") as tmp:
        d = Path(tmp) / "full"
        t0 = time.perf_counter()
        n = write_log(d, int(n_records / RECORDS_PER_TASK) + 1, limit=n_records)
        t_write = time.perf_counter() - t0
        size = (d / "transitions.jsonl").stat().st_size
        print(
            f"log: {n:,} records, {size / 1e6:.0f} MB, "
            f"written in {t_write:.2f} s ({n / t_write:,.0f} rec/s)"
        )
        bare, lines = bare_decode_time(d / "transitions.jsonl")
        t0 = time.perf_counter()
        state = read_state(d, full=True)
        full = time.perf_counter() - t0
        assert state.last_seq == n == lines, (state.last_seq, n, lines)
        print(f"bare msgspec.json.decode of every line: {bare:.2f} s ({lines / bare:,.0f} lines/s)")
        print(f"full replay from empty:                 {full:.2f} s ({n / full:,.0f} rec/s)")
        print(f"ratio full replay / bare decode:        {full / bare:.2f} (target <= 3)")
        del state

        d2 = Path(tmp) / "snap"
        n2 = write_log(d2, n_tasks, snapshot_before_end=1000)
        t0 = time.perf_counter()
        store = Store(d2, fsync=False)
        state = store.open()
        t_open = time.perf_counter() - t0
        store.close()
        tasks = len(state.data.tasks)
        assert state.last_seq == n2
        print(f"snapshot + last 1,000 records, {tasks:,} tasks ({n2:,} records in the log): "
              f"Store.open {t_open:.3f} s (target < 1 s)")  # fmt: skip


if __name__ == "__main__":
    main()
