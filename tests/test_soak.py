"""A soak at CI size (bench/soak.py's workload): many runs of a DAG with a shared resource,
flaky and failing tasks, submitted one after another to the real daemon with short
retention. What the daemon holds must depend on what is live, not on history: at the end
its RSS, its state directory (without `archive/`) and its restart → ready stay within
1.3x of their values after the first tenth.

Compared like with like on a shared machine: the daemon lives from the first tenth to the
end (so its RSS at the end holds whatever its life kept), the state directory after the
first tenth is kept, and at the end the first tenth's state and the last are started
cleanly in turn, five times each (the median start of each, and the median RSS once the
workers are idle).

Every bound on history (runs kept, backups, log segments, rotated files) is set small
enough to be reached within the first tenth (bench/soak.py `soak_config`): 16 KiB log
segments and events files, 2 KiB worker logs, 3 backups of a snapshot every 0.25 s.

Until the config has rotation (`rotation.events_max_bytes`, `rotation.worker_log_max_bytes`),
events.jsonl and logs/workers/ are left out of the state directory's comparison.

Size: ORCHD_SOAK_RUNS runs (20) of ORCHD_SOAK_TASKS tasks (ORCHD_TORTURE_SIZE, else 200).
Needs retention of finished workstreams (`[retention]`); skipped on a tree without it.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import pytest

from bench import soak
from supervisor.core.config import Config
from tests.harness import Daemon, assert_no_leftovers

RUNS = int(os.environ.get("ORCHD_SOAK_RUNS", "20"))
TASKS = int(os.environ.get("ORCHD_SOAK_TASKS", os.environ.get("ORCHD_TORTURE_SIZE", "200")))
FLAT = 1.3
# Kept per pipeline: no more than the first tenth's runs, so the live state is at its
# steady size from the first tenth on.
KEEP = max(1, RUNS // 10)

# What grows until a setting of another change bounds it: the part of the state dir, and
# the setting that bounds it.
UNBOUNDED_UNTIL = {
    "events.jsonl": "rotation.events_max_bytes",
    "logs/workers": "rotation.worker_log_max_bytes",
}

pytestmark = pytest.mark.skipif(
    "retention" not in Config.__struct_fields__,
    reason="needs retention of finished workstreams: supervisor.core.config.Config has no "
    "`retention` field ([retention] keep_finished / keep_finished_s) on this tree",
)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_soak_memory_state_and_restart_stay_flat(sock_dir: Path) -> None:
    """After RUNS runs with retention, RSS, state dir and restart → ready are within 1.3x
    of the first tenth's."""
    base = sock_dir / "first"
    base.mkdir()
    # A tenth of the CI size is two runs, about 2 s: backups (3 of a snapshot every
    # 0.25 s), the log segments they keep, events (3 files of 16 KiB) and worker logs
    # (3 of 2 KiB each; their notes are the smallest stream) all reach their bound in it.
    cfg, applied = soak.soak_config(
        keep_finished=KEEP,
        keep_finished_s=3600.0,
        file_bytes=16 * 1024,
        snapshot_interval_s=0.25,
        backups_keep=3,
        extra={"rotation.worker_log_max_bytes": 2048},
    )
    assert applied.get("retention.keep_finished") == KEEP, applied
    first_d, last_d = Daemon(base, cfg), Daemon(sock_dir, cfg)
    try:
        rows, _ = soak.soak(
            RUNS, TASKS, sock_dir, cfg, restarts=1, restart_at="ends", keep_first=base / "state"
        )
        paired = soak.paired_starts(first_d, last_d, 5)
    finally:
        for d in (first_d, last_d):
            if d.proc is not None and d.proc.poll() is None:
                d.stop()
        assert_no_leftovers()
    first, last = rows[0], rows[-1]
    shown = f"{soak.table(rows)}\nbounds in force: {applied}"
    assert last.live_workstreams <= first.live_workstreams, shown
    assert last.rss_mib <= FLAT * first.rss_mib, shown
    # Files this tree does not bound yet (their rotation comes with its own change) are
    # left out of the comparison until the config has the setting.
    unbounded = [
        part for part, setting in UNBOUNDED_UNTIL.items() if not soak.known_setting(setting)
    ]

    def bounded(row: soak.Row) -> float:
        return row.state_mib - sum(row.state_parts.get(p, 0.0) for p in unbounded)

    assert bounded(last) <= FLAT * bounded(first), (
        f"{shown}\nleft out (not bounded on this tree): {unbounded}\n"
        f"state dir by entry, first: {first.state_parts}\nlast: {last.state_parts}"
    )
    # The starts were taken in turn, so both sides saw the same load: their medians (one
    # quick or slow start, seen either side, moves neither).
    med = {k: statistics.median(v) for k, v in paired.items()}
    assert med["last_s"] <= FLAT * med["first_s"], f"starts in turn: {paired}"
    assert med["last_mib"] <= FLAT * med["first_mib"], f"starts in turn: {paired}"
