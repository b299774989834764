"""What a cgroup per attempt costs: N no-op tasks (`true`) on 2 workers with
`workers.containment = "process"` (the baseline) and then `"cgroup"`, in the same run, on
fresh daemons (durable state, fdatasync on). Each attempt in the cgroup mode also makes
its cgroup, moves the agent in and out around the spawn, reads its accounting and
removes it. Needs root on a host with a writable cgroup v2 hierarchy.

    python bench/containment.py            # 2,000 tasks in each mode, 3 rounds
    python bench/containment.py 500 1      # a quick look
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ctl.client import Client
from tests.harness import Daemon


def run(n: int, mode: str) -> float:
    """Wall time from submit to the workstream's completion, on a fresh daemon."""
    with tempfile.TemporaryDirectory(prefix="orchd-bench-") as tmp:
        cfg = {
            "workers": {"count": 2, "containment": mode},
            "store": {"snapshot_interval_s": 30.0},
        }
        d = Daemon(Path(tmp), cfg)
        d.start()
        try:
            with Client(d.socket) as client:
                got = client.call("status")["containment"]["mode"]
                if got != mode:
                    raise SystemExit(f"asked for {mode}, the daemon runs {got}")
                body = "\n".join(
                    f'[[tasks]]\nid = "{mode}-{i}"\ncommand = ["true"]' for i in range(n)
                )
                started = time.perf_counter()
                client.call("submit", text=f'id = "ws-{mode}"\n' + body, source="bench")
                while client.call("ws_show", workstream=f"ws-{mode}")["state"] != "completed":
                    time.sleep(0.05)
                return time.perf_counter() - started
        finally:
            d.stop()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    if not 0 < n <= 2000:
        raise SystemExit("N is 1 to 2,000 (one submission; a request is capped at 1 MiB)")
    # The modes alternate, round after round, so a busy moment of the machine does not
    # land on one of them only; the medians are compared.
    times: dict[str, list[float]] = {"process": [], "cgroup": []}
    for _ in range(rounds):
        for mode in times:
            times[mode].append(run(n, mode))
    base, cg = statistics.median(times["process"]), statistics.median(times["cgroup"])
    print(f"{n} no-op tasks, 2 workers, median of {rounds} alternating rounds")
    print(f"  process: {base:7.2f} s  {base / n * 1e3:6.2f} ms/task  (baseline)")
    print(f"  cgroup:  {cg:7.2f} s  {cg / n * 1e3:6.2f} ms/task  x{cg / base:.2f} of the baseline")


if __name__ == "__main__":
    main()
