"""The state directory's derived state files: the snapshot (current.json, and its
backups), workstream checkpoint documents, and `load`, which recovers the state from the
snapshot and the log without changing any file.

Every file here is sealed with the log's checksum trailer and replaced atomically
(supervisor.store.files: temp file, fsync, rename, fsync of the directory), so a reader
sees the old file or the new one, and a damaged one is recognised rather than trusted.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from supervisor.core.errors import StoreCorrupt
from supervisor.core.graph import held_by
from supervisor.core.model import State, StateData
from supervisor.store.files import LOG_NAME, SNAPSHOT_NAME, list_backup_files
from supervisor.store.logfile import Scanner, ScanResult, is_sealed, prefix_matches, seal
from supervisor.store.references import checked_apply, state_problem

T = TypeVar("T")


class SnapshotFile(StateData, kw_only=True):
    """current.json: the state, plus where in the log it ends (offset, CRC of the bytes
    before it) so that a load can trust the covered part of the log with one CRC pass."""

    log_offset: int | None = None
    log_crc: int | None = None
    written_at: str | None = None


_snapshot_decoder = msgspec.json.Decoder(SnapshotFile)
_encoder = msgspec.json.Encoder()


def iso_utc(t: float | None = None) -> str:
    """ISO 8601 UTC with milliseconds, as the recovery guide writes times."""
    dt = datetime.fromtimestamp(time.time() if t is None else t, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def encode_snapshot(state: State, *, log_offset: int | None, log_crc: int | None) -> bytes:
    d = state.data
    snap = SnapshotFile(
        last_seq=d.last_seq,
        tasks=d.tasks,
        workstreams=d.workstreams,
        workers=d.workers,
        resources=d.resources,
        daemon=d.daemon,
        run_numbers=d.run_numbers,
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
        daemon=snap.daemon,
        run_numbers=snap.run_numbers,
    )


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
            for r in held_by(task):  # a per-host resource as its instance, ID@HOST
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
