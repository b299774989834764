"""Recovery time after a daemon crash, with N interrupted attempts that ignore SIGTERM,
against the same with one attempt (the baseline, measured in the same run).

For each size a real daemon (process containment) runs N tasks that ignore SIGTERM on N
workers; every agent is SIGSTOPped, so none can kill its own tree, and the daemon is
killed with SIGKILL. The figure is the time from starting the next daemon until it
answers on its socket: its recovery kills every tree (TERM, the grace, then KILL) and
every old agent first. Killed one after another this would grow as N graces; killed
together it stays near one grace whatever N.

    python bench/recovery.py            # N = 10 against N = 1, kill_grace_s = 2
    python bench/recovery.py 20 1.0     # N = 20, kill_grace_s = 1
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import Daemon, assert_no_leftovers


def recovery_s(n: int, grace: float) -> float:
    """Seconds from the restart to the socket answering, after a crash with n attempts."""
    with tempfile.TemporaryDirectory(prefix="orchd-bench-") as tmp:
        cfg = {
            "workers": {"count": n, "containment": "process"},
            "tasks": {"kill_grace_s": grace},
            "shutdown_grace_s": 10.0,
        }
        d = Daemon(Path(tmp), cfg).start()
        toml = "".join(
            f'[[tasks]]\nid = "t{i}"\ncommand = '
            f"\"if [ ! -e {tmp}/f{i} ]; then touch {tmp}/f{i}; trap '' TERM; fi; "
            'while :; do sleep 0.05; done"\n'
            for i in range(n)
        )
        d.submit(f'id = "ws"\n{toml}')

        def all_running() -> bool:
            tasks = [d.task(f"t{i}") for i in range(n)]
            return all(t["state"] == "running" and t.get("pid") for t in tasks)

        Daemon.wait_for(all_running, 120, f"{n} tasks to run")
        for w in d.workers():
            if w.get("pid"):
                psutil.Process(w["pid"]).suspend()
        d.kill()
        d2 = Daemon(Path(tmp), d.cfg)
        began = time.monotonic()
        d2.start(timeout=120)
        took = time.monotonic() - began
        for i in range(n):
            d2.call("cancel", task_id=f"t{i}")
        d2.stop()
        assert_no_leftovers()
        return took


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    grace = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
    base = recovery_s(1, grace)
    many = recovery_s(n, grace)
    print(f"kill_grace_s = {grace:g}")
    print(f"recovery with  1 TERM-ignoring attempt : {base:6.2f} s")
    print(f"recovery with {n:2d} TERM-ignoring attempts: {many:6.2f} s")
    print(f"ratio {many / base:.2f} (one after another would be about {n:d}x the graces)")


if __name__ == "__main__":
    main()
