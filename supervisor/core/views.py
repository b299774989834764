"""What the control socket shows: tasks, workers, resources, status and metrics as plain
JSON-able dicts. Pure: no I/O; `now` is passed in.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import msgspec

from supervisor.core.model import DAEMON_ID, State, Task, Worker
from supervisor.core.placement import host_name


def task_view(task: Task) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(task)
    # Fields that omit_defaults drops but that the contract always shows.
    out["state"] = str(task.state)
    out["name"] = task.name  # the bare id; `id` is the full name WS/TASK
    for key in ("worker_id", "failure_kind", "pid", "not_before"):
        out.setdefault(key, None)
    out.setdefault("retry_count", 0)
    out.setdefault("skipped", False)
    out.setdefault("depends_on", [])
    out.setdefault("attempts", [])
    out.setdefault("max_retries", task.max_retries)
    out.setdefault("timeout_s", task.timeout_s)
    out.setdefault("runs_on", None)
    # Where each attempt ran, by its host's name (local = the daemon's own host).
    for a in out["attempts"]:
        a["host"] = host_name(a.get("host", ""))
    out.pop("holds", None)
    if task.holds and task.state == "running":
        out["holds"] = list(task.holds)
    return out


def worker_view(
    worker: Worker, heartbeat_age_s: float | None, health: dict[str, Any] | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(worker)
    out["state"] = str(worker.state)
    out["host"] = host_name(worker.host)
    for key in ("pid", "task_id", "attempt_id"):
        out.setdefault(key, None)
    out["last_heartbeat_age_s"] = None if heartbeat_age_s is None else round(heartbeat_age_s, 3)
    if health:
        out["health"] = health
    return out


def resource_views(
    state: State, waiting: dict[str, list[str]], per_host: frozenset[str] = frozenset()
) -> list[dict[str, Any]]:
    """Each resource with its holders; a per-host one (`per_host`) also by host, its
    `max_holders` being the limit on each host."""
    out = []
    for res in state.data.resources.values():
        view: dict[str, Any] = {
            "id": res.id,
            "max_holders": res.max_holders,
            "holders": list(state.graph.holders_of(res.id)),
            "waiting": waiting.get(res.id, []),
        }
        if res.id in per_host:
            by_host = {
                inst.partition("@")[2]: list(held)
                for inst, held in sorted(state.graph.instances_of(res.id).items())
            }
            view["per_host"] = True
            view["holders_by_host"] = by_host
            view["holders"] = [t for held in by_host.values() for t in held]
        out.append(view)
    return out


def status_view(state: State) -> dict[str, Any]:
    tasks = Counter(str(t.state) for t in state.data.tasks.values())
    ws = Counter(str(w.state) for w in state.data.workstreams.values())
    workers = Counter(str(w.state) for w in state.data.workers.values() if w.state != "shutdown")
    drain = None
    if state.data.draining():
        d = state.data.daemon[DAEMON_ID]
        drain = {"since": d.since, "reason": d.reason, "running": tasks.get("running", 0)}
    return {
        "last_seq": state.last_seq,
        "tasks": dict(tasks),
        "workstreams": dict(ws),
        "workers": dict(workers),
        "drain": drain,
    }


def status_line(status: dict[str, Any]) -> str:
    """One line for systemd's STATUS=, from `status_view`."""
    tasks, workers = status["tasks"], status["workers"]
    live = sum(workers.values())
    up = workers.get("idle", 0) + workers.get("busy", 0)
    drain, held = status.get("drain"), ""
    if drain:
        # The words of orchctl status (control.protocol.drain_words).
        n = drain["running"]
        held = (f"draining: {n} running" if n else "drained: nothing running") + "; "
    return held + (
        f"{tasks.get('running', 0)} running, {tasks.get('queued', 0)} queued, "
        f"{tasks.get('pending', 0)} pending, {tasks.get('failed', 0)} failed; "
        f"workers {up}/{live} up"
    )


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


def metrics_view(
    state: State,
    counters: dict[str, int],
    queue_waits: list[float],
    *,
    now: float,
    transitions_per_s: float,
) -> dict[str, Any]:
    """The figures written to metrics.json."""
    failures = {k.split(".", 1)[1]: v for k, v in counters.items() if k.startswith("failure.")}
    events = {k.split(".", 1)[1]: v for k, v in counters.items() if k.startswith("event.")}
    return {
        "ts": now,
        "last_seq": state.last_seq,
        "tasks_by_state": dict(Counter(str(t.state) for t in state.data.tasks.values())),
        "workstreams_by_state": dict(
            Counter(str(w.state) for w in state.data.workstreams.values())
        ),
        "workers_by_state": dict(Counter(str(w.state) for w in state.data.workers.values())),
        "attempts": counters.get("attempts", 0),
        "retries": counters.get("retries", 0),
        "timeouts": counters.get("timeouts", 0),
        "completed": counters.get("completed", 0),
        "failures_by_kind": failures,
        "events": events,
        "queue_wait_s": {
            "p50": percentile(queue_waits, 0.5),
            "p95": percentile(queue_waits, 0.95),
            "samples": len(queue_waits),
        },
        "transitions_per_s": round(transitions_per_s, 3),
    }
