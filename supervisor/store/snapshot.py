"""The state directory below the Store: derived files (snapshot, backups, checkpoints),
`load`, which recovers the state from the snapshot and the log without changing any
file, and the directory's lock.

Every file here is sealed with the log's checksum trailer and replaced atomically
(temp file, fsync, rename, fsync of the directory), so a reader sees the old file or
the new one, and a damaged one is recognised rather than trusted.
"""

from __future__ import annotations

import fcntl
import gc
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec

from supervisor.core.errors import StoreCorrupt, StoreLocked
from supervisor.core.model import State, StateData
from supervisor.store.logfile import Scanner, ScanResult, is_sealed, prefix_matches, seal
from supervisor.store.references import checked_apply, state_problem

LOG_NAME: Final = "transitions.jsonl"
_TAIL_CHUNK: Final = 1 << 20
SNAPSHOT_NAME: Final = "current.json"
TMP_SUFFIX: Final = ".tmp"
_BACKUP_PREFIX: Final = "current_"
# Backup names sort in time order: fixed-width UTC time down to the microsecond.
_STAMP_FORMAT: Final = "%Y-%m-%dT%H-%M-%S.%fZ"
T = TypeVar("T")


class SnapshotFile(StateData, kw_only=True):
    """current.json: the state, plus where in the log it ends (offset, CRC of the bytes
    before it) so that a load can trust the covered part of the log with one CRC pass."""

    log_offset: int | None = None
    log_crc: int | None = None
    written_at: str | None = None


_snapshot_decoder = msgspec.json.Decoder(SnapshotFile)
_encoder = msgspec.json.Encoder()


def utc_stamp(t: float | None = None) -> str:
    """A UTC time usable in a file name (no colons)."""
    return datetime.fromtimestamp(time.time() if t is None else t, UTC).strftime(_STAMP_FORMAT)


def iso_utc(t: float | None = None) -> str:
    """ISO 8601 UTC with milliseconds, as the recovery guide writes times."""
    dt = datetime.fromtimestamp(time.time() if t is None else t, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def encode_snapshot(state: State, *, log_offset: int | None, log_crc: int | None) -> bytes:
    d = state.data
    snap = SnapshotFile(
        last_seq=d.last_seq,
        tasks=d.tasks,
        workstreams=d.workstreams,
        workers=d.workers,
        resources=d.resources,
        log_offset=log_offset,
        log_crc=log_crc,
        written_at=iso_utc(),
    )
    return seal(_encoder.encode(snap))


def read_snapshot(path: Path) -> SnapshotFile | str:
    """The snapshot in `path`, or a reason why it cannot be used.

    Its checksum is computed in a thread while this one decodes it (zlib lets go of the
    GIL); a snapshot whose seal does not match is refused whatever the decoding gave, and
    so is one that names a task, worker, workstream or resource it does not hold."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if not data:
        return "empty"
    sealed = in_thread(is_sealed, data)
    try:
        snap: SnapshotFile | str = _snapshot_decoder.decode(data)
    except msgspec.DecodeError as exc:
        snap = f"does not decode ({exc})"
    if not sealed():
        return "checksum mismatch (truncated or garbled)"
    if not isinstance(snap, str) and (why := state_problem(snap)) is not None:
        # Sealed, so not torn: written wrong or edited. Trust it no more than a torn one.
        return f"inconsistent ({why})"
    return snap


def in_thread(fn: Callable[..., T], *args: Any) -> Callable[[], T]:
    """Start `fn(*args)` in a thread; the function returned waits for its result (or
    raises its exception).

    For checksums over tens or hundreds of megabytes: zlib lets go of the GIL while it
    computes, so a load decodes and indexes on one core while it checks on another."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orchd-load")
    try:
        return pool.submit(fn, *args).result
    finally:
        pool.shutdown(wait=False)  # the thread ends after its one job


def snapshot_state(snap: SnapshotFile) -> StateData:
    return StateData(
        last_seq=snap.last_seq,
        tasks=snap.tasks,
        workstreams=snap.workstreams,
        workers=snap.workers,
        resources=snap.resources,
    )


def list_backup_files(backups: Path) -> list[Path]:
    """Backups, oldest first."""
    try:
        names = [
            n for n in os.listdir(backups) if n.startswith(_BACKUP_PREFIX) and n.endswith(".json")
        ]
    except FileNotFoundError:
        return []
    return [backups / n for n in sorted(names)]


def next_backup_path(backups: Path, last: Path | None) -> Path:
    """A new backup name, later than `last` even within one microsecond."""
    name = f"{_BACKUP_PREFIX}{utc_stamp()}.json"
    if last is not None and name <= last.name:
        stem = last.name[len(_BACKUP_PREFIX) : -len(".json")]
        prev = datetime.strptime(stem, _STAMP_FORMAT).replace(tzinfo=UTC)
        name = f"{_BACKUP_PREFIX}{utc_stamp(prev.timestamp() + 1e-6)}.json"
        # Float rounding may land on the same microsecond; step until it sorts after.
        step = 2e-6
        while name <= last.name:
            name = f"{_BACKUP_PREFIX}{utc_stamp(prev.timestamp() + step)}.json"
            step += 1e-6
    return backups / name


def prune_oldest(files: list[Path], keep: int) -> list[Path]:
    """Delete all but the newest `keep` of `files` (given oldest first); return the rest."""
    extra = max(0, len(files) - keep)
    for p in files[:extra]:
        p.unlink(missing_ok=True)
    return files[extra:]


def checkpoint_doc(ws_id: str, state: State, t: float | None = None) -> dict[str, Any]:
    """A workstream checkpoint as the recovery guide shows it, with a little more.

    `pending_tasks` holds every task not finished yet (pending, queued and running, as the
    guide's example counts a running task that holds a resource as pending); `queued_tasks`
    and `running_tasks` name those two subsets. `completed_tasks` includes skipped ones,
    which `skipped_tasks` also lists."""
    data = state.data
    ws = data.workstreams[ws_id]
    lists: dict[str, list[str]] = {
        k: []
        for k in ("completed", "failed", "pending", "queued", "running", "cancelled", "skipped")
    }
    held: dict[str, list[str]] = {}
    tasks: dict[str, Any] = {}
    for tid in ws.task_ids:
        task = data.tasks[tid]
        st = str(task.state)
        lists[st].append(tid)
        if st in ("queued", "running"):
            lists["pending"].append(tid)
        if task.skipped:
            lists["skipped"].append(tid)
        if st == "running":
            for r in task.resources:
                held.setdefault(r, []).append(tid)
        tasks[tid] = {
            "state": st,
            "retry_count": task.retry_count,
            "timeout_s": task.timeout_s,
            "max_retries": task.max_retries,
            "depends_on": list(task.depends_on),
            "skipped": task.skipped,
        }
    return {
        "workstream_id": ws_id,
        "checkpoint_at": iso_utc(t),
        "seq": data.last_seq,
        "state": str(ws.state),
        "completed_tasks": lists["completed"],
        "failed_tasks": lists["failed"],
        "pending_tasks": lists["pending"],
        "queued_tasks": lists["queued"],
        "running_tasks": lists["running"],
        "cancelled_tasks": lists["cancelled"],
        "skipped_tasks": lists["skipped"],
        "resources_held": held,
        "tasks": tasks,
    }


class Loaded(msgspec.Struct):
    """What a load found: the state, where the log's good records end, what was wrong."""

    state: State
    scan: ScanResult
    repairs: list[str]
    source: str  # "current.json", a backup's name, or "empty"


def load(state_dir: Path, *, full: bool = False) -> Loaded:
    """Recover the state from `state_dir` without changing any file.

    Snapshot (checksum checked), else the newest valid backup, else empty; then the log's
    records after it. `full=True` ignores snapshots and replays the whole log. A torn tail
    is reported in `scan` (and `repairs`) but not cut here. Every replayed record's
    references are checked (`references.check_record`). Raises StoreCorrupt."""
    log_path = state_dir / LOG_NAME
    repairs: list[str] = []
    snap, source = None, "empty"
    if not full:
        got = read_snapshot(state_dir / SNAPSHOT_NAME)
        if isinstance(got, str):
            backups = list_backup_files(state_dir / "backups")
            for b in reversed(backups):
                cand = read_snapshot(b)
                if not isinstance(cand, str):
                    snap, source = cand, f"backups/{b.name}"
                    break
            # No snapshot yet (a first run stopped before its first one) is not damage.
            if got != "missing" or backups:
                how = (
                    f"loaded {source} and replayed the log after it"
                    if snap
                    else "rebuilt it by replaying the whole log"
                )
                repairs.append(f"{SNAPSHOT_NAME} is {got}; {how}")
        else:
            snap, source = got, SNAPSHOT_NAME
    covered: Callable[[], bool] | None = None
    if (
        snap is not None
        and snap.log_offset is not None
        and snap.log_crc is not None
        and log_path.exists()
    ):
        # Check the log's covered bytes while the graph is being built.
        covered = in_thread(prefix_matches, log_path, snap.log_offset, snap.log_crc, snap.last_seq)
    state = State(snapshot_state(snap)) if snap is not None else State()
    scanner = Scanner(log_path, state_dir)
    if not log_path.exists():
        scan = ScanResult(end=0, crc=0, last_seq=0, line=0, size=0)
    elif snap is not None and covered is not None and covered():
        # The covered part of the log is byte-for-byte what was written: check the rest.
        assert snap.log_offset is not None and snap.log_crc is not None
        seq = snap.last_seq
        scan = scanner.scan(
            start=snap.log_offset,
            crc=snap.log_crc,
            seq=seq,
            line=seq,
            apply_after=seq,
            apply=checked_apply(state),
        )
    else:
        scan = scanner.scan(apply_after=state.last_seq, apply=checked_apply(state))
    if scan.last_seq < state.last_seq:
        raise StoreCorrupt(
            f"{state_dir / source}: the snapshot covers records up to {state.last_seq} but "
            f"{log_path} ends at record {scan.last_seq} (line {scan.line}); "
            f"inspect with `orchctl state validate --state-dir {state_dir}`, then "
            f"`orchctl state repair --state-dir {state_dir}` rebuilds the snapshot from the log "
            f"(keeping the old one aside)",
            path=str(log_path),
            line=scan.line,
        )
    if scan.torn_line is not None:
        repairs.append(
            f"{LOG_NAME}: line {scan.torn_line} and after are a torn write ({scan.torn_why}); "
            f"cut back to record {scan.last_seq}"
        )
    return Loaded(state=state, scan=scan, repairs=repairs, source=source)


@contextmanager
def gc_paused(*, freeze: bool = False) -> Iterator[None]:
    """Loading builds millions of objects that all live on; collecting meanwhile only
    rescans them again and again (it doubles the replay time).

    The collections are only put off, though: the first ones after the pause would walk
    every object loaded (a second or more for a big state). With `freeze`, for a state
    kept for the rest of the process, a successful load ends with `gc.freeze()`, which
    moves everything alive into a generation the collector never scans; the garbage
    already there is collected first, so none of it is frozen. The loaded objects form
    no reference cycles, so reference counting still frees them when they go."""
    was = gc.isenabled()
    if freeze:
        gc.collect()
    gc.disable()
    try:
        yield
        if freeze:
            gc.freeze()
    finally:
        if was:
            gc.enable()


def cut_torn_tail(state_dir: Path, scan: ScanResult, *, fsync: bool) -> str:
    """Keep the torn bytes (those after `scan.end`) aside, then truncate the log there.

    Only the tail is copied, never the whole log: this runs at start-up, often on a disk
    that has just filled up, where a copy of the log would not fit. Raises OSError when
    the tail cannot be kept (the log is then left as it was)."""
    log_path = state_dir / LOG_NAME
    aside = state_dir / f"{LOG_NAME}.broken.{utc_stamp()}"
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


def cut_torn_text(path: Path) -> bool:
    """Drop a partial last line of a JSON-lines side file (events, interventions)."""
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
            f.truncate(size - back + cut + 1 if cut >= 0 else (0 if back == size else size))
            return True
    except FileNotFoundError:
        return False
