"""The state directory's files as files: their names, atomic replacement, fsync of a
directory, the directory's lock, backup naming and pruning, and cutting a torn tail off
the log or a JSON-lines side file.

What is in the files (snapshot, checkpoints, the log's records) is for the modules that
use these helpers; here only bytes are written, renamed, truncated or deleted.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from supervisor.core.errors import StoreLocked
from supervisor.store.logfile import ScanResult, fsync_dir

LOG_NAME: Final = "transitions.jsonl"
_TAIL_CHUNK: Final = 1 << 20
SNAPSHOT_NAME: Final = "current.json"
TMP_SUFFIX: Final = ".tmp"
_BACKUP_PREFIX: Final = "current_"
# Backup names sort in time order: fixed-width UTC time down to the microsecond.
_STAMP_FORMAT: Final = "%Y-%m-%dT%H-%M-%S.%fZ"


def utc_stamp(t: float | None = None) -> str:
    """A UTC time usable in a file name (no colons)."""
    return datetime.fromtimestamp(time.time() if t is None else t, UTC).strftime(_STAMP_FORMAT)


def write_atomic(
    path: Path, data: bytes, *, fsync: bool = True, keep_as: Path | None = None
) -> None:
    """Replace `path` with `data` atomically; hard-link the old file to `keep_as` first.

    On any failure the temp file is removed: a partial one would hold disk space the log
    needs (and a full disk is the usual failure)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if keep_as is not None:
            try:
                os.link(path, keep_as)
            except FileNotFoundError:
                pass  # no old file to keep
            else:
                if fsync:
                    # The old file's new name is durable before its old name is reused.
                    fsync_dir(keep_as.parent)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(path.parent)


def list_backup_files(backups: Path) -> list[Path]:
    """Backups, oldest first."""
    try:
        names = [
            n for n in os.listdir(backups) if n.startswith(_BACKUP_PREFIX) and n.endswith(".json")
        ]
    except FileNotFoundError:
        return []
    return [backups / n for n in sorted(names)]


def backup_stamp(path: Path) -> str:
    """The time part of a backup's name (a full one's or a restore point's)."""
    name = path.name[len(_BACKUP_PREFIX) :]
    return name[: name.index("Z") + 1]


def next_backup_path(backups: Path, last: Path | None, *, suffix: str = ".json") -> Path:
    """A new backup name, later than `last` even within one microsecond."""
    stamp = utc_stamp()
    if last is not None and stamp <= (prev_stamp := backup_stamp(last)):
        prev = datetime.strptime(prev_stamp, _STAMP_FORMAT).replace(tzinfo=UTC)
        stamp = utc_stamp(prev.timestamp() + 1e-6)
        # Float rounding may land on the same microsecond; step until it sorts after.
        step = 2e-6
        while stamp <= prev_stamp:
            stamp = utc_stamp(prev.timestamp() + step)
            step += 1e-6
    return backups / f"{_BACKUP_PREFIX}{stamp}{suffix}"


def prune_oldest(files: list[Path], keep: int) -> list[Path]:
    """Delete all but the newest `keep` of `files` (given oldest first); return the rest."""
    extra = max(0, len(files) - keep)
    for p in files[:extra]:
        p.unlink(missing_ok=True)
    return files[extra:]


def cut_torn_tail(
    state_dir: Path, scan: ScanResult, *, fsync: bool, path: Path | None = None
) -> str:
    """Keep the torn bytes (those after `scan.end`) aside, then truncate the log there.

    Only the tail is copied, never the whole log: this runs at start-up, often on a disk
    that has just filled up, where a copy of the log would not fit. Raises OSError when
    the tail cannot be kept (the log is then left as it was)."""
    log_path = state_dir / LOG_NAME if path is None else path
    aside = state_dir / f"{log_path.name}.broken.{utc_stamp()}"
    kept = 0
    fd = os.open(log_path, os.O_RDWR | os.O_CLOEXEC)
    try:
        out = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            while chunk := os.pread(fd, _TAIL_CHUNK, scan.end + kept):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view) :]
                kept += len(chunk)
            if fsync:
                os.fsync(out)
        except BaseException:
            os.close(out)
            aside.unlink(missing_ok=True)
            raise
        os.close(out)
        if fsync:
            fsync_dir(state_dir)  # the kept bytes have a durable name before they are cut
        os.ftruncate(fd, scan.end)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return (
        f"the {kept} torn byte(s) after record {scan.last_seq} (offset {scan.end}) were kept "
        f"as {aside.name}"
    )


def lock_dir(state_dir: Path) -> int:
    """Take the state directory's lock (flock on state_dir/lock); the fd holds it."""
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreLocked(
            f"{state_dir} is in use by another orchd (its lock is held); stop it first, or pass "
            f"another --state-dir"
        ) from None
    return fd


def cut_torn_text(path: Path, *, dry_run: bool = False) -> bool:
    """Drop a partial last line of a JSON-lines side file (events, interventions); with
    `dry_run`, only say whether there is one."""
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return False
            back = min(size, 1 << 16)
            f.seek(size - back)
            tail = f.read(back)
            if tail.endswith(b"\n"):
                return False
            cut = tail.rfind(b"\n")
            if dry_run:
                return True
            f.truncate(size - back + cut + 1 if cut >= 0 else (0 if back == size else size))
            return True
    except FileNotFoundError:
        return False
