"""Replay refuses, never crashes: a checksummed record that cannot be performed, or that
names what does not exist, is StoreCorrupt naming the file, the line and the command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from supervisor.core.errors import StoreCorrupt
from supervisor.core.model import Transition
from supervisor.store.directory import Store, validate_state
from supervisor.store.logfile import seal
from supervisor.store.snapshot import SnapshotFile
from tests.harness import Daemon

TS = 1_700_000_000.0


def rec(seq: int, entity: Any, id_: str, from_: str | None, to: str, **changes: Any) -> Transition:
    """A record as the daemon writes it."""
    cause: Any = "submit" if entity == "workstream" and from_ is None else "auto"
    return Transition(
        seq=seq,
        ts=TS + seq,
        entity=entity,
        id=id_,
        from_=from_,
        to=to,
        cause=cause,
        changes=changes,
    )


def good_records() -> list[Transition]:
    """Six consistent records: a resource, a worker, a workstream of two tasks, one running."""
    tasks = [
        {"id": "a", "workstream_id": "ws", "command": ["true"], "resources": ["repo"]},
        {"id": "b", "workstream_id": "ws", "command": ["true"], "depends_on": ["a"], "order": 1},
    ]
    attempt = {"attempt_id": "a.1", "number": 1, "worker_id": "w-1", "started_at": TS}
    return [
        rec(1, "resource", "repo", None, "defined", max_holders=1),
        rec(2, "worker", "w-1", None, "starting", pid=100),
        rec(3, "worker", "w-1", "starting", "idle"),
        rec(4, "workstream", "ws", None, "pending", workstream={"id": "ws"}, tasks=tasks),
        rec(5, "task", "a", "pending", "queued", queued_at=TS),
        rec(6, "task", "a", "queued", "running", worker_id="w-1", attempt=attempt),
    ]


def write_log(d: Path, recs: list[Transition]) -> Path:
    """transitions.jsonl in `d` holding `recs` as sealed lines."""
    d.mkdir(parents=True, exist_ok=True)
    log = d / "transitions.jsonl"
    log.write_bytes(b"".join(seal(msgspec.json.encode(r)) for r in recs))
    return log


# Each bad 7th record, and what the refusal says about it.
BAD: dict[str, tuple[Transition, str]] = {
    "attempt_id_of_wrong_type": (
        rec(7, "task", "a", "running", "running", attempt_update={}, attempt={"attempt_id": 5}),
        "ValidationError",
    ),
    "creation_task_without_id": (
        rec(
            7,
            "workstream",
            "ws2",
            None,
            "pending",
            workstream={"id": "ws2"},
            tasks=[{"workstream_id": "ws2"}],
        ),
        "KeyError",
    ),
    "creation_task_not_an_object": (
        rec(7, "workstream", "ws2", None, "pending", workstream={"id": "ws2"}, tasks=[5]),
        "TypeError",
    ),
    "attempt_update_not_an_object": (
        rec(7, "task", "a", "running", "running", attempt_update=5),
        "AttributeError",
    ),
    "depends_on_unknown_task": (
        rec(7, "task", "b", "pending", "pending", depends_on=["a", "no-such-task"]),
        "depends on unknown task 'no-such-task'",
    ),
    "depends_on_a_string": (
        rec(7, "task", "b", "pending", "pending", depends_on="a"),
        "not a list of task ids",
    ),
    "created_task_depends_on_unknown_task": (
        rec(
            7,
            "workstream",
            "ws2",
            None,
            "pending",
            workstream={"id": "ws2"},
            tasks=[{"id": "c", "workstream_id": "ws2", "command": "x", "depends_on": ["zz"]}],
        ),
        "depends on unknown task 'zz'",
    ),
    "created_task_of_another_workstream": (
        rec(
            7,
            "workstream",
            "ws2",
            None,
            "pending",
            workstream={"id": "ws2"},
            tasks=[{"id": "c", "workstream_id": "ws", "command": "x"}],
        ),
        "says it belongs to 'ws'",
    ),
    "creation_under_another_id": (
        rec(7, "workstream", "ws2", None, "pending", workstream={"id": "ws3"}, tasks=[]),
        "creates workstream 'ws3', not 'ws2'",
    ),
    "task_uses_unknown_resource": (
        rec(7, "task", "b", "pending", "pending", resources=["gpu"]),
        "unknown resource 'gpu'",
    ),
    "task_given_unknown_worker": (
        rec(7, "task", "a", "running", "running", worker_id="w-9"),
        "unknown worker 'w-9'",
    ),
    "created_task_uses_unknown_resource": (
        rec(
            7,
            "workstream",
            "ws2",
            None,
            "pending",
            workstream={"id": "ws2"},
            tasks=[{"id": "c", "workstream_id": "ws2", "command": "x", "resources": ["gpu"]}],
        ),
        "unknown resource 'gpu'",
    ),
    "worker_given_unknown_task": (
        rec(7, "worker", "w-1", "idle", "busy", task_id="ghost", attempt_id="ghost.1"),
        "unknown task 'ghost'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_unappliable_record_is_store_corrupt_naming_line(tmp_path: Path, case: str) -> None:
    """A sealed record that cannot be applied raises StoreCorrupt with file, line and hint,
    and `orchctl state validate` reports the same line."""
    bad, why = BAD[case]
    log = write_log(tmp_path, [*good_records(), bad])
    before = log.read_bytes()
    with pytest.raises(StoreCorrupt) as info:
        Store(tmp_path, fsync=False).open()
    msg = str(info.value)
    assert info.value.line == 7 and info.value.path == str(log)
    assert f"{log}: line 7: record cannot be replayed" in msg and why in msg
    assert "orchctl state validate" in msg and "orchctl state repair" in msg
    assert log.read_bytes() == before  # a good checksum is not a torn tail: nothing cut
    problems = validate_state(tmp_path)
    assert any("line 7" in p and why in p for p in problems), problems


def test_good_records_replay_cleanly(tmp_path: Path) -> None:
    """The consistent records the cases above build on load without a complaint."""
    write_log(tmp_path, good_records())
    store = Store(tmp_path, fsync=False)
    state = store.open()
    store.close(state)
    assert state.last_seq == 6 and state.data.tasks["a"].worker_id == "w-1"
    assert not store.repairs and validate_state(tmp_path) == []


def _dangle_snapshot(path: Path) -> None:
    """Rewrite a snapshot, properly sealed, with task b depending on a task that is not."""
    snap = msgspec.json.decode(path.read_bytes(), type=SnapshotFile)
    snap.tasks["b"].depends_on = ["a", "ghost"]
    path.write_bytes(seal(msgspec.json.encode(snap)))


@pytest.mark.parametrize("with_backup", [True, False])
def test_snapshot_with_dangling_reference_is_not_trusted(tmp_path: Path, with_backup: bool) -> None:
    """A sealed snapshot naming a missing task is passed over like a damaged one: the load
    falls back to a backup (or the full log) and says so in a repair message."""
    write_log(tmp_path, good_records()[:4])
    store = Store(tmp_path, fsync=False)
    state = store.open()
    store.write_snapshot(state)
    for r in good_records()[4:]:
        store.write(r)
        state.apply(r)
    if with_backup:
        store.write_snapshot(state)  # the first snapshot becomes a backup
    store.close()
    _dangle_snapshot(tmp_path / "current.json")
    store = Store(tmp_path, fsync=False)
    loaded = store.open()
    store.close()
    assert loaded.data.tasks["b"].depends_on == ["a"] and loaded.last_seq == 6
    (repair,) = store.repairs
    assert "current.json is inconsistent (task 'b' depends on unknown task 'ghost')" in repair
    if with_backup:
        assert "loaded backups/current_" in repair
    else:
        assert "replaying the whole log" in repair
    assert any("current.json is inconsistent" in p for p in validate_state(tmp_path))


@pytest.mark.parametrize("case", ["attempt_id_of_wrong_type", "depends_on_unknown_task"])
def test_daemon_exits_65_on_unappliable_record(tmp_path: Path, case: str) -> None:
    """The real orchd on a log whose last record cannot be replayed exits 65 (no traceback)
    naming the file, the line and the orchctl command to run."""
    d = Daemon(tmp_path)
    log = write_log(d.state_dir, [*good_records(), BAD[case][0]])
    r = subprocess.run(
        [sys.executable, "-m", "supervisor", "--config", str(d.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert r.returncode == 65, r.stderr
    assert f"{log}: line 7" in r.stderr and "orchctl state validate" in r.stderr
    assert BAD[case][1] in r.stderr and "Traceback" not in r.stderr
