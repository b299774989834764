"""The log as segments: sealing, start-up from the snapshot's segment, compaction, and the
backups (full copies and restore points) that each stay restorable."""

from __future__ import annotations

import itertools
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest
from test_store_log import Driver, build

from supervisor.core.errors import StoreCorrupt
from supervisor.core.model import State, StateData, Transition, equal_states
from supervisor.store.backups import is_point, list_kinds
from supervisor.store.directory import Store, list_backups, read_state
from supervisor.store.logfile import seal
from supervisor.store.maintenance import (
    repair_state,
    restore_from_backup,
    restore_from_transitions,
    validate_state,
)
from supervisor.store.segments import log_chain, sealed_segments
from supervisor.store.snapshot import read_snapshot, snapshot_state

SMALL = 4096


def _copy(data: StateData) -> StateData:
    return msgspec.json.decode(msgspec.json.encode(data), type=StateData)


def _work(drv: Driver, ws: str, n: int = 4) -> None:
    for tid in drv.submit(ws, n):
        drv.run_task(tid)


def _history(d: Path, rounds: int, **kw: int) -> tuple[Driver, dict[int, StateData]]:
    """A store in `d` that ran `rounds` workstreams, a snapshot after each; the model's
    state at each snapshot, by seq."""
    store = Store(d, fsync=False, segment_bytes=SMALL, **kw)
    drv = Driver(store, store.open())
    at: dict[int, StateData] = {}
    for r in range(rounds):
        _work(drv, f"ws-{r}")
        store.write_snapshot(drv.model)
        at[drv.model.last_seq] = _copy(drv.model.data)
    return drv, at


def test_the_log_is_sealed_into_segments_named_by_their_records(tmp_path: Path) -> None:
    """Past segment_bytes the active file is sealed as segments/<first>-<last>.jsonl; the
    chain of names has no hole and a reopen (or a full replay) gives the model back."""
    drv = build(tmp_path, 60, segment_bytes=SMALL)
    drv.store.close()
    sealed = sealed_segments(tmp_path)
    assert len(sealed) >= 5
    assert sealed[0].first == 1
    for a, b in itertools.pairwise(sealed):
        assert a.last is not None and b.first == a.last + 1
        assert a.path.stat().st_size >= SMALL
    last = sealed[-1].last
    assert last is not None
    active = (tmp_path / "transitions.jsonl").read_bytes().splitlines()
    assert active[0].startswith(b'{"seq":%d,' % (last + 1))
    assert equal_states(read_state(tmp_path, full=True).data, drv.model.data)
    store = Store(tmp_path, fsync=False, segment_bytes=SMALL)
    assert equal_states(store.open().data, drv.model.data) and store.repairs == []
    store.close()


def test_start_up_reads_only_the_segments_after_the_snapshot(tmp_path: Path) -> None:
    """A segment the snapshot covers is not read at start-up (garbling it changes nothing),
    while validate, which replays what the backups need, finds the damage."""
    drv, _ = _history(tmp_path, 6)
    current = read_snapshot(tmp_path / "current.json")
    assert not isinstance(current, str)
    covered = [s for s in sealed_segments(tmp_path) if s.last and s.last < current.last_seq]
    assert covered, "a sealed segment older than the snapshot is kept for the backups"
    seg = covered[-1].path
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0x20
    seg.write_bytes(bytes(data))
    drv.store.close()
    store = Store(tmp_path, fsync=False, segment_bytes=SMALL)
    assert equal_states(store.open().data, drv.model.data) and store.repairs == []
    store.close()
    problems = validate_state(tmp_path)
    assert any(seg.name in p and "line" in p for p in problems), problems


def test_a_state_directory_of_one_log_file_opens_unchanged(tmp_path: Path) -> None:
    """A directory written before segments (one transitions.jsonl, a snapshot with no
    log_first) opens as it is, with nothing to repair, and is sealed from then on."""
    drv = build(tmp_path, 30, segment_bytes=0)
    drv.store.write_snapshot(drv.model)
    drv.store.close()
    cur = tmp_path / "current.json"
    doc = msgspec.json.decode(cur.read_bytes())
    doc.pop("crc"), doc.pop("log_first")
    cur.write_bytes(seal(msgspec.json.encode(doc)))
    log_before = (tmp_path / "transitions.jsonl").read_bytes()
    assert sealed_segments(tmp_path) == []
    store = Store(tmp_path, fsync=False, segment_bytes=SMALL)
    drv = Driver(store, store.open())
    assert store.repairs == []
    kept = b"".join(s.path.read_bytes() for s in log_chain(tmp_path))
    assert kept == log_before  # sealed at the first sync, perhaps, but not one byte changed
    _work(drv, "ws-2")
    store.close()
    (first, *_) = sealed_segments(tmp_path)
    assert first.first == 1 and first.path.read_bytes().startswith(log_before)
    assert validate_state(tmp_path) == []
    assert equal_states(read_state(tmp_path).data, drv.model.data)


def test_compaction_keeps_every_listed_backup_restorable(tmp_path: Path) -> None:
    """With backups_keep = 6 and backups_full = 2: few full copies, old segments deleted,
    and each listed backup, full or point, restores to the state at its record."""
    drv, at = _history(tmp_path / "d", 20, backups_keep=6, backups_full=2)
    drv.store.close()
    d = tmp_path / "d"
    kinds = list_kinds(d / "backups")
    assert 6 <= len(kinds) <= 7
    assert kinds[0].full and sum(b.full for b in kinds) <= 3
    assert any(is_point(b.path) for b in kinds)
    assert log_chain(d)[0].first > 1, "segments before the oldest full backup are deleted"
    assert validate_state(d) == []
    for b in list_backups(d):
        copy = tmp_path / f"c-{b.name}"
        shutil.copytree(d, copy)
        said = restore_from_backup(copy, b.name)
        snap = read_snapshot(copy / "current.json")
        assert not isinstance(snap, str)
        assert equal_states(snapshot_state(snap), at[snap.last_seq]), said
        assert f"(record {snap.last_seq})" in said
        assert validate_state(copy) == []
        assert equal_states(read_state(copy).data, drv.model.data)


def test_restore_from_transitions_after_compaction_says_where_it_starts(tmp_path: Path) -> None:
    """After compaction a full replay starts from the oldest full backup and says so."""
    drv, _ = _history(tmp_path, 12, backups_keep=4, backups_full=2)
    drv.store.close()
    (tmp_path / "current.json").unlink()
    oldest = list_kinds(tmp_path / "backups")[0]
    assert oldest.full and oldest.seq is not None
    said = restore_from_transitions(tmp_path)
    assert f"from record {oldest.seq + 1} to {drv.model.last_seq}" in said, said
    assert f"onto backups/{oldest.path.name}" in said
    assert equal_states(read_state(tmp_path).data, drv.model.data)
    assert validate_state(tmp_path) == []


def test_a_full_replay_without_the_backup_it_needs_is_refused(tmp_path: Path) -> None:
    """When the kept log starts after record 1 and no full backup reaches it, a full
    replay says which records are gone and what to run instead."""
    drv, _ = _history(tmp_path, 8, backups_keep=2, backups_full=1)
    drv.store.close()
    for b in list_backups(tmp_path):
        b.unlink()
    with pytest.raises(StoreCorrupt, match="no valid full backup covers"):
        restore_from_transitions(tmp_path)


def test_a_segment_that_ends_early_sets_the_files_after_it_aside(tmp_path: Path) -> None:
    """A power loss can take the end of a sealed segment while the next file's records
    (never acknowledged) reached the disk: they are kept aside, the chain is mended."""
    drv = build(tmp_path, 40, segment_bytes=SMALL)
    drv.store.close()
    seg = sealed_segments(tmp_path)[-1]
    assert seg.last is not None
    lines = seg.path.read_bytes().splitlines(keepends=True)
    seg.path.write_bytes(b"".join(lines[:-2]))
    active = (tmp_path / "transitions.jsonl").read_bytes()
    store = Store(tmp_path, fsync=False, segment_bytes=SMALL)
    state = store.open()
    assert state.last_seq == seg.last - 2
    assert any("transitions.jsonl follows records" in r for r in store.repairs), store.repairs
    (aside,) = tmp_path.glob("transitions.jsonl.broken.*")
    assert aside.read_bytes() == active
    assert sealed_segments(tmp_path)[-1].last == seg.last - 2
    store.close(state)
    assert validate_state(tmp_path) == []


def _rec(model: State, seq: int, i: int) -> Transition:
    return Transition(
        seq=seq,
        ts=1_700_000_000.0 + seq,
        entity="resource",
        id=f"r{i}",
        from_=model.current("resource", f"r{i}"),
        to="defined",
        cause="config",
        changes={"max_holders": 1 + i},
    )


def test_appends_syncs_and_installs_in_three_threads_lose_nothing(tmp_path: Path) -> None:
    """The loop's appends, a commit thread's syncs (which seal segments) and a worker
    thread's snapshot installs (which compact) run at once: nothing is lost or torn."""
    store = Store(tmp_path, fsync=True, segment_bytes=SMALL, backups_keep=4, backups_full=2)
    model = store.open()
    stop = threading.Event()
    blobs: queue.Queue[object] = queue.Queue()
    errors: list[BaseException] = []

    def syncer() -> None:
        try:
            while not stop.is_set():
                store.sync()
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    def installer() -> None:
        try:
            while (blob := blobs.get()) is not None:
                store.install_snapshot(blob)  # type: ignore[arg-type]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=syncer), threading.Thread(target=installer)]
    for t in threads:
        t.start()
    try:
        for n in range(3000):
            rec = _rec(model, model.last_seq + 1, n % 50)
            model.check(rec)
            store.write_batch([rec])
            model.apply(rec)
            if n % 300 == 299:
                blobs.put(store.snapshot_blob(model))
                # As the engine waits on its syncs now and then (to release effects).
                while store.synced_seq < model.last_seq and not errors:
                    time.sleep(0.001)
    finally:
        blobs.put(None)
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    store.close()
    assert len(sealed_segments(tmp_path)) >= 2 and log_chain(tmp_path)[0].first > 1
    reopened = Store(tmp_path, fsync=False, segment_bytes=SMALL)
    assert equal_states(reopened.open().data, model.data) and reopened.repairs == []
    reopened.close()
    assert validate_state(tmp_path) == []


def test_repair_mends_a_torn_active_file_and_a_bad_snapshot_over_segments(
    tmp_path: Path,
) -> None:
    """repair cuts a torn tail off the active file and rebuilds a damaged current.json
    from the segments kept; validate is clean afterwards."""
    drv, _ = _history(tmp_path, 6)
    drv.store.close()
    with open(tmp_path / "transitions.jsonl", "ab") as f:
        f.write(b'{"seq":99999,"ts":1.0,"entity":"ta')
    cur = tmp_path / "current.json"
    cur.write_bytes(cur.read_bytes()[:20])
    assert validate_state(tmp_path) != []
    done = repair_state(tmp_path)
    assert any("cut the torn tail of transitions.jsonl" in x for x in done), done
    assert any("rebuilt current.json" in x for x in done), done
    assert validate_state(tmp_path) == []
    assert equal_states(read_state(tmp_path).data, drv.model.data)


def test_orchctl_lists_and_restores_a_restore_point(tmp_path: Path) -> None:
    """The real orchctl lists restore points with the full copies and restores one."""
    drv, at = _history(tmp_path, 8, backups_keep=4, backups_full=2)
    drv.store.close()
    listed = _orchctl("state", "backups", "--state-dir", str(tmp_path))
    assert listed.returncode == 0, listed.stderr
    points = [line for line in listed.stdout.splitlines() if line.endswith(".point.json")]
    assert points and len(listed.stdout.splitlines()) >= 4
    name = Path(points[0]).name
    r = _orchctl("state", "restore", "--from-backup", name, "--state-dir", str(tmp_path), "--yes")
    assert r.returncode == 0, r.stderr
    snap = read_snapshot(tmp_path / "current.json")
    assert not isinstance(snap, str) and f"{name} (record {snap.last_seq})" in r.stdout
    assert equal_states(snapshot_state(snap), at[snap.last_seq])


def _orchctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ctl", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
