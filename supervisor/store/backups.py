"""Snapshot backups: full copies and restore points, which kind the next one is, which
are kept, and the oldest record a kept one still needs from the log.

A backup is what current.json was before a snapshot replaced it. Most are restore points,
`backups/current_<time>.point.json`: a few sealed bytes naming the record they stand for.
One in every ceil(backups_keep / backups_full) is a full copy, `current_<time>.json` (the
old current.json hard-linked, as every backup was before). A point is restored by
replaying the log onto the newest full copy at or before it, so the log is compacted only
up to the oldest full copy kept, and the oldest kept backup is always a full one: every
listed backup can be restored, with a handful of full copies on disk instead of all.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Final

import msgspec

from supervisor.store.files import list_backup_files
from supervisor.store.logfile import is_sealed, seal

POINT_SUFFIX: Final = ".point.json"
_HEAD = re.compile(rb'^\{"last_seq":(\d+)[,}]')


class Backup(msgspec.Struct, frozen=True):
    """One backup: its file, the last record it covers (None: unreadable), its kind."""

    path: Path
    seq: int | None
    full: bool


class PointFile(msgspec.Struct, kw_only=True):
    """A restore point's content."""

    last_seq: int
    kind: str = "point"
    written_at: str | None = None


_point_decoder = msgspec.json.Decoder(PointFile)


def peek_seq(path: Path) -> int | None:
    """The `last_seq` a snapshot or a point starts with (both are encoded with it first),
    read from the file's first bytes: a full copy is tens of megabytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return None
    m = _HEAD.match(head)
    return int(m[1]) if m else None


def is_point(path: Path) -> bool:
    return path.name.endswith(POINT_SUFFIX)


def list_kinds(backups_dir: Path) -> list[Backup]:
    """Every backup, oldest first, with the record it stands for."""
    return [Backup(p, peek_seq(p), not is_point(p)) for p in list_backup_files(backups_dir)]


def full_every(keep: int, full: int) -> int:
    """One backup in this many is a full copy."""
    return max(1, math.ceil(keep / max(1, full)))


def next_is_full(backups: list[Backup], every: int) -> bool:
    """Whether the next backup is a full copy: `every - 1` points follow each full one."""
    for since, b in enumerate(reversed(backups)):
        if b.full:
            return since >= every - 1
    return True


def point_data(seq: int, written_at: str) -> bytes:
    return seal(msgspec.json.encode(PointFile(last_seq=seq, written_at=written_at)))


def read_point(path: Path) -> PointFile | str:
    """A restore point's content, or why it cannot be used."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if not is_sealed(data):
        return "checksum mismatch (truncated or garbled)"
    try:
        return _point_decoder.decode(data)
    except msgspec.DecodeError as exc:
        return f"does not decode ({exc})"


def to_prune(backups: list[Backup], keep: int) -> list[Backup]:
    """The backups to delete (oldest first): all but the newest `keep`, except that when
    the oldest kept one is a point, the full copy it is replayed from stays too."""
    kept = backups[-keep:] if keep > 0 else []
    drop = backups[: len(backups) - len(kept)]
    if kept and not kept[0].full:
        base = next((b for b in reversed(drop) if b.full), None)
        if base is not None:
            drop = [b for b in drop if b is not base]
    return drop


def needed_from(backups: list[Backup], current_seq: int) -> int:
    """Records up to this one are needed by no kept backup nor by current.json (at
    `current_seq`): the log may be compacted up to it. That is the oldest full copy's
    record, so that the whole kept log can always be replayed onto one (`orchctl state
    restore --from-transitions`); with no full copy yet, 0 (nothing is compacted). A full
    copy whose head cannot be read is not counted (it cannot be restored anyway;
    validate reports it)."""
    fulls = [b.seq for b in backups if b.full and b.seq is not None]
    return min([current_seq, *fulls]) if fulls else 0
