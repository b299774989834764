"""Cost of one attempt in the worker agent: wall time and CPU per no-op task.

Starts a real agent (`python -m supervisor.workers.agent`), sends it N Runs of `true` one after the
other (each as soon as the previous Finished arrives) and reports, per task: wall time, the
agent's own CPU, and its children's CPU (the `true` processes, which the agent reaps).
Repeats R times and prints each run and the median.

    python bench/agent_loop.py            # 2,000 tasks, 3 runs
    python bench/agent_loop.py 500 5      # 500 tasks, 5 runs
    python bench/agent_loop.py 2000 3 /dev/shm   # task logs on tmpfs: the agent's cost alone

Creating each task's log file is part of an attempt's cost, and on a disk filesystem it
varies with whatever else is syncing at the time; a tmpfs directory takes that out.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supervisor.core import wire
from supervisor.workers.pool import agent_env

ROOT = Path(__file__).resolve().parent.parent


def _read_exactly(f: object, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(f, n - len(data))  # type: ignore[arg-type]
        if not chunk:
            raise EOFError("agent closed its stdout")
        data += chunk
    return data


def _recv(rfd: int) -> wire.FromAgent:
    header = _read_exactly(rfd, 4)
    msg: wire.FromAgent = wire.from_agent_decoder.decode(
        _read_exactly(rfd, wire.frame_length(header))
    )
    return msg


def one_run(n: int, tmp: Path, extra: tuple[str, ...] = ()) -> tuple[float, float, float]:
    """(wall ms, agent CPU ms, children CPU ms) per task for n sequential `true` Runs;
    `extra`: more agent options (bench/shim_start.py passes a lease)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "supervisor.workers.agent",
            "--worker-id",
            "w1",
            "--heartbeat-s",
            "1",
            *extra,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=open(tmp / "agent.log", "ab"),  # noqa: SIM115
        env=agent_env(dict(os.environ)),
        cwd=ROOT,  # `-m` imports from the working directory first: the tree under test
    )
    assert proc.stdin is not None and proc.stdout is not None
    wfd, rfd = proc.stdin.fileno(), proc.stdout.fileno()
    try:
        assert isinstance(_recv(rfd), wire.Hello)
        ps = psutil.Process(proc.pid)
        before = ps.cpu_times()
        t0 = time.perf_counter()
        for i in range(n):
            run = wire.Run(
                attempt_id=f"a{i}",
                task_id=f"t{i}",
                number=1,
                command=["true"],
                log_path=str(tmp / "logs" / f"t{i}.log"),
            )
            os.write(wfd, wire.frame(run))
            while not isinstance(_recv(rfd), wire.Finished):
                pass
        wall = time.perf_counter() - t0
        after = ps.cpu_times()
    finally:
        proc.stdin.close()
        proc.wait()
    own = (after.user + after.system) - (before.user + before.system)
    kids = (after.children_user + after.children_system) - (
        before.children_user + before.children_system
    )
    return wall * 1000 / n, own * 1000 / n, kids * 1000 / n


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    where = sys.argv[3] if len(sys.argv) > 3 else None
    results = []
    for r in range(runs):
        with tempfile.TemporaryDirectory(prefix="orchd-agent-bench-", dir=where) as tmp:
            wall, own, kids = one_run(n, Path(tmp))
        results.append((wall, own, kids))
        print(f"run {r + 1}: wall {wall:.3f} ms  agent CPU {own:.3f} ms  children {kids:.3f} ms")
    print(
        "median: wall {:.3f} ms  agent CPU {:.3f} ms  children CPU {:.3f} ms per task".format(
            *(statistics.median(x[i] for x in results) for i in range(3))
        )
    )


if __name__ == "__main__":
    main()
