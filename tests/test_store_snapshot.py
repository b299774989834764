"""Snapshots, backups, checkpoints and the side files of the state directory."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from test_store_log import Driver, build

from supervisor.core.errors import StoreCorrupt
from supervisor.core.model import Event, State, equal_states
from supervisor.store.directory import Store, list_backups, read_state
from supervisor.store.logfile import is_sealed


def test_open_creates_the_layout(tmp_path: Path) -> None:
    """A new state directory gets its sub-directories and an empty log."""
    d = tmp_path / "state"
    store = Store(d, fsync=True)
    state = store.open()
    store.close()
    assert state.last_seq == 0 and store.repairs == []
    for sub in ("backups", "checkpoints", "archive", "logs", "logs/workers"):
        assert (d / sub).is_dir()
    assert (d / "transitions.jsonl").read_bytes() == b""


def test_snapshot_plus_tail_equals_full_replay(tmp_path: Path) -> None:
    """A reopen from a snapshot and the records after it equals the model and a full replay."""
    drv = build(tmp_path, n_tasks=4)
    path = drv.store.write_snapshot(drv.model)
    assert path == tmp_path / "current.json" and is_sealed(path.read_bytes())
    for tid in drv.submit("ws-2", 3):
        drv.run_task(tid)
    drv.store.close()
    store = Store(tmp_path, fsync=False)
    state = store.open()
    store.close()
    assert store.repairs == []
    assert equal_states(state.data, drv.model.data)
    assert equal_states(read_state(tmp_path, full=True).data, drv.model.data)
    assert list(state.graph.unmet) == list(drv.model.graph.unmet)


def test_close_with_state_writes_final_snapshot(tmp_path: Path) -> None:
    """close(state) leaves a snapshot covering every record."""
    drv = build(tmp_path)
    drv.store.close(drv.model)
    snap = msgspec.json.decode((tmp_path / "current.json").read_bytes())
    assert snap["last_seq"] == drv.model.last_seq and snap["log_offset"] > 0


def _with_backups(d: Path) -> Driver:
    drv = build(d, n_tasks=2)
    drv.store.write_snapshot(drv.model)
    drv.run_task(drv.submit("ws-2", 1)[0])
    drv.store.write_snapshot(drv.model)  # the first one becomes a backup
    drv.run_task(drv.submit("ws-3", 1)[0])
    drv.store.close()
    return drv


@pytest.mark.parametrize("damage", ["truncated", "garbled", "missing", "empty"])
def test_bad_snapshot_recovers_from_newest_backup_and_replay(tmp_path: Path, damage: str) -> None:
    """A truncated, garbled, empty or missing current.json: newest valid backup + the log."""
    drv = _with_backups(tmp_path)
    cur = tmp_path / "current.json"
    data = cur.read_bytes()
    if damage == "truncated":
        cur.write_bytes(data[: len(data) // 2])
    elif damage == "garbled":
        cur.write_bytes(data[:40] + b"X" + data[41:])
    elif damage == "missing":
        cur.unlink()
    else:
        cur.write_bytes(b"")
    store = Store(tmp_path, fsync=False)
    state = store.open()
    store.close()
    assert equal_states(state.data, drv.model.data)
    (backup,) = list_backups(tmp_path)
    assert any(f"loaded backups/{backup.name}" in r for r in store.repairs), store.repairs


def test_bad_snapshot_and_no_valid_backup_recovers_from_full_log(tmp_path: Path) -> None:
    """With current.json and every backup damaged, the whole log is replayed."""
    drv = _with_backups(tmp_path)
    for p in [tmp_path / "current.json", *list_backups(tmp_path)]:
        p.write_bytes(p.read_bytes()[:-5])
    store = Store(tmp_path, fsync=False)
    state = store.open()
    store.close()
    assert equal_states(state.data, drv.model.data)
    assert any("replaying the whole log" in r for r in store.repairs)


def test_snapshot_beyond_the_log_is_refused(tmp_path: Path) -> None:
    """A snapshot that covers records the log no longer has raises StoreCorrupt."""
    drv = build(tmp_path, n_tasks=2)
    drv.store.close(drv.model)
    log = tmp_path / "transitions.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:-2]))
    with pytest.raises(StoreCorrupt, match="snapshot covers records up to"):
        Store(tmp_path, fsync=False).open()


def test_101_snapshots_leave_exactly_100_backups(tmp_path: Path) -> None:
    """With every backup a full copy (backups_full = backups_keep), backups are pruned to
    the newest 100, with unique names even within one second."""
    store = Store(tmp_path, fsync=False, backups_full=100)
    drv = Driver(store, store.open())
    seen: set[str] = set()
    for i in range(103):
        drv.do("resource", f"r{i}", "defined", "config", max_holders=1)
        store.write_snapshot(drv.model)
        seen.update(p.name for p in list_backups(tmp_path))
        if i == 100:
            backups = list_backups(tmp_path)
            assert len(backups) == 100 and len(seen) == 100  # 101 snapshots, 100 distinct backups
    backups = list_backups(tmp_path)
    assert len(backups) == 100 and len(seen) == 102
    seqs = [msgspec.json.decode(p.read_bytes())["last_seq"] for p in backups]
    assert seqs == list(range(3, 103))  # oldest first; the two oldest were pruned
    store.close()


def test_checkpoint_content_and_pruning(tmp_path: Path) -> None:
    """A checkpoint lists tasks by state, resources held, and per-task detail; old ones go."""
    store = Store(tmp_path, fsync=False, checkpoints_keep=3)
    drv = Driver(store, store.open())
    tasks = [
        {"id": "a", "workstream_id": "ws", "command": "true"},
        {"id": "b", "workstream_id": "ws", "command": "true", "resources": ["repo"]},
        {"id": "c", "workstream_id": "ws", "command": "true", "depends_on": ["a"]},
    ]
    drv.do("workstream", "ws", "pending", "submit", workstream={"id": "ws"}, tasks=tasks)
    seqs = []
    drv.run_task("a")
    seqs.append(drv.model.last_seq)
    store.write_checkpoint("ws", drv.model)
    drv.do("task", "b", "queued")
    attempt = {"attempt_id": "b-1", "number": 1, "worker_id": "w", "started_at": 1.0}
    drv.do("task", "b", "running", worker_id="w", attempt=attempt)
    for _ in range(3):
        seqs.append(drv.model.last_seq)
        store.write_checkpoint("ws", drv.model)
        drv.do("resource", f"r{len(seqs)}", "defined", "config")
    assert store.list_checkpoints("ws") == seqs[-3:]
    doc = store.read_checkpoint("ws", "latest")
    assert doc == store.read_checkpoint("ws", seqs[-1])
    assert doc["workstream_id"] == "ws" and doc["seq"] == seqs[-1]
    assert doc["checkpoint_at"].endswith("Z") and doc["state"] == "pending"
    assert doc["completed_tasks"] == ["a"] and doc["failed_tasks"] == []
    assert doc["pending_tasks"] == ["b", "c"] and doc["running_tasks"] == ["b"]
    assert doc["resources_held"] == {"repo": ["b"]}
    assert doc["tasks"]["c"] == {
        "state": "pending", "retry_count": 0, "timeout_s": 600.0, "max_retries": 3,
        "depends_on": ["a"], "skipped": False,
    }  # fmt: skip
    store.close()


def test_damaged_checkpoint_is_reported(tmp_path: Path) -> None:
    """Reading a garbled checkpoint raises StoreCorrupt instead of returning bad data."""
    drv = build(tmp_path, n_tasks=1)
    path = drv.store.write_checkpoint("ws-1", drv.model)
    path.write_bytes(path.read_bytes().replace(b"completed", b"c0mpleted", 1))
    with pytest.raises(StoreCorrupt, match="checksum"):
        drv.store.read_checkpoint("ws-1", drv.model.last_seq)
    drv.store.close()


def test_events_are_appended_and_read_back_after_a_line(tmp_path: Path) -> None:
    """events.jsonl gets one JSON line per event; read_events skips the first N lines."""
    store = Store(tmp_path, fsync=False)
    store.open()
    for i in range(5):
        store.append_event(
            Event(event="task_timeout", severity="warning", ts=float(i), task_id=f"t{i}")
        )
    assert [e.task_id for e in store.read_events()] == ["t0", "t1", "t2", "t3", "t4"]
    assert [e.task_id for e in store.read_events(after_line=3)] == ["t3", "t4"]
    store.close()
    with open(tmp_path / "events.jsonl", "ab") as f:
        f.write(b'{"event":"half')  # a crash mid-line
    store = Store(tmp_path, fsync=False)
    store.open()
    store.append_event(Event(event="recovered", severity="info", ts=9.0))
    events, nxt = store.read_events_from(4)
    assert [e.event for e in events] == ["task_timeout", "recovered"] and nxt == 6
    store.close()


def test_interventions_and_json_files(tmp_path: Path) -> None:
    """Interventions are JSON lines; write_json replaces a file atomically inside the dir."""
    store = Store(tmp_path, fsync=False)
    store.open()
    store.append_intervention({"action": "skip", "uid": 1000, "reason": "flaky"})
    store.write_json("metrics.json", {"tasks": {"completed": 3}})
    store.write_json("archive/ws-1.json", State().data)
    with pytest.raises(ValueError):
        store.write_json("../escape.json", {})
    store.close()
    line = (tmp_path / "interventions.log").read_bytes()
    assert msgspec.json.decode(line) == {"action": "skip", "uid": 1000, "reason": "flaky"}
    assert msgspec.json.decode((tmp_path / "metrics.json").read_bytes()) == {
        "tasks": {"completed": 3}
    }
    assert msgspec.json.decode((tmp_path / "archive/ws-1.json").read_bytes())["last_seq"] == 0
    assert not list(tmp_path.glob("**/*.tmp"))


def test_stale_temp_files_are_removed_on_open(tmp_path: Path) -> None:
    """A temp file left by a crash mid-replace is removed; the real file is untouched."""
    drv = build(tmp_path, n_tasks=1)
    drv.store.close(drv.model)
    (tmp_path / "current.json.123.tmp").write_bytes(b"partial")
    (tmp_path / "checkpoints" / "ws-1_9.json.55.tmp").write_bytes(b"partial")
    store = Store(tmp_path, fsync=False)
    state = store.open()
    store.close()
    assert not list(tmp_path.glob("**/*.tmp"))
    assert equal_states(state.data, drv.model.data) and store.repairs == []
