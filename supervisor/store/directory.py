"""The only module that touches the state directory: log, snapshot, backups, checkpoints,
events, interventions, metrics and archive files (the offline `orchctl state` helpers are
in supervisor/maintenance.py and re-exported here).

The transitions log (a chain of segments, supervisor.store.segments) is the source of
truth; everything else is derived from it and is rebuilt when missing or damaged.
`Store.open` takes the directory's lock and returns the recovered State; whatever it had
to repair on the way is in `Store.repairs`. Each snapshot installed may turn the previous
one into a backup (a full copy or a restore point, supervisor.store.backups), prune the
backups and delete the segments no kept backup needs any more.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Literal

import msgspec
import structlog

from supervisor import failpoints
from supervisor.core.errors import StoreCorrupt
from supervisor.core.model import Event, State, Transition
from supervisor.store.backups import (
    POINT_SUFFIX,
    Backup,
    full_every,
    list_kinds,
    needed_from,
    next_is_full,
    point_data,
    to_prune,
)
from supervisor.store.files import (
    LOG_NAME,
    SNAPSHOT_NAME,
    TMP_SUFFIX,
    cut_torn_text,
    lock_dir,
    next_backup_path,
    prune_oldest,
    write_atomic,
)
from supervisor.store.logfile import SEGMENTS_DIR, LogWriter, fsync_dir, is_sealed, seal
from supervisor.store.maintenance import (
    list_backups,
    repair_state,
    restore_from_backup,
    restore_from_transitions,
    validate_state,
)
from supervisor.store.segments import compact, settle
from supervisor.store.sidelog import NO_ROTATION, AppendLog, LineCut, Rotation, copy_truncate
from supervisor.store.snapshot import checkpoint_doc, encode_snapshot, gc_paused, iso_utc, load

log = structlog.get_logger("orchd.store")


class SnapshotBlob(msgspec.Struct, frozen=True):
    """A snapshot encoded on the loop, to be written in a thread."""

    seq: int
    data: bytes


class CheckpointBlob(msgspec.Struct, frozen=True):
    """A workstream checkpoint taken on the loop, to be encoded and written in a thread
    (`doc` is made of fresh lists and plain values: nothing in it changes with the state)."""

    ws_id: str
    seq: int
    doc: dict[str, Any]


_DIRS: Final = ("backups", "checkpoints", "archive", "logs", "logs/workers", SEGMENTS_DIR)
SEGMENT_BYTES: Final = 16 << 20
_event_decoder = msgspec.json.Decoder(Event)
_json_encoder = msgspec.json.Encoder()


class Store:
    """The state directory of one running daemon (see the module docstring)."""

    def __init__(
        self,
        state_dir: str | Path,
        *,
        backups_keep: int = 100,
        checkpoints_keep: int = 20,
        fsync: bool = True,
        events: Rotation = NO_ROTATION,
        interventions: Rotation = NO_ROTATION,
        worker_logs: Rotation = NO_ROTATION,
        segment_bytes: int = SEGMENT_BYTES,
        backups_full: int = 4,
    ) -> None:
        self._dir = Path(state_dir)
        self._fsync = fsync
        self.repairs: list[str] = []
        self._lock_fd = -1
        self._log: LogWriter | None = None
        self._events = AppendLog(self._dir / "events.jsonl", events)
        self._interventions = AppendLog(self._dir / "interventions.log", interventions)
        self.configure(
            backups_keep=backups_keep,
            checkpoints_keep=checkpoints_keep,
            segment_bytes=segment_bytes,
            backups_full=backups_full,
            events=events,
            interventions=interventions,
            worker_logs=worker_logs,
        )
        # The seq of the current.json this store wrote or loaded (None: damaged or none).
        self._current_seq: int | None = None
        # Installs (snapshot, backups, compaction) one at a time, in whichever thread.
        self._install_lock = threading.Lock()

    def configure(
        self,
        *,
        backups_keep: int,
        checkpoints_keep: int,
        segment_bytes: int,
        backups_full: int,
        events: Rotation,
        interventions: Rotation,
        worker_logs: Rotation,
    ) -> None:
        """The bounds on history (at start, and on a config reload: on the loop, between
        steps): the next seal, backup, prune and rotation follow them. Each is one
        attribute, read whole by the threads that use it."""
        self.backups_keep, self.checkpoints_keep = backups_keep, checkpoints_keep
        self.segment_bytes, self.backups_full = segment_bytes, backups_full
        if self._log is not None:
            self._log.segment_bytes = segment_bytes
        self._events.rotation = events
        self._interventions.rotation = interventions
        self.worker_logs = worker_logs

    @property
    def state_dir(self) -> Path:
        return self._dir

    @property
    def log_path(self) -> Path:
        return self._dir / LOG_NAME

    @property
    def written_seq(self) -> int:
        return self._writer.written_seq

    @property
    def synced_seq(self) -> int:
        return self._writer.synced_seq

    @property
    def _writer(self) -> LogWriter:
        if self._log is None:
            raise RuntimeError("the store is not open")
        return self._log

    def open(self) -> State:
        """Lock the directory, create what is missing, clean up, load and return the state."""
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = lock_dir(self._dir)
        try:
            return self._open_locked()
        except BaseException:
            self.close()
            raise

    def _open_locked(self) -> State:
        for sub in _DIRS:
            (self._dir / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("", "backups", "checkpoints", "archive"):
            for p in (self._dir / sub).glob(f"*{TMP_SUFFIX}"):
                p.unlink(missing_ok=True)
        with gc_paused(freeze=True):
            loaded = load(self._dir)
        self.repairs = list(loaded.repairs)
        found = loaded.log
        self.repairs += settle(self._dir, found, fsync=self._fsync)
        for name in ("events.jsonl", "interventions.log"):
            cut_torn_text(self._dir / name)
        scan = found.scan
        new_log = not self.log_path.exists()
        if found.tail is None or found.tail.last is not None:
            # No active file (a new directory, or one whose last file is sealed): a new
            # empty one, starting after the last record.
            end, crc, first = 0, 0, scan.last_seq + 1
        else:
            end, crc, first = scan.end, scan.crc, found.tail.first
        self._log = LogWriter(
            self.log_path,
            end=end,
            crc=crc,
            seq=scan.last_seq,
            fsync=self._fsync,
            first=first,
            segment_bytes=self.segment_bytes,
        )
        self._writer.sync()
        if new_log and self._fsync:
            fsync_dir(self._dir)
        if loaded.source == SNAPSHOT_NAME:
            self._current_seq = loaded.base_seq
        return loaded.state

    # -- the log ---------------------------------------------------------------------

    def write(self, rec: Transition) -> None:
        """Append `rec`'s line now (not yet durable: call `sync`). Raises StoreWriteError."""
        self._writer.write(rec)

    def write_batch(self, recs: Sequence[Transition]) -> None:
        """Append one step's records all or nothing (not yet durable: call `sync`).

        Raises ValueError, before anything is written, unless their seqs follow
        `written_seq` one by one; StoreWriteError when the write failed, the log then
        being exactly as it was before."""
        self._writer.write_batch(recs)

    def sync(self) -> None:
        """Make every record written so far durable (one fdatasync). Raises StoreFsyncError."""
        self._writer.sync()

    # -- snapshot, backups, checkpoints ----------------------------------------------

    def write_snapshot(self, state: State) -> Path:
        """Replace current.json by `state`, keeping the old one in backups/."""
        return self.install_snapshot(self.snapshot_blob(state))

    def snapshot_blob(self, state: State) -> SnapshotBlob:
        """`state` encoded as a snapshot, now (the caller owns `state`: the loop, between
        its steps); `install_snapshot` writes it, in any thread."""
        written, first, end, crc = self._writer.position()
        if state.last_seq > written:
            raise ValueError(f"state at seq {state.last_seq} is ahead of the log ({written})")
        at_end = state.last_seq == written
        data = encode_snapshot(
            state,
            log_offset=end if at_end else None,
            log_crc=crc if at_end else None,
            log_first=first if at_end else None,
        )
        return SnapshotBlob(seq=state.last_seq, data=data)

    def install_snapshot(self, blob: SnapshotBlob) -> Path:
        """Make `blob` current.json, in any thread: after a sync (a snapshot never covers
        records that are not durable yet), the old one becomes a backup (a full copy or a
        restore point), the backups beyond `backups_keep` are deleted, then the sealed
        segments no kept backup needs. Each step leaves a valid directory (crash points
        `backup_point_written`, `snapshot_installed`, `backup_prune`, `compact_unlink`).
        A blob older than the installed snapshot is not installed."""
        if self._writer.synced_seq < blob.seq:
            self._writer.sync()  # usually done already by the group commit
        path = self._dir / SNAPSHOT_NAME
        with self._install_lock:
            if self._current_seq is not None and blob.seq < self._current_seq:
                return path
            backups = self._dir / "backups"
            kinds = list_kinds(backups)
            last = kinds[-1].path if kinds else None
            old = self._current_seq if path.exists() else None
            fsync = self._fsync
            if old is None:
                write_atomic(path, blob.data, fsync=fsync)
            elif next_is_full(kinds, full_every(self.backups_keep, self.backups_full)):
                keep = next_backup_path(backups, last)
                write_atomic(path, blob.data, fsync=fsync, keep_as=keep)
                kinds.append(Backup(keep, old, True))
            else:
                point = next_backup_path(backups, last, suffix=POINT_SUFFIX)
                write_atomic(point, point_data(old, iso_utc()), fsync=fsync)
                failpoints.crash_point("backup_point_written")
                write_atomic(path, blob.data, fsync=fsync)
                kinds.append(Backup(point, old, False))
            self._current_seq = blob.seq
            failpoints.crash_point("snapshot_installed")
            for b in to_prune(kinds, self.backups_keep):
                failpoints.crash_point("backup_prune")
                b.path.unlink(missing_ok=True)
                kinds.remove(b)
            gone = compact(self._dir, needed_from(kinds, blob.seq))
            if gone:
                if fsync:
                    fsync_dir(self._dir / SEGMENTS_DIR)
                log.info("log_compacted", segments=len(gone), upto=gone[-1])
        return path

    def write_checkpoint(self, ws_id: str, state: State) -> Path:
        """Write checkpoints/<ws>_<seq>.json and <ws>_latest.json; keep the newest N."""
        return self.install_checkpoint(self.checkpoint_blob(ws_id, state))

    def checkpoint_blob(self, ws_id: str, state: State) -> CheckpointBlob:
        """A workstream's checkpoint taken now (see `snapshot_blob`); its encoding is left
        to `install_checkpoint`."""
        _check_name(ws_id)
        doc = checkpoint_doc(ws_id, state)
        return CheckpointBlob(ws_id=ws_id, seq=state.last_seq, doc=doc)

    def install_checkpoint(self, blob: CheckpointBlob) -> Path:
        """Encode a checkpoint, write it and point <ws>_latest.json at it, in any thread."""
        ws_id = blob.ws_id
        cdir = self._dir / "checkpoints"
        path = cdir / f"{ws_id}_{blob.seq}.json"
        write_atomic(path, seal(msgspec.json.encode(blob.doc)), fsync=self._fsync)
        # `latest` is a second name for the same file, switched atomically.
        tmp = cdir / f"{ws_id}_latest.json.{os.getpid()}{TMP_SUFFIX}"
        tmp.unlink(missing_ok=True)
        os.link(path, tmp)
        try:
            os.replace(tmp, cdir / f"{ws_id}_latest.json")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        numbered = [cdir / f"{ws_id}_{n}.json" for n in self.list_checkpoints(ws_id)]
        prune_oldest(numbered, self.checkpoints_keep)
        return path

    def list_checkpoints(self, ws_id: str) -> list[int]:
        """The seqs of the numbered checkpoints of `ws_id`, oldest first."""
        prefix = f"{ws_id}_"
        out = []
        for name in os.listdir(self._dir / "checkpoints"):
            if name.startswith(prefix) and name.endswith(".json"):
                mid = name[len(prefix) : -len(".json")]
                if mid.isdigit():
                    out.append(int(mid))
        return sorted(out)

    def read_checkpoint(self, ws_id: str, which: int | Literal["latest"]) -> dict[str, Any]:
        """A checkpoint's content. Raises FileNotFoundError, or StoreCorrupt if damaged."""
        _check_name(ws_id)
        path = self._dir / "checkpoints" / f"{ws_id}_{which}.json"
        data = path.read_bytes()
        if not is_sealed(data):
            raise StoreCorrupt(
                f"{path}: checksum mismatch; it is regenerated by the next checkpoint",
                path=str(path),
            )
        doc: dict[str, Any] = msgspec.json.decode(data)
        doc.pop("crc", None)
        return doc

    # -- side files (store/sidelog.py: rotation, reading across rotated files) ---------

    def append_event(self, event: Event) -> None:
        """Append one event to events.jsonl (written at once; not fsynced), rotating it
        first when it is full (the oldest rotated file beyond the count is removed)."""
        for path in self._events.append(_json_encoder.encode(event) + b"\n"):
            log.info("events_file_removed", path=str(path), keep=self._events.rotation.keep)

    def append_intervention(self, line: dict[str, Any]) -> list[Path]:
        """Append one manual action to interventions.log (one JSON object a line); the
        rotated files this removed, if a count is set (the caller says so: an audit trail
        never loses a line silently)."""
        return self._interventions.append(_json_encoder.encode(line) + b"\n")

    def events_cut(self) -> LineCut:
        """events.jsonl and its rotated files as they are now, to be read in any thread."""
        return self._events.cut()

    def interventions_cut(self) -> LineCut:
        """interventions.log and its rotated files as they are now (see `events_cut`)."""
        return self._interventions.cut()

    def worker_log_cut(self, worker_id: str) -> LineCut:
        """A worker's log and its rotated files as they are now (see `events_cut`)."""
        return LineCut.of(self.worker_log_path(worker_id))

    def append_worker_log(self, worker_id: str, lines: Sequence[tuple[float, str]]) -> None:
        """Append timestamped lines to a worker's log (in any thread). The log is rotated
        as soon as it reaches `worker_logs.max_bytes`, between two lines (copy-truncate:
        its agent holds it open), so a rotated file is at most the limit and a line.
        Raises OSError (a full disk): the caller loses these lines, never the daemon."""
        path = self.worker_log_path(worker_id)
        with open(path, "ab") as f:
            size = os.fstat(f.fileno()).st_size
            for ts, text in lines:
                line = f"{iso_utc(ts)} {text}\n".encode()
                f.write(line)
                size += len(line)
                limit = self.worker_logs.max_bytes
                if limit and size >= limit:
                    f.flush()
                    removed = copy_truncate(path, self.worker_logs)
                    log.info(
                        "worker_log_rotated", worker_id=worker_id, removed=[str(p) for p in removed]
                    )
                    # What the agent wrote meanwhile stays in the live file.
                    size = os.fstat(f.fileno()).st_size

    def read_events(self, *, after_line: int = 0) -> list[Event]:
        """Every event in events.jsonl and its rotated files, oldest first, skipping the
        first `after_line` (unreadable lines are skipped); reads files: in any thread."""
        with self.events_cut() as cut:
            raw = list(cut.reverse_lines())
        raw.reverse()
        out = []
        for line in raw[after_line:]:
            try:
                out.append(_event_decoder.decode(line))
            except msgspec.DecodeError:
                continue
        return out

    def read_events_from(self, after_line: int = 0) -> tuple[list[Event], int]:
        """The events after line `after_line` of events.jsonl alone, and the line to
        continue after next time (unreadable lines are skipped but counted; a partial last
        line is left for later)."""
        try:
            data = (self._dir / "events.jsonl").read_bytes()
        except FileNotFoundError:
            return [], after_line
        lines = data.split(b"\n")
        lines.pop()  # empty, or a line still being written
        out = []
        for raw in lines[after_line:]:
            try:
                out.append(_event_decoder.decode(raw))
            except msgspec.DecodeError:
                continue
        return out, max(after_line, len(lines))

    def task_log_path(self, task_id: str) -> Path:
        """logs/<ws>/<task>.log for a full name (logs/<task>.log for a task recorded before
        full names), written by the agents (every attempt, with a header each); the agent
        makes the workstream's directory."""
        ws_id, slash, bare = task_id.rpartition("/")
        _check_name(bare)
        if not slash:
            return self._dir / "logs" / f"{bare}.log"
        _check_name(ws_id)
        return self._dir / "logs" / ws_id / f"{bare}.log"

    def worker_log_path(self, worker_id: str) -> Path:
        _check_name(worker_id)
        return self._dir / "logs" / "workers" / f"{worker_id}.log"

    @staticmethod
    def tail(path: Path, lines: int) -> list[str]:
        """The last `lines` lines of a text file ([] when it does not exist)."""
        try:
            with open(path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                block, data = 8192, b""
                while True:
                    start = max(0, size - block)
                    f.seek(start)
                    data = f.read(size - start)
                    if start == 0 or data.count(b"\n") > lines:
                        break
                    block *= 4
        except FileNotFoundError:
            return []
        text = data.decode("utf-8", errors="replace").splitlines()
        return text[-lines:] if lines > 0 else []

    def write_json(self, relpath: str, obj: object) -> None:
        """Atomically write a derived JSON file (metrics.json, archive/<ws>.json)."""
        rel = Path(relpath)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"{relpath!r} is not a path inside the state directory")
        path = self._dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(
            path,
            msgspec.json.format(_json_encoder.encode(obj), indent=2) + b"\n",
            fsync=self._fsync,
        )

    def close(self, state: State | None = None) -> None:
        """Final sync, a snapshot of `state` if given, then release everything."""
        try:
            if self._log is not None:
                self._log.sync()
                if state is not None:
                    self.write_snapshot(state)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
            self._events.close()
            self._interventions.close()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)  # closing the descriptor releases the flock
                self._lock_fd = -1


def _check_name(ws_id: str) -> None:
    if not ws_id or "/" in ws_id or ws_id.startswith(".") or "\0" in ws_id:
        raise ValueError(f"{ws_id!r} cannot name a file")


def read_state(state_dir: str | Path, *, full: bool = False) -> State:
    """The state on disk, read-only: no lock taken, nothing repaired (a torn tail is
    ignored). For tools and tests that look at a directory; `full` ignores snapshots."""
    with gc_paused():
        return load(Path(state_dir), full=full).state


__all__ = [
    "Store",
    "list_backups",
    "lock_dir",
    "read_state",
    "repair_state",
    "restore_from_backup",
    "restore_from_transitions",
    "validate_state",
]
