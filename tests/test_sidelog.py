"""The appended side files on real files: rotation by size with a count kept, cuts that
see a consistent view whatever rotates meanwhile, copy-truncate under a writer that holds
the file open (store/sidelog.py)."""

from __future__ import annotations

import os
from pathlib import Path

from supervisor.store.sidelog import AppendLog, LineCut, Rotation, copy_truncate, rotated_files


def _lines(n: int, start: int = 0) -> list[bytes]:
    return [b"line-%06d" % i for i in range(start, start + n)]


def _all(path: Path) -> list[bytes]:
    with LineCut.of(path) as cut:
        got = list(cut.reverse_lines())
    got.reverse()
    return got


def test_append_rotates_at_size_and_keeps_count(tmp_path: Path) -> None:
    """No file grows past max_bytes; beyond `keep` rotated files the oldest go, and each
    removal is reported, oldest first."""
    path = tmp_path / "events.jsonl"
    log = AppendLog(path, Rotation(max_bytes=120, keep=3))
    removed: list[Path] = []
    for line in _lines(100):
        removed += log.append(line + b"\n")
    log.close()
    files = [p for _, p in rotated_files(path)] + [path]
    assert [p.name for p in files] == [
        "events.jsonl.3",
        "events.jsonl.2",
        "events.jsonl.1",
        "events.jsonl",
    ]
    assert all(p.stat().st_size <= 120 for p in files)
    assert removed and all(p.name == "events.jsonl.3" for p in removed)
    got = _all(path)
    # What is kept is the newest lines, every one, in order.
    assert got == _lines(100)[-len(got) :]
    assert len(got) == sum(p.read_bytes().count(b"\n") for p in files)


def test_keep_zero_never_removes_a_line(tmp_path: Path) -> None:
    """With keep = 0 (interventions' default) every rotated file stays: all lines read."""
    path = tmp_path / "interventions.log"
    log = AppendLog(path, Rotation(max_bytes=64, keep=0))
    removed = [p for line in _lines(200) for p in log.append(line + b"\n")]
    log.close()
    assert removed == []
    assert len(rotated_files(path)) > 30
    assert _all(path) == _lines(200)


def test_cut_is_consistent_across_rotations(tmp_path: Path) -> None:
    """A cut taken before more lines and rotations sees exactly the lines of its moment."""
    path = tmp_path / "events.jsonl"
    log = AppendLog(path, Rotation(max_bytes=100, keep=50))
    for line in _lines(40):
        log.append(line + b"\n")
    cut = log.cut()
    for line in _lines(60, start=40):
        log.append(line + b"\n")
    log.close()
    with cut:
        got = list(cut.reverse_lines())
        assert cut.tail(3) == _lines(3, start=37)
    got.reverse()
    assert got == _lines(40)
    assert _all(path) == _lines(100)


def test_partial_last_line_is_left_out(tmp_path: Path) -> None:
    """A line still being written (no newline yet) is not read; the complete ones are."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"a\nb\nhalf")
    assert _all(path) == [b"a", b"b"]
    with LineCut.of(path) as cut:
        assert cut.tail(1) == [b"b"]


def test_long_history_read_in_blocks(tmp_path: Path) -> None:
    """Lines longer than a read block and files of many blocks come back whole."""
    path = tmp_path / "events.jsonl"
    long = b"x" * 200_000
    path.write_bytes(b"first\n" + long + b"\n" + b"\n".join(_lines(50_000)) + b"\nlast\n")
    got = _all(path)
    assert got[0] == b"first" and got[1] == long and got[-1] == b"last"
    assert got[2:-1] == _lines(50_000)


def test_copy_truncate_under_an_open_append_writer(tmp_path: Path) -> None:
    """A writer holding the file open with O_APPEND (an agent's stderr) goes on at the
    start of the emptied file: no hole, no line lost outside the cut's window."""
    path = tmp_path / "w1.log"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for line in _lines(500):
            os.write(fd, line + b"\n")
        assert copy_truncate(path, Rotation(max_bytes=1000, keep=2)) == []
        for line in _lines(10, start=500):
            os.write(fd, line + b"\n")
        assert path.read_bytes() == b"".join(x + b"\n" for x in _lines(10, start=500))
        assert _all(path) == _lines(510)
        copy_truncate(path, Rotation(max_bytes=1000, keep=2))
        os.write(fd, b"after\n")
        removed = copy_truncate(path, Rotation(max_bytes=1000, keep=2))
    finally:
        os.close(fd)
    assert [p.name for p in removed] == ["w1.log.2"]
    assert sorted(p.name for _, p in rotated_files(path)) == ["w1.log.1", "w1.log.2"]
    assert path.read_bytes() == b""
