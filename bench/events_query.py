"""Dispatch while `orchctl events` reads a long history: the hop latency of a chain of
dependent tasks with and without `orchctl events` running back to back, over an
events.jsonl of 500,000 lines.

Two queries: `orchctl events` (the newest 100: read backwards, a few blocks) and
`orchctl events --severity critical` (one event in 50,000 is critical: the whole file is
read and decoded). The hops (one command's start to the next one's, each command
appending the time it ran to a file) are measured without queries, then with each query
looping.

    python bench/events_query.py                        # this checkout
    python bench/events_query.py --against /work/main   # and another checkout, same run
    python bench/events_query.py --events 200000 --chain 100
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import itertools

from tests.harness import ROOT, Daemon

CONFIG = {"workers": {"count": 2}, "store": {"snapshot_interval_s": 30.0}}


def write_events(path: Path, n: int, critical_every: int = 50_000) -> None:
    ts = time.time() - n
    with path.open("wb") as f:
        for i in range(n):
            ev = {
                "event": "generated",
                "severity": "critical" if i % critical_every == 0 else "info",
                "ts": ts + i,
                "task_id": f"old/t{i}",
                "message": f"event number {i} of a long history",
            }
            f.write(json.dumps(ev, separators=(",", ":")).encode() + b"\n")


def chain(ws: str, n: int, stamps: Path) -> str:
    """A chain of `n` tasks, each appending the time it ran to `stamps`."""
    return f'id = "{ws}"\n' + "\n".join(
        f'[[tasks]]\nid = "c{i}"\ncommand = "date +%s.%N >> {stamps}"'
        + (f'\ndepends_on = ["c{i - 1}"]' if i else "")
        for i in range(n)
    )


def hops(stamps: Path) -> list[float]:
    """One command's start to the next one's, sorted."""
    t = sorted(float(x) for x in stamps.read_text().split())
    return sorted(b - a for a, b in itertools.pairwise(t))


def run_chain(
    d: Daemon, ws: str, n: int, query: list[str] | None
) -> tuple[list[float], list[float]]:
    """The chain's hops, and the durations of the queries that ran meanwhile."""
    took: list[float] = []
    stop = threading.Event()

    def loop() -> None:
        assert query is not None
        while not stop.is_set():
            a = time.perf_counter()
            r = subprocess.run(
                [sys.executable, "-m", "ctl", "--socket", d.socket, "--json", *query],
                capture_output=True,
                cwd=ROOT,
                timeout=300,
            )
            if r.returncode != 0:
                raise SystemExit(f"orchctl {' '.join(query)} failed: {r.stderr.decode()}")
            took.append(time.perf_counter() - a)

    worker = threading.Thread(target=loop, daemon=True) if query else None
    stamps = d.tmp / f"{ws}.stamps"
    d.call("submit", text=chain(ws, n, stamps), source="bench")
    if worker is not None:
        worker.start()
    try:
        d.wait_ws(ws, "completed", timeout=600)
    finally:
        stop.set()
        if worker is not None:
            worker.join(300)
    return hops(stamps), took


def fmt(h: list[float]) -> str:
    return (
        f"median {statistics.median(h) * 1e3:6.2f} ms, p95 {h[int(len(h) * 0.95)] * 1e3:7.2f} ms,"
        f" max {h[-1] * 1e3:7.2f} ms"
    )


def measure(tree: Path, n_events: int, n: int) -> None:
    with tempfile.TemporaryDirectory(prefix="orchd-bench-") as tmp:
        d = Daemon(Path(tmp), CONFIG)
        (d.state_dir).mkdir(parents=True)
        write_events(d.state_dir / "events.jsonl", n_events)
        d.start(timeout=120, env_extra={"PYTHONPATH": str(tree)})
        try:
            base, _ = run_chain(d, "quiet", n, None)
            print(f"  no query:                     hops {fmt(base)}")
            for label, q in (
                ("events (newest 100)", ["events"]),
                ("events --severity critical", ["events", "--severity", "critical"]),
            ):
                h, took = run_chain(d, f"q{len(label)}", n, q)
                ratio = statistics.median(h) / statistics.median(base)
                print(
                    f"  {label:28s} hops {fmt(h)}; {len(took)} queries, median "
                    f"{statistics.median(took) * 1e3:.0f} ms each; median hop ratio {ratio:.2f}"
                )
        finally:
            d.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=500_000)
    ap.add_argument("--chain", type=int, default=200)
    ap.add_argument("--against", type=Path, help="another checkout, measured in the same run")
    args = ap.parse_args()
    trees = [ROOT] + ([args.against.resolve()] if args.against else [])
    for tree in trees:
        print(f"{tree} ({os.cpu_count()} CPUs): {args.events} events, chain of {args.chain}")
        measure(tree, args.events, args.chain)


if __name__ == "__main__":
    main()
