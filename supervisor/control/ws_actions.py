"""Workstream actions of the recovery guide, run inside a step of the engine: retry, retry the
failed tasks, resume from a task, checkpoints and rollback, mark merged, and the failure
analysis that walks the guide's decision trees on the real state.
"""

from __future__ import annotations

from typing import Any

from supervisor.control import protocol as p
from supervisor.control.lookup import (
    get_task,
    get_ws,
    refuse_merged,
    reopen_workstream,
    reset_tasks,
)
from supervisor.core.errors import OperatorError, StoreCorrupt
from supervisor.core.graph import find_cycles
from supervisor.core.lifecycle import stop_task
from supervisor.core.machine import Machine
from supervisor.core.model import TASK_TRANSITIONS, FailureKind, Task, TaskState
from supervisor.core.policy import StopReason
from supervisor.core.retention import retire_by_hand


def _result(s: Machine, ws_id: str, before: int, **extra: Any) -> dict[str, Any]:
    ws = s.state.data.workstreams[ws_id]
    seq = s.state.last_seq if s.state.last_seq != before else None
    return {"workstream_id": ws_id, "state": str(ws.state), "seq": seq} | extra


def _refuse_running(s: Machine, ids: list[str], what: str) -> None:
    running = [t for t in ids if s.state.data.tasks[t].state == TaskState.RUNNING]
    if running:
        raise OperatorError(
            "wrong_state",
            f"{', '.join(running)} still running; wait for {what} or `orchctl cancel` first",
        )


def ws_retry(s: Machine, params: p.WsRetryParams) -> dict[str, Any]:
    ws = get_ws(s, params.workstream)
    refuse_merged(s, ws.id)
    _refuse_running(s, ws.task_ids, "them")
    before = s.state.last_seq
    reset = reset_tasks(s, ws.task_ids)
    reopen_workstream(s, ws.id)
    return _result(s, ws.id, before, reset=reset)


def ws_retry_failed(s: Machine, params: p.WsRetryFailedParams) -> dict[str, Any]:
    ws = get_ws(s, params.workstream)
    refuse_merged(s, ws.id)
    failed = [t for t in ws.task_ids if s.state.data.tasks[t].state == TaskState.FAILED]
    if not failed:
        raise OperatorError("wrong_state", f"workstream {ws.id} has no failed task")
    before = s.state.last_seq
    reset = reset_tasks(s, failed)
    reopen_workstream(s, ws.id)
    return _result(s, ws.id, before, reset=reset)


def ws_resume(s: Machine, params: p.WsResumeParams) -> dict[str, Any]:
    ws = get_ws(s, params.workstream)
    task = get_task(s, params.from_task, ws.id)
    refuse_merged(s, ws.id)
    members = set(ws.task_ids)
    # Downstream tasks of other workstreams are theirs to restart, not this one's.
    ids = [task.id] + [t for t in s.state.graph.downstream(task.id) if t in members]
    _refuse_running(s, ids, "them")
    before = s.state.last_seq
    reset = reset_tasks(s, ids)
    reopen_workstream(s, ws.id)
    return _result(s, ws.id, before, reset=reset)


def ws_mark_merged(s: Machine, params: p.WsMarkMergedParams) -> dict[str, Any]:
    ws = get_ws(s, params.workstream)
    if ws.state != "completed":
        raise OperatorError(
            "wrong_state", f"workstream {ws.id} is {ws.state}; only a completed one is merged"
        )
    rec = s.commit("workstream", ws.id, "merged", "operator")
    s.rt.mark_dirty(ws.id)
    s.emit("workstream_merged", "info", workstream_id=ws.id, message=params.reason)
    return {"workstream_id": ws.id, "state": "merged", "seq": rec.seq}


def ws_retire(s: Machine, params: p.WsRetireParams) -> dict[str, Any]:
    """`orchctl ws retire WS`: archive a finished workstream now and retire it (the server
    waits for the retirement record and answers with its seq)."""
    ws = get_ws(s, params.workstream)
    retire_by_hand(s, ws.id)
    return {"workstream_id": ws.id, "state": str(ws.state), "archiving": True}


# --- checkpoints and rollback -----------------------------------------------------------


def ws_checkpoints(s: Machine, params: p.WsCheckpointsParams) -> list[dict[str, Any]]:
    ws = get_ws(s, params.workstream)
    out = []
    for n in s.files.list_checkpoints(ws.id):
        try:
            doc = s.files.read_checkpoint(ws.id, n)
        except (FileNotFoundError, StoreCorrupt):
            continue  # pruned meanwhile, or damaged: not one to roll back to
        out.append(
            {
                "seq": n,
                "checkpoint_at": doc.get("checkpoint_at"),
                "state": doc.get("state"),
                "completed": len(doc.get("completed_tasks", [])),
                "failed": len(doc.get("failed_tasks", [])),
                "pending": len(doc.get("pending_tasks", [])),
                "cancelled": len(doc.get("cancelled_tasks", [])),
            }
        )
    return out


def _load_checkpoint(s: Machine, ws_id: str, which: str) -> dict[str, Any]:
    if which != "latest" and not which.isdigit():
        raise OperatorError("invalid", "--to-checkpoint takes `latest` or a checkpoint's seq")
    try:
        return s.files.read_checkpoint(ws_id, "latest" if which == "latest" else int(which))
    except FileNotFoundError:
        raise OperatorError(
            "not_found",
            f"no checkpoint {which} of {ws_id} (see `orchctl ws checkpoints {ws_id}`)",
        ) from None
    except StoreCorrupt as exc:
        raise OperatorError("failed", str(exc)) from None


def _restore_changes(task: Task, saved: dict[str, Any]) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for key in ("retry_count", "timeout_s", "max_retries"):
        if key in saved and getattr(task, key) != saved[key]:
            changes[key] = saved[key]
    if "depends_on" in saved and list(task.depends_on) != list(saved["depends_on"]):
        changes["depends_on"] = list(saved["depends_on"])
    return changes


def ws_rollback(s: Machine, params: p.WsRollbackParams) -> dict[str, Any]:
    """The guide's rollback: load the checkpoint, cancel running tasks (they end pending),
    reset queued tasks to pending, restore task states; their resources are released as
    they leave running. Completed tasks are not rolled back; merged workstreams refused."""
    ws = get_ws(s, params.workstream)
    refuse_merged(s, ws.id)
    doc = _load_checkpoint(s, ws.id, params.to_checkpoint)
    saved: dict[str, dict[str, Any]] = doc.get("tasks", {})
    tasks = s.state.data.tasks
    before = s.state.last_seq
    stopping, reset, restored, kept, not_restored = [], [], [], [], []
    for tid in ws.task_ids:
        task = tasks[tid]
        if task.state == TaskState.RUNNING:
            stop_task(s, task, StopReason.ROLLBACK)
            stopping.append(tid)
            changes = _restore_changes(task, saved.get(tid, {}))
            if changes:
                s.commit("task", tid, "running", "operator", **changes)
    for tid in ws.task_ids:
        if tasks[tid].state == TaskState.QUEUED:
            s.commit("task", tid, "pending", "operator", not_before=None)
            reset.append(tid)
    for tid in ws.task_ids:
        task, snap = tasks[tid], saved.get(tid)
        if snap is None or tid in stopping:
            continue
        target = snap.get("state", "pending")
        if task.state == TaskState.COMPLETED:
            if target != "completed":
                kept.append(tid)  # its work is done: a completed task is never rolled back
            continue
        if target in ("queued", "running"):
            target = "pending"  # what was under way at the checkpoint waits to run again
        changes = _restore_changes(task, snap)
        if target == "failed" and task.state != TaskState.FAILED:
            not_restored.append(tid)  # a task fails only by running; it stays as it is
            target = str(task.state)
        if target == "completed":
            changes["skipped"] = bool(snap.get("skipped"))
        if target == "pending":
            changes["not_before"] = None
        if target == task.state and not changes:
            continue
        if target not in TASK_TRANSITIONS[str(task.state)]:
            not_restored.append(tid)
            continue
        s.commit("task", tid, target, "operator", **changes)
        if target == "pending":
            s.state.graph.mark_ready(tid)
        restored.append(tid)
    unfinished = (TaskState.PENDING, TaskState.QUEUED, TaskState.RUNNING)
    if any(tasks[t].state in unfinished for t in ws.task_ids):
        reopen_workstream(s, ws.id)
    s.check_workstream(ws.id)
    s.emit(
        "workstream_rolled_back",
        "warning",
        workstream_id=ws.id,
        tasks=restored + reset + stopping,
        message=f"rolled back to checkpoint at seq {doc.get('seq')}",
        data={"checkpoint_seq": doc.get("seq"), "kept_completed": kept},
    )
    return _result(
        s,
        ws.id,
        before,
        checkpoint_seq=doc.get("seq"),
        stopping=stopping,
        reset=reset,
        restored=restored,
        kept_completed=kept,
        not_restored=not_restored,
    )


# --- analysis -----------------------------------------------------------------------------


def task_advice(task: Task) -> tuple[str, list[str]]:
    """The Task Recovery Decision Tree for one failed task: what it is, what to run."""
    t = task.id
    tries = f"after {task.retry_count}/{task.max_retries} attempt(s)"
    if task.retry_count < task.max_retries and task.failure_kind != FailureKind.EXIT_CODE:
        return f"{t} failed ({task.failure_kind}) {tries}", [f"orchctl retry {t}"]
    match task.failure_kind:
        case FailureKind.TIMEOUT:
            longer = f"{task.timeout_s * 2:g}"
            return (
                f"{t} timed out {tries} (limit {task.timeout_s:g}s): transient — "
                "increase the timeout and retry",
                [f"orchctl logs {t}", f"orchctl retry {t} --timeout {longer}"],
            )
        case FailureKind.VALIDATION:
            return (
                f"{t} failed validation {tries}: code issue — fix the code, then re-run "
                "only the validation step",
                [f"orchctl show {t} --logs", f"orchctl revalidate {t}"],
            )
        case FailureKind.WORKER_LOST:
            return (
                f"{t} lost its worker {tries}: worker problem — check the workers, retry",
                ["orchctl workers", f"orchctl retry {t}"],
            )
        case FailureKind.SPAWN_ERROR:
            return (
                f"{t} could not start {tries}: task definition issue (command, cwd) — "
                "update the definition and submit it again",
                [f"orchctl show {t} --logs"],
            )
    code = task.attempts[-1].exit_code if task.attempts else None
    if code is not None and code in task.no_retry_exit_codes:
        return (
            f"{t} exited {code}, listed in no_retry_exit_codes: task definition issue",
            [f"orchctl show {t} --logs"],
        )
    return (
        f"{t} exited {'non-zero' if code is None else code} {tries}: code issue — fix, retry",
        [f"orchctl show {t} --logs", f"orchctl retry {t}"],
    )


def ws_analyze(s: Machine, params: p.WsAnalyzeParams) -> dict[str, Any]:
    """The Workstream Recovery Decision Tree, each finding with the commands to run next."""
    ws = get_ws(s, params.workstream)
    tasks = [s.state.data.tasks[t] for t in ws.task_ids]
    counts: dict[str, int] = {}
    for t in tasks:
        counts[str(t.state)] = counts.get(str(t.state), 0) + 1
    failed = [t for t in tasks if t.state == TaskState.FAILED]
    findings: list[dict[str, Any]] = []
    nxt: list[str] = []

    def add(text: str, commands: list[str]) -> None:
        findings.append({"text": text, "commands": commands})

    cycles = find_cycles([t.id for t in tasks], {t.id: list(t.depends_on) for t in tasks})
    for cycle in cycles:
        a = cycle[0]
        b = next(d for d in s.state.data.tasks[a].depends_on if d in cycle)
        add(
            f"dependency cycle: {', '.join(cycle)} wait on each other — break it",
            [f"orchctl dag {ws.id}", f"orchctl dep remove --from {a} --to {b}"],
        )
    if failed and len(failed) == len(tasks):
        kinds = {str(t.failure_kind) for t in failed}
        bad_workers = [
            w.id for w in s.state.data.workers.values() if w.state in ("unresponsive", "shutdown")
        ]
        text = f"all {len(tasks)} tasks failed ({', '.join(sorted(kinds))}): systemic issue"
        cmds = ["orchctl workers"]
        if "worker_lost" in kinds or bad_workers:
            text += "; worker problems — investigate the workers"
        if any(t.resources for t in tasks):
            cmds.append("orchctl resources")
        if "spawn_error" in kinds:
            text += "; configuration issue — review commands, cwd and settings"
        add(text, cmds)
        nxt.append(f"orchctl ws retry {ws.id}")
    elif failed:
        critical = [t for t in failed if t.critical]
        if critical:
            add(
                f"partial failure: critical task(s) {', '.join(t.id for t in critical)} "
                "failed — fix them, then retry the workstream",
                [],
            )
            nxt.append(f"orchctl ws retry {ws.id}")
        else:
            add(
                f"partial failure: only non-critical task(s) {', '.join(t.id for t in failed)} "
                "failed — retry the failed tasks only",
                [],
            )
            nxt.append(f"orchctl ws retry-failed {ws.id}")
    for t in failed:
        text, cmds = task_advice(t)
        add(text, cmds)
    by_id = s.state.data.tasks
    for t in tasks:
        if t.state != TaskState.PENDING:
            continue
        dead = [d for d in t.depends_on if d in by_id and by_id[d].state == TaskState.FAILED]
        if dead:
            add(
                f"{t.id} waits on failed {', '.join(dead)}: dependency issue — fix the "
                "dependency, or stop waiting for it",
                [f"orchctl deps {t.id}"]
                + [f"orchctl dep remove --from {t.id} --to {d}" for d in dead],
            )
    if not findings:
        add(f"workstream {ws.id} is {ws.state}; nothing failed", [f"orchctl ws show {ws.id}"])
    return {
        "workstream_id": ws.id,
        "state": str(ws.state),
        "counts": counts,
        "all_failed": bool(failed) and len(failed) == len(tasks),
        "cycles": cycles,
        "findings": findings,
        "next": nxt,
    }
