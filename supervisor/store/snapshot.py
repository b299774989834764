"""The state directory's derived state files: the snapshot (current.json, and its
backups), workstream checkpoint documents, and `load`, which recovers the state from the
snapshot and the log segments after it without changing any file.

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
from supervisor.core.model import State, StateData
from supervisor.store.backups import list_kinds
from supervisor.store.files import SNAPSHOT_NAME
from supervisor.store.logfile import ScanResult, is_sealed, prefix_matches, seal
from supervisor.store.references import checked_apply, state_problem
from supervisor.store.segments import LogScan, Segment, log_chain, scan_chain, start_of

T = TypeVar("T")


class SnapshotFile(StateData, kw_only=True):
    """current.json: the state, plus where in the log it ends (the first seq of the segment
    file, the offset in it, the CRC of the bytes before it) so that a load can trust the
    covered part of that file with one CRC pass. No `log_first` (a snapshot written before
    segments) is the file that starts at record 1."""

    log_offset: int | None = None
    log_crc: int | None = None
    written_at: str | None = None
    log_first: int | None = None


_snapshot_decoder = msgspec.json.Decoder(SnapshotFile)
_encoder = msgspec.json.Encoder()


def iso_utc(t: float | None = None) -> str:
    """ISO 8601 UTC with milliseconds, as the recovery guide writes times."""
    dt = datetime.fromtimestamp(time.time() if t is None else t, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def encode_snapshot(
    state: State, *, log_offset: int | None, log_crc: int | None, log_first: int | None = None
) -> bytes:
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
        log_first=log_first if log_offset is not None else None,
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
    scan: ScanResult  # about `log.tail`, the file appending goes on in
    repairs: list[str]
    source: str  # "current.json", a backup's name, or "empty"
    log: LogScan
    base_seq: int = 0  # the last record `source` covers


def replay_base(state_dir: Path, chain: list[Segment]) -> tuple[SnapshotFile | None, str]:
    """What a replay of the whole kept log starts from: nothing when it starts at record
    1, else the oldest valid full backup it reaches (compaction keeps one). Raises
    StoreCorrupt when there is none."""
    oldest = chain[0].first if chain else 1
    if oldest == 1:
        return None, "empty"
    for b in list_kinds(state_dir / "backups"):
        if b.full and b.seq is not None and b.seq + 1 >= oldest:
            got = read_snapshot(b.path)
            if not isinstance(got, str) and got.last_seq + 1 >= oldest:
                return got, f"backups/{b.path.name}"
    raise StoreCorrupt(
        f"{chain[0].path}: the kept log starts at record {oldest} and no valid full backup "
        f"covers the records before it; `orchctl state restore --from-backup latest "
        f"--state-dir {state_dir}` rebuilds the state from the newest snapshot instead",
        path=str(chain[0].path),
    )


def load(state_dir: Path, *, full: bool = False) -> Loaded:
    """Recover the state from `state_dir` without changing any file.

    Snapshot (checksum checked), else the newest valid full backup, else empty; then the
    log's records after it, reading only the segments that hold them. `full=True` ignores
    current.json and replays all of the kept log (onto the backup it starts from, see
    `replay_base`). A torn tail is reported in `log` but not cut here (`segments.settle`
    does). Every replayed record's references are checked (`references.check_record`).
    Raises StoreCorrupt."""
    chain = log_chain(state_dir)
    repairs: list[str] = []
    snap: SnapshotFile | None
    snap, source = None, "empty"
    if full:
        snap, source = replay_base(state_dir, chain)
    else:
        got = read_snapshot(state_dir / SNAPSHOT_NAME)
        if isinstance(got, str):
            backups = [b for b in list_kinds(state_dir / "backups") if b.full]
            for b in reversed(backups):
                cand = read_snapshot(b.path)
                if not isinstance(cand, str):
                    snap, source = cand, f"backups/{b.path.name}"
                    break
            if snap is None and chain and chain[0].first > 1:
                snap, source = replay_base(state_dir, chain)
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
    position: tuple[int, int, int] | None = None
    covered: Callable[[], bool] | None = None
    if snap is not None and snap.log_offset is not None and snap.log_crc is not None:
        position = (snap.log_first or 1, snap.log_offset, snap.log_crc)
        start = start_of(chain, snap.last_seq)
        if start is not None and start.first == position[0]:
            # Check the file's covered bytes while the graph is being built.
            covered = in_thread(prefix_matches, start.path, *position[1:], snap.last_seq)
    state = State(snapshot_state(snap)) if snap is not None else State()
    base_seq = state.last_seq
    found = scan_chain(
        state_dir,
        chain,
        seq=state.last_seq,
        apply_after=state.last_seq,
        apply=checked_apply(state),
        position=position,
        covered=covered,
    )
    scan = found.scan
    if found.last_seq < state.last_seq:
        where = found.tail.path if found.tail is not None else state_dir / "transitions.jsonl"
        raise StoreCorrupt(
            f"{state_dir / source}: the snapshot covers records up to {state.last_seq} but "
            f"the log ends at record {found.last_seq} ({where}, line {scan.line}); "
            f"inspect with `orchctl state validate --state-dir {state_dir}`, then "
            f"`orchctl state repair --state-dir {state_dir}` rebuilds the snapshot from the log "
            f"(keeping the old one aside)",
            path=str(where),
            line=scan.line,
        )
    return Loaded(
        state=state, scan=scan, repairs=repairs, source=source, log=found, base_seq=base_seq
    )


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
