"""The offline `orchctl state …` helpers: validate, backups, restore, repair."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from test_store_log import Driver, build, line_starts

from supervisor.core.errors import StoreCorrupt, StoreLocked
from supervisor.core.model import equal_states
from supervisor.store.directory import (
    Store,
    list_backups,
    read_state,
    repair_state,
    restore_from_backup,
    restore_from_transitions,
    validate_state,
)


def _dir_with_history(d: Path) -> Driver:
    drv = build(d, n_tasks=2)
    drv.store.write_snapshot(drv.model)
    drv.run_task(drv.submit("ws-2", 1)[0])
    drv.store.write_snapshot(drv.model)
    drv.run_task(drv.submit("ws-3", 1)[0])
    drv.store.close()
    return drv


def test_validate_reports_nothing_on_a_healthy_dir(tmp_path: Path) -> None:
    """A consistent state directory validates clean."""
    _dir_with_history(tmp_path)
    assert validate_state(tmp_path) == []


def test_validate_names_each_problem(tmp_path: Path) -> None:
    """A torn tail, a garbled snapshot and a garbled backup are each reported."""
    _dir_with_history(tmp_path)
    with open(tmp_path / "transitions.jsonl", "ab") as f:
        f.write(b'{"seq":99,"ts"')
    cur = tmp_path / "current.json"
    cur.write_bytes(cur.read_bytes()[:-3])
    (backup,) = list_backups(tmp_path)
    backup.write_bytes(b"{}")
    problems = validate_state(tmp_path)
    assert len(problems) == 3, problems
    assert "torn write" in problems[0] and "orchctl state repair" in problems[0]
    assert "current.json is checksum mismatch" in problems[1]
    assert backup.name in problems[2]


def test_validate_reports_a_damaged_record_with_its_line(tmp_path: Path) -> None:
    """Damage inside the log is reported with the file and line."""
    _dir_with_history(tmp_path)
    log = tmp_path / "transitions.jsonl"
    data = bytearray(log.read_bytes())
    data[line_starts(bytes(data))[1] + 12] ^= 1
    log.write_bytes(bytes(data))
    (problem,) = [p for p in validate_state(tmp_path) if "line" in p]
    assert "transitions.jsonl: line 2" in problem


def test_offline_helpers_need_the_lock(tmp_path: Path) -> None:
    """While a daemon holds the directory, the changing helpers refuse to run."""
    store = Store(tmp_path, fsync=False)
    store.open()
    for helper in (validate_state, repair_state, restore_from_transitions, restore_from_backup):
        with pytest.raises(StoreLocked):
            helper(tmp_path)
    store.close()


def test_restore_from_backup_then_open_replays_the_tail(tmp_path: Path) -> None:
    """current.json made from the newest backup; the next open replays the log after it."""
    drv = _dir_with_history(tmp_path)
    (tmp_path / "current.json").write_bytes(b"garbage")
    msg = restore_from_backup(tmp_path, "latest")
    (backup,) = list_backups(tmp_path)
    assert backup.name in msg and "current.json.broken" in msg
    assert list(tmp_path.glob("current.json.broken.*"))
    store = Store(tmp_path, fsync=False)
    state = store.open()
    store.close()
    assert store.repairs == [] and equal_states(state.data, drv.model.data)


def test_restore_from_named_backup_keeps_the_current_one(tmp_path: Path) -> None:
    """Restoring a backup by name turns the valid current.json into a new backup."""
    drv = _dir_with_history(tmp_path)
    (backup,) = list_backups(tmp_path)
    restore_from_backup(tmp_path, backup.name)
    assert len(list_backups(tmp_path)) == 2
    snap = msgspec.json.decode((tmp_path / "current.json").read_bytes())
    assert snap["last_seq"] == msgspec.json.decode(backup.read_bytes())["last_seq"]
    assert equal_states(read_state(tmp_path).data, drv.model.data)


def test_restore_from_transitions_rebuilds_the_snapshot(tmp_path: Path) -> None:
    """A full replay writes a current.json covering the whole log."""
    drv = _dir_with_history(tmp_path)
    (tmp_path / "current.json").unlink()
    for b in list_backups(tmp_path):
        b.unlink()
    msg = restore_from_transitions(tmp_path)
    assert f"replaying {drv.model.last_seq} record(s)" in msg
    snap = msgspec.json.decode((tmp_path / "current.json").read_bytes())
    assert snap["last_seq"] == drv.model.last_seq
    assert equal_states(read_state(tmp_path).data, drv.model.data)


def test_repair_cuts_torn_tail_and_rebuilds_bad_snapshot(tmp_path: Path) -> None:
    """repair cuts a torn tail (kept aside) and regenerates a garbled snapshot."""
    drv = _dir_with_history(tmp_path)
    log = tmp_path / "transitions.jsonl"
    good = log.read_bytes()
    log.write_bytes(good + b"\0" * 100)
    cur = tmp_path / "current.json"
    cur.write_bytes(cur.read_bytes()[:10])
    done = repair_state(tmp_path)
    assert len(done) == 2 and "torn tail" in done[0] and "rebuilt current.json" in done[1]
    assert log.read_bytes() == good
    assert validate_state(tmp_path) == []
    assert equal_states(read_state(tmp_path).data, drv.model.data)
    assert repair_state(tmp_path) == []  # nothing left to do


def test_repair_rebuilds_a_snapshot_beyond_the_log(tmp_path: Path) -> None:
    """A snapshot ahead of the log is kept aside and rebuilt from the log."""
    drv = build(tmp_path, n_tasks=2)
    drv.store.close(drv.model)
    log = tmp_path / "transitions.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:-1]))
    done = repair_state(tmp_path)
    assert any("rebuilt current.json" in d for d in done)
    assert read_state(tmp_path).last_seq == drv.model.last_seq - 1


def test_repair_refuses_damage_inside_the_log(tmp_path: Path) -> None:
    """repair never drops good records: damage before the end is left to the operator."""
    _dir_with_history(tmp_path)
    log = tmp_path / "transitions.jsonl"
    data = bytearray(log.read_bytes())
    data[30] ^= 2
    log.write_bytes(bytes(data))
    with pytest.raises(StoreCorrupt, match="line 1"):
        repair_state(tmp_path)
    assert log.read_bytes() == bytes(data)


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_dry_runs_change_no_file_and_announce_what_the_real_runs_do(tmp_path: Path) -> None:
    """repair and restore with dry_run decide as the real runs (the same steps, named the
    same way) and leave every file as it was."""
    _dir_with_history(tmp_path)
    with open(tmp_path / "transitions.jsonl", "ab") as f:
        f.write(b'{"seq":99,"ts"')
    (tmp_path / "events.jsonl").write_bytes(b'{"event":"x"}\n{"ev')
    cur = tmp_path / "current.json"
    cur.write_bytes(cur.read_bytes()[:10])
    before = _files(tmp_path)
    plan = repair_state(tmp_path, dry_run=True)
    assert _files(tmp_path) == before
    assert [p.split()[0] for p in plan] == ["cut", "rebuild", "cut"], plan
    assert "is kept aside as current.json.broken." in plan[1]
    done = repair_state(tmp_path)
    assert [d.split()[0] for d in done] == ["cut", "rebuilt", "cut"], done
    before = _files(tmp_path)
    (backup,) = list_backups(tmp_path)[-1:]
    said = restore_from_backup(tmp_path, backup.name, dry_run=True)
    assert said.startswith(f"restore current.json from {backup.name}")
    assert "the present current.json is kept as backups/" in said
    said = restore_from_transitions(tmp_path, dry_run=True)
    assert said.startswith("rebuild current.json by replaying")
    assert _files(tmp_path) == before
