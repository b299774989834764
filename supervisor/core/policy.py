"""Decisions: back-off, the outcome of a failed attempt, workstream verdicts. Pure: no I/O.

Time (`now`) and randomness (`rand`, a float in [0, 1)) are passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from supervisor.core.model import FailureKind, Task, TaskState, WorkstreamState

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


class Outcome(msgspec.Struct, frozen=True):
    """Where a task goes after an attempt ended badly, and the fields that change."""

    to: TaskState
    changes: dict[str, Any]
    final: bool


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
    spend_retry: bool = True,
) -> Outcome:
    """The retry rule of the recovery guide, for an attempt that failed with `kind`.

    retry_count += 1; while it stays below max_retries the task goes back to pending with
    not_before = now + backoff; else it fails for good. An exit code listed in
    no_retry_exit_codes fails at once. A reassignment (spend_retry=False) or an interrupted
    attempt goes straight back to queued/pending without spending a retry."""
    if not spend_retry or kind in FREE_RETRY_KINDS:
        return Outcome(
            TaskState.PENDING,
            {"worker_id": None, "pid": None, "stopping": None, "not_before": None},
            False,
        )
    count = task.retry_count + 1
    base = {
        "worker_id": None,
        "pid": None,
        "stopping": None,
        "retry_count": count,
        "failure_kind": kind,
    }
    no_retry = (
        kind == FailureKind.EXIT_CODE
        and exit_code is not None
        and exit_code in task.no_retry_exit_codes
    )
    if no_retry or count >= task.max_retries:
        return Outcome(TaskState.FAILED, {**base, "not_before": None}, True)
    delay = backoff_s(count, base_s, max_s, jitter, rand)
    return Outcome(TaskState.PENDING, {**base, "not_before": now + delay}, False)


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
