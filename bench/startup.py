"""Start-up benchmark of the state store with a long history: one big log (the layout of
a state directory written before segments) against segments with compaction.

Both directories hold the same records: the life of TASKS tasks (bench/replay.py's
workload), then resource limit changes up to RECORDS in all, a history that does not grow
the state (it stands for the work retention has since dropped from it), with a snapshot
every 5,000 records and one 1,000 records before the end.

- before: `store.segment_bytes = 0` and every backup a full copy (`backups_full =
  backups_keep = 100`), so everything stays in one transitions.jsonl beside 100 full
  snapshots, as in a directory written by the code before segments; its start-up checks
  the snapshot's log position with a CRC pass over the whole log (as that code did), then
  replays the last records;
- after: `store.segment_bytes` = 16 MiB (the default), `backups_keep = 20`,
  `backups_full = 4` (restore points reaching back 20 snapshots): the log is sealed into
  segments, the ones no kept backup needs are deleted, and start-up reads the snapshot
  and the active segment only.

Reported for each: the state directory's size, the log files kept, and `Store.open` (the
store's part of restart → ready: lock, load, check, replay), best of three, with the
ratio of the two. Usage: python bench/startup.py [RECORDS] [TASKS]
(or ORCHD_BENCH_RECORDS, ORCHD_BENCH_TASKS; defaults 1,000,000 and 10,000).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.replay import Gen
from supervisor.core.model import Transition
from supervisor.store.directory import Store
from supervisor.store.segments import log_chain

SNAPSHOT_EVERY = 5_000
RESOURCES = 20


def history(n_records: int, n_tasks: int) -> Iterator[Transition]:
    gen = Gen()
    n = 0
    for rec in gen.records(n_tasks):
        if n >= n_records:
            return
        n += 1
        yield rec
    for i in range(RESOURCES):
        yield gen.rec("resource", f"pool-{i}", None, "defined", max_holders=1)
        n += 1
    k = 0
    while n < n_records:
        k += 1
        i = k % RESOURCES
        yield gen.rec("resource", f"pool-{i}", "defined", "defined", max_holders=1 + k % 7)
        n += 1


def write(d: Path, n_records: int, n_tasks: int, **kw: int) -> int:
    """Write the history into `d` through a Store made with `kw`; return the record count."""
    store = Store(d, fsync=False, **kw)
    state = store.open()
    n = 0
    for rec in history(n_records, n_tasks):
        store.write(rec)
        state.apply(rec)
        n += 1
        last_one = n_records - 1000
        if (n % SNAPSHOT_EVERY == 0 and n < last_one) or n == last_one:
            store.sync()
            store.write_snapshot(state)
    store.close()
    return n


def du(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def open_time(d: Path, n: int, **kw: int) -> float:
    """The best of three Store.open, with the settings the directory was written with (a
    one-log directory opened with segments would be sealed by the first open)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        store = Store(d, fsync=False, **kw)
        state = store.open()
        best = min(best, time.perf_counter() - t0)
        store.close()
        assert state.last_seq == n, (state.last_seq, n)
        del state
    return best


def main() -> None:
    # The store's info lines (a log_compacted after each snapshot) are not the figures.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    args = sys.argv[1:]
    n_records = int(args[0] if args else os.environ.get("ORCHD_BENCH_RECORDS", 1_000_000))
    n_tasks = int(args[1] if len(args) > 1 else os.environ.get("ORCHD_BENCH_TASKS", 10_000))
    with tempfile.TemporaryDirectory(prefix="orchd-bench-") as tmp:
        before, after = Path(tmp) / "before", Path(tmp) / "after"
        old: dict[str, int] = {"segment_bytes": 0, "backups_keep": 100, "backups_full": 100}
        new: dict[str, int] = {"backups_keep": 20, "backups_full": 4}
        n = write(before, n_records, n_tasks, **old)
        n2 = write(after, n_records, n_tasks, **new)
        assert n == n2
        rows = []
        for name, d, kw in (("before (one log)", before, old), ("after (segments)", after, new)):
            chain = log_chain(d)
            log_bytes = sum(s.path.stat().st_size for s in chain)
            n_backups = len(list((d / "backups").iterdir()))
            rows.append((name, du(d), len(chain), log_bytes, n_backups, open_time(d, n, **kw)))
        print(f"{n:,} records, {n_tasks:,} tasks, a snapshot every {SNAPSHOT_EVERY:,} records")
        for name, size, files, log_bytes, backups, t in rows:
            print(
                f"{name:18} state dir {size / 1e6:8.1f} MB, log {files:3} file(s) "
                f"{log_bytes / 1e6:8.1f} MB, {backups:3} backups, Store.open {t:.3f} s"
            )
        (_, s0, _, l0, _, t0), (_, s1, _, l1, _, t1) = rows
        print(
            f"ratio before/after: state dir {s0 / s1:.1f}x, log {l0 / l1:.1f}x, "
            f"Store.open {t0 / t1:.2f}x"
        )


if __name__ == "__main__":
    main()
