"""Whole-process time of `orchctl status` against `python -c pass`, run in the same command.

Starts a real daemon (2 workers, idle), then runs, alternately so that the machine's load
hits both alike, N times each: `python -c pass` (the interpreter's own start, the baseline)
and `python -m ctl --socket S status` (start, imports, one request, the reply printed).
Prints the median and the 90th percentile of each and the ratio of the medians; the aim is
a ratio of 3 or less. Also prints the modules `orchctl status` imports beyond the
baseline's, slowest first (`python -X importtime`), to show what its start costs.

    python bench/ctl_start.py        # 40 runs of each
    python bench/ctl_start.py 100
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness import Daemon  # noqa: E402


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env, cwd=ROOT)
    return time.perf_counter() - t0


def slowest_imports(cmd: list[str], env: dict[str, str], n: int = 12) -> list[tuple[int, str]]:
    """The top-level modules a command imports, by cumulative import time (µs)."""
    err = subprocess.run(
        [cmd[0], "-X", "importtime", *cmd[1:]],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    out = []
    for line in err.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        if cumulative.strip().isdigit() and not name.startswith("  "):
            out.append((int(cumulative), name.strip()))
    return sorted(out, reverse=True)[:n]


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    env = {k: v for k, v in os.environ.items() if k != "ORCHD_SOCKET"}
    env["PYTHONPATH"] = str(ROOT)
    with tempfile.TemporaryDirectory(prefix="orchd-bench-") as tmp:
        d = Daemon(Path(tmp)).start()
        try:
            base_cmd = [sys.executable, "-c", "pass"]
            ctl_cmd = [sys.executable, "-m", "ctl", "--socket", d.socket, "status"]
            for _ in range(3):  # warm the page cache for both
                timed(base_cmd, env)
                timed(ctl_cmd, env)
            base, ctl = [], []
            for _ in range(runs):
                base.append(timed(base_cmd, env))
                ctl.append(timed(ctl_cmd, env))
            imports = slowest_imports(ctl_cmd, env)
        finally:
            d.stop()

    def figures(xs: list[float]) -> str:
        q = statistics.quantiles(xs, n=10)
        return f"median {statistics.median(xs) * 1000:6.1f} ms, p90 {q[-1] * 1000:6.1f} ms"

    ratio = statistics.median(ctl) / statistics.median(base)
    print(f"runs: {runs} of each, alternating")
    print(f"python -c pass  : {figures(base)}")
    print(f"orchctl status  : {figures(ctl)}")
    print(f"ratio (medians) : {ratio:.2f}x  (aim: <= 3x)")
    print("slowest imports of orchctl status (cumulative):")
    for us, name in imports:
        print(f"  {us / 1000:6.1f} ms  {name}")


if __name__ == "__main__":
    main()
