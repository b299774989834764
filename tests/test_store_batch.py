"""One step, one atomic append: `write_batch` writes a step's records whole or not at all."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from supervisor import failpoints
from supervisor.core.errors import StoreWriteError
from supervisor.core.model import Transition
from supervisor.store import logfile
from supervisor.store.directory import Store, read_state

ROOT = Path(__file__).resolve().parent.parent


def res(seq: int) -> Transition:
    """A legal record on its own: resource r<seq> is defined."""
    return Transition(
        seq=seq,
        ts=1.0,
        entity="resource",
        id=f"r{seq}",
        from_=None,
        to="defined",
        cause="config",
        changes={"max_holders": seq},
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """An open store holding records 1-3, written one batch each."""
    s = Store(tmp_path, fsync=False)
    s.open()
    for seq in (1, 2, 3):
        s.write_batch([res(seq)])
    s.sync()
    try:
        yield s
    finally:
        s.close()
        failpoints.reset("")


def test_batch_is_appended_whole_and_replays(store: Store, tmp_path: Path) -> None:
    """A batch of three records lands as three sealed lines and replays to their state."""
    store.write_batch([res(4), res(5), res(6)])
    store.sync()
    assert store.written_seq == store.synced_seq == 6
    lines = store.log_path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 6 and all(logfile.is_sealed(line) for line in lines)
    store.close()
    assert sorted(read_state(tmp_path).data.resources) == [f"r{i}" for i in range(1, 7)]


def test_failed_batch_leaves_log_byte_identical(store: Store) -> None:
    """A batch whose write fails leaves the file as it was and written_seq unchanged."""
    before = store.log_path.read_bytes()
    failpoints.reset("append_fail")
    with pytest.raises(StoreWriteError) as info:
        store.write_batch([res(4), res(5), res(6)])
    msg = str(info.value)
    assert "records 4-6" in msg and "nothing of the batch was written" in msg
    assert "Free space" in msg and "cut back to record 3" in msg
    assert store.log_path.read_bytes() == before
    assert store.written_seq == 3


def test_batch_after_failure_follows_last_good_record(store: Store, tmp_path: Path) -> None:
    """After a failed batch, the retried batch is appended right after record 3."""
    before = store.log_path.read_bytes()
    failpoints.reset("append_fail")
    with pytest.raises(StoreWriteError):
        store.write_batch([res(4), res(5)])
    store.write_batch([res(4), res(5)])
    store.sync()
    data = store.log_path.read_bytes()
    assert data.startswith(before)
    assert data[len(before) :].startswith(b'{"seq":4,')
    store.close()
    assert read_state(tmp_path).last_seq == 5


def test_append_fail_failpoint_counts_batches(store: Store) -> None:
    """`append_fail:1` fails one whole batch, not one record of it; the next batch succeeds."""
    failpoints.reset("append_fail:1")
    with pytest.raises(StoreWriteError):
        store.write_batch([res(4), res(5), res(6)])
    store.write_batch([res(4), res(5), res(6)])
    assert store.written_seq == 6


@pytest.mark.parametrize("seqs", [[4, 6], [5, 6], [4, 4], [3, 4]])
def test_seq_gap_in_batch_is_refused_before_writing(store: Store, seqs: list[int]) -> None:
    """A batch whose seqs do not run on from written_seq is refused and nothing is written."""
    before = store.log_path.read_bytes()
    with pytest.raises(ValueError, match="does not follow"):
        store.write_batch([res(s) for s in seqs])
    assert store.log_path.read_bytes() == before and store.written_seq == 3


def test_empty_batch_writes_nothing(store: Store) -> None:
    """An empty batch is a no-op."""
    before = store.log_path.read_bytes()
    store.write_batch([])
    assert store.log_path.read_bytes() == before and store.written_seq == 3


def test_failed_cut_back_is_retried_before_next_batch(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When cutting a partial batch back fails too, the next batch cuts it first."""
    before = store.log_path.read_bytes()
    real_write, real_truncate = os.write, os.ftruncate
    calls = {"write": 0, "truncate": 0}

    def half_then_enospc(fd: int, data: bytes | memoryview) -> int:
        calls["write"] += 1
        if calls["write"] == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def eio_once(fd: int, length: int) -> None:
        calls["truncate"] += 1
        if calls["truncate"] == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_truncate(fd, length)

    monkeypatch.setattr(logfile.os, "write", half_then_enospc)
    monkeypatch.setattr(logfile.os, "ftruncate", eio_once)
    with pytest.raises(StoreWriteError, match="before the next write"):
        store.write_batch([res(4), res(5), res(6)])
    assert len(store.log_path.read_bytes()) > len(before)  # the partial batch is still there
    monkeypatch.setattr(logfile.os, "write", real_write)
    store.write_batch([res(4)])
    assert store.log_path.read_bytes() == before + logfile.seal(msgspec.json.encode(res(4)))


def test_torn_batch_under_file_size_limit_is_cut_back(tmp_path: Path) -> None:
    """A batch the kernel writes only part-way (RLIMIT_FSIZE in a child) is cut back to the
    last whole record; the file reopens cleanly and the next batch appends after it."""
    script = textwrap.dedent(
        f"""
        import os, resource, signal, sys
        from supervisor.core.errors import StoreWriteError
        from supervisor.core.model import Transition
        from supervisor.store.directory import Store
        from supervisor.store import logfile
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
        wrote, real_write = [], os.write
        def observed(fd, data):  # only watches: the kernel does the tearing
            n = real_write(fd, data)
            wrote.append((n, len(data)))
            return n
        def res(seq):
            return Transition(seq=seq, ts=1.0, entity="resource", id=f"r{{seq}}", from_=None,
                              to="defined", cause="config", changes={{"max_holders": seq}})
        store = Store({str(tmp_path)!r}, fsync=True)
        store.open()
        store.write_batch([res(1), res(2)]); store.sync()
        size = os.path.getsize(store.log_path)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        # Room for a record and a half of the next batch: the kernel writes that much.
        limit = size + 150
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        logfile.os.write = observed
        try:
            store.write_batch([res(3), res(4), res(5)])
        except StoreWriteError as exc:
            print("ERROR", exc, file=sys.stderr)
        logfile.os.write = real_write
        print(size, os.path.getsize(store.log_path), store.written_seq, *wrote[0])
        store.close()
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "ERROR" in proc.stderr and "nothing of the batch was written" in proc.stderr
    size, after, written, partial, batch_len = map(int, proc.stdout.split())
    assert partial == 150 < batch_len  # the kernel really wrote the batch part-way
    assert after == size and written == 2
    store = Store(tmp_path, fsync=False)
    state = store.open()
    assert state.last_seq == 2 and not store.repairs
    store.write_batch([res(3), res(4), res(5)])
    store.close()
    assert read_state(tmp_path).last_seq == 5
