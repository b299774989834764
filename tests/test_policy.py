"""Decisions: back-off delays, the retry rule after a failed attempt, workstream verdicts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor.core.model import Attempt, FailureKind, Task, TaskState, WorkstreamState
from supervisor.core.policy import (
    MIN_REASSIGNS,
    STOP_RULES,
    Outcome,
    StopReason,
    after_failure,
    attempt_outcome,
    backoff_s,
    health_verdict,
    workstream_verdict,
)

NOW = 1000.0


def task(**kw: object) -> Task:
    return Task(id="t1", workstream_id="ws-1", command="false", **kw)  # type: ignore[arg-type]


def test_first_retries_wait_two_then_four_base_delays() -> None:
    """The first failure waits 2·base, the second 4·base (the guide's 2^retry_count s)."""
    first = after_failure(task(), FailureKind.EXIT_CODE, 1, now=NOW, base_s=1.5, max_s=100)
    assert first.to == TaskState.PENDING
    assert first.changes["not_before"] == NOW + 3.0
    assert first.changes["retry_count"] == 1
    second = after_failure(
        task(retry_count=1), FailureKind.TIMEOUT, None, now=NOW, base_s=1.5, max_s=100
    )
    assert second.changes["not_before"] == NOW + 6.0
    assert second.changes["retry_count"] == 2
    assert not first.final and not second.final


def test_backoff_is_capped() -> None:
    """No delay exceeds backoff_max_s, however many retries came before (no overflow)."""
    assert backoff_s(3, 1.0, 300.0) == 8.0
    assert backoff_s(20, 1.0, 300.0) == 300.0
    assert backoff_s(2000, 1.0, 300.0) == 300.0


@given(
    retry=st.integers(0, 12),
    base=st.floats(0.01, 10),
    jitter=st.floats(0, 1),
    rand=st.floats(0, 1, exclude_max=True),
)
def test_jitter_stays_within_its_bounds(
    retry: int, base: float, jitter: float, rand: float
) -> None:
    """With jitter j the delay lies in [d·(1-j), d·(1+j)] and never above the cap."""
    cap = 60.0
    exact = backoff_s(retry, base, cap)
    delay = backoff_s(retry, base, cap, jitter, rand)
    assert exact * (1 - jitter) - 1e-9 <= delay <= min(exact * (1 + jitter), cap) + 1e-9
    assert delay >= 0


def test_no_jitter_gives_the_exact_figure() -> None:
    """Without jitter the random input does not matter."""
    assert backoff_s(1, 1.0, 60.0, 0.0, 0.0) == backoff_s(1, 1.0, 60.0, 0.0, 0.99) == 2.0


def test_no_retry_exit_code_fails_at_once() -> None:
    """An exit code listed in no_retry_exit_codes fails the task on its first failure."""
    out = after_failure(
        task(no_retry_exit_codes=[2]), FailureKind.EXIT_CODE, 2, now=NOW, base_s=1, max_s=60
    )
    assert (out.to, out.final) == (TaskState.FAILED, True)
    assert out.changes["not_before"] is None
    other = after_failure(
        task(no_retry_exit_codes=[2]), FailureKind.EXIT_CODE, 1, now=NOW, base_s=1, max_s=60
    )
    assert other.to == TaskState.PENDING


def test_no_retry_codes_do_not_apply_to_other_failure_kinds() -> None:
    """A validation failure exiting with a listed code is still retried."""
    out = after_failure(
        task(no_retry_exit_codes=[2]), FailureKind.VALIDATION, 2, now=NOW, base_s=1, max_s=60
    )
    assert out.to == TaskState.PENDING


def test_retries_run_out_at_max_retries() -> None:
    """The failure that brings retry_count to max_retries is final."""
    t = task(max_retries=3)
    outcomes = []
    for _ in range(3):
        out = after_failure(t, FailureKind.EXIT_CODE, 1, now=NOW, base_s=1, max_s=60)
        outcomes.append(out.to)
        t.retry_count = out.changes["retry_count"]
    assert outcomes == [TaskState.PENDING, TaskState.PENDING, TaskState.FAILED]
    assert t.retry_count == 3


@pytest.mark.parametrize("kind", list(FailureKind))
def test_failure_kind_is_recorded(kind: FailureKind) -> None:
    """A spent retry records why the attempt failed; an interrupted one spends none."""
    out = after_failure(task(), kind, None, now=NOW, base_s=1, max_s=60)
    assert out.kind == kind
    if kind == FailureKind.INTERRUPTED:
        assert "retry_count" not in out.changes
    else:
        assert out.changes["failure_kind"] == kind


def _ended(t: Task, phase: str = "command", killed: bool = True) -> Outcome:
    return attempt_outcome(
        t, phase=phase, killed=killed, exit_code=None, now=NOW, base_s=1, max_s=60
    )


@pytest.mark.parametrize("reason", list(StopReason))
def test_every_stop_reason_has_one_rule(reason: StopReason) -> None:
    """Each stop reason maps, through the one table, to its cause, kind and target."""
    rule = STOP_RULES[reason]
    out = _ended(task(retry_count=0, max_retries=3, stopping=str(reason)))
    assert out.cause in (rule.cause, "timeout", "failure")
    assert out.kind == rule.kind
    if rule.to is not None:
        assert out.to == rule.to and "retry_count" not in out.changes
    else:
        assert out.changes["retry_count"] == 1


def test_interrupted_and_reassigned_attempts_spend_no_retry() -> None:
    """An interrupted attempt goes back to pending and a reassigned one to queued, with
    the retry count intact."""
    t = task(retry_count=2, max_retries=3)
    interrupted = after_failure(t, FailureKind.INTERRUPTED, None, now=NOW, base_s=1, max_s=60)
    assert (interrupted.to, interrupted.final) == (TaskState.PENDING, False)
    assert "retry_count" not in interrupted.changes
    t.stopping = "reassign"
    reassigned = _ended(t)
    assert (reassigned.to, reassigned.final) == (TaskState.QUEUED, False)
    assert reassigned.event == "task_reassigned" and "retry_count" not in reassigned.changes


def test_a_task_reassigned_too_often_spends_its_retries() -> None:
    """After MIN_REASSIGNS reassignments, losing the worker again counts as a failure."""
    lost = [
        Attempt(attempt_id=f"a{i}", number=i, worker_id="w", started_at=0.0, reassigned=True)
        for i in range(MIN_REASSIGNS)
    ]
    out = _ended(task(max_retries=2, stopping="reassign", attempts=lost))
    assert out.kind == FailureKind.WORKER_LOST and out.changes["retry_count"] == 1


def test_a_clean_finish_completes() -> None:
    """An attempt that ended in phase done, not killed, completes the task."""
    out = _ended(task(), phase="done", killed=False)
    assert out.to == TaskState.COMPLETED and out.changes == {"failure_kind": None}


@pytest.mark.parametrize(
    ("counts", "critical_failed", "runnable", "verdict"),
    [
        ({"completed": 3}, False, False, WorkstreamState.COMPLETED),
        ({"completed": 2, "cancelled": 1}, False, False, WorkstreamState.COMPLETED),
        ({"completed": 1, "running": 1}, False, False, None),
        ({"pending": 2}, False, True, None),
        ({"failed": 1, "running": 1}, True, False, None),
        ({"failed": 1, "pending": 2}, True, True, WorkstreamState.FAILED),
        ({"failed": 1, "pending": 2}, False, True, None),
        ({"failed": 1, "queued": 1}, False, False, None),
        ({"failed": 1, "pending": 1}, False, False, WorkstreamState.FAILED),
        ({"failed": 1, "completed": 4}, False, False, WorkstreamState.FAILED),
        ({}, False, False, None),
    ],
)
def test_workstream_verdict(
    counts: dict[str, int],
    critical_failed: bool,
    runnable: bool,
    verdict: WorkstreamState | None,
) -> None:
    """Completed when all is done; failed once a task failed for good and nothing more can
    run (at once after a critical failure, as soon as nothing runs); else undecided."""
    got = workstream_verdict(counts, critical_failed=critical_failed, has_runnable_pending=runnable)
    assert got == verdict


def verdict(state: str, age: float, ok: bool = True, down_for: float | None = None) -> str | None:
    return health_verdict(
        state,
        heartbeat_age_s=age,
        probe_ok=ok,
        unresponsive_for_s=down_for,
        unresponsive_after_s=30.0,
        shutdown_after_s=180.0,
    )


@pytest.mark.parametrize("state", ["idle", "busy"])
def test_live_worker_turns_unresponsive_at_the_threshold_or_on_a_bad_probe(state: str) -> None:
    """An idle or busy worker is unresponsive once its heartbeat is unresponsive_after_s old
    (not before) or as soon as psutil finds its process stopped, a zombie or gone."""
    assert verdict(state, 29.999) is None
    assert verdict(state, 30.0) == "unresponsive"
    assert verdict(state, 0.0, ok=False) == "unresponsive"


def test_unresponsive_worker_recovers_or_is_shut_down_at_shutdown_after() -> None:
    """An unresponsive worker recovers when heartbeats are fresh and its process is fine,
    stays unresponsive until shutdown_after_s, and is shut down from then on."""
    assert verdict("unresponsive", 1.0, down_for=179.0) == "recovered"
    assert verdict("unresponsive", 31.0, down_for=179.999) is None
    assert verdict("unresponsive", 31.0, down_for=180.0) == "shutdown"
    assert verdict("unresponsive", 1.0, ok=False, down_for=500.0) == "shutdown"
    # Fresh heartbeats from a process psutil calls stopped are no recovery.
    assert verdict("unresponsive", 0.0, ok=False, down_for=10.0) is None
    # Without a known start of the episode it is never shut down on a guess.
    assert verdict("unresponsive", 999.0, down_for=None) is None


@pytest.mark.parametrize("state", ["starting", "shutdown"])
def test_starting_and_shut_down_workers_get_no_verdict(state: str) -> None:
    """Health checks leave starting and shut down workers alone, whatever the figures."""
    assert verdict(state, 999.0, ok=False, down_for=999.0) is None
