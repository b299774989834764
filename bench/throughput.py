"""Throughput of the engine against `xargs -P 2`, its scaling from 2,000 to 20,000 tasks,
and the latency of one hop along a chain of dependent tasks.

Runs the real daemon (durable state, fdatasync on) with 2 workers on no-op tasks (`true`,
no dependencies) and, in the same run, the same commands through `xargs -P 2`; then a
chain of 200 tasks, each depending on the one before, whose per-hop latency (one task's
end to the next one's start, from the attempt records) is set beside the cost of running
`true` from a shell loop.

    python bench/throughput.py            # 2,000 vs xargs, then 2,000 vs 20,000, chain 200
    python bench/throughput.py 500 5000   # smaller sizes for a quick look
"""

from __future__ import annotations

import itertools
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ctl.client import Client
from tests.harness import Daemon

BENCH_CONFIG = {
    "workers": {"count": 2},
    "store": {
        "snapshot_interval_s": 30.0,
        "metrics_interval_s": 5.0,
        "checkpoint_interval_s": 1.0,
    },
}


def run_orchd(n: int, tag: str) -> float:
    """Wall time from submit to the workstream's completion, on a fresh daemon."""
    with tempfile.TemporaryDirectory(prefix="orchd-bench-") as tmp:
        d = Daemon(Path(tmp), BENCH_CONFIG)
        d.start()
        try:
            # One workstream, however big (a file over one frame is uploaded in chunks);
            # no dependencies, so it is one wide DAG to the engine.
            body = "\n".join(
                f'[[tasks]]\nid = "{tag}-{i}"\ncommand = ["true"]\ntimeout_s = 60' for i in range(n)
            )
            with Client(d.socket) as client:  # one connection, polled gently
                started = time.perf_counter()
                client.submit(f'id = "ws-{tag}"\n' + body, source="bench")
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


def _gaps(stamps: Path) -> list[float]:
    times = [float(x) for x in stamps.read_text().split()]
    return sorted(b - a for a, b in itertools.pairwise(times))


def run_chain(n: int) -> list[float]:
    """Gaps (s) between consecutive tasks of a chain of `n` dependent tasks, each of which
    appends the time it ran to a file: one hop, from one command to the next."""
    with tempfile.TemporaryDirectory(prefix="orchd-bench-") as tmp:
        stamps = Path(tmp) / "stamps"
        d = Daemon(Path(tmp), BENCH_CONFIG)
        d.start()
        try:
            body = "\n".join(
                f'[[tasks]]\nid = "c{i}"\ncommand = "date +%s.%N >> {stamps}"\ntimeout_s = 60'
                + (f'\ndepends_on = ["c{i - 1}"]' if i else "")
                for i in range(n)
            )
            with Client(d.socket) as client:
                client.call("submit", text='id = "ws-chain"\n' + body, source="bench")
                while client.call("ws_show", workstream="ws-chain")["state"] != "completed":
                    time.sleep(0.05)
        finally:
            d.stop()
        return _gaps(stamps)


def run_shell_chain(n: int) -> list[float]:
    """The same commands one after another from a shell loop (the baseline hop)."""
    with tempfile.TemporaryDirectory(prefix="orchd-bench-") as tmp:
        stamps = Path(tmp) / "stamps"
        loop = f"i=0; while [ $i -lt {n} ]; do sh -c 'date +%s.%N >> {stamps}'; i=$((i+1)); done"
        subprocess.run(["sh", "-c", loop], check=True)
        return _gaps(stamps)


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
    shell = run_shell_chain(200)
    hops = run_chain(200)
    med, base = statistics.median(hops), statistics.median(shell)
    print(
        f"chain of 200 dependent tasks: one hop (command to command) median {med * 1e3:.2f} ms,"
        f" p95 {hops[int(len(hops) * 0.95)] * 1e3:.2f} ms; the same commands from a shell "
        f"loop {base * 1e3:.2f} ms; orchd's own latency per hop {(med - base) * 1e3:.2f} ms "
        f"(target <= 5 ms)"
    )


if __name__ == "__main__":
    main()
