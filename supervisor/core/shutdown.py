"""The daemon's clean stop, decided: no new dispatch, every running attempt stopped as
interrupted (no retry spent), then every worker recorded as shut down. Pure: no I/O.
"""

from __future__ import annotations

from supervisor.core.context import Core
from supervisor.core.lifecycle import stop_task
from supervisor.core.model import WorkerState
from supervisor.core.policy import StopReason


def begin(m: Core, direct: bool) -> None:
    """Stop dispatching; stop every running attempt (`direct`: from the daemon, when its
    agent did not answer in time)."""
    m.rt.set_draining()
    for task in list(m.running_tasks()):
        stop_task(m, task, StopReason.SHUTDOWN, direct=direct)


def end(m: Core) -> None:
    """Every worker is recorded as shut down; the pool stops their processes on exit."""
    for wid, worker in list(m.state.data.workers.items()):
        if worker.state != WorkerState.SHUTDOWN:
            m.rt.take_idle(wid)
            m.rt.set_generation(wid, m.rt.generation(wid) + 1)
            m.commit("worker", wid, "shutdown", "shutdown", pid=None, task_id=None, attempt_id=None)
