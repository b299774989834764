"""Derived files on a full disk and torn-tail repair: a failed snapshot leaves no temp file,
a torn tail keeps only its own bytes aside, and a start that cannot repair exits clearly."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from supervisor.core.model import Transition
from supervisor.store import files
from supervisor.store.directory import Store, read_state
from tests.harness import ROOT, Daemon

# A child that gets EFBIG (not a fatal SIGXFSZ) once it writes past its file-size limit.
PRELUDE = """
import os, resource, signal, sys
from supervisor.core.model import Transition
from supervisor.store.directory import Store
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
def res(seq):
    return Transition(seq=seq, ts=1.0, entity="resource", id=f"resource-{seq:06d}",
                      from_=None, to="defined", cause="config", changes={"max_holders": seq})
def temp_files(d):
    return sorted(str(p) for p in d.rglob("*.tmp"))
"""


def res(seq: int) -> Transition:
    """A legal record on its own: one more resource defined."""
    return Transition(
        seq=seq,
        ts=1.0,
        entity="resource",
        id=f"resource-{seq:06d}",
        from_=None,
        to="defined",
        cause="config",
        changes={"max_holders": seq},
    )


def run_child(script: str, *wrapper: str) -> subprocess.CompletedProcess[str]:
    """Run PRELUDE + `script` in a fresh interpreter (optionally under `wrapper`)."""
    code = PRELUDE + textwrap.dedent(script)
    return subprocess.run(
        [*wrapper, sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_failed_snapshot_under_file_size_limit_leaves_no_temp_file(tmp_path: Path) -> None:
    """A snapshot that fails part-way (EFBIG from RLIMIT_FSIZE) removes its temp file and
    leaves current.json as it was."""
    r = run_child(
        f"""
        from pathlib import Path
        d = Path({str(tmp_path)!r})
        store = Store(d, fsync=True)
        state = store.open()
        for seq in range(1, 2001):
            rec = res(seq); store.write(rec); state.apply(rec)
        store.sync()
        limit = 16 * 1024  # the snapshot of 2000 resources is far bigger
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        try:
            store.write_snapshot(state)
        except OSError as exc:
            print("FAILED", exc.strerror, file=sys.stderr)
        print(temp_files(d), (d / "current.json").exists())
        """
    )
    assert r.returncode == 0, r.stderr
    assert "FAILED File too large" in r.stderr
    assert r.stdout.split() == ["[]", "False"]


def test_failed_snapshot_on_full_tmpfs_gives_its_space_back(tmp_path: Path) -> None:
    """On a full tmpfs, a snapshot that does not fit is removed again, so the space freed
    stays free and the log's next records still fit (audit E7)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    script = f"""
        from pathlib import Path
        d = Path({str(mnt)!r}) / "state"
        store = Store(d, fsync=True)
        state = store.open()
        for seq in range(1, 3001):
            rec = res(seq); store.write(rec); state.apply(rec)
        store.sync()
        spare = Path({str(mnt)!r}) / "spare"
        spare.write_bytes(b"x" * 65536)
        with open(Path({str(mnt)!r}) / "filler", "wb", buffering=0) as f:
            try:
                while f.write(b"\\0" * 4096):
                    pass
            except OSError:
                pass
        spare.unlink()  # 64 KiB free; the snapshot needs about 150 KiB
        free = os.statvfs(d).f_bavail
        try:
            store.write_snapshot(state)
        except OSError as exc:
            print("FAILED", exc.strerror, file=sys.stderr)
        print(temp_files(d), os.statvfs(d).f_bavail == free)
        for seq in range(3001, 3101):
            store.write(res(seq))
        store.sync()
        store.close()
        print(len((d / "transitions.jsonl").read_bytes().splitlines()))
    """
    mount = f'mount -t tmpfs -o size=1m tmpfs {mnt} && exec "$@"'
    r = run_child(script, "unshare", "-m", "sh", "-c", mount, "sh")
    if r.returncode != 0 and "mount" in r.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    assert "FAILED No space left on device" in r.stderr
    assert r.stdout.split() == ["[]", "True", "3100"]


def test_backup_directory_is_synced_before_the_snapshot_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keeping the old snapshot as a backup fsyncs backups/ before current.json is replaced."""
    store = Store(tmp_path, fsync=True)
    state = store.open()
    store.write(res(1))
    state.apply(res(1))
    store.write_snapshot(state)
    synced: list[str] = []
    real = files.fsync_dir
    real_replace = os.replace

    def fsync_dir(path: Path) -> None:
        synced.append(path.name)
        real(path)

    def replace(src: str | Path, dst: str | Path) -> None:
        synced.append(f"replace {Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(files, "fsync_dir", fsync_dir)
    monkeypatch.setattr(files.os, "replace", replace)
    store.write_snapshot(state)
    monkeypatch.undo()
    store.close()
    assert synced == ["backups", "replace current.json", tmp_path.name]


def test_torn_tail_of_big_log_keeps_only_the_torn_bytes(tmp_path: Path) -> None:
    """A torn tail on a multi-megabyte log is cut; only the bytes after the last good
    record are kept aside (never a copy of the whole log), and the repair says so."""
    store = Store(tmp_path, fsync=False)
    store.open()
    for start in range(1, 30001, 1000):
        store.write_batch([res(s) for s in range(start, start + 1000)])
    store.close()
    log = tmp_path / "transitions.jsonl"
    good = log.read_bytes()
    assert len(good) > 3_000_000
    torn = b'{"seq":30001,"ts":1.0,"entity":"reso'
    with log.open("ab") as f:
        f.write(torn)
    store = Store(tmp_path, fsync=True)
    state = store.open()
    store.close()
    assert state.last_seq == 30000 and log.read_bytes() == good
    (aside,) = tmp_path.glob("transitions.jsonl.broken.*")
    assert aside.read_bytes() == torn
    (repair,) = store.repairs
    assert f"the {len(torn)} torn byte(s) after record 30000" in repair
    assert f"(offset {len(good)}) were kept as {aside.name}" in repair


def test_daemon_that_cannot_keep_a_torn_tail_exits_clearly(tmp_path: Path) -> None:
    """When the torn tail cannot be kept aside (EFBIG here, ENOSPC on a full disk), orchd
    exits 74 with the file, the error and what to do, no traceback, and the log untouched;
    once the limit is gone it starts and repairs."""
    d = Daemon(tmp_path)
    store = Store(d.state_dir, fsync=False)
    store.open()
    store.write_batch([res(s) for s in range(1, 101)])
    store.close()
    log = d.state_dir / "transitions.jsonl"
    torn = b"\0" * 200_000  # a zeroed block, bigger than the limit below
    with log.open("ab") as f:
        f.write(torn)
    before = log.read_bytes()
    limit = 100_000

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run(
        [sys.executable, "-m", "supervisor", "--config", str(d.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        preexec_fn=small_files,
    )
    assert r.returncode == 74, r.stderr
    assert "Traceback" not in r.stderr
    assert f"cannot open the state in {d.state_dir}" in r.stderr
    assert "File too large" in r.stderr and "free space" in r.stderr
    assert log.read_bytes() == before and not list(d.state_dir.glob("*.broken.*"))
    d.start()
    try:
        ev = d.wait_event("state_repaired")
        assert f"the {len(torn)} torn byte(s) after record 100" in ev["message"]
    finally:
        d.stop()
    assert read_state(d.state_dir).data.resources["resource-000100"].max_holders == 100
    shutil.rmtree(d.state_dir)
