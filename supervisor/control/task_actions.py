"""Task-level operator actions and diagnoses, run inside a step of the engine: dependencies (show,
remove), revalidation, the debug diagnosis, and the interventions log and live metrics.
"""

from __future__ import annotations

from typing import Any

import msgspec

from supervisor.control import protocol as p
from supervisor.control.lookup import dependency_of, get_task, refuse_merged, reopen_workstream
from supervisor.control.queries import FilePart
from supervisor.control.ws_actions import task_advice
from supervisor.core.errors import OperatorError
from supervisor.core.figures import metrics as live_metrics
from supervisor.core.figures import probe_report
from supervisor.core.graph import find_cycles
from supervisor.core.machine import Machine
from supervisor.core.model import SATISFYING_STATES, Task, TaskState
from supervisor.core.views import task_view, worker_view


def _ws_cycles(s: Machine, ws_id: str) -> list[list[str]]:
    tasks = s.state.data.tasks
    ids = s.state.data.workstreams[ws_id].task_ids
    return find_cycles(ids, {t: list(tasks[t].depends_on) for t in ids})


def why_waits(s: Machine, task: Task) -> str:
    """One line: why this task is not running (or what it is doing)."""
    tasks = s.state.data.tasks
    ws = s.state.data.workstreams[task.workstream_id]
    match task.state:
        case TaskState.RUNNING:
            return f"running on {task.worker_id or 'a worker'}" + (
                f", being stopped ({task.stopping})" if task.stopping else ""
            )
        case TaskState.COMPLETED | TaskState.CANCELLED | TaskState.FAILED:
            return f"not waiting: it is {task.state}" + (
                f" ({task.failure_kind})" if task.state == TaskState.FAILED else ""
            )
    if ws.state not in ("pending", "running"):
        return f"its workstream is {ws.state}: nothing in it is dispatched"
    if s.rt.is_blocked(task.workstream_id):
        return "dispatch in its workstream is stopped after a critical task failed"
    if ws.paused and task.state == TaskState.QUEUED:
        return f"queued: its workstream is paused (`orchctl ws unpause {ws.id}`)"
    if s.state.data.draining() and task.state == TaskState.QUEUED:
        return "queued: the daemon is drained, nothing starts (`orchctl undrain`)"
    if task.state == TaskState.QUEUED:
        res = s.rt.parked_on(task.id)
        where = f" on {task.runs_on}" if task.runs_on else ""
        if res is not None and res.startswith("@"):
            per = [r for r in task.resources if r in s.hosts.per_host]
            return (
                f"queued: per-host resource {', '.join(per)} is full on every host{where} "
                "with an idle worker"
            )
        if res is not None:
            held = ", ".join(s.state.graph.holders_of(res)) or "-"
            return f"queued: resource {res} is full (held by {held})"
        if task.runs_on and not s.hosts.hosts_for(task.runs_on):
            known = ", ".join(s.hosts.known())
            return f"queued: no configured host is {task.runs_on!r} (known: {known})"
        return f"queued: dependencies met, waiting for an idle worker{where}"
    for cycle in _ws_cycles(s, task.workstream_id):
        if task.id in cycle:
            return f"in a dependency cycle with {', '.join(c for c in cycle if c != task.id)}"
    unmet = [
        d for d in task.depends_on if d not in tasks or tasks[d].state not in SATISFYING_STATES
    ]
    if unmet:
        parts = []
        for d in unmet:
            st = tasks[d].state if d in tasks else "missing"
            parts.append(f"{d} ({st}{', will not complete by itself' if st == 'failed' else ''})")
        return f"waits for {len(unmet)} unmet dependenc{'y' if len(unmet) == 1 else 'ies'}: " + (
            ", ".join(parts)
        )
    if task.not_before is not None and task.not_before > s.wall:
        return f"retry back-off: queued again in {task.not_before - s.wall:.1f}s"
    return "ready: queued at the next scheduling step"


def deps(s: Machine, params: p.DepsParams) -> dict[str, Any]:
    task = get_task(s, params.task_id, params.workstream)
    tasks = s.state.data.tasks

    def entry(tid: str) -> dict[str, Any]:
        t = tasks.get(tid)
        st = str(t.state) if t is not None else "missing"
        return {"id": tid, "state": st, "satisfied": st in SATISFYING_STATES}

    return {
        "task_id": task.id,
        "state": str(task.state),
        "depends_on": [entry(d) for d in task.depends_on],
        "dependents": [entry(d) for d in s.state.graph.dependents.get(task.id, [])],
        "unmet": s.state.graph.unmet.get(task.id, 0),
        "why": why_waits(s, task),
    }


def dep_remove(s: Machine, params: p.DepRemoveParams) -> dict[str, Any]:
    task = get_task(s, params.from_task, params.workstream)
    to_task = dependency_of(s, task, params.to_task)
    if task.state not in (TaskState.PENDING, TaskState.QUEUED):
        raise OperatorError(
            "wrong_state", f"task {task.id} is {task.state}; only a waiting task's dependencies"
        )
    left = [d for d in task.depends_on if d != to_task]
    rec = s.commit("task", task.id, str(task.state), "operator", depends_on=left)
    s.state.graph.mark_ready(task.id)
    cycles = _ws_cycles(s, task.workstream_id)
    s.emit(
        "dependency_removed",
        "info",
        task_id=task.id,
        workstream_id=task.workstream_id,
        tasks=[task.id, to_task],
        message=f"{task.id} no longer depends on {to_task}; "
        + (
            "cycles left: " + "; ".join(", ".join(c) for c in cycles) if cycles else "no cycle left"
        ),
        data={"cycles_left": cycles},
    )
    return {
        "task_id": task.id,
        "removed": to_task,
        "depends_on": left,
        "unmet": s.state.graph.unmet.get(task.id, 0),
        "cycles_left": cycles,
        "seq": rec.seq,
    }


def revalidate(s: Machine, params: p.RevalidateParams) -> dict[str, Any]:
    task = get_task(s, params.task_id, params.workstream)
    if task.state != TaskState.FAILED or task.failure_kind != "validation" or not task.validate:
        raise OperatorError(
            "wrong_state",
            f"task {task.id} is {task.state} ({task.failure_kind or 'no failure'}); only a "
            "task whose last attempt failed validation is revalidated (else `orchctl retry`)",
        )
    refuse_merged(s, task.workstream_id)
    # retry_count stays spent: a failed revalidation fails the task again at once.
    rec = s.commit(
        "task", task.id, "pending", "operator", revalidate=True, not_before=None, failure_kind=None
    )
    reopen_workstream(s, task.workstream_id)
    s.state.graph.mark_ready(task.id)
    return {"task_id": task.id, "state": "pending", "revalidate": True, "seq": rec.seq}


def _actions(s: Machine, task: Task) -> list[dict[str, Any]]:
    """What an operator may do next about this task, as orchctl argument lists."""
    t = task.id
    acts: list[dict[str, Any]] = []

    def act(label: str, *argv: str) -> None:
        acts.append({"label": label, "argv": list(argv)})

    if task.state == TaskState.FAILED:
        if task.failure_kind == "timeout":
            act(
                f"retry with twice the timeout ({task.timeout_s * 2:g}s)",
                "retry",
                t,
                "--timeout",
                f"{task.timeout_s * 2:g}",
            )
        if task.failure_kind == "validation" and task.validate:
            act("re-run only the validation step", "revalidate", t)
        act("retry with fresh retries", "retry", t)
        act("skip it (mark completed)", "skip", t, "--reason", "{reason}")
        act("cancel it (dependents go on)", "cancel", t)
    elif task.state == TaskState.RUNNING:
        act("follow its log", "logs", t, "-f")
        if task.worker_id:
            act(f"check its worker {task.worker_id}", "worker", "check", task.worker_id)
        act("cancel it", "cancel", t)
    elif task.state in (TaskState.PENDING, TaskState.QUEUED):
        tasks = s.state.data.tasks
        for d in task.depends_on:
            if d in tasks and tasks[d].state == TaskState.FAILED:
                act(f"retry its failed dependency {d}", "retry", d)
                act(f"stop waiting for {d}", "dep", "remove", "--from", t, "--to", d)
        if task.state == TaskState.QUEUED:
            act("show resources", "resources")
        act("show its dependencies", "deps", t)
        act("cancel it", "cancel", t)
    elif task.state in (TaskState.COMPLETED, TaskState.CANCELLED):
        act("run it again", "retry", t)
    return acts


def debug(s: Machine, params: p.DebugParams) -> FilePart:
    task = get_task(s, params.task_id, params.workstream)
    tasks = s.state.data.tasks
    diagnosis = [why_waits(s, task)]
    if task.state == TaskState.FAILED:
        diagnosis.append(task_advice(task)[0])
    worker = None
    if task.worker_id and task.worker_id in s.state.data.workers:
        w = s.state.data.workers[task.worker_id]
        seen = s.rt.heartbeat_at(w.id)
        health = probe_report(s, w.id)
        worker = worker_view(w, None if seen is None else max(0.0, s.now - seen), health)
    view = task_view(task)
    path = s.files.task_log_path(task.id)
    out = {
        "task": {k: v for k, v in view.items() if k != "attempts"},
        "attempts": view["attempts"][-3:],
        "dependencies": [
            {"id": d, "state": str(tasks[d].state) if d in tasks else "missing"}
            for d in task.depends_on
        ],
        "worker": worker,
        "log_path": str(path),
        "diagnosis": diagnosis,
        "actions": _actions(s, task),
    }
    files, lines = s.files, params.lines
    return FilePart(lambda: out | {"log_tail": files.tail(path, lines)})


def interventions(s: Machine, params: p.InterventionsParams) -> FilePart:
    """The last `limit` manual actions, across interventions.log's rotated files (the
    step takes the cut, a worker thread reads it)."""
    cut, limit = s.files.interventions_cut(), max(0, params.limit)

    def read() -> list[dict[str, Any]]:
        out = []
        for line in cut.tail(limit):
            try:
                out.append(msgspec.json.decode(line))
            except msgspec.DecodeError:
                continue  # a line torn by a crash mid-write
        return out

    return FilePart(read, cut.close)


def metrics(s: Machine, _: p.MetricsParams) -> dict[str, Any]:
    out: dict[str, Any] = live_metrics(s, s.transitions_per_s)
    return out
