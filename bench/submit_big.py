"""One big workstream: submitting 20,000 tasks with dependencies in one `orchctl submit`,
the daemon's step that records it, how the loop answers meanwhile, a restart that
replays it, and running it (per-task cost at 20,000 against 2,000 in one workstream).

Each figure is set beside a baseline measured in the same run:

- `orchctl submit` of the big file (uploaded in chunks) against `orchctl submit` of a
  one-task file, whole-process wall time, on the real daemon (drained, so nothing runs);
- the creation step in-process (the decision core on an in-memory store: parse and
  check from the decoded document, build and apply the one record, encode it), beside
  the TOML decode that the socket runs off the loop, and a bare `tomllib` decode;
- the loop's answer time to `workers` requests sent every 10 ms while the big file is
  submitted, against the same requests on the idle daemon;
- the daemon's start after a SIGKILL (replaying the big record) against a start on an
  empty state directory;
- a run of N tasks in one workstream (layers of 200, two dependencies each) against
  one of N/10.

    python bench/submit_big.py            # 20,000 tasks
    python bench/submit_big.py 5000       # a quicker look
    python bench/submit_big.py 20000 --no-run   # without running the tasks (minutes)
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec

from ctl.client import Client
from supervisor.control import actions
from supervisor.control import protocol as p
from supervisor.core.submission import decode_document
from supervisor.store.logfile import seal
from tests.harness import Daemon
from tests.rig import Rig, config

BENCH_CONFIG = {
    "workers": {"count": 2},
    "store": {"snapshot_interval_s": 30.0, "metrics_interval_s": 5.0, "checkpoint_interval_s": 1.0},
}


def big_file(n: int, prefix: str) -> str:
    """`n` tasks in layers of 200, each depending on two tasks of the layer before."""
    out = [f'id = "ws-{prefix}"']
    for i in range(n):
        layer, k = divmod(i, 200)
        deps = (
            f'["{prefix}{(layer - 1) * 200 + k}", "{prefix}{(layer - 1) * 200 + (k + 7) % 200}"]'
            if layer
            else "[]"
        )
        out.append(
            f'[[tasks]]\nid = "{prefix}{i}"\ncommand = ["true", "shard {i}", "/srv/src/m{i}.c"]\n'
            f"depends_on = {deps}\ntimeout_s = 60\n"
        )
    return "\n".join(out) + "\n"


def orchctl_submit(d: Daemon, path: Path) -> float:
    started = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "ctl", "--socket", d.socket, "submit", str(path)],
        capture_output=True,
        text=True,
    )
    took = time.perf_counter() - started
    assert r.returncode == 0, r.stderr
    return took


class Pinger:
    """Sends `workers` every 10 ms on its own connection and keeps each answer's time."""

    def __init__(self, socket: str) -> None:
        self.socket, self.times, self._stop = socket, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with Client(self.socket) as c:
            while not self._stop.is_set():
                t = time.perf_counter()
                c.call("workers")
                self.times.append(time.perf_counter() - t)
                time.sleep(0.01)

    def __enter__(self) -> Pinger:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def submit_figures(n: int) -> None:
    with tempfile.TemporaryDirectory(prefix="orchd-bench-") as tmp:
        d = Daemon(Path(tmp), BENCH_CONFIG).start()
        try:
            d.call("drain")
            small, big = Path(tmp) / "one.toml", Path(tmp) / "big.toml"
            big.write_text(big_file(n, "b"))
            base = []
            for i in range(3):
                small.write_text(f'id = "ws-one{i}"\n[[tasks]]\nid = "one{i}"\ncommand = "true"\n')
                base.append(orchctl_submit(d, small))
            with Pinger(d.socket) as idle:
                time.sleep(1.0)
            with Pinger(d.socket) as busy:
                big_s = orchctl_submit(d, big)
            size = big.stat().st_size
            b = statistics.median(base)
            print(
                f"orchctl submit of {n} tasks with dependencies ({size / 1e6:.1f} MB, "
                f"{-(-size // p.UPLOAD_CHUNK)} chunks): {big_s:.2f} s; of one task: {b:.3f} s; "
                f"ratio {big_s / b:.0f}x ({big_s / n * 1e6:.0f} us a task)"
            )
            print(
                f"loop answers (`workers`, every 10 ms) during that submit: median "
                f"{statistics.median(busy.times) * 1e3:.1f} ms, max {max(busy.times) * 1e3:.0f} "
                f"ms over {len(busy.times)} requests; idle: median "
                f"{statistics.median(idle.times) * 1e3:.1f} ms, max "
                f"{max(idle.times) * 1e3:.1f} ms"
            )
            steps = [
                json.loads(line)
                for line in d.output.read_text().splitlines()
                if '"slow_step"' in line and '"submit"' in line
            ]
            print(
                "the daemon's own step for it (its slow_step log line): "
                + (", ".join(f"{e['seconds']:.2f} s" for e in steps) or "under 0.25 s")
            )
            d.kill()
            started = time.perf_counter()
            d.start()
            replay_s = time.perf_counter() - started
        finally:
            if d.proc is not None and d.proc.poll() is None:
                d.stop()
    with tempfile.TemporaryDirectory(prefix="orchd-bench-") as tmp:
        e = Daemon(Path(tmp), BENCH_CONFIG)
        started = time.perf_counter()
        e.start()
        empty_s = time.perf_counter() - started
        e.stop()
    print(
        f"start after SIGKILL, replaying the {n}-task record: {replay_s:.2f} s; "
        f"on an empty state directory: {empty_s:.2f} s"
    )


def step_figures(n: int) -> None:
    text = big_file(n, "s")
    data = text.encode()
    t = time.perf_counter()
    tomllib.loads(text)
    bare = time.perf_counter() - t
    t = time.perf_counter()
    doc = decode_document(data, "bench")
    decode = time.perf_counter() - t
    rig = Rig(config(workers=2))
    rig.m.rt.set_draining()  # nothing dispatched: the step is the submission's alone
    params = p.PreparedSubmit(text=text, source="bench", document=doc)
    m = rig.m
    t = time.perf_counter()
    m.begin(rig.clock.now, rig.clock.wall)
    result = m.run(actions.submit, params)
    m.settle()
    step = m.decided()
    decided = time.perf_counter() - t
    # What the store does on the loop with it: encode and seal the line (the write and
    # the fdatasync follow; the sync runs off the loop).
    t = time.perf_counter()
    lines = [seal(msgspec.json.encode(r)) for r in step.records]
    encoded = time.perf_counter() - t
    m.keep()
    assert result["tasks"] == n, result
    size = sum(len(x) for x in lines)
    print(
        f"creation step in-process ({n} tasks; {len(step.records)} records, "
        f"{size / 1e6:.1f} MB, the first the creation): decided in {decided:.2f} s, "
        f"encoded in {encoded:.3f} s; "
        f"the TOML decode run off the loop before it: {decode:.2f} s (bare tomllib: "
        f"{bare:.2f} s)"
    )


def run_figures(n: int) -> None:
    def run(m: int, tag: str) -> float:
        with tempfile.TemporaryDirectory(prefix="orchd-bench-") as tmp:
            d = Daemon(Path(tmp), BENCH_CONFIG).start()
            try:
                path = Path(tmp) / "ws.toml"
                path.write_text(big_file(m, tag))
                with Client(d.socket) as c:
                    started = time.perf_counter()
                    c.submit(path.read_text(), source="bench")
                    # ws_list, not ws_show: the latter sends every task back each time.
                    while c.call("ws_list")[0]["state"] != "completed":
                        time.sleep(0.5)
                    return time.perf_counter() - started
            finally:
                d.stop()

    small = max(200, n // 10)
    s, b = run(small, "r"), run(n, "R")
    print(
        f"running one workstream, 2 workers: {small} tasks {s:.1f} s ({s / small * 1e3:.2f} ms a "
        f"task), {n} tasks {b:.1f} s ({b / n * 1e3:.2f} ms a task); growth per task "
        f"{(b / n) / (s / small):.2f}x (quadratic would be {n / small:.0f}x)"
    )


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    step_figures(n)
    submit_figures(n)
    if "--no-run" not in sys.argv:
        run_figures(n)


if __name__ == "__main__":
    main()
