"""Operator actions and queries, each run inside one step of the engine (`Engine.call`).

Each function takes the decision core (the Machine) and typed params, reads or commits,
and returns a plain dict for the response — or, for a query that reads files, a
FilePart whose reading runs after the step in a worker thread (control/queries.py); a
refusal raises OperatorError with the protocol's error code, and the step takes back
whatever the request had recorded.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import msgspec

from supervisor.control import protocol as p
from supervisor.control import quiesce_actions as hold_ops
from supervisor.control import task_actions as task_ops
from supervisor.control import ws_actions as ws_ops
from supervisor.control.lookup import fresh_changes, get_ws
from supervisor.control.lookup import get_task as _task
from supervisor.control.lookup import reopen_workstream as _reopen_workstream
from supervisor.control.queries import FilePart
from supervisor.control.state_actions import OFF_LOOP
from supervisor.core.context import LineCut
from supervisor.core.errors import OperatorError, WorkstreamExists, WorkstreamFileError
from supervisor.core.figures import probe_report, resource_figures
from supervisor.core.graph import find_cycles
from supervisor.core.lifecycle import retire_worker, stop_task
from supervisor.core.machine import Machine
from supervisor.core.model import Event, TaskState, Worker, WorkerState
from supervisor.core.policy import StopReason
from supervisor.core.submission import new_ulid, parse_workstream
from supervisor.core.views import status_view, task_view, worker_view

SEVERITIES = ("debug", "info", "warning", "error", "critical")
_event_decoder = msgspec.json.Decoder(Event)


def _worker(s: Machine, worker_id: str) -> Worker:
    worker = s.state.data.workers.get(worker_id)
    if worker is None:
        raise OperatorError("not_found", f"no worker {worker_id!r} (see `orchctl workers`)")
    return worker


# --- queries ----------------------------------------------------------------------------


def status(s: Machine, _: p.StatusParams) -> dict[str, Any]:
    out = status_view(s.state)
    out |= {
        "uptime_s": round(s.now - s.started_at, 3),
        "draining": s.rt.draining,
        "queued_ready": s.rt.queue_length(),
        "state_dir": os.path.abspath(s.files.state_dir),
        "read_only": s.read_only,
        "paused_workstreams": [w.id for w in s.state.data.workstreams.values() if w.paused],
        "containment": msgspec.to_builtins(s.containment),
    }
    return out


def show(s: Machine, params: p.ShowParams) -> dict[str, Any] | FilePart:
    task = _task(s, params.task_id, params.workstream)
    out = task_view(task)
    out["dependencies"] = {
        d: str(s.state.data.tasks[d].state) for d in task.depends_on if d in s.state.data.tasks
    }
    path = s.files.task_log_path(task.id)
    out["log_path"] = str(path)
    if not params.logs:
        return out
    files, lines = s.files, params.lines
    return FilePart(lambda: out | {"log_tail": files.tail(path, lines)})


def tasks(s: Machine, params: p.TasksParams) -> list[dict[str, Any]]:
    if params.workstream is not None:
        ws = get_ws(s, params.workstream)
        chosen = [s.state.data.tasks[t] for t in ws.task_ids]
    else:
        chosen = list(s.state.data.tasks.values())
    if params.state is not None:
        if params.state not in TaskState.__members__.values():
            raise OperatorError(
                "invalid", f"unknown task state {params.state!r}; one of {', '.join(TaskState)}"
            )
        chosen = [t for t in chosen if t.state == params.state]
    return [task_view(t) for t in chosen]


def _heartbeat_age(s: Machine, wid: str) -> float | None:
    seen = s.rt.heartbeat_at(wid)
    return None if seen is None else max(0.0, s.now - seen)


def workers(s: Machine, _: p.WorkersParams) -> list[dict[str, Any]]:
    out = []
    for w in s.state.data.workers.values():
        if w.state == WorkerState.SHUTDOWN and s.rt.heartbeat_at(w.id) is None:
            continue
        health = probe_report(s, w.id)
        out.append(worker_view(w, _heartbeat_age(s, w.id), health))
    return out


def _text_tail(cut: LineCut, lines: int) -> list[str]:
    return [b.decode("utf-8", errors="replace") for b in cut.tail(lines)]


def worker_check(s: Machine, params: p.WorkerCheckParams) -> FilePart:
    w = _worker(s, params.worker_id)
    health = probe_report(s, w.id)
    out = worker_view(w, _heartbeat_age(s, w.id), health)
    cut = s.files.worker_log_cut(w.id)
    return FilePart(lambda: out | {"log_tail": _text_tail(cut, 20)}, cut.close)


def worker_logs(s: Machine, params: p.WorkerLogsParams) -> FilePart:
    """A worker's last log lines, across its rotated files (read after the step)."""
    w = _worker(s, params.worker_id)
    path = s.files.worker_log_path(w.id)
    cut, n = s.files.worker_log_cut(w.id), params.lines
    return FilePart(
        lambda: {"worker_id": w.id, "path": str(path), "lines": _text_tail(cut, n)}, cut.close
    )


def log_target(s: Machine, params: p.LogsParams) -> dict[str, Any]:
    """Which file a task's log is (the step's part of `logs`, and of `logs -f`)."""
    task = _task(s, params.task_id, params.workstream)
    return {"task_id": task.id, "path": str(s.files.task_log_path(task.id))}


def logs(s: Machine, params: p.LogsParams) -> FilePart:
    out, files, n = log_target(s, params), s.files, params.lines
    return FilePart(lambda: out | {"lines": files.tail(Path(out["path"]), n)})


def events(s: Machine, params: p.EventsParams) -> list[dict[str, Any]] | FilePart:
    """The last `limit` events of at least `severity`, newest last: the step takes a cut
    of events.jsonl and its rotated files, a worker thread reads it backwards."""
    if params.severity is not None and params.severity not in SEVERITIES:
        raise OperatorError(
            "invalid", f"unknown severity {params.severity!r}; one of {', '.join(SEVERITIES)}"
        )
    if params.limit <= 0:
        return []
    cut = s.files.events_cut()
    return FilePart(lambda: last_events(cut, params.severity, params.limit), cut.close)


def last_events(cut: LineCut, severity: str | None, limit: int) -> list[dict[str, Any]]:
    """The last `limit` events in `cut` of at least `severity`, oldest first (unreadable
    lines are skipped)."""
    floor = SEVERITIES.index(severity) if severity else 0
    out: list[dict[str, Any]] = []
    for raw in cut.reverse_lines():
        try:
            ev = _event_decoder.decode(raw)
        except msgspec.DecodeError:
            continue
        if SEVERITIES.index(ev.severity) >= floor:
            out.append(msgspec.to_builtins(ev))
            if len(out) >= limit:
                break
    out.reverse()
    return out


def ws_list(s: Machine, params: p.WsListParams) -> list[dict[str, Any]]:
    """Every workstream in submission order; with `name`, that pipeline's runs, newest
    first."""
    chosen = list(s.state.data.workstreams.values())
    if params.name is not None:
        chosen = [ws for ws in reversed(chosen) if ws.name == params.name]
    out = []
    for ws in chosen:
        counts = {str(k): v for k, v in s.state.graph.ws_counts.get(ws.id, {}).items() if v}
        out.append(
            {
                "id": ws.id,
                "name": ws.name,
                "number": ws.number,
                "state": str(ws.state),
                "tasks": len(ws.task_ids),
                "counts": counts,
                "submitted_at": ws.submitted_at,
                "ended_at": ws.ended_at,
                "paused": ws.paused,
            }
        )
    return out


def ws_show(s: Machine, params: p.WsShowParams) -> dict[str, Any]:
    ws = get_ws(s, params.workstream)
    out: dict[str, Any] = msgspec.to_builtins(ws)
    out["state"] = str(ws.state)
    out["paused"] = ws.paused
    out["tasks"] = [task_view(s.state.data.tasks[t]) for t in ws.task_ids]
    return out


def ws_follow(s: Machine, params: p.WsFollowParams) -> dict[str, Any]:
    """Where a followed workstream stands (the server then streams its transitions): its
    state, each task's, and the seq they are as of."""
    ws = get_ws(s, params.workstream)
    tasks = s.state.data.tasks
    return {
        "workstream_id": ws.id,
        "state": str(ws.state),
        "seq": s.state.last_seq,
        "tasks": {tid: str(tasks[tid].state) for tid in ws.task_ids},
    }


def resources(s: Machine, _: p.ResourcesParams) -> list[dict[str, Any]]:
    return resource_figures(s)


# --- changes ----------------------------------------------------------------------------


def submit(s: Machine, params: p.SubmitParams) -> dict[str, Any]:
    data = s.state.data
    try:
        ws, new_tasks = parse_workstream(
            params.text.encode(),
            source=params.source or "<submitted>",
            defaults=s.cfg.tasks,
            known_resources=set(data.resources),
            existing_task_ids=data.tasks.keys(),
            existing_workstream_ids=data.workstreams.keys(),
            run_numbers=data.run_numbers,
            explicit_id=params.id,
            new_id=lambda: new_ulid(time.time(), os.urandom(10)),
            document=params.document if isinstance(params, p.PreparedSubmit) else None,
            hosts=s.hosts,
        )
    except WorkstreamFileError as exc:
        raise OperatorError("invalid", str(exc)) from None
    except WorkstreamExists as exc:
        raise OperatorError("wrong_state", str(exc)) from None
    base = len(s.state.data.tasks)
    for i, t in enumerate(new_tasks):
        t.order = base + i
    ws.submitted_at = s.wall
    rec = s.commit(
        "workstream",
        ws.id,
        "pending",
        "submit",
        workstream=msgspec.to_builtins(ws),
        tasks=[msgspec.to_builtins(t) for t in new_tasks],
    )
    s.rt.mark_dirty(ws.id)
    cycles = find_cycles([t.id for t in new_tasks], {t.id: t.depends_on for t in new_tasks})
    for cycle in cycles:
        s.emit(
            "dependency_cycle_detected",
            "critical",
            workstream_id=ws.id,
            tasks=cycle,
            message="these tasks wait on each other; break the cycle with "
            "`orchctl dep remove` or `orchctl cancel`",
        )
    s.emit("workstream_submitted", "info", workstream_id=ws.id, data={"tasks": len(new_tasks)})
    return {
        "workstream_id": ws.id,
        "name": ws.name,
        "tasks": len(new_tasks),
        "seq": rec.seq,
        "cycles": cycles,
    }


def retry(s: Machine, params: p.RetryParams) -> dict[str, Any]:
    task = _task(s, params.task_id, params.workstream)
    if task.state in (TaskState.RUNNING, TaskState.QUEUED):
        raise OperatorError(
            "wrong_state",
            f"task {task.id} is {task.state}; only a finished or pending task can be retried",
        )
    if s.state.data.workstreams[task.workstream_id].state == "merged":
        raise OperatorError("wrong_state", f"workstream {task.workstream_id} is merged")
    changes = fresh_changes(task)  # a retry runs the whole task again, revalidate or not
    if params.timeout_s is not None:
        if params.timeout_s <= 0:
            raise OperatorError("invalid", "--timeout must be > 0")
        changes["timeout_s"] = params.timeout_s
    if params.max_retries is not None:
        if params.max_retries < 1:
            raise OperatorError("invalid", "--max-retries must be >= 1")
        changes["max_retries"] = params.max_retries
    rec = s.commit("task", task.id, "pending", "operator", **changes)
    _reopen_workstream(s, task.workstream_id)
    s.state.graph.mark_ready(task.id)
    return {"task_id": task.id, "state": str(task.state), "seq": rec.seq}


def skip(s: Machine, params: p.SkipParams) -> dict[str, Any]:
    task = _task(s, params.task_id, params.workstream)
    if not params.reason.strip():
        raise OperatorError("invalid", "a skip needs a --reason")
    if task.state in (TaskState.RUNNING, TaskState.COMPLETED, TaskState.CANCELLED):
        raise OperatorError(
            "wrong_state", f"task {task.id} is {task.state}; cancel a running task first"
        )
    rec = s.commit(
        "task",
        task.id,
        "completed",
        "operator",
        skipped=True,
        skip_reason=params.reason,
        not_before=None,
    )
    s.emit(
        "task_skipped",
        "warning",
        task_id=task.id,
        workstream_id=task.workstream_id,
        message=params.reason,
    )
    if s.rt.is_blocked(task.workstream_id):
        _reopen_workstream(s, task.workstream_id)
    s.check_workstream(task.workstream_id)
    return {"task_id": task.id, "state": "completed", "skipped": True, "seq": rec.seq}


def cancel(s: Machine, params: p.CancelParams) -> dict[str, Any]:
    task = _task(s, params.task_id, params.workstream)
    if task.state in (TaskState.COMPLETED, TaskState.CANCELLED):
        raise OperatorError("wrong_state", f"task {task.id} is already {task.state}")
    if task.state == TaskState.RUNNING:
        stop_task(s, task, StopReason.CANCEL)  # commits the `stopping` record (or it was already)
        return {"task_id": task.id, "state": "running", "stopping": True, "seq": s.state.last_seq}
    rec = s.commit("task", task.id, "cancelled", "operator", not_before=None)
    s.check_workstream(task.workstream_id)
    return {"task_id": task.id, "state": "cancelled", "seq": rec.seq}


def _live_worker(s: Machine, worker_id: str) -> Worker:
    w = _worker(s, worker_id)
    if w.state == WorkerState.SHUTDOWN:
        raise OperatorError("wrong_state", f"worker {w.id} is shut down")
    return w


def worker_restart(s: Machine, params: p.WorkerRestartParams) -> dict[str, Any]:
    w = _live_worker(s, params.worker_id)
    task_id = w.task_id
    seq = retire_worker(s, w.id, task_reason=StopReason.REASSIGN, restart_same=True, graceful=True)
    s.emit("worker_restarted", "warning", worker_id=w.id, task_id=task_id, message=params.reason)
    return {"worker_id": w.id, "reassigned_task": task_id, "seq": seq}


def worker_shutdown(s: Machine, params: p.WorkerShutdownParams) -> dict[str, Any]:
    w = _live_worker(s, params.worker_id)
    if w.task_id is not None and not params.force:
        raise OperatorError(
            "wrong_state", f"worker {w.id} is running {w.task_id}; add --force (and --reassign)"
        )
    task_id = w.task_id
    reason = StopReason.REASSIGN if params.reassign else StopReason.WORKER_LOST
    seq = retire_worker(s, w.id, task_reason=reason, restart_same=False, graceful=not params.force)
    s.emit(
        "worker_shutdown",
        "error",
        worker_id=w.id,
        task_id=task_id,
        message=f"operator shutdown{' with reassign' if params.reassign else ''}",
    )
    return {
        "worker_id": w.id,
        "task_id": task_id,
        "reassigned": bool(params.reassign and task_id),
        "seq": seq,
    }


def resource_set_limit(s: Machine, params: p.ResourceSetLimitParams) -> dict[str, Any]:
    res = s.state.data.resources.get(params.resource_id)
    if res is None:
        raise OperatorError(
            "not_found", f"no resource {params.resource_id!r} (see `orchctl resources`)"
        )
    if params.max_holders < 1:
        raise OperatorError("invalid", "max_holders must be >= 1")
    rec = s.commit("resource", res.id, "defined", "operator", max_holders=params.max_holders)
    s.rt.unpark(res.id)
    if res.id in s.hosts.per_host:
        s.rt.unpark_all_placement()  # its limit is per host: those waiting on it retry
    return {"resource_id": res.id, "max_holders": params.max_holders, "seq": rec.seq}


def settle(s: Machine, params: p.SettleParams) -> dict[str, Any]:
    """The seq the daemon has recorded up to; answered once it is durable and the effects
    of every step up to it are carried out (p.DURABLE_READS): the events a script reads
    next include theirs."""
    return {"seq": s.state.last_seq}


HANDLERS: dict[str, Any] = {
    "status": status,
    "settle": settle,
    "show": show,
    "tasks": tasks,
    "workers": workers,
    "events": events,
    "ws_list": ws_list,
    "ws_show": ws_show,
    "ws_follow": ws_follow,
    "worker_check": worker_check,
    "worker_logs": worker_logs,
    "resources": resources,
    "logs": logs,
    "submit": submit,
    "retry": retry,
    "skip": skip,
    "cancel": cancel,
    "worker_restart": worker_restart,
    "worker_shutdown": worker_shutdown,
    "resource_set_limit": resource_set_limit,
    "deps": task_ops.deps,
    "dep_remove": task_ops.dep_remove,
    "revalidate": task_ops.revalidate,
    "debug": task_ops.debug,
    "interventions": task_ops.interventions,
    "metrics": task_ops.metrics,
    "ws_retry": ws_ops.ws_retry,
    "ws_retry_failed": ws_ops.ws_retry_failed,
    "ws_resume": ws_ops.ws_resume,
    "ws_checkpoints": ws_ops.ws_checkpoints,
    "ws_rollback": ws_ops.ws_rollback,
    "ws_mark_merged": ws_ops.ws_mark_merged,
    "ws_retire": ws_ops.ws_retire,
    "ws_analyze": ws_ops.ws_analyze,
    "ws_pause": hold_ops.ws_pause,
    "ws_unpause": hold_ops.ws_unpause,
    "drain": hold_ops.drain,
    "undrain": hold_ops.undrain,
}
assert set(HANDLERS) | set(OFF_LOOP) == set(p.METHODS), "every protocol method has a handler"
