"""Offline maintenance of a state directory, for `orchctl state …` with the daemon stopped:
validate, list backups, restore from a backup or from the log, repair.

Each helper takes the directory's lock first, so it cannot run beside a live daemon. None
deletes a good record: damaged files are kept aside (`*.broken.<time>`), never removed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from supervisor.core.errors import StoreCorrupt
from supervisor.core.model import State, Transition, equal_states
from supervisor.store.backups import list_kinds, read_point
from supervisor.store.files import (
    SNAPSHOT_NAME,
    TMP_SUFFIX,
    cut_torn_text,
    list_backup_files,
    lock_dir,
    next_backup_path,
    utc_stamp,
    write_atomic,
)
from supervisor.store.logfile import SEGMENTS_DIR, is_sealed
from supervisor.store.references import check_record, checked_apply
from supervisor.store.segments import LogScan, Segment, log_chain, scan_chain, settle
from supervisor.store.snapshot import (
    Loaded,
    SnapshotFile,
    encode_snapshot,
    gc_paused,
    load,
    read_snapshot,
    replay_base,
    snapshot_state,
)


@contextmanager
def _locked(state_dir: str | Path) -> Iterator[Path]:
    d = Path(state_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is not a state directory")
    fd = lock_dir(d)
    try:
        yield d
    finally:
        os.close(fd)


def _log_end(d: Path) -> LogScan:
    """Check every line of the kept log (checksum, seq) without decoding; raises
    StoreCorrupt."""
    chain = log_chain(d)
    return scan_chain(d, chain, seq=chain[0].first - 1 if chain else 0, apply_after=_NEVER)


def _position(loaded: Loaded) -> dict[str, int | None]:
    """Where a snapshot of `loaded.state` ends in the log, when that is the active file."""
    tail = loaded.log.tail
    if tail is None or tail.last is not None:
        return {"log_offset": None, "log_crc": None, "log_first": None}
    return {"log_offset": loaded.scan.end, "log_crc": loaded.scan.crc, "log_first": tail.first}


def _replace_snapshot(d: Path, data: bytes, *, fsync: bool = True, dry_run: bool = False) -> str:
    """Install `data` as current.json; a valid old one becomes a backup, a bad one is kept
    aside as current.json.broken.<time>. Says what happened (with `dry_run`: what would
    happen, and nothing is done) to the old one."""
    cur = d / SNAPSHOT_NAME
    old = read_snapshot(cur)
    keep: Path | None = None
    note = "there is no current.json now" if dry_run else "there was no current.json"
    if not isinstance(old, str):
        existing = list_backup_files(d / "backups")
        keep = next_backup_path(d / "backups", existing[-1] if existing else None)
        verb = "is kept" if dry_run else "was kept"
        note = (
            f"the {'present' if dry_run else 'previous'} current.json {verb} as backups/{keep.name}"
        )
    elif old != "missing":
        aside = d / f"{SNAPSHOT_NAME}.broken.{utc_stamp()}"
        if dry_run:
            return f"the damaged current.json ({old}) is kept aside as {aside.name}"
        os.replace(cur, aside)
        note = f"the damaged current.json ({old}) was kept as {aside.name}"
    if not dry_run:
        write_atomic(cur, data, fsync=fsync, keep_as=keep)
    return note


def validate_state(state_dir: str | Path) -> list[str]:
    """Every problem found in the state directory (empty when all is well)."""
    with _locked(state_dir) as d:
        return _problems(d, live=False)[0]


def validate_live(state_dir: str | Path) -> list[str]:
    """`validate_state` on the directory of the running daemon that calls it (from a worker
    thread, without its lock). The daemon only appends to the log and replaces the other
    files whole, so the files are read in an order that stays consistent while it writes:
    snapshot, backups and checkpoints first, the log last (it holds at least every record
    they cover); a last line still being appended is not a torn write. A segment sealed
    or compacted away at any point of the check (the backups it listed may have been
    pruned with it) makes the check start again (three times at most)."""
    d = Path(state_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is not a state directory")
    problems: list[str] = []
    for _ in range(3):
        before = _chain_or_none(d)
        problems, chain = _problems(d, live=True)
        if before == chain == _chain_or_none(d):
            break
    return problems


def _chain_or_none(d: Path) -> list[Segment] | None:
    try:
        return log_chain(d)
    except StoreCorrupt:
        return None


def _problems(d: Path, *, live: bool) -> tuple[list[str], list[Segment] | None]:
    """The problems found, and the chain of log files they were found in."""
    problems: list[str] = []
    snap = read_snapshot(d / SNAPSHOT_NAME)
    side = _side_files(d)
    snap_ok: bool | None = None
    chain: list[Segment] | None = None
    found: LogScan | None = None
    try:
        chain = log_chain(d)
        base, _ = replay_base(d, chain)
        replayed = State(snapshot_state(base)) if base is not None else State()
        if not isinstance(snap, str) and snap.last_seq == replayed.last_seq:
            snap_ok = equal_states(replayed.data, snapshot_state(snap))

        def apply(rec: Transition) -> None:
            nonlocal snap_ok
            check_record(replayed, rec)
            replayed.apply(rec)
            if not isinstance(snap, str) and rec.seq == snap.last_seq:
                snap_ok = equal_states(replayed.data, snapshot_state(snap))

        with gc_paused():
            if chain:
                seq = replayed.last_seq
                found = scan_chain(d, chain, seq=seq, apply_after=seq, apply=apply)
    except (StoreCorrupt, FileNotFoundError) as exc:
        problems.append(str(exc))
    if found is not None and not live:
        tail = found.tail
        scan = found.scan
        if tail is not None and scan.torn_line is not None:
            problems.append(
                f"{tail.name}: line {scan.torn_line} and after are a torn write "
                f"({scan.torn_why}); `orchctl state repair --state-dir {d}` cuts it (the next "
                f"start does too)"
            )
        for seg in found.orphans:
            problems.append(
                f"{seg.name} follows records that were never made durable; "
                f"`orchctl state repair --state-dir {d}` keeps it aside (the next start does too)"
            )
    last = found.last_seq if found is not None else 0
    oldest = chain[0].first if chain else 1
    if isinstance(snap, str):
        if snap != "missing" or last:
            problems.append(
                f"{SNAPSHOT_NAME} is {snap}; `orchctl state repair --state-dir {d}` rebuilds it"
            )
    elif snap.last_seq > last and (found is not None or not problems):
        problems.append(
            f"{SNAPSHOT_NAME} covers records up to {snap.last_seq} but the log ends at {last}"
        )
    elif snap.last_seq == 0:
        snap_ok = equal_states(State().data, snapshot_state(snap))
    if snap_ok is False and not isinstance(snap, str):
        problems.append(
            f"{SNAPSHOT_NAME} differs from the replay of the log up to record {snap.last_seq}"
        )
    fulls = [seq for name, seq, full in side if full and isinstance(seq, int)]
    for name, got, full in side:
        if isinstance(got, str):
            problems.append(f"{name} is {got}")
        elif found is not None and got > last:
            problems.append(f"{name} covers records up to {got}, beyond the log ({last})")
        elif full and got + 1 < oldest:
            problems.append(
                f"{name} (record {got}) cannot be replayed on: the kept log starts at {oldest}"
            )
        elif not full and not any(f <= got for f in fulls) and oldest > 1:
            problems.append(
                f"{name} (record {got}) cannot be restored: no full backup at or before it"
            )
    return problems, chain


def _side_files(d: Path) -> list[tuple[str, str | int, bool]]:
    """Each backup and checkpoint: what is wrong with it, or (a backup) the last record it
    covers, and whether it is a full copy. One pruned while it is looked at is no longer
    there to be checked."""
    out: list[tuple[str, str | int, bool]] = []
    for b in list_kinds(d / "backups"):
        if not b.path.exists():
            continue
        got: SnapshotFile | str | int
        if b.full:
            snap = read_snapshot(b.path)
            got = snap if isinstance(snap, str) else snap.last_seq
        else:
            point = read_point(b.path)
            got = point if isinstance(point, str) else point.last_seq
        if got == "missing":
            continue
        out.append((f"backups/{b.path.name}", got, b.full))
    for c in sorted((d / "checkpoints").glob("*.json")):
        try:
            data = c.read_bytes()
        except FileNotFoundError:
            continue
        if not is_sealed(data):
            out.append((f"checkpoints/{c.name}", "damaged (checksum mismatch)", False))
    return out


def list_backups(state_dir: str | Path) -> list[Path]:
    """The backups, full copies and restore points, oldest first (read-only: takes no
    lock). Every one can be given to `restore_from_backup`."""
    return list_backup_files(Path(state_dir) / "backups")


def _backup_snapshot(d: Path, chosen: Path, end: LogScan) -> tuple[bytes, int]:
    """A backup as snapshot bytes, and the record it stands for: a full copy as it is, a
    restore point replayed onto the newest full copy at or before it. Raises
    StoreCorrupt (naming what to do) when it cannot be used."""
    hint = "pick another from `orchctl state backups`"
    if not chosen.name.endswith(".point.json"):
        snap = read_snapshot(chosen)
        if isinstance(snap, str):
            raise StoreCorrupt(f"{chosen} is {snap}; {hint}", path=str(chosen))
        seq, data = snap.last_seq, chosen.read_bytes()
    else:
        point = read_point(chosen)
        if isinstance(point, str):
            raise StoreCorrupt(f"{chosen} is {point}; {hint}", path=str(chosen))
        seq = point.last_seq
        data = b""
    if seq > end.last_seq:
        raise StoreCorrupt(
            f"{chosen} covers records up to {seq}, but the log ends at {end.last_seq}; "
            f"pick an older backup, or `orchctl state restore --from-transitions`",
            path=str(chosen),
        )
    if data:
        return data, seq
    chain = log_chain(d)
    oldest = chain[0].first if chain else 1
    base: SnapshotFile | None = None
    for b in reversed(list_kinds(d / "backups")):
        if b.full and b.seq is not None and b.seq <= seq and b.seq + 1 >= oldest:
            cand = read_snapshot(b.path)
            if not isinstance(cand, str) and cand.last_seq <= seq:
                base = cand
                break
    if base is None and oldest > 1:
        raise StoreCorrupt(
            f"{chosen} (record {seq}) cannot be restored: no valid full backup at or before "
            f"it, and the kept log starts at record {oldest}; {hint}",
            path=str(chosen),
        )
    state = State(snapshot_state(base)) if base is not None else State()
    replay = checked_apply(state)

    def apply(rec: Transition) -> None:
        if rec.seq <= seq:
            replay(rec)

    scan_chain(d, chain, seq=state.last_seq, apply_after=state.last_seq, apply=apply)
    return encode_snapshot(state, log_offset=None, log_crc=None), seq


def restore_from_backup(
    state_dir: str | Path, which: str = "latest", *, dry_run: bool = False
) -> str:
    """Make current.json from a backup ("latest" = the newest one that can be restored, or
    a file name or path), a full copy or a restore point; the log's later records are
    replayed at the next start. Says what it did (with `dry_run`, what it would do: every
    check is made, nothing is written)."""
    with _locked(state_dir) as d, gc_paused():
        end = _log_end(d)
        backups = list_backup_files(d / "backups")
        got: tuple[bytes, int] | None = None
        if which == "latest":
            for b in reversed(backups):
                try:
                    got, chosen = _backup_snapshot(d, b, end), b
                    break
                except StoreCorrupt:
                    continue
            if got is None:
                raise FileNotFoundError(f"no valid backup in {d / 'backups'}")
        else:
            chosen = Path(which) if Path(which).exists() else d / "backups" / which
            got = _backup_snapshot(d, chosen, end)
        data, seq = got
        note = _replace_snapshot(d, data, dry_run=dry_run)
        tail = end.last_seq - seq
        done = "restore current.json from" if dry_run else "current.json restored from"
        return (
            f"{done} {chosen.name} (record {seq}); {note}; the log's "
            f"{tail} later record(s) are replayed at the next start"
        )


def restore_from_transitions(state_dir: str | Path, *, dry_run: bool = False) -> str:
    """Rebuild current.json by replaying the whole kept log (onto the oldest full backup
    it starts from, when older segments were compacted away). Says what it did and from
    which record (with `dry_run`, what it would do: the log is replayed, nothing is
    written)."""
    with _locked(state_dir) as d, gc_paused():
        loaded = load(d, full=True)
        scan = loaded.scan
        data = encode_snapshot(loaded.state, **_position(loaded))
        note = _replace_snapshot(d, data, dry_run=dry_run)
    torn = (
        f"; the torn tail at line {scan.torn_line} is cut at the next start"
        if scan.torn_line
        else ""
    )
    done = "rebuild current.json" if dry_run else "current.json rebuilt"
    first = loaded.base_seq + 1
    onto = "" if loaded.source == "empty" else f" onto {loaded.source} (record {first - 1})"
    return (
        f"{done} by replaying {scan.last_seq - first + 1} record(s) of the log, from record "
        f"{first} to {scan.last_seq} (all that is kept){onto}; {note}{torn}"
    )


def repair_state(state_dir: str | Path, *, dry_run: bool = False) -> list[str]:
    """Cut a torn log tail (kept aside), keep aside log files that follow one, rebuild a
    damaged or impossible snapshot, drop stale temp files. Never deletes a good record.
    Returns what it did (with `dry_run`, what it would do, deciding as it would and
    changing nothing); raises StoreCorrupt when the log itself is damaged before its end
    (that needs an operator)."""
    done: list[str] = []
    with _locked(state_dir) as d, gc_paused():
        for sub in ("", "backups", "checkpoints", "archive", SEGMENTS_DIR):
            for p in (d / sub).glob(f"*{TMP_SUFFIX}"):
                if not dry_run:
                    p.unlink()
                done.append(
                    f"{'remove' if dry_run else 'removed'} stale temp file {p.relative_to(d)}"
                )
        end = _log_end(d)  # raises on damage before the end: nothing here may fix that
        rebuild = False
        try:
            loaded = load(d)
            rebuild = loaded.source != SNAPSHOT_NAME and end.last_seq > 0
        except StoreCorrupt:
            loaded, rebuild = load(d, full=True), True
        done += settle(d, loaded.log, fsync=True, dry_run=dry_run)
        scan = loaded.scan
        if rebuild:
            data = encode_snapshot(loaded.state, **_position(loaded))
            note = _replace_snapshot(d, data, dry_run=dry_run)
            verb = "rebuild" if dry_run else "rebuilt"
            done.append(f"{verb} {SNAPSHOT_NAME} from the log (record {scan.last_seq}); {note}")
        for name in ("events.jsonl", "interventions.log"):
            if cut_torn_text(d / name, dry_run=dry_run):
                done.append(f"cut a partial last line of {name}")
    return done


_NEVER: Final = 1 << 62  # an apply_after bound no log reaches: check lines, decode none
