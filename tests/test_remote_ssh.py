"""Remote workers over real ssh: the real daemon drives one local worker and one on a second
host (Debian's sshd in a network namespace, tests/remote_host.py), through partitions,
heals, a daemon SIGKILL, a stopped agent and broken transports.

CI-sized timings: heartbeat 0.1 s, agent lease 2 s, shutdown after 5 s. The task
processes on the second host share this machine's pid namespace and file system, so they
are found by their attempt marker and leave their traces in the test's directory.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.harness import FAST, Daemon, assert_no_leftovers, marker_processes, orchd_processes
from tests.remote_host import RemoteHost, needs_remote_host

pytestmark = needs_remote_host

LEASE_S = 2.0
SHUTDOWN_S = 5.0
GRACE_S = FAST["tasks"]["kill_grace_s"]
UNRESPONSIVE_S = FAST["health"]["unresponsive_after_s"]
CHECK_S = FAST["health"]["health_check_interval_s"]
# Room for a loaded CI machine on top of the deadlines the design promises.
SLACK_S = 1.5


def remote_config(host: RemoteHost, *, local: int = 1, remote: int = 1) -> dict[str, Any]:
    """The daemon's overrides: `local` workers here and `remote` on `host`."""
    return {
        "workers": {"count": local, "hosts": [host.host_config(remote)]},
        "health": {"agent_lease_s": LEASE_S, "shutdown_after_s": SHUTDOWN_S},
    }


@pytest.fixture
def host() -> Iterator[RemoteHost]:
    """A second host, removed afterwards (whatever the test left of it)."""
    with RemoteHost() as h:
        yield h


@contextlib.contextmanager
def running(tmp: Path, host: RemoteHost, **over: Any) -> Iterator[Daemon]:
    """A daemon with one local and one remote worker; afterwards the link is up, no agent
    is left stopped, the daemon is stopped and nothing it started is left."""
    d = Daemon(tmp, remote_config(host) | over)
    d.start()
    try:
        yield d
    finally:
        host.heal()
        for proc in orchd_processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                if proc.status() == psutil.STATUS_STOPPED:
                    proc.resume()
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
        assert_no_leftovers()


# --- tasks and where they run -------------------------------------------------------------


def waiting_task(work: Path, task_id: str, *, probe: bool = False, **fields: Any) -> str:
    """A task that waits for `work/go-<id>` and then records its attempt in `work/done-<id>`; with
    `probe`, it first takes a non-blocking flock on `work/probe` (the task also holds
    git_repo_write), and a second live holder records itself in `work/two_holders`."""
    lines = []
    if probe:
        lines.append(
            f'exec 9>>{work}/probe; flock -n 9 || {{ echo "$ORCHD_ATTEMPT_ID" >> '
            f"{work}/two_holders; exit 3; }}"
        )
        fields.setdefault("resources", ["git_repo_write"])
    lines += [
        f'echo "$ORCHD_ATTEMPT_ID" >> {work}/started-{task_id}',
        f"while [ ! -e {work}/go-{task_id} ]; do sleep 0.05; done",
        f'echo "$ORCHD_ATTEMPT_ID" >> {work}/done-{task_id}',
    ]
    extra = "".join(f"\n{k} = {json.dumps(v)}" for k, v in fields.items())
    return f'[[tasks]]\nid = "{task_id}"\ncommand = {json.dumps("; ".join(lines))}{extra}\n'


def go(work: Path, task_id: str) -> None:
    (work / f"go-{task_id}").touch()


def runs_on_host(d: Daemon, host: RemoteHost, task_id: str) -> bool | None:
    """Whether the task's command runs on `host` (None while it has no process yet)."""
    t = d.task(task_id)
    if t["state"] != "running" or t.get("pid") is None:
        return None
    return int(t["pid"]) in host.pids()


def place_on_remote(d: Daemon, host: RemoteHost, work: Path, tasks: str, target: str) -> None:
    """Run `target` (one of `tasks`, a workstream file's [[tasks]]) on the remote worker and
    leave the local one idle: two pads take both workers, the remote one's pad ends, the
    tasks come in and take it, then the local pad ends."""
    d.submit(
        f'id = "pads"\n{waiting_task(work, "pad-1")}{waiting_task(work, "pad-2")}', "pads.toml"
    )
    where: dict[str, bool] = {}

    def both_placed() -> bool:
        for pad in ("pads/pad-1", "pads/pad-2"):
            on = runs_on_host(d, host, pad)
            if on is None:
                return False
            where[pad] = on
        return True

    Daemon.wait_for(both_placed, 20, "both pads to run")
    assert sorted(where.values()) == [False, True], where
    remote_pad = next(p for p, on in where.items() if on)
    local_pad = next(p for p, on in where.items() if not on)
    go(work, remote_pad.rpartition("/")[2])
    d.wait_task(remote_pad, "completed")
    d.submit(f'id = "ws"\n{tasks}', "ws.toml")
    Daemon.wait_for(
        lambda: runs_on_host(d, host, f"ws/{target}") is True, 20, f"{target} on the host"
    )
    go(work, local_pad.rpartition("/")[2])
    d.wait_task(local_pad, "completed")


def first_attempt(d: Daemon, task_id: str) -> str:
    attempt: str = d.task(task_id)["attempts"][0]["attempt_id"]
    return attempt


def transitions(d: Daemon) -> list[dict[str, Any]]:
    path = d.state_dir / "transitions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def completions(d: Daemon, task_id: str) -> int:
    """How many times the log records the task's move into `completed`."""
    return sum(
        1
        for r in transitions(d)
        if r["entity"] == "task"
        and r["id"] == task_id
        and r["to"] == "completed"
        and r.get("from") != "completed"
    )


def gone_within(attempt: str, since: float, limit: float) -> float:
    """Wait until no process carries the attempt's marker; the seconds since `since`, which
    must be within `limit`."""
    Daemon.wait_for(lambda: not marker_processes(attempt), limit + 5, f"{attempt}'s tree to go")
    took = time.monotonic() - since
    assert took <= limit, f"{attempt}'s tree lived {took:.2f}s, more than {limit:.2f}s"
    return took


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def remote_worker(d: Daemon, task_id: str) -> str:
    wid: str = d.task(task_id)["worker_id"]
    return wid


# --- partitions ----------------------------------------------------------------------------


def test_partition_fences_the_remote_attempt_and_reassigns_it_once(
    tmp_path: Path, host: RemoteHost
) -> None:
    """A partition mid-task: the worker goes unresponsive on time, the remote tree is gone
    within lease + grace, the task is reassigned at shutdown_after_s with its retry count
    unchanged, it completes exactly once, and the flock probe never saw two live holders
    of git_repo_write."""
    work = tmp_path / "work"
    work.mkdir()
    with running(tmp_path, host) as d:
        place_on_remote(d, host, work, waiting_task(work, "t", probe=True), "t")
        wid, attempt = remote_worker(d, "ws/t"), first_attempt(d, "ws/t")
        assert marker_processes(attempt)
        cut, cut_wall = time.monotonic(), time.time()
        host.partition()
        unresp = d.wait_event("worker_unresponsive", timeout=10, worker_id=wid)
        assert unresp["ts"] - cut_wall <= UNRESPONSIVE_S + CHECK_S + SLACK_S
        gone_within(attempt, cut, LEASE_S + GRACE_S + SLACK_S)
        go(work, "t")
        down = d.wait_event("worker_shutdown", timeout=SHUTDOWN_S + 10, worker_id=wid)
        gap = down["ts"] - unresp["ts"]
        assert SHUTDOWN_S - CHECK_S <= gap <= SHUTDOWN_S + CHECK_S + SLACK_S, gap
        t = d.wait_task("ws/t", "completed", timeout=20)
        assert t["retry_count"] == 0 and len(t["attempts"]) == 2
        assert t["attempts"][0]["failure_kind"] == "worker_lost"
        assert t["attempts"][0]["reassigned"] is True
        assert t["attempts"][1]["worker_id"] != wid
        assert completions(d, t["id"]) == 1
        assert lines(work / "done-t") == [t["attempts"][1]["attempt_id"]]
        assert not (work / "two_holders").exists()


def test_heal_inside_the_server_alive_window_completes_the_same_attempt(
    tmp_path: Path, host: RemoteHost
) -> None:
    """A partition shorter than the lease and the ssh client's patience: the worker may go
    unresponsive and recover, and the same attempt completes, once, with no retry spent."""
    work = tmp_path / "work"
    work.mkdir()
    with running(tmp_path, host) as d:
        place_on_remote(d, host, work, waiting_task(work, "t"), "t")
        wid, attempt = remote_worker(d, "ws/t"), first_attempt(d, "ws/t")
        host.partition()
        time.sleep(0.8)  # the partition itself: shorter than the lease (2 s) and ServerAlive (3 s)
        host.heal()
        go(work, "t")
        t = d.wait_task("ws/t", "completed", timeout=20)
        assert [a["attempt_id"] for a in t["attempts"]] == [attempt]
        assert t["retry_count"] == 0 and t["attempts"][0]["worker_id"] == wid
        assert completions(d, t["id"]) == 1
        assert lines(work / "done-t") == [attempt]
        assert not d.events("worker_shutdown")
        assert not d.events("late_frame")


def test_heal_after_the_client_gave_up_reports_the_fenced_attempt_late(
    tmp_path: Path, host: RemoteHost
) -> None:
    """A partition that outlasts the ssh client: the old attempt is fenced by its shim, the
    task completes once elsewhere, and after the heal the host's new agent sweeps nothing
    alive and reports the fenced attempt, which becomes a late_frame event."""
    work = tmp_path / "work"
    work.mkdir()
    with running(tmp_path, host) as d:
        place_on_remote(d, host, work, waiting_task(work, "t"), "t")
        wid, attempt = remote_worker(d, "ws/t"), first_attempt(d, "ws/t")
        cut = time.monotonic()
        host.partition()
        gone_within(attempt, cut, LEASE_S + GRACE_S + SLACK_S)
        # The client's patience: ServerAliveInterval 1 s x ServerAliveCountMax 3, and more.
        time.sleep(max(0.0, 4.5 - (time.monotonic() - cut)))
        host.heal()
        go(work, "t")
        t = d.wait_task("ws/t", "completed", timeout=SHUTDOWN_S + 20)
        assert t["retry_count"] == 0 and len(t["attempts"]) == 2
        assert t["attempts"][1]["worker_id"] != wid
        assert completions(d, t["id"]) == 1
        assert lines(work / "done-t") == [t["attempts"][1]["attempt_id"]]
        Daemon.wait_for(
            lambda: any(e["data"].get("attempt_id") == attempt for e in d.events("late_frame")),
            SHUTDOWN_S + 20,
            f"a late_frame event of {attempt}",
        )
        late = [e for e in d.events("late_frame") if e["data"].get("attempt_id") == attempt]
        assert all(e["data"]["frame"] == "Finished" and e["data"]["fenced"] for e in late), late
        assert not d.events("sweep_killed")
        assert completions(d, t["id"]) == 1


# --- the daemon or the agent stops ---------------------------------------------------------


def test_daemon_sigkill_leaves_no_remote_tree_and_a_restart_runs_each_task_once(
    tmp_path: Path, host: RemoteHost
) -> None:
    """A daemon SIGKILLed with a task running on the remote worker (and one here): the
    remote tree is gone within the lease, and after a restart every task completes exactly
    once, nothing lost."""
    work = tmp_path / "work"
    work.mkdir()
    with running(tmp_path, host) as d:
        place_on_remote(d, host, work, waiting_task(work, "r"), "r")
        d.submit(f'id = "ws2"\n{waiting_task(work, "l")}', "ws2.toml")
        Daemon.wait_for(lambda: runs_on_host(d, host, "ws2/l") is False, 20, "l here")
        remote_attempt, local_attempt = first_attempt(d, "ws/r"), first_attempt(d, "ws2/l")
        killed = time.monotonic()
        d.kill()
        gone_within(remote_attempt, killed, LEASE_S + GRACE_S)
        gone_within(local_attempt, killed, LEASE_S + GRACE_S)
        go(work, "r")
        go(work, "l")
        d.start()
        for task_id in ("ws/r", "ws2/l"):
            t = d.wait_task(task_id, "completed", timeout=LEASE_S + GRACE_S + 20)
            assert completions(d, t["id"]) == 1
        done = lines(work / "done-r") + lines(work / "done-l")
        assert len(done) == 2 and remote_attempt not in done and local_attempt not in done
        assert d.task("pads/pad-1")["state"] == d.task("pads/pad-2")["state"] == "completed"


def agent_pid(host: RemoteHost, worker_id: str) -> int:
    """The pid (here) of the agent of `worker_id` on the host."""
    for pid in host.host_pids().values():
        with contextlib.suppress(psutil.NoSuchProcess):
            argv = psutil.Process(pid).cmdline()
            if "supervisor.workers.agent" in argv and worker_id in argv:
                return pid
    raise AssertionError(f"no agent of {worker_id} on {host.name}")


def test_a_stopped_remote_agent_is_fenced_by_its_shim_and_reassigned_on_time(
    tmp_path: Path, host: RemoteHost
) -> None:
    """SIGSTOP of the remote agent on a reachable host: the attempt's shim (not the agent)
    kills the tree within lease + grace, and the task is reassigned at shutdown_after_s,
    completing once elsewhere with no retry spent."""
    work = tmp_path / "work"
    work.mkdir()
    with running(tmp_path, host) as d:
        place_on_remote(d, host, work, waiting_task(work, "t", probe=True), "t")
        wid, attempt = remote_worker(d, "ws/t"), first_attempt(d, "ws/t")
        pid = agent_pid(host, wid)
        stopped = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            unresp = d.wait_event("worker_unresponsive", timeout=10, worker_id=wid)
            gone_within(attempt, stopped, LEASE_S + GRACE_S + SLACK_S)
            assert psutil.Process(pid).status() == psutil.STATUS_STOPPED
            go(work, "t")
            down = d.wait_event("worker_shutdown", timeout=SHUTDOWN_S + 10, worker_id=wid)
            gap = down["ts"] - unresp["ts"]
            assert SHUTDOWN_S - CHECK_S <= gap <= SHUTDOWN_S + CHECK_S + SLACK_S, gap
            t = d.wait_task("ws/t", "completed", timeout=20)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        assert t["retry_count"] == 0 and len(t["attempts"]) == 2
        assert t["attempts"][1]["worker_id"] != wid
        assert completions(d, t["id"]) == 1
        assert lines(work / "done-t") == [t["attempts"][1]["attempt_id"]]
        assert not (work / "two_holders").exists()
        Daemon.wait_for(lambda: not psutil.pid_exists(pid), 10, "the stopped agent to exit")


# --- transport faults ----------------------------------------------------------------------

FAULTS = {
    "sshd_down": ("Connection refused", RemoteHost.stop_sshd, RemoteHost.start_sshd),
    "wrong_host_key": (
        "Host key verification failed",
        RemoteHost.pin_wrong_host_key,
        RemoteHost.restore_keys,
    ),
    "refused_key": ("Permission denied", RemoteHost.refuse_client_key, RemoteHost.restore_keys),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_transport_fault_is_an_event_with_backoff_and_the_farm_goes_on(
    tmp_path: Path, host: RemoteHost, fault: str
) -> None:
    """sshd down, a wrong pinned host key, a refused client key: each start of the remote
    agent fails with a transport_failed event naming the host and ssh's error, the starts
    are spaced by a growing back-off, the local worker runs tasks meanwhile, and once the
    fault is repaired the remote worker comes up."""
    error, break_it, repair = FAULTS[fault]
    break_it(host)
    work = tmp_path / "work"
    work.mkdir()
    with running(tmp_path, host) as d:
        Daemon.wait_for(lambda: len(d.events("transport_failed")) >= 3, 30, "three failures")
        failed = d.events("transport_failed")
        for ev in failed:
            assert ev["data"]["host"] == host.name and error in ev["message"], ev
        # Each failed start announces its back-off, doubling, and the next start waits it.
        delays = [
            e["data"]["delay_s"]
            for e in d.events("worker_start_failed")
            if e["worker_id"].endswith(f"@{host.name}")
        ]
        assert delays[0] == FAST["health"]["restart_backoff_base_s"], delays
        assert all(
            b == min(2 * a, FAST["health"]["restart_backoff_max_s"])
            for a, b in itertools.pairwise(delays[:3])
        ), delays
        gaps = [b["ts"] - a["ts"] for a, b in itertools.pairwise(failed)]
        assert all(g >= delay for g, delay in zip(gaps, delays, strict=False)), (gaps, delays)
        d.submit(f'id = "ws"\n{waiting_task(work, "here")}', "ws.toml")
        go(work, "here")
        assert d.wait_task("ws/here", "completed", timeout=10)["retry_count"] == 0
        repair(host)
        Daemon.wait_for(
            lambda: (
                any(w["state"] == "idle" and w.get("pid") in host.pids() for w in d.workers())
                or any(w["state"] == "idle" and w.get("host") == host.name for w in d.workers())
            ),
            20,
            "the remote worker to come up",
        )
