"""What the loop pays for a snapshot and a checkpoint now that their writing is off it:
the snapshot's encoding (`Store.snapshot_blob`) and the checkpoint's document
(`Store.checkpoint_blob`; it is encoded later, in the thread), which run between two
steps, set beside the snapshot's whole write (`install_snapshot`: fsyncs, renames, a
backup), which runs in a worker thread.

    python bench/snapshot_encode.py            # 10,000, 50,000 and 100,000 live tasks
    python bench/snapshot_encode.py 20000
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.replay import write_log
from supervisor.store.directory import Store


def timed(fn: object, *args: object, runs: int = 5) -> float:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(*args)  # type: ignore[operator]
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [10_000, 50_000, 100_000]
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="orchd-bench-") as tmp:
            d = Path(tmp)
            write_log(d, n)
            store = Store(d)
            state = store.open()
            try:
                ws = next(iter(state.data.workstreams))
                blob = store.snapshot_blob(state)
                enc = timed(store.snapshot_blob, state)
                inst = timed(store.install_snapshot, blob)
                ck = timed(store.checkpoint_blob, ws, state)
                print(
                    f"{len(state.data.tasks):,} tasks: snapshot {len(blob.data) / 1e6:.1f} MB, "
                    f"encoded on the loop in {enc * 1e3:.1f} ms, written in a thread in "
                    f"{inst * 1e3:.1f} ms; a 10,000-task workstream's checkpoint taken on the "
                    f"loop in {ck * 1e3:.1f} ms"
                )
            finally:
                store.close()


if __name__ == "__main__":
    main()
