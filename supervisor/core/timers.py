"""Due timers: attempt timeouts, the end of a back-off, queue-wait and resource alerts, the
re-check of a held task's survivors.
Pure: no I/O. Deadlines are monotonic; a timer that fires in a step whose records cannot
be written is armed again by the step's rollback, so it fires again once they can.
"""

from __future__ import annotations

from supervisor.core import fencing, survivors
from supervisor.core.context import Core
from supervisor.core.dispatch import held
from supervisor.core.lifecycle import FENCE, stop_task
from supervisor.core.model import TaskState
from supervisor.core.policy import StopReason


def on_timers(m: Core) -> None:
    tasks, rt = m.state.data.tasks, m.rt
    for kind, key in rt.pop_due(m.now):
        task = tasks.get(key)
        if task is None:
            continue
        if kind == "timeout":
            if task.state == TaskState.RUNNING and task.stopping is None:
                rt.count("timeouts")
                m.emit(
                    "task_timeout",
                    "warning",
                    task_id=key,
                    workstream_id=task.workstream_id,
                    worker_id=task.worker_id,
                    data={"timeout_s": task.timeout_s},
                )
                stop_task(m, task, StopReason.TIMEOUT)
        elif kind == "backoff":
            if task.state == TaskState.PENDING:
                rt.set_backoff_until(key, m.now)  # over, whatever the wall clock says
                m.state.graph.mark_ready(key)
        elif kind == "survivors":
            survivors.on_due(m, task)
        elif kind == FENCE:
            fencing.on_due(m, task)
        elif kind == "queue_alert":
            # Held by an operator (paused, drained): not a wait to report; armed again
            # when the hold is lifted.
            if task.state == TaskState.QUEUED and not held(m, task):
                m.emit(
                    "task_queue_timeout",
                    "warning",
                    task_id=key,
                    workstream_id=task.workstream_id,
                    data={"waited_s": round(m.now - (rt.queued_at(key) or m.now), 3)},
                )
        elif kind == "resource_alert":
            res = rt.parked_on(key)
            if task.state == TaskState.QUEUED and res and not rt.resource_alerted(res):
                rt.set_resource_alerted(res, True)
                graph = m.state.graph
                if res.startswith("@"):
                    # Parked on its placement: per-host resources full wherever it may run.
                    per = [r for r in task.resources if r in m.hosts.per_host]
                    holders = [t for r in per for h in graph.instances_of(r).values() for t in h]
                    rid = ",".join(per)
                else:
                    holders, rid = list(graph.holders_of(res)), res
                m.emit(
                    "resource_exhausted",
                    "critical",
                    resource_id=rid,
                    task_id=key,
                    workstream_id=task.workstream_id,
                    data={
                        "holders": holders,
                        "waiting": rt.waiting_on(res),
                        "waited_s": round(m.now - (rt.queued_at(key) or m.now), 3),
                    }
                    | ({"runs_on": rt.placement_lane(res) or None} if res.startswith("@") else {}),
                )
