"""What replay checks beyond the transition tables: that a record, or a loaded snapshot,
names only tasks, workers, workstreams and resources that exist. Pure: no I/O.

The live daemon builds its records from its own state, so it never names what does not
exist and does not pay for these checks; a log or snapshot read back from disk may have
been edited or damaged in a way its checksum does not show (a type-valid but meaningless
record), and then these checks turn silent acceptance into a refusal that names it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, Final

from supervisor.core.model import State, StateData, Transition


class DanglingReference(ValueError):
    """Raised by `check_record` when a record names a task, worker, workstream or resource
    that does not exist when it is replayed. The store turns it into StoreCorrupt naming the
    file and the line."""


def _task_problem(
    task_id: str,
    changes: Mapping[str, Any],
    data: StateData,
    new_tasks: Collection[str] = (),
) -> str | None:
    """What a task's fields (a creation's task, or a record's changes) name that does not
    exist; `new_tasks` are the tasks created together with it."""
    deps = changes.get("depends_on")
    if deps is not None:
        # `apply` takes any iterable (a string would become its letters): insist on a list.
        if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
            return f"task {task_id!r} has a depends_on that is not a list of task ids"
        for dep in deps:
            if dep not in new_tasks and dep not in data.tasks:
                return f"task {task_id!r} depends on unknown task {dep!r}"
    res = changes.get("resources")
    if isinstance(res, list):
        for r in res:
            if r not in data.resources:
                return f"task {task_id!r} uses unknown resource {r!r}"
    wid = changes.get("worker_id")
    if wid is not None and wid not in data.workers:
        return f"task {task_id!r} is given unknown worker {wid!r}"
    attempt = changes.get("attempt")
    if isinstance(attempt, Mapping):
        wid = attempt.get("worker_id")
        if wid is not None and wid not in data.workers:
            return f"an attempt of task {task_id!r} runs on unknown worker {wid!r}"
    return None


def record_problem(data: StateData, rec: Transition) -> str | None:
    """What `rec` names that does not exist in `data` (the state before it), or None."""
    changes = rec.changes
    if not changes:
        return None
    entity = rec.entity
    if entity == "task":
        return _task_problem(rec.id, changes, data)
    if entity == "worker":
        tid = changes.get("task_id")
        if tid is not None and tid not in data.tasks:
            return f"worker {rec.id!r} is given unknown task {tid!r}"
        return None
    if entity == "workstream" and rec.from_ is None:
        ws = changes.get("workstream")
        if isinstance(ws, Mapping) and ws.get("id") != rec.id:
            return f"the record creates workstream {ws.get('id')!r}, not {rec.id!r}"
        tasks = changes.get("tasks")
        if not isinstance(tasks, list):
            return None
        new = {str(t.get("id")) for t in tasks if isinstance(t, Mapping)}
        for t in tasks:
            if not isinstance(t, Mapping):
                continue
            tid = t.get("id")
            if t.get("workstream_id") != rec.id:
                return (
                    f"task {tid!r} of workstream {rec.id!r} says it belongs to "
                    f"{t.get('workstream_id')!r}"
                )
            why = _task_problem(str(tid), t, data, new)
            if why is not None:
                return why
    return None


def check_record(state: State, rec: Transition) -> None:
    """Raise DanglingReference if `rec` names something that does not exist in `state`
    (the state before `rec` is applied)."""
    if rec.changes:
        why = record_problem(state.data, rec)
        if why is not None:
            raise DanglingReference(why)


# The change keys that can name another entity; a record with none of them (most of a
# log: a pid learnt, a back-off, an attempt's end) needs no look-up.
_REFERENCING: Final = frozenset(
    {"depends_on", "resources", "worker_id", "attempt", "task_id", "tasks", "workstream"}
)


def checked_apply(state: State) -> Callable[[Transition], None]:
    """`state.apply` for replay: each record's references are checked before it is applied
    (raises DanglingReference, or whatever `apply` raises)."""
    apply, data, refs = state.apply, state.data, _REFERENCING
    workers = data.workers

    def apply_checked(rec: Transition) -> None:
        changes = rec.changes
        if changes and not refs.isdisjoint(changes):
            # The common case inline (replay runs this once per record): a task given a
            # worker, or an attempt started on one.
            if rec.entity == "task" and "depends_on" not in changes and "resources" not in changes:
                wid = changes.get("worker_id")
                attempt = changes.get("attempt")
                if (wid is None or wid in workers) and (
                    attempt is None
                    or (isinstance(attempt, dict) and attempt.get("worker_id") in workers)
                ):
                    apply(rec)
                    return
            why = record_problem(data, rec)
            if why is not None:
                raise DanglingReference(why)
        apply(rec)

    return apply_checked


def state_problem(data: StateData) -> str | None:
    """The first reference in `data` (a loaded snapshot) to something that does not exist,
    described; None when every reference resolves."""
    tasks, workers, workstreams, resources = (
        data.tasks,
        data.workers,
        data.workstreams,
        data.resources,
    )
    for tid, task in tasks.items():
        for dep in task.depends_on:
            if dep not in tasks:
                return f"task {tid!r} depends on unknown task {dep!r}"
        if task.workstream_id not in workstreams:
            return f"task {tid!r} belongs to unknown workstream {task.workstream_id!r}"
        for res in task.resources:
            if res not in resources:
                return f"task {tid!r} uses unknown resource {res!r}"
        if task.worker_id is not None and task.worker_id not in workers:
            return f"task {tid!r} is given unknown worker {task.worker_id!r}"
        for attempt in task.attempts:
            if attempt.worker_id not in workers:
                return f"an attempt of task {tid!r} runs on unknown worker {attempt.worker_id!r}"
    for wsid, ws in workstreams.items():
        for tid in ws.task_ids:
            listed = tasks.get(tid)
            if listed is None:
                return f"workstream {wsid!r} lists unknown task {tid!r}"
            if listed.workstream_id != wsid:
                return f"workstream {wsid!r} lists task {tid!r} of {listed.workstream_id!r}"
    for wid, worker in workers.items():
        if worker.task_id is not None and worker.task_id not in tasks:
            return f"worker {wid!r} is given unknown task {worker.task_id!r}"
    return None
