"""The transitions log on disk: line framing, the appender (which also seals a full
segment, see supervisor.store.segments), and the verifying scanner.

One record a line: the Transition encoded as a JSON object, with a fixed-width trailer
`,"crc":"xxxxxxxx"}` + newline spliced in before the closing brace. The CRC32 covers the
line's bytes before the trailer, so a line is checked by slicing, without re-encoding,
and it stays a valid JSON object that any JSON tool can read (decoders ignore `crc`).
The same seal is put on snapshots and checkpoints, so a garbled one is detected.
"""

from __future__ import annotations

import errno
import os
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

import msgspec
import structlog

from supervisor import failpoints
from supervisor.core.errors import StoreCorrupt, StoreFsyncError, StoreWriteError
from supervisor.core.model import Transition

SEGMENTS_DIR: Final = "segments"
TRAILER_LEN: Final = 19  # len(b',"crc":"xxxxxxxx"}\n')
_TRAILER: Final = b',"crc":"%08x"}'  # without the newline: lines are split on it
_CHUNK: Final = 8 << 20
_WINDOW: Final = 1 << 16
# Big reads: the check runs in a thread, and each chunk has to win the GIL back.
_CRC_BUF: Final = 16 << 20
_crc32 = zlib.crc32
log = structlog.get_logger("orchd.store")


def sealed_name(first: int, last: int) -> str:
    """The file name of the sealed segment holding records first..last (names sort in
    log order)."""
    return f"{first:020d}-{last:020d}.jsonl"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(body: bytes) -> bytes:
    """Put the checksum trailer (and a newline) on an encoded JSON object."""
    head = body[:-1]
    return head + b',"crc":"%08x"}\n' % _crc32(head)


def is_sealed(data: bytes | memoryview) -> bool:
    """True when `data` ends with a trailer whose CRC matches the bytes before it."""
    if len(data) <= TRAILER_LEN or bytes(data[-1:]) != b"\n":
        return False
    # A view, not a slice: a snapshot is tens of megabytes, and a slice would copy it.
    with memoryview(data) as view:
        return bytes(view[-TRAILER_LEN:-1]) == _TRAILER % _crc32(view[:-TRAILER_LEN])


def corrupt_hint(state_dir: Path) -> str:
    """The commands an operator runs next when the state cannot be trusted."""
    d = str(state_dir)
    return (
        f"inspect with `orchctl state validate --state-dir {d}`; then "
        f"`orchctl state restore --from-backup latest --state-dir {d}` "
        f"or `orchctl state repair --state-dir {d}`"
    )


def _describe(exc: Exception) -> str:
    """An exception as a message: our own say what happened, others also name their type."""
    if type(exc).__module__.startswith("supervisor."):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class ScanResult(msgspec.Struct):
    """Where the good records of a log end, and what follows them."""

    end: int  # byte offset just past the last good record
    crc: int  # CRC32 of bytes [0, end)
    last_seq: int
    line: int  # line number of the last good record
    size: int  # file size seen
    torn_line: int | None = None  # first line of a bad final stretch, if any
    torn_why: str | None = None


class Scanner:
    """Reads a log from a known-good position, checking every line after it.

    Records with seq <= `apply_after` are only checked (checksum, seq); later ones are
    decoded and handed to `apply`. A bad stretch that runs to the end of the file is a
    torn tail and is reported in the result; a bad line followed by a good one, a seq
    gap, or a record `apply` refuses raises StoreCorrupt naming the line.
    """

    def __init__(self, path: Path, state_dir: Path) -> None:
        self.path, self.state_dir = path, state_dir
        self._decode = msgspec.json.Decoder(Transition).decode

    def _corrupt(self, line: int, why: str) -> StoreCorrupt:
        return StoreCorrupt(
            f"{self.path}: line {line}: {why}; {corrupt_hint(self.state_dir)}",
            path=str(self.path),
            line=line,
        )

    def scan(
        self,
        *,
        start: int = 0,
        crc: int = 0,
        seq: int = 0,
        line: int = 0,
        apply_after: int = 0,
        apply: Callable[[Transition], None] | None = None,
    ) -> ScanResult:
        decode, trailer, crc32 = self._decode, _TRAILER, _crc32
        expected = seq + 1
        # While every line is good, record s sits on line s + shift.
        shift = line - seq
        end = start
        bad: tuple[int, str] | None = None
        lines_after_bad = 0
        with open(self.path, "rb") as f:
            f.seek(start)
            carry = b""
            while chunk := f.read(_CHUNK):
                buf = carry + chunk if carry else chunk
                parts = buf.split(b"\n")
                carry = parts.pop()
                rest = parts
                if bad is None:
                    first = expected
                    # The hot loop of every replay: keep it lean.
                    for raw in parts:
                        if len(raw) <= 18 or raw[-18:] != trailer % crc32(raw[:-18]):
                            break
                        if expected <= apply_after:
                            if not raw.startswith(b'{"seq":%d,' % expected):
                                raise self._corrupt(
                                    expected + shift, f"seq is not {expected} (gap)"
                                )
                        else:
                            try:
                                rec = decode(raw)
                            except msgspec.DecodeError as exc:
                                why = f"record does not decode ({exc})"
                                raise self._corrupt(expected + shift, why) from None
                            if rec.seq != expected:
                                why = f"seq {rec.seq} where {expected} was due (gap)"
                                raise self._corrupt(expected + shift, why)
                            if apply is not None:
                                try:
                                    apply(rec)
                                except MemoryError:
                                    raise
                                except Exception as exc:
                                    # Its checksum is good, yet it cannot be performed:
                                    # whatever the cause, the log is not to be trusted.
                                    why = f"record cannot be replayed ({_describe(exc)})"
                                    raise self._corrupt(expected + shift, why) from exc
                        expected += 1
                    ngood = expected - first
                    if ngood == len(parts):
                        good_bytes = len(buf) - len(carry)
                    else:
                        good_bytes = sum(map(len, parts[:ngood])) + ngood
                        raw = parts[ngood]
                        bad = (
                            expected + shift,
                            "checksum mismatch" if len(raw) > 18 else "not a record",
                        )
                        rest = parts[ngood + 1 :]
                    # Good lines are contiguous from the start of buf.
                    crc = crc32(memoryview(buf)[:good_bytes], crc)
                    end += good_bytes
                    if bad is None:
                        continue
                for raw in rest:
                    # After a bad line, a good one means damage inside the log, not a torn end.
                    lines_after_bad += 1
                    if len(raw) > 18 and raw[-18:] == trailer % crc32(raw[:-18]):
                        assert bad is not None
                        where = bad[0] + lines_after_bad
                        why = f"{bad[1]}, and good records follow it (line {where})"
                        raise self._corrupt(bad[0], why)
            size = f.tell()
        if carry and bad is None:
            bad = (expected + shift, "incomplete last line (no newline)")
        result = ScanResult(
            end=end, crc=crc, last_seq=expected - 1, line=expected - 1 + shift, size=size
        )
        if bad is not None:
            result.torn_line, result.torn_why = bad
        return result


def prefix_matches(path: Path, end: int, crc: int, last_seq: int) -> bool:
    """True when the first `end` bytes of the log have CRC `crc` and end with record `last_seq`.

    This is how a snapshot's recorded log position is trusted without re-checking every
    line it covers: one CRC pass over the bytes, at memory speed (read into one reused
    buffer, so no chunk is allocated or copied twice)."""
    try:
        with open(path, "rb", buffering=0) as f:
            fd = f.fileno()
            if os.fstat(fd).st_size < end:
                return False
            buf = bytearray(min(_CRC_BUF, end))
            got, left = 0, end
            with memoryview(buf) as view:
                while left:
                    n = f.readinto(view[: min(len(buf), left)])
                    if not n:
                        return False
                    got = _crc32(view[:n], got)
                    left -= n
            if got != crc:
                return False
            if end == 0:
                return last_seq == 0
            tail = os.pread(fd, min(_WINDOW, end), end - min(_WINDOW, end))
    except OSError:
        return False
    if not tail.endswith(b"\n"):
        return False
    idx = tail.rfind(b"\n", 0, len(tail) - 1)
    if idx < 0 and end > len(tail):
        return True  # a record longer than the window: the CRC alone vouches for it
    return tail.startswith(b'{"seq":%d,' % last_seq, idx + 1)


class LogWriter:
    """Appends framed records to the active segment and makes them durable in groups.

    `write_batch` puts a step's lines in the file at once (one os.write, no fsync) and
    `sync` fdatasyncs everything written so far, so a group costs one fsync. A failed
    write is cut back to the last good record, so a batch is in the file whole or not at
    all; a failed fdatasync kills the writer for good, because after one the kernel may
    have dropped the dirty pages it failed to write.

    Threads: the loop calls `write_batch` while `sync` runs in a worker thread (or on the
    loop). `_lock` covers the file descriptor and the position (first, end, crc, written);
    it is held for an os.write or a rename, never across an fdatasync. `_sync_lock` makes
    syncs (and so the sealing of a segment, done at the end of a sync) one at a time.

    Sealing (`segment_bytes` > 0 and the active file reached it, checked after a sync):
    under `_lock`, the file is renamed to `segments/<first>-<last>.jsonl` and a new empty
    one takes its name; then, outside it, the records written to the old file since the
    sync's fdatasync are fdatasynced and both directories are fsynced, all before `sync`
    returns, so nothing in the new file counts as durable before the old one is whole.
    """

    def __init__(
        self,
        path: Path,
        *,
        end: int,
        crc: int,
        seq: int,
        fsync: bool,
        first: int = 1,
        segment_bytes: int = 0,
    ) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._fsync = fsync
        self._encode = msgspec.json.Encoder().encode
        self.first, self.end, self.crc = first, end, crc
        self.segment_bytes = segment_bytes
        self._written = self._synced = seq
        self._dirty = os.fstat(self._fd).st_size != end
        self._dead: StoreFsyncError | None = None
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self.sealed: list[Path] = []  # segments sealed by this writer, oldest first

    @property
    def written_seq(self) -> int:
        return self._written

    @property
    def synced_seq(self) -> int:
        return self._synced

    def position(self) -> tuple[int, int, int, int]:
        """(written seq, first seq of the active file, its end, the CRC of its bytes), at
        one moment: where a snapshot of the state at `written seq` ends in the log."""
        with self._lock:
            return self._written, self.first, self.end, self.crc

    def write(self, rec: Transition) -> None:
        """Append one record: `write_batch([rec])`."""
        self.write_batch((rec,))

    def write_batch(self, recs: Sequence[Transition]) -> None:
        """Append `recs` (one step's records) all or nothing, with one os.write.

        Their seqs must run on from `written_seq` (ValueError before anything is written).
        On any write error, a short write included, the file is cut back to where it ended
        before and StoreWriteError is raised: `written_seq`, `end` and `crc` are unchanged,
        as if the batch had never been tried. Not durable until `sync`."""
        if self._dead is not None:
            raise self._dead
        if not recs:
            return
        encode = self._encode
        data = b"".join([seal(encode(rec)) for rec in recs])
        with self._lock:
            self._append(recs, data)

    def _append(self, recs: Sequence[Transition], data: bytes) -> None:
        first = self._written + 1
        for i, rec in enumerate(recs):
            if rec.seq != first + i:
                raise ValueError(f"record seq {rec.seq} does not follow {first + i - 1}")
        try:
            if self._dirty:
                # A previous failed write may have left bytes behind; cut them first.
                os.ftruncate(self._fd, self.end)
                self._dirty = False
            if failpoints.take("append_fail"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = memoryview(data)
            while view:
                # A short write (the disk filled up part-way) loops: the next write then
                # reports the error, and everything written is cut back below.
                n = os.write(self._fd, view)
                if n == 0:
                    raise OSError(errno.ENOSPC, "short write")
                view = view[n:]
        except OSError as exc:
            self._cut_back()
            last = recs[-1].seq
            what = f"record {first}" if last == first else f"records {first}-{last}"
            where = (
                f"will be cut back to record {self._written} before the next write"
                if self._dirty
                else f"was cut back to record {self._written}"
            )
            raise StoreWriteError(
                f"cannot append {what} to {self.path}: {exc.strerror or exc}; nothing of the "
                f"batch was written (the log {where}). Free space (or fix the error) and the "
                f"next change will be written; nothing was lost."
            ) from exc
        except BaseException:
            self._cut_back()  # interrupted part-way: never leave a partial batch behind
            raise
        self.end += len(data)
        self.crc = _crc32(data, self.crc)
        self._written = recs[-1].seq

    def _cut_back(self) -> None:
        try:
            os.ftruncate(self._fd, self.end)
            self._dirty = False
        except OSError:
            self._dirty = True  # the next write tries again before appending

    def _failed(self, exc: OSError, what: str) -> StoreFsyncError:
        self._dead = StoreFsyncError(
            f"{what} failed: {exc.strerror or exc}; records after {self._synced} may not be "
            f"on disk. Never retried: restart, and the state is recovered from the log."
        )
        return self._dead

    def sync(self) -> None:
        """Make every record written so far durable; seal the active file when full."""
        with self._sync_lock:
            if self._dead is not None:
                raise self._dead
            with self._lock:
                target, fd = self._written, self._fd  # writes may go on while we wait
            if self._fsync and target > self._synced:
                try:
                    if slow := failpoints.delay("sync_delay"):
                        time.sleep(slow)
                    os.fdatasync(fd)
                except OSError as exc:
                    raise self._failed(exc, f"fdatasync of {self.path}") from exc
            self._synced = max(self._synced, target)
            if self.segment_bytes and self.end >= self.segment_bytes:
                self._seal()

    def _seal(self) -> None:
        """Seal the active file as a segment and start a new one (see the class docstring)."""
        seg_dir = self.path.parent / SEGMENTS_DIR
        with self._lock:
            last = self._written
            if self._dirty or last < self.first:
                return  # a failed write to cut back first, or nothing to seal
            sealed = seg_dir / sealed_name(self.first, last)
            try:
                seg_dir.mkdir(exist_ok=True)
                os.rename(self.path, sealed)
            except OSError as exc:
                # Not sealed: appending goes on in the same file, tried again next sync.
                log.warning("segment_not_sealed", path=str(self.path), error=str(exc))
                return
            failpoints.crash_point("roll_renamed")
            try:
                flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                new_fd = os.open(self.path, flags, 0o640)
            except OSError as exc:
                try:
                    os.rename(sealed, self.path)  # back as it was: the old file stays active
                except OSError as back:
                    raise self._failed(back, f"sealing {sealed}") from back
                log.warning("segment_not_sealed", path=str(self.path), error=str(exc))
                return
            old_fd, self._fd = self._fd, new_fd
            self.first, self.end, self.crc = last + 1, 0, 0
        failpoints.crash_point("roll_created")
        try:
            if self._fsync:
                if last > self._synced:
                    os.fdatasync(old_fd)
                fsync_dir(seg_dir)
                fsync_dir(self.path.parent)
        except OSError as exc:
            raise self._failed(exc, f"sealing {sealed}") from exc
        finally:
            os.close(old_fd)
        self._synced = max(self._synced, last)
        self.sealed.append(sealed)
        failpoints.crash_point("roll_done")

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
