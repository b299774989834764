"""Real faults for the real daemon: write errors from the daemon's own file-size limit,
failpoints passed through ORCHD_FAILPOINT, a raw events follower, and the checks every
fault test ends with (nothing stuck, nothing recorded twice, the state validates).

A write error here is a real one: the live daemon's RLIMIT_FSIZE is lowered to the log's
size (plus the bytes of the records that are meant to land), so the next append fails with
EFBIG on the daemon's ordinary write path, with no patching. Only the soft limit is moved;
the hard limit stays where it was, so lifting the fault needs no CAP_SYS_RESOURCE.
"""

from __future__ import annotations

import contextlib
import json
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec

from supervisor.core.model import Transition
from supervisor.store.logfile import seal
from tests.harness import ROOT, Daemon, event_matches

# The longest repr of a time.time() float (10 integer digits, 17 significant digits): record
# lengths are estimated with it, so an estimate is an upper bound of the real length.
WIDEST_TS = 1234567890.1234567
_encode = msgspec.json.Encoder().encode


class FaultDaemon(Daemon):
    """A Daemon with what the fault tests read of it: its pid, its log, its write errors."""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.state_dir / "transitions.jsonl"

    def write_failures(self) -> int:
        """How many failed log writes the daemon has reported so far."""
        return self.output.read_text(errors="replace").count('"store_write_failed"')


# --- write errors ----------------------------------------------------------------------


def ignores_sigxfsz(pid: int) -> bool:
    """True when process `pid` ignores SIGXFSZ (else EFBIG would kill it, not fail a write)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGXFSZ - 1) & 1)
    return False


class WriteFault:
    """Real write errors on a live daemon through its RLIMIT_FSIZE."""

    def __init__(self, d: FaultDaemon) -> None:
        self.d = d
        assert ignores_sigxfsz(d.pid), (
            "orchd does not ignore SIGXFSZ: a file-size limit would kill it, not fail a write"
        )

    def block(self, landing: int = 0) -> int:
        """From now on an append fails once the log would grow past its current size plus
        `landing` bytes (the records meant to land first). Returns the limit."""
        limit = self.d.log_path.stat().st_size + landing
        _, hard = resource.prlimit(self.d.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(self.d.pid, resource.RLIMIT_FSIZE, (limit, hard))
        return limit

    def lift(self) -> None:
        _, hard = resource.prlimit(self.d.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(self.d.pid, resource.RLIMIT_FSIZE, (hard, hard))

    def wait_failed(self, before: int, what: str, timeout: float = 10.0) -> None:
        """Wait until the daemon reported a failed write after `before` had been counted."""
        Daemon.wait_for(
            lambda: self.d.write_failures() > before, timeout, f"a write error ({what})"
        )


def record_bytes(
    seq: int, entity: str, id_: str, frm: str | None, to: str, cause: str, **changes: Any
) -> int:
    """An upper bound of the length of a record as the daemon writes it (floats in the
    record are to be given as WIDEST_TS)."""
    rec = Transition(
        seq=seq,
        ts=WIDEST_TS,
        entity=entity,  # type: ignore[arg-type]
        id=id_,
        from_=frm,
        to=to,
        cause=cause,  # type: ignore[arg-type]
        changes=changes,
    )
    return len(seal(_encode(rec)))


def attempt_id_like(task_id: str, number: int) -> str:
    """An attempt id of the length the daemon gives it (`task.n.hex6`)."""
    return f"{task_id}.{number}.abcdef"


# --- reading the log -------------------------------------------------------------------


def records(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / "transitions.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def last_seq(d: Daemon) -> int:
    recs = records(d.state_dir)
    return int(recs[-1]["seq"]) if recs else 0


def wait_quiet(d: FaultDaemon, quiet_s: float = 0.3, timeout: float = 10.0) -> int:
    """Wait until the log has not grown for `quiet_s` (a lazy pid record, a heartbeat-driven
    change); returns its size. Fault placement counts bytes from this point."""
    seen = [d.log_path.stat().st_size, time.monotonic()]

    def still() -> bool:
        size = d.log_path.stat().st_size
        if size != seen[0]:
            seen[:] = [size, time.monotonic()]
        return time.monotonic() - seen[1] >= quiet_s

    Daemon.wait_for(still, timeout, "the log to be quiet")
    return int(seen[0])


def assert_recorded_once(state_dir: Path) -> None:
    """Nothing recorded twice: seqs follow each other, no task completed twice, no attempt
    started twice (by id or by number)."""
    recs = records(state_dir)
    seqs = [r["seq"] for r in recs]
    assert seqs == list(range(1, len(seqs) + 1)), f"seq gap or repeat: {seqs}"
    completed = Counter(
        r["id"]
        for r in recs
        if r["entity"] == "task" and r["to"] == "completed" and r.get("from") != "completed"
    )
    twice = {t: n for t, n in completed.items() if n > 1}
    assert not twice, f"tasks recorded completed more than once: {twice}"
    attempts = [
        (r["id"], r["changes"]["attempt"]) for r in recs if "attempt" in r.get("changes", {})
    ]
    ids = Counter(a["attempt_id"] for _, a in attempts)
    assert all(n == 1 for n in ids.values()), f"attempt ids recorded twice: {ids}"
    numbers = Counter((t, a["number"]) for t, a in attempts)
    assert all(n == 1 for n in numbers.values()), f"attempt numbers recorded twice: {numbers}"


# --- the state after the fault ---------------------------------------------------------


def stuck_workers(d: Daemon) -> list[str]:
    """What is wrong with the pool as `orchctl workers` and `show --json` describe it: a
    busy worker without a running task of its own, an idle one holding a task, a task
    running on a worker that does not run it."""
    problems = []
    workers = d.ctl_json("workers")
    for w in workers:
        if w["state"] == "busy":
            t = d.ctl_json("show", w["task_id"]) if w["task_id"] else None
            if t is None or t["state"] != "running" or t.get("worker_id") != w["id"]:
                problems.append(
                    f"{w['id']} is busy on {w['task_id']} which is {t['state'] if t else 'nothing'}"
                )
        elif w["state"] == "idle" and w["task_id"]:
            problems.append(f"{w['id']} is idle but holds {w['task_id']}")
    for t in d.call("tasks"):
        if t["state"] == "running":
            owner = next((w for w in workers if w["id"] == t.get("worker_id")), None)
            if owner is None or owner["state"] not in ("busy", "unresponsive"):
                problems.append(
                    f"task {t['id']} is running on {t.get('worker_id')} which is "
                    f"{owner['state'] if owner else 'unknown'}"
                )
    return problems


def live_workers(d: Daemon) -> list[dict[str, Any]]:
    return [w for w in d.workers() if w["state"] in ("idle", "busy")]


def assert_pool_back(d: Daemon, size: int, timeout: float = 5.0) -> None:
    """The pool is back to `size` live workers and none of them is stuck."""
    try:
        Daemon.wait_for(lambda: len(live_workers(d)) == size, timeout, f"{size} live workers")
    except AssertionError:
        states = [(w["id"], w["state"]) for w in d.workers()]
        raise AssertionError(
            f"the pool is {len(live_workers(d))} of {size} workers after writes succeed "
            f"again: {states}"
        ) from None
    problems = stuck_workers(d)
    assert not problems, f"stuck after writes succeed again: {problems}"


def wait_task_state(
    d: Daemon, task_id: str, states: tuple[str, ...], timeout: float, why: str
) -> dict[str, Any]:
    """wait_task, with what the task looks like in the failure message."""
    try:
        return d.wait_task(task_id, states, timeout)
    except AssertionError:
        t = d.task(task_id)
        attempts = [
            {k: a.get(k) for k in ("number", "attempt_id", "failure_kind", "ended_at")}
            for a in t.get("attempts", [])
        ]
        raise AssertionError(
            f"{why}: task {task_id} is still {t['state']} {timeout:g}s later "
            f"(pid {t.get('pid')}, worker {t.get('worker_id')}, attempts {attempts})"
        ) from None


def stop_and_validate(d: Daemon) -> None:
    """Stop the daemon (cleanly) and check the state directory offline."""
    assert d.stop() == 0, f"orchd did not stop cleanly:\n{d.output.read_text()[-3000:]}"
    assert_recorded_once(d.state_dir)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ctl",
            "--json",
            "state",
            "validate",
            "--state-dir",
            str(d.state_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 0, f"orchctl state validate exited {r.returncode}: {r.stdout}{r.stderr}"


# --- followers -------------------------------------------------------------------------


def follow_socket(path: str, timeout_s: float = 30.0) -> socket.socket:
    """A raw `events -f` connection (what orchctl events -f sends), before any frame is read."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    s.connect(path)
    body = _encode({"id": 1, "method": "events", "params": {"follow": True}})
    s.sendall(struct.pack(">I", len(body)) + body)
    return s


def read_frame(s: socket.socket) -> dict[str, Any] | None:
    """One frame, or None at EOF."""
    head = _recv(s, 4)
    if head is None:
        return None
    (n,) = struct.unpack(">I", head)
    body = _recv(s, n)
    if body is None:
        return None
    out: dict[str, Any] = json.loads(body)
    return out


def _recv(s: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class Follower:
    """Follows the daemon's events in a thread, stamping each frame with time.time() when it
    arrives."""

    def __init__(self, path: str) -> None:
        self.sock = follow_socket(path, timeout_s=None)  # type: ignore[arg-type]
        self.frames: list[tuple[float, dict[str, Any]]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            while (frame := read_frame(self.sock)) is not None:
                self.frames.append((time.time(), frame))

    def events(self, name: str) -> list[tuple[float, dict[str, Any]]]:
        return [
            (t, f["result"])
            for t, f in list(self.frames)
            if f.get("ok") and f["result"].get("event") == name
        ]

    def wait(
        self, name: str, count: int = 1, timeout: float = 15.0, **match: Any
    ) -> list[tuple[float, dict[str, Any]]]:
        def found() -> list[tuple[float, dict[str, Any]]]:
            return [(t, e) for t, e in self.events(name) if event_matches(e, match)]

        Daemon.wait_for(lambda: len(found()) >= count, timeout, f"{count} x {name} {match}")
        return found()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)


class FileWatch:
    """Polls transitions.jsonl and events.jsonl every 2 ms in a thread, stamping with
    time.time() the moment each record (by seq) and each event line first appears."""

    def __init__(self, state_dir: Path) -> None:
        self.log = state_dir / "transitions.jsonl"
        self.ev = state_dir / "events.jsonl"
        self.record_seen: dict[int, float] = {}
        self.event_seen: list[tuple[float, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _lines(self, path: Path, done: int) -> list[bytes]:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        return data.split(b"\n")[done:-1]  # complete lines only

    def _run(self) -> None:
        nlog = nev = 0
        while not self._stop.is_set():
            now = time.time()
            for raw in self._lines(self.log, nlog):
                nlog += 1
                self.record_seen.setdefault(json.loads(raw)["seq"], now)
            for raw in self._lines(self.ev, nev):
                nev += 1
                self.event_seen.append((now, json.loads(raw)))
            time.sleep(0.002)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
