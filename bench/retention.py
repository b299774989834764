"""Memory with and without retention, and what one retirement costs.

1. The decision core (tests/rig.py, in-process, no processes) runs R runs of a pipeline of
   T tasks back to back, every attempt succeeding. With `keep_finished = K` the live
   tasks and the traced memory (tracemalloc) after 10% of the runs (at least K + 1) and
   at the end stay flat (what the rig itself keeps of every step is cleared); the
   baseline, in the same command, keeps every run (keep_finished huge).
2. One workstream of 2,000 tasks: how long its archive document takes to encode in the
   step (on the loop), and how long the archive (2,000 task logs of 1 KiB) takes to write
   in the worker thread, with its size.

    python bench/retention.py            # R = 100 runs of T = 200 tasks, K = 5
    python bench/retention.py 200 100 5
"""

from __future__ import annotations

import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supervisor.control import actions
from supervisor.control import protocol as p
from supervisor.core.config import RetentionConfig
from supervisor.core.retention import document
from supervisor.store import archive
from tests.rig import Rig, config


def pipeline(tasks: int) -> str:
    out = ['name = "soak"']
    for i in range(tasks):
        deps = f'depends_on = ["t{i - 1}"]\n' if i % 10 else ""
        out.append(f'[[tasks]]\nid = "t{i}"\ncommand = "true"\n{deps}')
    return "\n".join(out) + "\n"


def run(runs: int, tasks: int, keep: int, first: int) -> list[tuple[int, int, float]]:
    """(runs done, live tasks, traced MiB) after 10% of the runs and at the end."""
    cfg = msgspec.structs.replace(config(workers=8), retention=RetentionConfig(keep_finished=keep))
    rig = Rig(cfg)
    text = pipeline(tasks)
    out = []
    tracemalloc.start()
    for n in range(1, runs + 1):
        rig.run(actions.submit, p.SubmitParams(text=text))
        while rig.pool.current:
            for wid in list(rig.pool.current):
                rig.pool.finish(wid)
            rig.deliver()
        rig.deliver()
        # The rig keeps every effect and record it saw: not the daemon's memory.
        for kept in (
            rig.effects,
            rig.archives,
            rig.dropped,
            rig.notes,
            rig.store.records,
            rig.store.events,
            rig.store.checkpoints,
            rig.pool.runs,
            rig.pool.sent,
        ):
            kept.clear()
        if n in (first, runs):
            out.append((n, len(rig.state.data.tasks), tracemalloc.get_traced_memory()[0] / 2**20))
    tracemalloc.stop()
    return out


def one_archive(tasks: int = 2000) -> dict[str, Any]:
    rig = Rig(msgspec.structs.replace(config(workers=8), retention=RetentionConfig()))
    rig.run(actions.submit, p.SubmitParams(text=pipeline(tasks)))
    while rig.pool.current:
        for wid in list(rig.pool.current):
            rig.pool.finish(wid)
        rig.deliver()
    (ws_id,) = rig.state.data.workstreams
    started = time.perf_counter()
    doc = document(rig.state, ws_id, 0.0)
    encode_ms = (time.perf_counter() - started) * 1000
    with tempfile.TemporaryDirectory(prefix="orchd-bench-") as tmp:
        d = Path(tmp)
        logs = d / "logs" / ws_id
        logs.mkdir(parents=True)
        line = ("x" * 63 + "\n") * 16
        for i in range(tasks):
            (logs / f"t{i}.log").write_text(line)
        started = time.perf_counter()
        path = archive.write_archive(d, ws_id, doc)
        write_ms = (time.perf_counter() - started) * 1000
        size = path.stat().st_size
    return {
        "encode_ms": encode_ms,
        "write_ms": write_ms,
        "doc_kib": len(doc) / 1024,
        "archive_kib": size / 1024,
    }


def main() -> None:
    runs, tasks, keep = (int(a) for a in (sys.argv[1:] + ["100", "200", "5"][len(sys.argv) - 1 :]))
    print(f"{runs} runs of {tasks} tasks, back to back (decision core, in-process)")
    first = min(runs, max(keep + 1, runs // 10))
    for label, k in ((f"retention keep_finished={keep}", keep), ("baseline (keeps all)", 10**9)):
        (n1, t1, m1), (n2, t2, m2) = run(runs, tasks, k, first)
        print(
            f"  {label:28} after {n1:4} runs: {t1:6} tasks {m1:7.1f} MiB; after {n2:4}: "
            f"{t2:6} tasks {m2:7.1f} MiB; end/10% = {m2 / m1:.2f}x"
        )
    a = one_archive()
    print(
        f"one 2,000-task workstream: document {a['doc_kib']:.0f} KiB encoded in "
        f"{a['encode_ms']:.1f} ms (in the step); archive with 2,000 logs "
        f"{a['archive_kib']:.0f} KiB written in {a['write_ms']:.0f} ms (worker thread)"
    )


if __name__ == "__main__":
    main()
