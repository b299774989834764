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
from supervisor.store.files import (
    LOG_NAME,
    SNAPSHOT_NAME,
    TMP_SUFFIX,
    cut_torn_tail,
    cut_torn_text,
    list_backup_files,
    lock_dir,
    next_backup_path,
    utc_stamp,
    write_atomic,
)
from supervisor.store.logfile import Scanner, ScanResult, is_sealed
from supervisor.store.references import check_record
from supervisor.store.snapshot import (
    encode_snapshot,
    gc_paused,
    load,
    read_snapshot,
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


def _log_end(d: Path) -> ScanResult:
    """Check every line of the log (checksum, seq) without decoding; raises StoreCorrupt."""
    if not (d / LOG_NAME).exists():
        return ScanResult(end=0, crc=0, last_seq=0, line=0, size=0)
    return Scanner(d / LOG_NAME, d).scan(apply_after=_NEVER)


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
        return _problems(d, live=False)


def validate_live(state_dir: str | Path) -> list[str]:
    """`validate_state` on the directory of the running daemon that calls it (from a worker
    thread, without its lock). The daemon only appends to the log and replaces the other
    files whole, so the files are read in an order that stays consistent while it writes:
    snapshot, backups and checkpoints first, the log last (it holds at least every record
    they cover); a last line still being appended is not a torn write."""
    d = Path(state_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is not a state directory")
    return _problems(d, live=True)


def _problems(d: Path, *, live: bool) -> list[str]:
    problems: list[str] = []
    snap = read_snapshot(d / SNAPSHOT_NAME)
    side = _side_files(d)
    replayed = State()
    snap_ok: bool | None = None

    def apply(rec: Transition) -> None:
        nonlocal snap_ok
        check_record(replayed, rec)
        replayed.apply(rec)
        if not isinstance(snap, str) and rec.seq == snap.last_seq:
            snap_ok = equal_states(replayed.data, snapshot_state(snap))

    scan = None
    try:
        with gc_paused():
            if (d / LOG_NAME).exists():
                scan = Scanner(d / LOG_NAME, d).scan(apply=apply)
    except StoreCorrupt as exc:
        problems.append(str(exc))
    if scan is not None and scan.torn_line is not None and not live:
        problems.append(
            f"{LOG_NAME}: line {scan.torn_line} and after are a torn write ({scan.torn_why}); "
            f"`orchctl state repair --state-dir {d}` cuts it (the next start does too)"
        )
    last = scan.last_seq if scan is not None else 0
    if isinstance(snap, str):
        if snap != "missing" or last:
            problems.append(
                f"{SNAPSHOT_NAME} is {snap}; `orchctl state repair --state-dir {d}` rebuilds it"
            )
    elif snap.last_seq > last and (scan is not None or not problems):
        problems.append(
            f"{SNAPSHOT_NAME} covers records up to {snap.last_seq} but the log ends at {last}"
        )
    elif snap.last_seq == 0:
        snap_ok = equal_states(State().data, snapshot_state(snap))
    if snap_ok is False and not isinstance(snap, str):
        problems.append(
            f"{SNAPSHOT_NAME} differs from the replay of the log up to record {snap.last_seq}"
        )
    for name, got in side:
        if isinstance(got, str):
            problems.append(f"{name} is {got}")
        elif scan is not None and got > last:
            problems.append(f"{name} covers records up to {got}, beyond the log ({last})")
    return problems


def _side_files(d: Path) -> list[tuple[str, str | int]]:
    """Each backup and checkpoint: what is wrong with it, or (a backup) the last record it
    covers. One pruned while it is looked at is no longer there to be checked."""
    out: list[tuple[str, str | int]] = []
    for b in list_backup_files(d / "backups"):
        if not b.exists():
            continue
        got = read_snapshot(b)
        if got == "missing":
            continue
        out.append((f"backups/{b.name}", got if isinstance(got, str) else got.last_seq))
    for c in sorted((d / "checkpoints").glob("*.json")):
        try:
            data = c.read_bytes()
        except FileNotFoundError:
            continue
        if not is_sealed(data):
            out.append((f"checkpoints/{c.name}", "damaged (checksum mismatch)"))
    return out


def list_backups(state_dir: str | Path) -> list[Path]:
    """The snapshot backups, oldest first (read-only: takes no lock)."""
    return list_backup_files(Path(state_dir) / "backups")


def restore_from_backup(
    state_dir: str | Path, which: str = "latest", *, dry_run: bool = False
) -> str:
    """Make current.json from a backup ("latest" = the newest valid one, or a file name or
    path); the log's later records are replayed at the next start. Says what it did (with
    `dry_run`, what it would do: every check is made, nothing is written)."""
    with _locked(state_dir) as d:
        backups = list_backup_files(d / "backups")
        if which == "latest":
            chosen = next(
                (b for b in reversed(backups) if not isinstance(read_snapshot(b), str)), None
            )
            if chosen is None:
                raise FileNotFoundError(f"no valid backup in {d / 'backups'}")
        else:
            chosen = Path(which) if Path(which).exists() else d / "backups" / which
        snap = read_snapshot(chosen)
        if isinstance(snap, str):
            raise StoreCorrupt(
                f"{chosen} is {snap}; pick another from `orchctl state backups`", path=str(chosen)
            )
        end = _log_end(d)
        if snap.last_seq > end.last_seq:
            raise StoreCorrupt(
                f"{chosen} covers records up to {snap.last_seq}, but the log ends at "
                f"{end.last_seq}; "
                f"pick an older backup, or `orchctl state restore --from-transitions`",
                path=str(chosen),
            )
        note = _replace_snapshot(d, chosen.read_bytes(), dry_run=dry_run)
        tail = end.last_seq - snap.last_seq
        done = "restore current.json from" if dry_run else "current.json restored from"
        return (
            f"{done} {chosen.name} (record {snap.last_seq}); {note}; the log's "
            f"{tail} later record(s) are replayed at the next start"
        )


def restore_from_transitions(state_dir: str | Path, *, dry_run: bool = False) -> str:
    """Rebuild current.json by replaying the whole log. Says what it did (with `dry_run`,
    what it would do: the log is replayed, nothing is written)."""
    with _locked(state_dir) as d, gc_paused():
        loaded = load(d, full=True)
        scan = loaded.scan
        data = encode_snapshot(loaded.state, log_offset=scan.end, log_crc=scan.crc)
        note = _replace_snapshot(d, data, dry_run=dry_run)
    torn = (
        f"; the torn tail at line {scan.torn_line} is cut at the next start"
        if scan.torn_line
        else ""
    )
    done = "rebuild current.json" if dry_run else "current.json rebuilt"
    return f"{done} by replaying {scan.last_seq} record(s) of the log; {note}{torn}"


def repair_state(state_dir: str | Path, *, dry_run: bool = False) -> list[str]:
    """Cut a torn log tail (kept aside), rebuild a damaged or impossible snapshot, drop
    stale temp files. Never deletes a good record. Returns what it did (with `dry_run`,
    what it would do, deciding as it would and changing nothing); raises StoreCorrupt
    when the log itself is damaged before its end (that needs an operator)."""
    done: list[str] = []
    with _locked(state_dir) as d, gc_paused():
        for sub in ("", "backups", "checkpoints", "archive"):
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
        scan = loaded.scan
        if scan.torn_line is not None:
            note = (
                f"the torn bytes after record {scan.last_seq} are kept aside"
                if dry_run
                else cut_torn_tail(d, scan, fsync=True)
            )
            done.append(
                f"cut the torn tail of {LOG_NAME} at line {scan.torn_line} "
                f"({scan.torn_why}); {note}"
            )
        if rebuild:
            data = encode_snapshot(loaded.state, log_offset=scan.end, log_crc=scan.crc)
            note = _replace_snapshot(d, data, dry_run=dry_run)
            verb = "rebuild" if dry_run else "rebuilt"
            done.append(f"{verb} {SNAPSHOT_NAME} from the log (record {scan.last_seq}); {note}")
        for name in ("events.jsonl", "interventions.log"):
            if cut_torn_text(d / name, dry_run=dry_run):
                done.append(f"cut a partial last line of {name}")
    return done


_NEVER: Final = 1 << 62  # an apply_after bound no log reaches: check lines, decode none
