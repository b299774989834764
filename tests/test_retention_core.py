"""Retention in the decision core (tests/rig.py, no processes): which finished workstreams
are due, the write-ahead order of a retirement (archive asked, then the record, then the
files), memory back to its baseline after many retirements, replay, and a retirement step
the log refuses taken back whole."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from supervisor.control import actions, ws_actions
from supervisor.control import protocol as p
from supervisor.core.config import RetentionConfig
from supervisor.core.effects import DropFiles, WriteArchive
from supervisor.core.errors import OperatorError
from supervisor.core.model import State, Workstream, WorkstreamState, equal_states
from supervisor.core.queue import Timers
from supervisor.core.retention import RETRY_AFTER_S, due, next_due
from tests.rig import Rig, config

PIPELINE = """name = "nightly"
[[tasks]]
id = "compile"
command = "make"
[[tasks]]
id = "test"
command = "make test"
depends_on = ["compile"]
[[tasks]]
id = "package"
command = "tar"
depends_on = ["compile", "test"]
"""
DAY = 86400.0


def rig_with(**retention: Any) -> Rig:
    cfg = msgspec.structs.replace(config(workers=2), retention=RetentionConfig(**retention))
    return Rig(cfg)


def submit(rig: Rig, text: str = PIPELINE, **params: Any) -> str:
    out = rig.run(actions.submit, p.SubmitParams(text=text, **params))
    if isinstance(out, Exception):
        raise out
    ws_id: str = out["workstream_id"]
    return ws_id


def finish_all(rig: Rig, exit_code: int = 0) -> None:
    """Every attempt the pool runs ends with `exit_code`, until nothing runs any more."""
    for _ in range(200):
        if not rig.pool.current:
            return
        for wid in list(rig.pool.current):
            rig.pool.finish(wid, phase="command" if exit_code else "done", exit_code=exit_code)
        rig.deliver()
    raise AssertionError("tasks kept running")


def ws(id_: str, state: str, ended: float, name: str | None = None) -> Workstream:
    return Workstream(id=id_, state=WorkstreamState(state), ended_at=ended, name=name)


def test_due_by_age_by_count_per_name_and_failed_ones_later() -> None:
    """A finished run is due after keep_finished_s, or once keep_finished newer finished
    runs of its name exist; a failed one only after keep_failed_s; live ones never."""
    cfg = RetentionConfig(keep_finished_s=DAY, keep_finished=2, keep_failed_s=10 * DAY)
    wss = [
        ws("n-1", "completed", 0.0, "n"),
        ws("n-2", "failed", 0.0, "n"),
        ws("n-3", "completed", 5.0, "n"),
        ws("n-4", "cancelled", 6.0, "n"),
        ws("solo", "merged", 1.0),
        ws("live", "running", 0.0, "n"),
    ]
    # At t=10 s only the count matters: n-3 and n-4 are the two newest finished runs of
    # n (the failed n-2 does not count, and is kept).
    assert due(wss, cfg, 10.0) == ["n-1"]
    # A day later every finished one but the failed is due by its age.
    assert due(wss, cfg, DAY + 6.0) == ["n-1", "n-3", "n-4", "solo"]
    assert due(wss, cfg, 10 * DAY) == ["n-1", "n-2", "n-3", "n-4", "solo"]
    assert next_due(wss, cfg) == DAY


def test_retirement_is_archive_then_record_then_files_and_memory_returns_to_baseline() -> None:
    """Thirty runs of a pipeline with keep_finished=2: each older run is archived (the
    document encoded in the step), then retired by one record, then its files dropped;
    the tasks, graph and runtime hold only the two kept runs, the run counter goes on, and
    replaying the log gives the live state."""
    rig = rig_with(keep_finished=2)
    base_tasks = len(rig.state.data.tasks)
    for _ in range(2):
        submit(rig)
        finish_all(rig)
    kept_tasks = len(rig.state.data.tasks)
    graph = rig.state.graph
    kept_sizes = (len(graph.dependents), len(graph.unmet), len(graph.ws_counts))
    for _ in range(28):
        submit(rig)
        finish_all(rig)
        rig.deliver()
    data = rig.state.data
    assert sorted(data.workstreams) == ["nightly-29", "nightly-30"]
    assert len(data.tasks) == kept_tasks == base_tasks + 6
    assert (len(graph.dependents), len(graph.unmet), len(graph.ws_counts)) == kept_sizes
    assert not graph.ready and not any(graph.holders.values())
    rt = rig.m.rt
    assert not rt._archiving and not rt._queued_at and not rt._backoff_until
    assert not rt._parked_on and not rt._blocked_ws
    assert rt.next_due() is None  # no timer of a retired task stays armed
    assert data.run_numbers == {"nightly": 30}
    assert submit(rig) == "nightly-31"
    # The order: the archive asked for, then (a later step) the record, then the files.
    kinds = [type(e).__name__ for e in rig.effects if isinstance(e, WriteArchive | DropFiles)]
    assert kinds[:2] == ["WriteArchive", "DropFiles"]
    retired = [r for r in rig.store.records if r.to == "retired"]
    assert [r.id for r in retired] == [f"nightly-{n}" for n in range(1, 29)]
    assert rig.dropped == [r.id for r in retired]
    doc = msgspec.json.decode(rig.archives["nightly-1"])
    assert doc["workstream"]["id"] == "nightly-1"
    assert [t["id"] for t in doc["tasks"]] == [
        "nightly-1/compile",
        "nightly-1/test",
        "nightly-1/package",
    ]
    assert all(t["attempts"] for t in doc["tasks"])
    replayed = State()
    for rec in rig.store.records:
        replayed.apply(rec)
    assert equal_states(replayed.data, rig.state.data)
    assert len(rig.events("workstream_retired")) == 28


def test_a_workstream_retried_while_its_archive_is_written_is_not_retired() -> None:
    """An operator's retry between the archive's request and its arrival cancels that
    retirement: the workstream runs again and stays live."""
    rig = rig_with(keep_finished=1)
    rig.hold_archived = True
    first = submit(rig)
    finish_all(rig)
    submit(rig)
    finish_all(rig)
    assert first in rig.archives  # asked for; its Archived is still held
    out = rig.run(ws_actions.ws_retry, p.WsRetryParams(workstream=first))
    assert not isinstance(out, Exception), out
    rig.step(rig.held)
    assert first in rig.state.data.workstreams
    assert rig.state.data.workstreams[first].state == "running"
    assert not [r for r in rig.store.records if r.to == "retired" and r.id == first]


def test_retire_by_hand_refuses_a_live_workstream_and_takes_a_failed_one() -> None:
    """`ws retire` of a running workstream is refused with what to do; a failed one
    (which retention would keep) is retired by hand, with cause operator."""
    rig = rig_with()
    live = submit(rig, 'name = "flaky"\n[[tasks]]\nid = "t"\ncommand = "false"\nmax_retries = 0\n')
    with pytest.raises(OperatorError, match="only a finished one") as err:
        out = rig.run(ws_actions.ws_retire, p.WsRetireParams(workstream=live))
        if isinstance(out, Exception):
            raise out
    assert err.value.code == "wrong_state"
    finish_all(rig, exit_code=1)
    assert rig.state.data.workstreams[live].state == "failed"
    rig.advance(1)
    assert live in rig.state.data.workstreams  # a failed run waits for an operator
    out = rig.run(ws_actions.ws_retire, p.WsRetireParams(workstream=live))
    assert out["archiving"] is True
    rig.deliver()
    assert live not in rig.state.data.workstreams
    (rec,) = [r for r in rig.store.records if r.to == "retired"]
    assert rec.cause == "operator" and rec.from_ == "failed"


def test_a_retirement_the_log_refuses_is_taken_back_whole() -> None:
    """The step that records a retirement fails to append: the workstream, its tasks and
    the graph are as before, and the retirement happens once the log takes writes."""
    rig = rig_with(keep_finished=1)
    rig.hold_archived = True
    first = submit(rig)
    finish_all(rig)
    submit(rig)
    finish_all(rig)
    rig.hold_archived = False
    before = msgspec.json.encode(rig.state.data)
    counts = {k: v for k, v in rig.state.graph.ws_counts[first].items() if v}
    rig.store.fail_next_writes(1)
    held, rig.held = rig.held, []
    step, _ = rig.step(held)
    assert step is None and rig.aborted == 1
    assert first in rig.state.data.workstreams
    assert {k: v for k, v in rig.state.graph.ws_counts[first].items() if v} == counts
    # Byte for byte: the dicts' order (the submission order) is restored too.
    assert msgspec.json.encode(rig.state.data) == before
    rig.deliver()  # the refused step's input is handled again
    assert first not in rig.state.data.workstreams


def test_disarmed_timers_leave_the_heap_long_before_they_would_fire() -> None:
    """A timeout disarmed when its attempt ends (10,000 of them, each 600 s away) does not
    stay in the timers' heap until its deadline; armed ones still fire."""
    timers = Timers()
    for i in range(10_000):
        timers.arm("timeout", f"t{i}", 600.0 + i)
        if i % 100:
            timers.disarm("timeout", f"t{i}")
    assert len(timers._heap) < 2 * 100 + 1024 + 1
    assert timers.next_due() == 600.0
    assert len(timers.pop_due(1e9)) == 100


def test_an_archive_that_cannot_be_written_leaves_the_run_live_and_is_tried_again_later() -> None:
    """A failed archive (a full disk) is an `archive_failed` event; the run stays live and
    its archive is not asked for again, whatever else happens, until RETRY_AFTER_S of
    wall time have passed; then it is retired."""
    rig = rig_with(keep_finished=1)
    rig.archive_error = "No space left on device"
    first = submit(rig)
    finish_all(rig)
    submit(rig)
    finish_all(rig)
    rig.deliver()
    assert first in rig.state.data.workstreams
    (ev,) = rig.events("archive_failed")
    assert ev.workstream_id == first and "No space left" in (ev.message or "")
    asked = sum(isinstance(e, WriteArchive) and e.workstream_id == first for e in rig.effects)
    submit(rig)  # more work, more steps: no new attempt at the archive yet
    finish_all(rig)
    rig.archive_error = None
    rig.advance(RETRY_AFTER_S / 2)
    again = sum(isinstance(e, WriteArchive) and e.workstream_id == first for e in rig.effects)
    assert again == asked
    rig.advance(RETRY_AFTER_S)
    rig.deliver()
    assert first not in rig.state.data.workstreams
