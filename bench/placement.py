"""The decision core's cost per task with placement, against the same work without it.

In-process (tests/rig.py: the Machine with a MemoryStore and a FakePool, no processes), on
a farm of 8 workers: 2 local and 2 on each of build-2, build-3, build-4 (labels: gpu on
build-2 and build-3). CPU time per task, from submission to completion, best of 3:

- baseline: N tasks without runs_on or resources;
- runs_on:  the same N tasks, each with a runs_on (a host, a label, local, in turn);
- per-host: the same N tasks, each needing a per-host resource (max 1 a host);
- global:   the same N tasks, each needing one global resource (max 1): N-1 wait, and
  each release wakes one of them, not all (it used to cost a look at every waiter);
- busy host: the N plain tasks while 5,000 more wait for build-4, whose workers are busy
  all along (they must cost nothing: their lane is not looked at).

    python bench/placement.py          # N = 3000
    python bench/placement.py 1000
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec

from supervisor.core.config import HostConfig, ResourceConfig
from supervisor.core.machine import Machine
from tests.rig import Rig, config

HOSTS = {"build-2": ["gpu"], "build-3": ["gpu"], "build-4": []}


def farm() -> Rig:
    cfg = config(workers=8)
    cfg = msgspec.structs.replace(
        cfg,
        workers=msgspec.structs.replace(
            cfg.workers,
            hosts=[HostConfig(host=h, count=0, labels=labels) for h, labels in HOSTS.items()],
        ),
        resources={
            "repo": ResourceConfig(max_holders=1, per_host=True),
            "lic": ResourceConfig(max_holders=1),
        },
    )
    rig = Rig(cfg)
    placed = dict(
        zip(
            [f"worker-{i:03d}" for i in range(3, 9)],
            [h for h in HOSTS for _ in (0, 1)],
            strict=True,
        )
    )

    def go(m: Machine) -> None:
        for wid, host in placed.items():
            m.commit("worker", wid, "idle", "config", host=host)

    rig.run(go)
    return rig


def drain(rig: Rig, keep: set[str] | None = None) -> None:
    """Finish attempts until nothing runs but the workers in `keep`."""
    while True:
        running = [w for w in rig.pool.current if keep is None or w not in keep]
        if not running:
            return
        for w in running:
            rig.pool.finish(w)
        rig.deliver()


def plain(n: int) -> list[dict[str, Any]]:
    return [{"id": f"t{i}", "command": "true"} for i in range(n)]


def timed(n: int, shape: Callable[[int], list[dict[str, Any]]], busy: int = 0) -> float:
    best = float("inf")
    for _ in range(3):
        rig = farm()
        keep: set[str] = set()
        if busy:
            rig.submit(
                "hold", [{"id": f"h{i}", "command": "x", "runs_on": "build-4"} for i in range(2)]
            )
            keep = set(rig.pool.current)
            rig.submit(
                "wait", [{"id": f"w{i}", "command": "x", "runs_on": "build-4"} for i in range(busy)]
            )
        t0 = time.process_time()
        rig.submit("ws", shape(n))
        drain(rig, keep)
        best = min(best, time.process_time() - t0)
        done = sum(t.state == "completed" for t in rig.state.data.tasks.values())
        assert done == n, (done, n)
    return best / n


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    where = ["build-2", "gpu", "local", "build-3"]
    base = timed(n, plain)
    runs_on = timed(n, lambda k: [t | {"runs_on": where[i % 4]} for i, t in enumerate(plain(k))])
    per_host = timed(n, lambda k: [t | {"resources": ["repo"]} for t in plain(k)])
    one = timed(n, lambda k: [t | {"resources": ["lic"]} for t in plain(k)])
    busy = timed(n, plain, busy=5000)
    print(f"{n} tasks, 8 workers on 4 hosts, CPU per task (best of 3):")
    print(f"  baseline (anywhere)        {base * 1e6:7.1f} us")
    for name, v in (
        ("runs_on", runs_on),
        ("per-host resource", per_host),
        ("global resource, max 1", one),
        ("beside 5,000 for a busy host", busy),
    ):
        print(f"  {name:<26} {v * 1e6:7.1f} us  ratio {v / base:.2f}")


if __name__ == "__main__":
    main()
