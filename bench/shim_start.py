"""Cost of the shim: one attempt's start and end with a lease (each step under its shim)
against without one, in the same command.

Runs the agent loop of bench/agent_loop.py (N sequential Runs of `true`, each sent as
soon as the previous Finished arrives) twice per round, without a lease and with one
(`--lease-s 60`, a spool on the same file system as the logs), and prints per task: wall
time, the agent's CPU and its children's (with a lease: the shim and `true`), and the
ratio. Then the shim's own start cost: `python -I -S shim.py -- true` against `true` and
against the interpreter's own start (`python -I -S -c pass`, the floor for a shim in
Python), each run to its end from a shell-less spawn.

    python bench/shim_start.py              # 300 tasks, 3 rounds
    python bench/shim_start.py 500 5 /dev/shm
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from agent_loop import one_run  # type: ignore[import-not-found]

from supervisor.workers import launch


def _spawn_cost(argv: list[str], n: int) -> tuple[float, float]:
    """Mean (wall ms, CPU ms) from spawn to reaped exit of `argv`, over n runs."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    for _ in range(n):
        pid = os.posix_spawn(argv[0], argv, dict(os.environ))
        os.waitpid(pid, 0)
    wall = (time.perf_counter() - t0) * 1000 / n
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1000 / n
    return wall, cpu


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    where = sys.argv[3] if len(sys.argv) > 3 else None
    plain: list[tuple[float, float, float]] = []
    leased: list[tuple[float, float, float]] = []
    for r in range(rounds):
        with tempfile.TemporaryDirectory(prefix="orchd-shim-bench-", dir=where) as tmp:
            plain.append(one_run(n, Path(tmp)))
        with tempfile.TemporaryDirectory(prefix="orchd-shim-bench-", dir=where) as tmp:
            spool = Path(tmp) / "spool"
            leased.append(one_run(n, Path(tmp), ("--lease-s", "60", "--spool", str(spool))))
        for name, x in (("no lease", plain[-1]), ("lease+shim", leased[-1])):
            print(
                f"round {r + 1} {name:>10}: wall {x[0]:.3f} ms  agent CPU {x[1]:.3f} ms  "
                f"children CPU {x[2]:.3f} ms per task"
            )
    med = [[statistics.median(x[i] for x in runs) for i in range(3)] for runs in (plain, leased)]
    print(
        f"median no lease:   wall {med[0][0]:.3f} ms  agent CPU {med[0][1]:.3f} ms  "
        f"children CPU {med[0][2]:.3f} ms per task"
    )
    print(
        f"median lease+shim: wall {med[1][0]:.3f} ms  agent CPU {med[1][1]:.3f} ms  "
        f"children CPU {med[1][2]:.3f} ms per task"
    )
    print(
        f"ratio lease+shim / no lease: wall {med[1][0] / med[0][0]:.2f}x  "
        f"agent CPU {med[1][1] / med[0][1]:.2f}x"
    )
    true = subprocess.run(["which", "true"], capture_output=True, text=True, check=True)
    bare = [true.stdout.strip()]
    shimmed = launch.shim_argv(
        "bench", lease_s=0, kill_grace_s=1, spool="/nonexistent", cwd=None, exec_wrapper=False
    )
    shimmed = [*shimmed[:5], "--attempt-id", "bench", "--", *bare]
    floor = [sys.executable, "-I", "-S", "-c", "pass"]
    k = max(20, n // 5)
    for name, argv in (("true", bare), ("true under the shim", shimmed), ("python -I -S", floor)):
        wall, cpu = _spawn_cost(argv, k)
        print(f"spawn to exit, {name:>20}: wall {wall:.3f} ms  CPU {cpu:.3f} ms")


if __name__ == "__main__":
    main()
