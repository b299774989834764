"""The state directory's files that grow by appending lines — events.jsonl,
interventions.log and the workers' logs — rotated by size with a count kept, and read
across their rotated files as one stream, in order.

Rotation renames NAME to NAME.1 (NAME.1 to NAME.2, …; the highest number is the oldest)
and starts a new NAME. Beyond `keep` rotated files the oldest is removed, and the caller
is told which, so it can say so; `keep = 0` removes none (interventions.log, an audit
trail, by default).

A worker's log is also written by its agent, which holds the file open (O_APPEND) for
its own lines and stderr: renaming it would leave the agent writing into NAME.1 forever.
It is rotated by copy-truncate instead (`copy_truncate`): the content copied to NAME.1,
then the file cut to nothing, the agent's next write landing at the new end. What the
agent writes between the last read of the copy and the cut (a few microseconds) is lost.

Readers take a `LineCut`: the files as they are at one moment, each opened, with its
size. It is taken cheaply (a few opens) where the state is consistent (in a step of the
engine) and read in any thread afterwards; a rotation meanwhile changes nothing of what
it sees. Every reading function here reads backwards from the newest line, so the last
N lines of a long history cost what N lines cost.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import msgspec

_BLOCK = 1 << 16


class Rotation(msgspec.Struct, frozen=True):
    """When a file rotates and how many rotated files are kept."""

    max_bytes: int = 0  # 0: never rotated
    keep: int = 0  # rotated files kept; 0: every one (none is ever removed)


NO_ROTATION = Rotation()


def rotated_files(path: Path) -> list[tuple[int, Path]]:
    """The rotated files of `path` that exist, as (number, path), oldest (highest) first."""
    prefix = path.name + "."
    found = []
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    for name in names:
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            found.append((int(name[len(prefix) :]), path.parent / name))
    return sorted(found, reverse=True)


def shift(path: Path, keep: int) -> list[Path]:
    """Make room for a new NAME.1: every rotated file moves one number up, those beyond
    `keep` (if > 0) are removed; the removed files."""
    dropped = []
    for n, old in rotated_files(path):
        if keep and n >= keep:
            old.unlink(missing_ok=True)
            dropped.append(old)
        else:
            os.replace(old, old.with_name(f"{path.name}.{n + 1}"))
    return dropped


class AppendLog:
    """One file written in whole lines by this process alone, rotated by size (see the
    module docstring). Not thread-safe: one writer (the engine's loop)."""

    def __init__(self, path: Path, rotation: Rotation) -> None:
        self.path, self.rotation = path, rotation
        self._fd = -1
        self._size = 0

    def append(self, data: bytes) -> list[Path]:
        """Write `data` (whole lines) at the end, rotating first when it would take the
        file past `max_bytes`; the rotated files this removed (oldest first)."""
        if self._fd < 0:
            self._open()
        dropped: list[Path] = []
        limit = self.rotation.max_bytes
        if limit and self._size and self._size + len(data) > limit:
            dropped = self.rotate()
        os.write(self._fd, data)
        self._size += len(data)
        return dropped

    def rotate(self) -> list[Path]:
        """NAME becomes NAME.1 and a new NAME is begun; the rotated files removed."""
        self.close()
        dropped = shift(self.path, self.rotation.keep)
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self._open()
        return dropped

    def cut(self) -> LineCut:
        """The file and its rotated files as they are now (see LineCut)."""
        return LineCut.of(self.path)

    def _open(self) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._fd = os.open(self.path, flags, 0o640)
        self._size = os.fstat(self._fd).st_size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def copy_truncate(path: Path, rotation: Rotation) -> list[Path]:
    """Rotate a file that other processes hold open for appending: copy it to NAME.1,
    then cut it to nothing (see the module docstring); the rotated files removed."""
    try:
        src = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    try:
        dropped = shift(path, rotation.keep)
        tmp = path.with_name(path.name + ".1.tmp")
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            offset = 0
            while chunk := os.pread(src, _BLOCK * 16, offset):
                os.write(dst, chunk)
                offset += len(chunk)
            os.ftruncate(src, 0)
        finally:
            os.close(dst)
        os.replace(tmp, path.with_name(path.name + ".1"))
    finally:
        os.close(src)
    return dropped


class LineCut:
    """A consistent view of a file and its rotated files: each open, with the size it had
    when the cut was taken (the bytes after it are not seen). Read in any thread; close it
    (or use it as a context manager) when done."""

    def __init__(self, parts: list[tuple[int, int]]) -> None:
        self._parts = parts  # (fd, size), oldest first

    @classmethod
    def of(cls, path: Path) -> LineCut:
        """`path`'s rotated files (oldest first) and `path` itself, as they are now."""
        parts: list[tuple[int, int]] = []
        try:
            for _, p in [*rotated_files(path), (0, path)]:
                try:
                    fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                parts.append((fd, os.fstat(fd).st_size))
        except BaseException:
            for fd, _ in parts:
                os.close(fd)
            raise
        return cls(parts)

    @property
    def size(self) -> int:
        """The bytes the cut covers, in all its files."""
        return sum(size for _, size in self._parts)

    def reverse_lines(self) -> Iterator[bytes]:
        """Every complete line, newest first (a partial last line of a file — still being
        written, or torn by a crash — is left out)."""
        for fd, size in reversed(self._parts):
            yield from _backwards(fd, _complete_end(fd, size))

    def tail(self, n: int) -> list[bytes]:
        """The last `n` complete lines, oldest first."""
        if n <= 0:
            return []
        out = []
        for line in self.reverse_lines():
            out.append(line)
            if len(out) >= n:
                break
        out.reverse()
        return out

    def close(self) -> None:
        parts, self._parts = self._parts, []
        for fd, _ in parts:
            os.close(fd)

    def __enter__(self) -> LineCut:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _complete_end(fd: int, size: int) -> int:
    """The offset just after the last newline within the first `size` bytes (0: none)."""
    pos = size
    while pos > 0:
        start = max(0, pos - _BLOCK)
        chunk = os.pread(fd, pos - start, start)
        i = chunk.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        if len(chunk) < pos - start:  # cut short meanwhile (a copy-truncate): what is there
            pos = start + len(chunk)
            continue
        pos = start
    return 0


def _backwards(fd: int, end: int) -> Iterator[bytes]:
    """The lines of the first `end` bytes (which end with a newline), last first."""
    if end <= 0:
        return
    pos = end - 1  # the final newline
    rest = b""
    while pos > 0:
        start = max(0, pos - _BLOCK)
        chunk = os.pread(fd, pos - start, start)
        pos = start
        pieces = (chunk + rest).split(b"\n")
        rest = pieces[0]
        yield from reversed(pieces[1:])
    yield rest


def tail_text(path: Path, lines: int) -> list[str]:
    """The last `lines` lines of `path` and its rotated files, as text (for any thread)."""
    with LineCut.of(path) as cut:
        return [b.decode("utf-8", errors="replace") for b in cut.tail(lines)]
