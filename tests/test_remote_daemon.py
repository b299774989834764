"""Remote workers, the daemon's side, with the real daemon and the local `env` transport
(the agent runs on this machine exactly as on another host: leases, shims, streamed
output, no psutil probes, an exit means unresponsive). No sshd needed: the same paths over
real ssh are tests/test_remote_ssh.py.

Timings as the issue's CI: heartbeat 0.1 s, agent lease 2 s, shutdown after 5 s.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.harness import FAST, Daemon, assert_no_leftovers, marker_processes

LEASE_S = 2.0
SHUTDOWN_S = 5.0
GRACE_S = FAST["tasks"]["kill_grace_s"]
UNRESPONSIVE_S = 1.0
SLACK_S = 2.0  # a loaded machine, on top of the deadlines the design promises
ENV_TRANSPORT = ["env", "ORCHD_FAKE_HOST={host}", "--"]


def hosts(**counts: int) -> list[dict[str, Any]]:
    return [
        {"host": h, "count": n, "python": sys.executable, "transport": ENV_TRANSPORT}
        for h, n in counts.items()
    ]


def overrides(**extra: Any) -> dict[str, Any]:
    """One worker here and one on host h2, unless `extra` says otherwise."""
    return {
        "workers": {"count": 1, "hosts": hosts(h2=1)},
        "health": {
            "agent_lease_s": LEASE_S,
            "shutdown_after_s": SHUTDOWN_S,
            "unresponsive_after_s": UNRESPONSIVE_S,
        },
    } | extra


def started(tmp: Path, over: dict[str, Any]) -> Daemon:
    return Daemon(tmp, over).start()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    out = tmp_path / "work"
    out.mkdir()
    return out


def stop(d: Daemon) -> None:
    """The daemon stopped (resuming any agent a test stopped) and nothing of it left."""
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_STOPPED and proc.environ().get("ORCHD_FAKE_HOST"):
                proc.resume()
        except psutil.Error:
            continue
    if d.proc is not None and d.proc.poll() is None:
        d.stop()
    assert_no_leftovers(timeout=LEASE_S + 5.0)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """One local worker and one on h2."""
    d = started(tmp_path, overrides())
    try:
        wait_idle(d, 2)
        yield d
    finally:
        stop(d)


def wait_idle(d: Daemon, n: int, timeout: float = 30.0) -> None:
    d.wait_for(
        lambda: sum(w["state"] == "idle" for w in d.workers()) >= n, timeout, f"{n} idle workers"
    )


def remote_worker(d: Daemon) -> dict[str, Any]:
    return next(w for w in d.workers() if w.get("host") not in (None, "", "local"))


def ws(tasks: list[dict[str, Any]], ws_id: str = "ws") -> str:
    out = [f'id = "{ws_id}"']
    for t in tasks:
        out.append("[[tasks]]")
        out.extend(f"{k} = {json.dumps(v)}" for k, v in t.items())
    return "\n".join(out) + "\n"


def once_then_wait(work: Path, name: str) -> str:
    """A command that records each run in work/<name>.runs; its first run waits for ever,
    a later one succeeds at once."""
    runs = work / f"{name}.runs"
    return (
        f'echo "$ORCHD_ATTEMPT_ID" >> {runs}; '
        f'if [ "$(wc -l < {runs})" -gt 1 ]; then echo second; exit 0; fi; '
        "echo first; sleep 600"
    )


def pid_of_agent(d: Daemon, wid: str) -> int:
    """The local process of a remote worker's transport (with `env`: the agent itself)."""
    w = next(x for x in d.workers() if x["id"] == wid)
    return int(w["pid"])


# --- a task on a remote worker --------------------------------------------------------------


def test_task_runs_on_the_remote_worker_with_its_output_in_the_daemons_log(
    daemon: Daemon,
) -> None:
    """A task pinned to h2 runs on its worker (id naming the host), its output arrives in
    Output frames and lands in the task's log here, and `orchctl workers` shows the host."""
    daemon.submit(ws([{"id": "t", "command": "echo hello from $ORCHD_FAKE_HOST", "runs_on": "h2"}]))
    t = daemon.wait_task("ws/t", "completed")
    wid = t["attempts"][-1]["worker_id"]
    assert wid.endswith("@h2")
    assert "hello from h2" in daemon.log("ws/t")
    table = daemon.ctl("workers")
    assert table.returncode == 0 and "h2" in table.stdout
    assert len(daemon.events("task_completed")) == 1


def test_worker_check_shows_the_remote_agents_own_figures(daemon: Daemon) -> None:
    """`orchctl worker check` of a remote worker shows the agent's own pid, start ticks,
    CPU and RSS from its last heartbeat (the daemon cannot probe it)."""
    wid = remote_worker(daemon)["id"]

    def figures() -> dict[str, Any]:
        out: dict[str, Any] = daemon.ctl_json("worker", "check", wid).get("health", {})
        return out

    daemon.wait_for(lambda: "rss_bytes" in figures(), 10.0, "the agent's figures")
    health = figures()
    assert health["host"] == "h2" and health["source"] == "heartbeat"
    assert health["pid"] > 0 and health["start_ticks"] > 0
    assert health["rss_bytes"] > 1_000_000 and health["cpu_percent"] >= 0
    assert health["reported_age_s"] < 2.0
    # The agent's pid there is the process that says so in its environment.
    assert psutil.Process(health["pid"]).environ().get("ORCHD_FAKE_HOST") == "h2"
    text = daemon.ctl("worker", "check", wid)
    assert text.returncode == 0 and "MiB" in text.stdout
    assert f"pid {health['pid']} on h2" in text.stdout


# --- a transport that exits -------------------------------------------------------------------


def test_transport_exit_is_unresponsive_then_reassign_at_shutdown_after_s_and_one_completion(
    tmp_path: Path, work: Path
) -> None:
    """The transport of the worker running a task exits: the worker is unresponsive (not
    dead), the task stays running with git_repo_write until shutdown_after_s, then it is
    reassigned without spending a retry; the old tree is gone by then, the new attempt
    completes, and exactly one completion is recorded."""
    d = started(tmp_path, overrides(workers={"count": 0, "hosts": hosts(h2=2)}))
    try:
        wait_idle(d, 2)
        cmd = once_then_wait(work, "t")
        d.submit(ws([{"id": "t", "command": cmd, "resources": ["git_repo_write"]}]))
        d.wait_for(lambda: (work / "t.runs").exists(), 20.0, "the first run")
        first = d.task("ws/t")
        wid, aid = first["worker_id"], first["attempts"][-1]["attempt_id"]
        os.kill(pid_of_agent(d, wid), signal.SIGKILL)
        lost = time.monotonic()
        ev = d.wait_event("worker_unresponsive", worker_id=wid, timeout=10.0)
        assert "transport" in ev["message"]
        t = d.task("ws/t")
        assert t["state"] == "running" and t["retry_count"] == 0
        res = {r["id"]: r for r in d.call("resources")}
        assert res["git_repo_write"]["holders"], "the lost attempt keeps its resource"
        d.wait_event("task_reassigned", timeout=SHUTDOWN_S + 10.0)
        assert time.monotonic() - lost >= SHUTDOWN_S - 0.5
        assert not marker_processes(aid), "the old attempt was fenced before the reassign"
        done = d.wait_task("ws/t", "completed", timeout=30.0)
        assert done["retry_count"] == 0
        assert len(done["attempts"]) == 2
        assert len(d.events("task_completed")) == 1
        assert (work / "t.runs").read_text().count("\n") == 2
    finally:
        stop(d)


def test_stopped_remote_agent_is_fenced_and_reassigned_and_its_late_words_are_an_event(
    tmp_path: Path, work: Path
) -> None:
    """A SIGSTOPped remote agent: its shim fences the attempt within the lease, the worker
    is shut down and the task reassigned at shutdown_after_s (no retry spent), it
    completes once; what the old attempt still reports is a late_frame event."""
    d = started(tmp_path, overrides(workers={"count": 0, "hosts": hosts(h2=2)}))
    try:
        wait_idle(d, 2)
        d.submit(ws([{"id": "t", "command": once_then_wait(work, "t")}]))
        d.wait_for(lambda: (work / "t.runs").exists(), 20.0, "the first run")
        first = d.task("ws/t")
        wid, aid = first["worker_id"], first["attempts"][-1]["attempt_id"]
        os.kill(pid_of_agent(d, wid), signal.SIGSTOP)
        stopped = time.monotonic()
        d.wait_for(
            lambda: not marker_processes(aid), LEASE_S + GRACE_S + SLACK_S, "the shim's fence"
        )
        assert time.monotonic() - stopped < LEASE_S + GRACE_S + SLACK_S
        done = d.wait_task("ws/t", "completed", timeout=SHUTDOWN_S + 20.0)
        assert done["retry_count"] == 0
        assert len(d.events("task_completed")) == 1
        d.wait_event("late_frame", timeout=10.0)
    finally:
        stop(d)


# --- transport faults ---------------------------------------------------------------------


def test_transport_failing_before_hello_is_an_event_with_backoff_and_the_farm_works(
    tmp_path: Path,
) -> None:
    """A transport that fails at once (ssh's refusal on its stderr, exit 255): an event
    naming the host and ssh's line each time, restarts that back off, and the local worker
    runs tasks all along."""
    refused = "ssh: connect to host x port 22: Connection refused"
    bad = {
        "host": "x",
        "count": 1,
        "transport": ["sh", "-c", f"echo '{refused}' >&2; exit 255", "--"],
    }
    d = started(tmp_path, overrides(workers={"count": 1, "hosts": [bad]}))
    try:
        d.wait_for(lambda: len(d.events("transport_failed")) >= 3, 30.0, "three failures")
        evs = d.events("transport_failed")
        assert all(e["data"]["host"] == "x" for e in evs)
        assert evs[0]["data"]["stderr"] == refused and refused in evs[0]["message"]
        assert evs[0]["data"]["returncode"] == 255
        delays = [e["data"]["delay_s"] for e in d.events("worker_start_failed")]
        assert delays[:3] == sorted(delays[:3]) and delays[2] > delays[0]
        wlog = (d.state_dir / "logs" / "workers" / "worker-002@x.log").read_text()
        assert refused in wlog
        d.submit(ws([{"id": "t", "command": "echo fine"}]))
        d.wait_task("ws/t", "completed", timeout=20.0)
    finally:
        stop(d)


# --- the daemon killed --------------------------------------------------------------------


def test_daemon_sigkill_with_a_remote_task_fences_it_and_runs_it_once_after_restart(
    tmp_path: Path, work: Path
) -> None:
    """The daemon is SIGKILLed while a remote task runs: the remote tree is gone within
    the lease; after the restart, recovery does not kill by pid there, the attempt is
    settled as interrupted (no retry spent), the task runs again and completes once."""
    over = overrides(workers={"count": 0, "hosts": hosts(h2=1)})
    d = started(tmp_path, over)
    try:
        wait_idle(d, 1)
        d.submit(ws([{"id": "t", "command": once_then_wait(work, "t")}]))
        d.wait_for(lambda: (work / "t.runs").exists(), 20.0, "the first run")
        aid = d.task("ws/t")["attempts"][-1]["attempt_id"]
        d.wait_for(lambda: bool(marker_processes(aid)), 10.0, "the attempt's processes")
        d.kill()
        killed = time.monotonic()
        d.wait_for(lambda: not marker_processes(aid), LEASE_S + GRACE_S + SLACK_S, "the fence")
        assert time.monotonic() - killed < LEASE_S + GRACE_S + SLACK_S
        d.start()
        d.wait_event("remote_attempt_fencing", timeout=10.0, task_id="ws/t")
        done = d.wait_task("ws/t", "completed", timeout=LEASE_S + 30.0)
        assert done["retry_count"] == 0
        assert (work / "t.runs").read_text().count("\n") == 2
        assert len(d.events("task_completed")) == 1
        assert not d.events("recovery_kill") or not any(
            aid in e.get("data", {}).get("attempts", []) for e in d.events("recovery_kill")
        )
    finally:
        stop(d)
