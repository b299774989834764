"""The transitions log on disk: framing, torn tails, corruption, write errors, the lock."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import msgspec
import pytest

from supervisor.core.errors import IllegalTransition, StoreCorrupt, StoreLocked
from supervisor.core.model import State, Transition, equal_states
from supervisor.store.directory import Store, read_state
from supervisor.store.logfile import TRAILER_LEN, is_sealed, seal

ROOT = Path(__file__).resolve().parent.parent


class Driver:
    """Makes legal records against an in-memory model and writes them through a Store:
    check first, then write + sync, then apply (the engine's order)."""

    def __init__(self, store: Store, model: State | None = None) -> None:
        self.store = store
        self.model = model if model is not None else State()
        self.ts = 1_700_000_000.0

    def do(self, entity: Any, id_: str, to: str, cause: Any = "auto", **changes: Any) -> Transition:
        self.ts += 1.0
        rec = Transition(
            seq=self.model.last_seq + 1,
            ts=self.ts,
            entity=entity,
            id=id_,
            from_=self.model.current(entity, id_),
            to=to,
            cause=cause,
            changes=changes,
        )
        self.model.check(rec)
        self.store.write(rec)
        self.store.sync()
        self.model.apply(rec)
        return rec

    def submit(self, ws: str, n: int, *, chain: bool = True) -> list[str]:
        ids = [f"{ws}-t{i}" for i in range(n)]
        tasks = [
            {
                "id": t,
                "workstream_id": ws,
                "command": ["true"],
                "depends_on": [ids[i - 1]] if chain and i else [],
            }
            for i, t in enumerate(ids)
        ]
        self.do("workstream", ws, "pending", "submit", workstream={"id": ws}, tasks=tasks)
        return ids

    def run_task(self, tid: str, worker: str = "w-1") -> None:
        if worker not in self.model.data.workers:
            self.do("worker", worker, "starting", pid=100)
            self.do("worker", worker, "idle")
        n = len(self.model.data.tasks[tid].attempts) + 1
        self.do("task", tid, "queued", queued_at=self.ts)
        attempt = {
            "attempt_id": f"{tid}-{n}",
            "number": n,
            "worker_id": worker,
            "started_at": self.ts,
        }
        self.do("task", tid, "running", worker_id=worker, attempt=attempt)
        self.do(
            "task",
            tid,
            "completed",
            worker_id=None,
            attempt_update={"ended_at": self.ts, "exit_code": 0},
        )


def build(d: Path, n_tasks: int = 3, **kw: Any) -> Driver:
    """A store in `d` with a workstream of `n_tasks` chained tasks, all run to completion."""
    store = Store(d, fsync=False, **kw)
    drv = Driver(store, store.open())
    for tid in drv.submit("ws-1", n_tasks):
        drv.run_task(tid)
    return drv


def line_starts(data: bytes) -> list[int]:
    starts = [0]
    for i, b in enumerate(data):
        if b == 0x0A:
            starts.append(i + 1)
    return starts  # the last entry is len(data)


def test_line_is_json_with_fixed_width_checksum_trailer(tmp_path: Path) -> None:
    """Each record is one JSON object a line whose last 19 bytes are the CRC trailer."""
    drv = build(tmp_path)
    drv.store.close()
    lines = (tmp_path / "transitions.jsonl").read_bytes().splitlines(keepends=True)
    assert len(lines) == drv.model.last_seq
    for n, line in enumerate(lines, 1):
        assert is_sealed(line)
        assert line[-TRAILER_LEN:].startswith(b',"crc":"') and line.endswith(b'"}\n')
        obj = msgspec.json.decode(line)
        assert obj["seq"] == n and len(obj["crc"]) == 8


def test_cut_at_every_offset_of_last_three_records_loads_last_whole_record(tmp_path: Path) -> None:
    """A log cut at any byte of its last three records loads to the last whole record, and
    the next append starts on its own line."""
    src = tmp_path / "src"
    drv = build(src, n_tasks=2)
    drv.store.close()
    data = (src / "transitions.jsonl").read_bytes()
    starts = line_starts(data)
    total = len(starts) - 1
    extra = Transition(seq=0, ts=1.0, entity="worker", id="w-9", to="starting", cause="auto")
    for cut in range(starts[total - 3], len(data) + 1):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        (d / "transitions.jsonl").write_bytes(data[:cut])
        whole = sum(1 for s in starts[1:] if s <= cut)
        store = Store(d, fsync=False)
        state = store.open()
        assert state.last_seq == whole, cut
        assert bool(store.repairs) == (cut not in starts), cut
        extra.seq = whole + 1
        store.write(extra)
        store.close()
        lines = (d / "transitions.jsonl").read_bytes().split(b"\n")
        assert lines.pop() == b""
        assert len(lines) == whole + 1 and all(is_sealed(ln + b"\n") for ln in lines), cut
        assert read_state(d).last_seq == whole + 1
        if cut not in starts:
            broken = list(d.glob("transitions.jsonl.broken.*"))
            assert len(broken) == 1 and broken[0].read_bytes() == data[starts[whole] : cut]


@pytest.mark.parametrize(
    "garbage", [os.urandom(700), b"\0" * 4096, b"\n\n" + os.urandom(64) + b"\n"]
)
def test_garbage_or_zeroed_block_at_end_is_cut_and_kept_aside(
    tmp_path: Path, garbage: bytes
) -> None:
    """Random bytes or a zeroed block after the last record are cut; the damaged file is kept."""
    drv = build(tmp_path)
    drv.store.close()
    log = tmp_path / "transitions.jsonl"
    good = log.read_bytes()
    log.write_bytes(good + garbage)
    store = Store(tmp_path, fsync=False)
    state = store.open()
    store.close()
    assert equal_states(state.data, drv.model.data)
    assert log.read_bytes() == good
    assert any("torn write" in r for r in store.repairs)
    (broken,) = tmp_path.glob("transitions.jsonl.broken.*")
    assert broken.read_bytes() == garbage


@pytest.mark.parametrize("with_snapshot", [False, True])
def test_flipped_bit_in_earlier_record_is_refused_with_its_line(
    tmp_path: Path, with_snapshot: bool
) -> None:
    """A flipped bit in a record followed by good ones raises StoreCorrupt naming the line."""
    drv = build(tmp_path, n_tasks=3)
    if with_snapshot:
        drv.store.write_snapshot(drv.model)  # it covers the damaged line
    drv.store.close()
    log = tmp_path / "transitions.jsonl"
    data = bytearray(log.read_bytes())
    starts = line_starts(bytes(data))
    data[starts[2] + 20] ^= 0x04  # inside line 3
    log.write_bytes(bytes(data))
    with pytest.raises(StoreCorrupt) as info:
        Store(tmp_path, fsync=False).open()
    assert info.value.line == 3
    msg = str(info.value)
    assert "transitions.jsonl: line 3" in msg and "orchctl state validate" in msg
    assert "orchctl state repair" in msg and "--from-backup latest" in msg
    assert log.read_bytes() == bytes(data)  # nothing was cut


def test_seq_gap_is_refused(tmp_path: Path) -> None:
    """A missing record in the middle (seq gap) raises StoreCorrupt at the line after the gap."""
    drv = build(tmp_path)
    drv.store.close()
    log = tmp_path / "transitions.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    del lines[4]
    log.write_bytes(b"".join(lines))
    with pytest.raises(StoreCorrupt, match="line 5") as info:
        Store(tmp_path, fsync=False).open()
    assert info.value.line == 5


def test_record_that_cannot_be_replayed_is_refused(tmp_path: Path) -> None:
    """A well-formed record that is illegal on replay is corruption, not a torn tail."""
    drv = build(tmp_path, n_tasks=1)
    drv.store.close()
    seq = drv.model.last_seq + 1
    # ws-1-t0 is completed: completed -> running is not a legal move.
    bad = Transition(
        seq=seq, ts=1.0, entity="task", id="ws-1-t0", from_="completed", to="running", cause="auto"
    )
    with open(tmp_path / "transitions.jsonl", "ab") as f:
        f.write(seal(msgspec.json.encode(bad)))
    with pytest.raises(StoreCorrupt, match="cannot be replayed"):
        Store(tmp_path, fsync=False).open()


def test_illegal_transition_leaves_state_and_log_unchanged(tmp_path: Path) -> None:
    """An illegal record is refused before it is written: state and log stay as they were."""
    drv = build(tmp_path, n_tasks=2)
    log = tmp_path / "transitions.jsonl"
    before_log = log.read_bytes()
    before = msgspec.json.encode(drv.model.data)
    seq = drv.store.written_seq
    with pytest.raises(IllegalTransition):
        drv.do("task", "ws-1-t0", "running")  # completed -> running is not in the table
    with pytest.raises(IllegalTransition):
        drv.do("task", "ws-1-t1", "pending", bogus=1)  # unknown field
    assert msgspec.json.encode(drv.model.data) == before
    assert log.read_bytes() == before_log and drv.store.written_seq == seq
    drv.store.close()
    assert equal_states(read_state(tmp_path).data, drv.model.data)


def test_write_refuses_out_of_order_seq(tmp_path: Path) -> None:
    """The store only appends the record that follows the last one."""
    drv = build(tmp_path, n_tasks=1)
    rec = Transition(
        seq=drv.store.written_seq + 2, ts=1.0, entity="worker", id="w", to="starting", cause="auto"
    )
    with pytest.raises(ValueError, match="does not follow"):
        drv.store.write(rec)
    drv.store.close()


def test_second_store_on_same_dir_is_locked_out(tmp_path: Path) -> None:
    """Only one Store may hold a state directory; the lock is released on close."""
    first = Store(tmp_path, fsync=False)
    first.open()
    with pytest.raises(StoreLocked, match=str(tmp_path)):
        Store(tmp_path, fsync=False).open()
    first.close()
    second = Store(tmp_path, fsync=False)
    second.open()
    second.close()


def test_lock_is_held_against_another_process(tmp_path: Path) -> None:
    """A daemon in another process sees the lock too (flock on state_dir/lock)."""
    store = Store(tmp_path, fsync=False)
    store.open()
    code = f"from supervisor.store.directory import Store; Store({str(tmp_path)!r}).open()"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    store.close()
    assert proc.returncode != 0 and "StoreLocked" in proc.stderr


def test_failed_write_is_cut_back_and_next_write_succeeds(tmp_path: Path) -> None:
    """A write that fails for lack of space (RLIMIT_FSIZE in a child) leaves the log at its
    last good record, raises StoreWriteError, and a later write succeeds once space is back."""
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        from supervisor.core.errors import StoreWriteError
        from supervisor.core.model import Transition
        from supervisor.store.directory import Store
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of a signal
        store = Store({str(tmp_path)!r}, fsync=True)
        store.open()
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1500, hard))
        seq = 0
        def rec(seq):
            return Transition(seq=seq, ts=1.0, entity="resource", id=f"r{{seq}}", from_=None,
                              to="defined", cause="config", changes={{"max_holders": seq}})
        try:
            while True:
                store.write(rec(seq + 1)); store.sync(); seq += 1
        except StoreWriteError as exc:
            print("ERROR", exc, file=sys.stderr)
        good = seq
        try:
            store.write(rec(seq + 1))
        except StoreWriteError:
            print("REFUSED-AGAIN", file=sys.stderr)
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        store.write(rec(good + 1)); store.sync()
        store.close()
        print(good)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    good = int(proc.stdout.split()[-1])
    assert good > 3 and "cut back to record" in proc.stderr and "REFUSED-AGAIN" in proc.stderr
    lines = (tmp_path / "transitions.jsonl").read_bytes().split(b"\n")
    assert lines.pop() == b"" and len(lines) == good + 1
    assert all(is_sealed(ln + b"\n") for ln in lines)
    store = Store(tmp_path, fsync=False)
    assert store.open().last_seq == good + 1 and store.repairs == []
    store.close()
