"""Decisions: back-off, the outcome of a failed attempt, workstream verdicts. Pure: no I/O.

Time (`now`) and randomness (`rand`, a float in [0, 1)) are passed in.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Final

import msgspec

from supervisor.core.model import Cause, FailureKind, Task, TaskState, WorkstreamState

# Failure kinds that do not spend a retry: the task was not at fault.
FREE_RETRY_KINDS = frozenset({FailureKind.INTERRUPTED})


def backoff_s(
    retry_count: int, base_s: float, max_s: float, jitter: float = 0.0, rand: float = 0.5
) -> float:
    """Delay before the next attempt: base·2^retry_count, capped at max_s.

    `jitter` in [0, 1] spreads the delay by ±jitter·delay using `rand`; 0 gives the exact
    figure (so the guide's 2, 4, 8 s hold by default)."""
    # The exponent is clamped: 2.0 ** 1024 overflows, and any cap is reached long before.
    delay = min(base_s * (2.0 ** min(retry_count, 64)), max_s)
    if jitter:
        delay *= 1.0 + jitter * (2.0 * rand - 1.0)
    return max(0.0, min(delay, max_s))


class StopReason(enum.StrEnum):
    """Why a running attempt is being stopped (persisted as the task's `stopping`)."""

    TIMEOUT = "timeout"
    CANCEL = "cancel"
    SHUTDOWN = "shutdown"  # the daemon stops: interrupted, no retry spent
    REASSIGN = "reassign"  # its worker was lost or restarted: queued again, no retry spent
    WORKER_LOST = "worker_lost"  # forced shutdown without reassign: a retry is spent
    ROLLBACK = "rollback"  # an operator's workstream rollback: pending, no retry spent


class StopRule(msgspec.Struct, frozen=True):
    """What a stop reason means. `to` None: the retry rule decides (a retry is spent)."""

    cause: Cause  # of the records that stop the attempt and settle the task
    kind: FailureKind | None  # None: from the phase the attempt ended in
    to: TaskState | None = None
    event: str | None = None
    reassign: bool = False


# The one table from stop reason to outcome (h11-style: look it up, never re-derive it).
STOP_RULES: Final[dict[StopReason, StopRule]] = {
    StopReason.TIMEOUT: StopRule("timeout", FailureKind.TIMEOUT),
    StopReason.CANCEL: StopRule("operator", FailureKind.EXIT_CODE, TaskState.CANCELLED),
    StopReason.SHUTDOWN: StopRule(
        "shutdown", FailureKind.INTERRUPTED, TaskState.PENDING, "task_interrupted"
    ),
    StopReason.ROLLBACK: StopRule(
        "operator", FailureKind.INTERRUPTED, TaskState.PENDING, "task_interrupted"
    ),
    StopReason.REASSIGN: StopRule(
        "health", FailureKind.WORKER_LOST, TaskState.QUEUED, "task_reassigned", reassign=True
    ),
    StopReason.WORKER_LOST: StopRule("operator", FailureKind.WORKER_LOST),
}
# The failure kind of an attempt that ended by itself, by the phase it ended in.
PHASE_KINDS: Final[dict[str, FailureKind]] = {
    "spawn": FailureKind.SPAWN_ERROR,
    "validate": FailureKind.VALIDATION,
}
# Reassignments a task gets (at least) before losing its worker counts as a failure.
MIN_REASSIGNS: Final = 3


class Outcome(msgspec.Struct, frozen=True):
    """Where a task goes after an attempt ended, and the fields that change."""

    to: TaskState
    changes: dict[str, Any]
    final: bool
    kind: FailureKind | None = None
    cause: Cause = "failure"
    event: str | None = None


def after_failure(
    task: Task,
    kind: FailureKind,
    exit_code: int | None,
    *,
    now: float,
    base_s: float,
    max_s: float,
    jitter: float = 0.0,
    rand: float = 0.5,
) -> Outcome:
    """The retry rule of the recovery guide, for an attempt that failed with `kind`.

    retry_count += 1; while it stays below max_retries the task goes back to pending with
    not_before = now + backoff (`now` is wall time: the field is persisted); else it fails
    for good. An exit code listed in no_retry_exit_codes fails at once. An interrupted
    attempt goes straight back to pending without spending a retry."""
    cause: Cause = "timeout" if kind == FailureKind.TIMEOUT else "failure"
    if kind in FREE_RETRY_KINDS:
        return Outcome(TaskState.PENDING, {"not_before": None}, False, kind, cause)
    count = task.retry_count + 1
    base = {"retry_count": count, "failure_kind": kind}
    no_retry = (
        kind == FailureKind.EXIT_CODE
        and exit_code is not None
        and exit_code in task.no_retry_exit_codes
    )
    if no_retry or count >= task.max_retries:
        return Outcome(TaskState.FAILED, {**base, "not_before": None}, True, kind, cause)
    delay = backoff_s(count, base_s, max_s, jitter, rand)
    return Outcome(TaskState.PENDING, {**base, "not_before": now + delay}, False, kind, cause)


def attempt_outcome(
    task: Task,
    *,
    phase: str,
    killed: bool,
    exit_code: int | None,
    now: float,
    base_s: float,
    max_s: float,
    jitter: float = 0.0,
    rand: float = 0.5,
) -> Outcome:
    """Where `task` goes now that its running attempt has ended in `phase` ("done" when
    the command and its validation succeeded), given why it was being stopped, if it was."""
    if phase == "done" and not killed:
        return Outcome(TaskState.COMPLETED, {"failure_kind": None}, False, None, "auto")
    reason = StopReason(task.stopping) if task.stopping else None
    rule = STOP_RULES[reason] if reason is not None else None
    if rule is not None and rule.reassign:
        reassigns = sum(1 for a in task.attempts if a.reassigned)
        if reassigns >= max(task.max_retries, MIN_REASSIGNS):
            rule = STOP_RULES[StopReason.WORKER_LOST]  # lost too often: it counts now
    if rule is not None and rule.to is not None:
        assert rule.kind is not None
        return Outcome(rule.to, {}, False, rule.kind, rule.cause, rule.event)
    if rule is not None and rule.kind is not None:
        kind = rule.kind
    else:
        kind = PHASE_KINDS.get(phase, FailureKind.EXIT_CODE)
        if task.revalidate and kind == FailureKind.EXIT_CODE:
            kind = FailureKind.VALIDATION  # the "command" was the validate step
    return after_failure(
        task, kind, exit_code, now=now, base_s=base_s, max_s=max_s, jitter=jitter, rand=rand
    )


def workstream_verdict(
    counts: Mapping[str, int],
    *,
    critical_failed: bool,
    has_runnable_pending: bool,
) -> WorkstreamState | None:
    """Completed when every task is completed or cancelled; failed when a task failed for good
    and nothing more can run (a critical failure stops new dispatch, so once nothing runs the
    workstream has failed). None while it is still running."""
    total = sum(counts.values())
    done = counts.get("completed", 0) + counts.get("cancelled", 0)
    if total and done == total:
        return WorkstreamState.COMPLETED
    if counts.get("failed", 0) == 0 or counts.get("running", 0):
        return None
    if critical_failed:
        return WorkstreamState.FAILED
    if counts.get("queued", 0) or has_runnable_pending:
        return None
    return WorkstreamState.FAILED


def health_verdict(
    state: str,
    *,
    heartbeat_age_s: float,
    probe_ok: bool,
    unresponsive_for_s: float | None,
    unresponsive_after_s: float,
    shutdown_after_s: float,
) -> str | None:
    """What the health check does with a worker: "unresponsive", "recovered", "shutdown" or
    None (nothing). `unresponsive_for_s` is how long it has been unresponsive, if it is.

    The guide's rule: no heartbeat for unresponsive_after_s (or the process is stopped,
    a zombie or gone) makes a worker unresponsive; heartbeats back before shutdown_after_s
    recover it; still unresponsive at shutdown_after_s shuts it down."""
    sick = not probe_ok or heartbeat_age_s >= unresponsive_after_s
    if state in ("idle", "busy"):
        return "unresponsive" if sick else None
    if state == "unresponsive":
        if not sick:
            return "recovered"
        if unresponsive_for_s is not None and unresponsive_for_s >= shutdown_after_s:
            return "shutdown"
    return None
