"""Live figures of a running engine: the metrics document and a worker's last probe, for
`orchctl metrics`, `worker check` and metrics.json. Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

import msgspec

from supervisor.core.context import Core
from supervisor.core.model import WorkerState
from supervisor.core.views import metrics_view, resource_views


def probe_report(m: Core, wid: str) -> dict[str, Any]:
    """The last probe of a worker, and how long it has been unresponsive, for display."""
    out: dict[str, Any] = {}
    worker = m.state.data.workers.get(wid)
    pr = m.probes.get(wid)
    if worker is not None and worker.host:
        out = remote_report(m, wid)
    elif pr is not None and worker is not None and pr.pid == worker.pid:
        out = msgspec.to_builtins(pr)
        out["checked_age_s"] = round(max(0.0, m.now - pr.checked_at), 3)
        del out["checked_at"]
    since = m.rt.unresponsive_since(wid)
    if worker is not None and worker.state == WorkerState.UNRESPONSIVE and since is not None:
        out["unresponsive_for_s"] = round(m.now - since, 3)
    return out


def remote_report(m: Core, wid: str) -> dict[str, Any]:
    """A remote agent's own figures from its last heartbeat (pid and start ticks on its
    host, CPU percent, resident memory), how old they are, and its transport's state."""
    worker = m.state.data.workers[wid]
    seen = m.remote.figures.get(wid, {})
    gone = m.remote.is_gone(wid)
    out: dict[str, Any] = {
        "host": worker.host,
        "source": "heartbeat",
        "status": "remote, transport exited" if gone else "remote",
    }
    out.update({k: v for k, v in seen.items() if k != "reported_at"})
    if "reported_at" in seen:
        out["reported_age_s"] = round(max(0.0, m.now - seen["reported_at"]), 3)
    out["transport"] = "exited" if gone else "connected"
    out["transport_pid"] = worker.pid
    return out


def resource_figures(m: Core) -> list[dict[str, Any]]:
    rt = m.rt
    waiting = {r: rt.waiting_on(r) for r in rt.parked_resources()}
    per_host = m.hosts.per_host
    tasks = m.state.data.tasks
    for key in [k for k in waiting if k.startswith("@")]:
        # Parked on their placement: they wait for their per-host resources.
        for tid in waiting.pop(key):
            for r in tasks[tid].resources if tid in tasks else ():
                if r in per_host:
                    waiting.setdefault(r, []).append(tid)
    return resource_views(m.state, waiting, per_host)


def metrics(m: Core, transitions_per_s: float) -> dict[str, Any]:
    out = metrics_view(
        m.state,
        m.rt.counters,
        m.rt.queue_waits,
        now=m.wall,
        transitions_per_s=transitions_per_s,
    )
    out["resources"] = resource_figures(m)
    out["workers_detail"] = [
        {
            "id": w.id,
            "state": str(w.state),
            "last_heartbeat_age_s": None
            if (age := m.heartbeat_age(w.id)) is None
            else round(age, 3),
        }
        | probe_report(m, w.id)
        for w in m.state.data.workers.values()
        if w.state != "shutdown"
    ]
    return out
