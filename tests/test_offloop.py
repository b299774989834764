"""Nothing slow on the loop, on the real daemon: a slow disk (every fdatasync 0.5 s) does
not stall heartbeats, `status` or the watchdog; the watchdog is withheld only while the
engine's loop is stuck; `orchctl events` over 500,000 events does not stall dispatch."""

from __future__ import annotations

import itertools
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ctl.client import Client
from tests.harness import ROOT, Daemon

SLOW_SYNC = "sync_delay:0.5"


def _chain(ws: str, n: int, command: str = "true") -> str:
    return f'id = "{ws}"\n' + "\n".join(
        f'[[tasks]]\nid = "c{i}"\ncommand = "{command}"'
        + (f'\ndepends_on = ["c{i - 1}"]' if i else "")
        for i in range(n)
    )


def _submit(d: Daemon, text: str) -> None:
    d.call("submit", text=text, source="test")


def test_slow_disk_keeps_heartbeats_status_and_workers(tmp_path: Path) -> None:
    """With every fdatasync taking 0.5 s while a chain of tasks runs, `status` answers a
    real socket client within 100 ms each time, heartbeats stay fresh and no worker is
    declared unresponsive (unresponsive_after_s is 0.5 s)."""
    d = Daemon(tmp_path, failpoint=SLOW_SYNC).start(timeout=30)
    try:
        _submit(d, _chain("slow", 6, "sleep 0.1"))
        latencies: list[float] = []
        ages: list[float] = []
        seqs: set[int] = set()
        with Client(d.socket, timeout_s=10) as c:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                st = c.call("status")
                latencies.append(time.perf_counter() - t0)
                seqs.add(st["last_seq"])
                for w in c.call("workers"):
                    if w["state"] in ("idle", "busy") and w["last_heartbeat_age_s"] is not None:
                        ages.append(w["last_heartbeat_age_s"])
                if c.call("ws_show", workstream="slow")["state"] == "completed":
                    break
                time.sleep(0.02)
        assert c is not None
        assert d.call("ws_show", workstream="slow")["state"] == "completed"
        # Six tasks, each hop behind at least one 0.5 s sync: the answers came while the
        # log was being written and synced, slowly.
        assert len(latencies) > 50 and len(seqs) > 6
        assert max(latencies) < 0.1, sorted(latencies)[-5:]
        assert ages and max(ages) < 0.5, sorted(ages)[-5:]
        assert d.events("worker_unresponsive") == []
    finally:
        d.stop()


def test_settle_answers_once_the_change_before_it_is_durable_and_its_events_written(
    tmp_path: Path,
) -> None:
    """With every fdatasync taking 0.5 s, a task's state is read as soon as its step
    decided it; `settle` is answered once that step is durable, and by then its events
    (task_completed) are in events.jsonl."""
    d = Daemon(tmp_path, failpoint=SLOW_SYNC).start(timeout=30)
    try:
        with Client(d.socket, timeout_s=10) as c:
            _submit(d, _chain("settle", 1, "true"))
            d.wait_for(
                lambda: c.call("ws_show", workstream="settle")["state"] == "completed",
                30,
                "the run to be completed",
            )
            seen = c.call("status")["last_seq"]  # read at once, maybe before its sync
            assert c.call("settle")["seq"] >= seen
            assert [e["task_id"] for e in d.events("task_completed")] == ["settle/c0"]
    finally:
        d.stop()


class _NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET: the times WATCHDOG=1
    arrived."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.pings: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if b"WATCHDOG=1" in data.split(b"\n"):
                self.pings.append(time.monotonic())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

    def pings_between(self, a: float, b: float) -> list[float]:
        return [t for t in self.pings if a <= t <= b]


def test_watchdog_sent_during_slow_syncs_and_withheld_while_stuck(tmp_path: Path) -> None:
    """WATCHDOG=1 keeps coming while fdatasyncs take 0.5 s (the loop turns); while the
    engine's loop is stuck (a failpoint), it is withheld and `watchdog_withheld` logged;
    once the loop turns again, it comes back."""
    stall = tmp_path / "stall"
    notify = _NotifySocket(tmp_path / "notify.sock")
    d = Daemon(tmp_path, failpoint=f"{SLOW_SYNC},loop_stall_file:{stall}")
    try:
        d.start(
            timeout=30,
            env_extra={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1200000"},
        )
        _submit(d, _chain("wd", 5, "sleep 0.1"))
        t0 = time.monotonic()
        d.wait_ws("wd", "completed", timeout=60)
        t1 = time.monotonic()
        # Pinged every 0.6 s throughout (never a gap of a whole watchdog period).
        during = notify.pings_between(t0, t1)
        assert t1 - t0 > 2.0 and len(during) >= 3
        assert max(b - a for a, b in zip([t0, *during], [*during, t1], strict=True)) < 1.2
        stall.touch()
        d.wait_for(lambda: "watchdog_withheld" in d.output.read_text(), 10, "the watchdog withheld")
        stuck_at = time.monotonic()
        time.sleep(1.5)
        assert notify.pings_between(stuck_at, time.monotonic()) == []
        stall.unlink()
        back = time.monotonic()
        d.wait_for(lambda: bool(notify.pings_between(back, time.monotonic())), 10, "a ping")
    finally:
        stall.unlink(missing_ok=True)
        d.stop()
        notify.close()


def _write_events(path: Path, n: int, critical_every: int) -> None:
    """`n` valid event lines, one critical in every `critical_every`."""
    ts = time.time() - n
    with path.open("wb") as f:
        for i in range(n):
            sev = "critical" if i % critical_every == 0 else "info"
            ev = {
                "event": "generated",
                "severity": sev,
                "ts": ts + i,
                "task_id": f"old/t{i}",
                "message": f"event number {i} of a long history",
            }
            f.write(json.dumps(ev, separators=(",", ":")).encode() + b"\n")


def _stamps(path: Path) -> list[float]:
    """The times the chain's commands ran (each appends `date +%s.%N`), in order."""
    return sorted(float(x) for x in path.read_text().split())


def _orchctl(socket_path: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ctl", "--socket", socket_path, "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_events_query_over_500k_events_does_not_stall_dispatch(tmp_path: Path) -> None:
    """500,000 events in events.jsonl: a chain of tasks keeps hopping while `orchctl
    events --severity critical` (which reads the whole history) answers: the chain's
    commands run during each query, its longest hop then is below the query's own
    duration, and the answers hold the right events."""
    n_events, every = 500_000, 50_000
    (tmp_path / "state").mkdir()
    _write_events(tmp_path / "state" / "events.jsonl", n_events, every)
    d = Daemon(tmp_path).start(timeout=60)
    try:
        n = 120
        windows: list[tuple[float, float]] = []
        answers: list[Any] = []
        stop = threading.Event()

        def query() -> None:
            while not stop.is_set():
                a = time.time()
                r = _orchctl(d.socket, "events", "--severity", "critical", "--limit", "1000")
                windows.append((a, time.time()))
                answers.append(r)

        stamps = tmp_path / "stamps"
        _submit(d, _chain("q", n, f"date +%s.%N >> {stamps}"))
        worker = threading.Thread(target=query, daemon=True)
        worker.start()
        try:
            d.wait_ws("q", "completed", timeout=120)
        finally:
            stop.set()
            worker.join(120)
        for r in answers:
            assert r.returncode == 0, r.stderr
            got = [e for e in json.loads(r.stdout) if e["event"] == "generated"]
            assert [e["task_id"] for e in got] == [f"old/t{i}" for i in range(0, n_events, every)]
        ran = _stamps(stamps)
        assert len(ran) == n
        checked = 0
        for a, b in windows:
            inside = [t for t in ran if a <= t <= b]
            if not ran[0] <= a or not b <= ran[-1]:
                continue  # the chain began or ended during this query
            checked += 1
            # Commands ran while the query was answered, none waiting as long as it took.
            assert inside, (b - a, inside)
            edges = [a, *inside, b]
            assert max(y - x for x, y in itertools.pairwise(edges)) < b - a
        assert checked >= 1, windows
    finally:
        d.stop()


def test_file_queries_answer_through_their_file_part(tmp_path: Path) -> None:
    """`events` over a long history answers its newest 100, in order; `logs`, `show
    --logs`, `debug` and `interventions` answer from their files, read after the step."""
    (tmp_path / "state").mkdir()
    _write_events(tmp_path / "state" / "events.jsonl", 20_000, 1000)
    d = Daemon(tmp_path).start(timeout=30)
    try:
        _submit(d, _chain("f", 2, "echo hello"))
        d.wait_ws("f", "completed", timeout=30)
        evs = d.ctl_json("events")
        every = d.events()
        assert len(evs) == 100
        assert [(e["event"], e["ts"]) for e in evs] == [(e["event"], e["ts"]) for e in every[-100:]]
        assert any("hello" in line for line in d.ctl_json("logs", "f/c1")["lines"])
        assert any("hello" in line for line in d.ctl_json("show", "f/c1", "--logs")["log_tail"])
        assert any("hello" in line for line in d.ctl_json("debug", "f/c1")["log_tail"])
        d.ctl("--yes", "drain")
        d.ctl("--yes", "undrain")
        acts = d.ctl_json("interventions")
        assert [a["method"] for a in acts[-2:]] == ["drain", "undrain"]
    finally:
        d.stop()
