"""Throughput of the engine against `xargs -P 2`, and its scaling from 2,000 to 20,000 tasks.

Runs the real daemon (durable state, fdatasync on) with 2 workers on no-op tasks (`true`,
no dependencies) and, in the same run, the same commands through `xargs -P 2`.

    python bench/throughput.py            # 2,000 vs xargs, then 2,000 vs 20,000
    python bench/throughput.py 500 5000   # smaller sizes for a quick look
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ctl.client import Client
from tests.harness import Daemon


def run_orchd(n: int, tag: str) -> float:
    """Wall time from submit to the workstream's completion, on a fresh daemon."""
    with tempfile.TemporaryDirectory(prefix="orchd-bench-") as tmp:
        d = Daemon(
            Path(tmp),
            {
                "workers": {"count": 2},
                "store": {
                    "snapshot_interval_s": 30.0,
                    "metrics_interval_s": 5.0,
                    "checkpoint_interval_s": 1.0,
                },
            },
        )
        d.start()
        try:
            # Submitted in workstreams of at most 2,000 tasks (a request is capped at 1 MiB);
            # none has dependencies, so together they are one wide DAG to the scheduler.
            texts = []
            for start in range(0, n, 2000):
                body = "\n".join(
                    f'[[tasks]]\nid = "{tag}-{i}"\ncommand = ["true"]\ntimeout_s = 60'
                    for i in range(start, min(n, start + 2000))
                )
                texts.append(f'id = "ws-{tag}-{start}"\n' + body)
            with Client(d.socket) as client:  # one connection, polled gently
                started = time.perf_counter()
                for text in texts:
                    client.call("submit", text=text, source="bench")
                while True:
                    ws = client.call("ws_list")
                    if all(w["state"] in ("completed", "failed") for w in ws):
                        break
                    time.sleep(0.05)
            elapsed = time.perf_counter() - started
            assert {w["state"] for w in ws} == {"completed"}, ws
            return elapsed
        finally:
            d.stop()


def run_xargs(n: int) -> float:
    """`true` n times through xargs -P 2 (one ignored argument each)."""
    started = time.perf_counter()
    subprocess.run(["xargs", "-P", "2", "-n", "1", "true"], input=("x\n" * n).encode(), check=True)
    return time.perf_counter() - started


def main() -> None:
    small = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    large = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
    xargs_s = run_xargs(small)
    orchd_s = run_orchd(small, "small")
    print(
        f"{small} tasks, 2 workers: orchd {orchd_s:.2f} s ({small / orchd_s:.0f} tasks/s), "
        f"xargs -P 2 {xargs_s:.2f} s; ratio {orchd_s / xargs_s:.2f} (target <= 2.5)"
    )
    large_s = run_orchd(large, "large")
    per_small, per_large = orchd_s / small, large_s / large
    print(
        f"{large} tasks (wide DAG): {large_s:.2f} s ({large / large_s:.0f} tasks/s); per task "
        f"{per_small * 1e3:.3f} ms at {small} vs {per_large * 1e3:.3f} ms at {large}; "
        f"growth {per_large / per_small:.2f}x (target <= 1.3)"
    )


if __name__ == "__main__":
    main()
