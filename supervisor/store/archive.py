"""The archive of retired workstreams: archive/<ws>.tar.gz (stdlib tarfile, gzip), each
holding `summary.json` first (what `ws list --archived` shows), `workstream.json` (the
workstream, its tasks and attempts, as its retirement step encoded them), `checkpoints/…`
and `logs/<task>.log`. Written to a temp name, fsynced,
renamed and the directory fsynced before the retirement is recorded; the workstream's
own files are deleted only after that record is durable (core/retention.py has the
order). Reading it (`ws show --archived`, `logs`) runs in a worker thread, never in a
step of the engine.

Writing it again is harmless: what an older archive of the same workstream holds and
the disk no longer does (its logs, after a restore from a backup from before its
retirement) is carried over into the new one. The archive of another run under the same
id (an explicit id submitted again after its retirement) is kept as
archive/<ws>.<its submission time>.tar.gz.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any, Final

import msgspec
import structlog

from supervisor import failpoints
from supervisor.store.files import TMP_SUFFIX, utc_stamp
from supervisor.store.logfile import fsync_dir

log = structlog.get_logger("orchd.store")

SUFFIX: Final = ".tar.gz"
SUMMARY: Final = "summary.json"
DOCUMENT: Final = "workstream.json"


class ArchiveMissing(LookupError):
    """Raised by the readers when a workstream has no (readable) archive."""


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or "\0" in name:
        raise ValueError(f"{name!r} cannot name a file")


def archive_path(state_dir: Path, ws_id: str) -> Path:
    _check_name(ws_id)
    return state_dir / "archive" / f"{ws_id}{SUFFIX}"


def _checkpoint_files(state_dir: Path, ws_id: str) -> list[Path]:
    cdir = state_dir / "checkpoints"
    prefix = f"{ws_id}_"
    out = []
    try:
        names = os.listdir(cdir)
    except FileNotFoundError:
        return []
    for name in sorted(names):
        if name.startswith(prefix) and name.endswith(".json"):
            mid = name[len(prefix) : -len(".json")]
            if mid.isdigit() or mid == "latest":
                out.append(cdir / name)
    return out


def _log_files(state_dir: Path, ws_id: str) -> list[Path]:
    ldir = state_dir / "logs" / ws_id
    try:
        return sorted(p for p in ldir.iterdir() if p.is_file())
    except FileNotFoundError:
        return []


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(mtime), 0o640
    tar.addfile(info, io.BytesIO(data))


def write_archive(state_dir: Path, ws_id: str, document: bytes, *, fsync: bool = True) -> Path:
    """Write archive/<ws>.tar.gz durably (temp name, fsync, rename, directory fsync) from
    `document` and the workstream's checkpoints and task logs. Deletes nothing."""
    final = archive_path(state_dir, ws_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.{os.getpid()}{TMP_SUFFIX}")
    names: set[str] = {SUMMARY, DOCUMENT}
    summary = _summary(document)
    older = _older_run(final, summary)
    try:
        with tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
            now = time.time()
            _add_bytes(tar, SUMMARY, msgspec.json.encode(summary), now)
            _add_bytes(tar, DOCUMENT, document, now)
            for path in _checkpoint_files(state_dir, ws_id):
                arc = f"checkpoints/{path.name}"
                tar.add(path, arcname=arc, recursive=False)
                names.add(arc)
            for path in _log_files(state_dir, ws_id):
                arc = f"logs/{path.name}"
                tar.add(path, arcname=arc, recursive=False)
                names.add(arc)
            if older is None:
                _carry_over(final, tar, names)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        failpoints.crash_point("retire_archive_tmp")
        if older is not None:
            # The archive of an earlier run under the same id (an explicit id submitted
            # again) keeps a name of its own.
            older.unlink(missing_ok=True)
            os.link(final, older)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(final.parent)
    failpoints.crash_point("retire_archived")
    return final


def _summary(document: bytes) -> dict[str, Any]:
    """What `ws list --archived` shows of an archive, its first member."""
    doc = msgspec.json.decode(document)
    ws = doc.get("workstream", {})
    return {
        "id": ws.get("id"),
        "name": ws.get("name"),
        "number": ws.get("number"),
        "state": ws.get("state", "pending"),
        "submitted_at": ws.get("submitted_at", 0.0),
        "ended_at": ws.get("ended_at"),
        "tasks": len(doc.get("tasks", [])),
        "archived_at": doc.get("archived_at"),
    }


def read_summary(path: Path) -> dict[str, Any] | None:
    """An archive's summary (its first member), None when it has none or is damaged."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            first = tar.next()
            if first is None or first.name != SUMMARY:
                return None
            f = tar.extractfile(first)
            if f is None:
                return None
            out: dict[str, Any] = msgspec.json.decode(f.read())
            return out
    except (tarfile.TarError, OSError, msgspec.DecodeError):
        return None


def _older_run(final: Path, summary: dict[str, Any]) -> Path | None:
    """Where the existing archive goes when it is of another run under the same id."""
    if not final.exists():
        return None
    old = read_summary(final)
    if old is None or old.get("submitted_at") == summary.get("submitted_at"):
        return None
    stamp = utc_stamp(float(old.get("submitted_at") or 0.0))
    return final.with_name(f"{final.name[: -len(SUFFIX)]}.{stamp}{SUFFIX}")


def _carry_over(old: Path, tar: tarfile.TarFile, have: set[str]) -> None:
    """What an earlier archive of the workstream holds that the new one would not."""
    if not old.exists():
        return
    try:
        with tarfile.open(old, "r:gz") as src:
            for member in src.getmembers():
                if member.name in have or not member.isfile():
                    continue
                f = src.extractfile(member)
                if f is not None:
                    tar.addfile(member, f)
    except (tarfile.TarError, OSError) as exc:
        # A damaged older archive: the new one holds what the disk still has.
        log.warning("archive_not_carried_over", path=str(old), error=str(exc))


def drop_files(state_dir: Path, ws_id: str) -> int:
    """Delete a retired workstream's checkpoints and task logs (its archive holds them);
    how many files went. Safe to run again after a crash half way."""
    gone = 0
    for path in [*_checkpoint_files(state_dir, ws_id), *_log_files(state_dir, ws_id)]:
        path.unlink(missing_ok=True)
        gone += 1
        failpoints.crash_point("retire_files")
    ldir = state_dir / "logs" / ws_id
    if ldir.is_dir():
        shutil.rmtree(ldir, ignore_errors=True)
    return gone


def leftovers(state_dir: Path, live: set[str]) -> list[str]:
    """Workstreams not live whose archive is there and whose files are too: retired by a
    daemon that died before it deleted them."""
    adir = state_dir / "archive"
    try:
        archived = {n[: -len(SUFFIX)] for n in os.listdir(adir) if n.endswith(SUFFIX)}
    except FileNotFoundError:
        return []
    found: set[str] = set()
    try:
        for name in os.listdir(state_dir / "checkpoints"):
            ws, sep, _ = name.rpartition("_")
            if sep and ws in archived and ws not in live:
                found.add(ws)
    except FileNotFoundError:
        pass
    for ws in archived - live:
        if (state_dir / "logs" / ws).is_dir():
            found.add(ws)
    return sorted(found)


def drop_leftovers(state_dir: Path, live: set[str]) -> list[str]:
    """At start: finish the deletions a crash interrupted (see `leftovers`)."""
    done = leftovers(state_dir, live)
    for ws_id in done:
        n = drop_files(state_dir, ws_id)
        log.info("retired_files_dropped", workstream_id=ws_id, files=n)
    return done


# -- reading ---------------------------------------------------------------------------


def _open(state_dir: Path, ws_id: str) -> tarfile.TarFile:
    path = archive_path(state_dir, ws_id)
    try:
        return tarfile.open(path, "r:gz")
    except FileNotFoundError:
        raise ArchiveMissing(f"no archive of workstream {ws_id!r} ({path})") from None
    except (tarfile.TarError, OSError) as exc:
        raise ArchiveMissing(f"archive {path} cannot be read: {exc}") from None


def read_document(state_dir: Path, ws_id: str) -> dict[str, Any]:
    """The archived workstream.json: {format, archived_at, last_seq, workstream, tasks}."""
    with _open(state_dir, ws_id) as tar:
        try:
            f = tar.extractfile(DOCUMENT)
        except KeyError:
            raise ArchiveMissing(f"archive of {ws_id!r} has no {DOCUMENT}") from None
        assert f is not None
        doc: dict[str, Any] = msgspec.json.decode(f.read())
    doc["files"] = archived_files(state_dir, ws_id)
    return doc


def archived_files(state_dir: Path, ws_id: str) -> list[str]:
    with _open(state_dir, ws_id) as tar:
        return [m.name for m in tar.getmembers() if m.isfile()]


def read_log(state_dir: Path, ws_id: str, task: str, lines: int) -> list[str] | None:
    """The last `lines` lines of an archived task log (`task` is its bare id); None when
    the archive has no log of it."""
    _check_name(task)
    with _open(state_dir, ws_id) as tar:
        try:
            f = tar.extractfile(f"logs/{task}.log")
        except KeyError:
            return None
        if f is None:
            return None
        text = f.read().decode("utf-8", errors="replace").splitlines()
    return text[-lines:] if lines > 0 else []


def list_archived(state_dir: Path) -> list[dict[str, Any]]:
    """Every archive: the workstream's id, the file's size and time, oldest first."""
    adir = state_dir / "archive"
    out = []
    try:
        entries = list(os.scandir(adir))
    except FileNotFoundError:
        return []
    for e in entries:
        if e.name.endswith(SUFFIX) and e.is_file():
            st = e.stat()
            summary = read_summary(Path(e.path)) or {}
            out.append(
                summary
                | {
                    "id": e.name[: -len(SUFFIX)],
                    "path": e.path,
                    "bytes": st.st_size,
                    "archived_at": summary.get("archived_at") or st.st_mtime,
                }
            )
    out.sort(key=lambda d: (d["archived_at"], d["id"]))
    return out
