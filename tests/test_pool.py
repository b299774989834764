"""The daemon's side of the workers with real agents: spawn, messages, stop, hard kill."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import msgspec
import psutil
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream

from supervisor.core import wire
from supervisor.core.config import HostConfig
from supervisor.core.effects import TaskTree
from supervisor.workers import proctree, spool
from supervisor.workers.pool import AgentExited, AgentMessage, Pool

MARK = f"test-pool-{uuid.uuid4().hex[:8]}-"
Inbox = MemoryObjectReceiveStream[AgentMessage | AgentExited]


# Every test here must leave no live child and no process carrying MARK (conftest.py).
pytestmark = pytest.mark.usefixtures("no_leftover_processes")


@asynccontextmanager
async def running_pool(tmp_path: Path) -> AsyncIterator[tuple[Pool, Inbox]]:
    """A pool whose remote agents have a spool of their own (a fence record one test's
    agent leaves is not reported to the next test's), removed at the end."""
    send, recv = anyio.create_memory_object_stream[AgentMessage | AgentExited](1000)
    daemon_id = f"{MARK}{uuid.uuid4().hex[:8]}"
    pool = Pool(
        python=sys.executable,
        log_dir=tmp_path / "logs",
        heartbeat_s=0.05,
        inbox=send,
        kill_grace_s=1.0,
        daemon_id=daemon_id,
    )
    try:
        with send, recv:
            async with anyio.create_task_group() as tg:
                await tg.start(pool.run)
                yield pool, recv
                tg.cancel_scope.cancel()
    finally:
        shutil.rmtree(spool.default_dir(os.environ, daemon_id), ignore_errors=True)


async def _next(
    inbox: Inbox, kind: type[wire.FromAgent] | None = None, timeout_s: float = 10.0
) -> AgentMessage | AgentExited:
    """The next inbox item that is not a heartbeat (and, if given, carries a `kind`)."""
    with anyio.fail_after(timeout_s):
        while True:
            item = await inbox.receive()
            if isinstance(item, AgentMessage) and isinstance(item.msg, wire.Heartbeat):
                continue
            if kind is None or (isinstance(item, AgentMessage) and isinstance(item.msg, kind)):
                return item


def _run(tmp_path: Path, name: str, command: list[str] | str) -> wire.Run:
    return wire.Run(
        attempt_id=MARK + name,
        task_id=name,
        number=1,
        command=command,
        log_path=str(tmp_path / "logs" / f"{name}.log"),
    )


def _alive_marked(name: str) -> list[psutil.Process]:
    return [p for p in proctree.find_marked(MARK + name) if proctree.alive(p)]


async def test_spawn_delivers_hello_tagged_with_the_generation(tmp_path: Path) -> None:
    """A spawned agent's Hello arrives in the inbox with the spawn's generation and pid."""
    async with running_pool(tmp_path) as (pool, inbox):
        gen = await pool.spawn("w1")
        item = await _next(inbox, wire.Hello)
        assert isinstance(item, AgentMessage) and isinstance(item.msg, wire.Hello)
        assert (item.worker_id, item.generation) == ("w1", gen)
        assert item.msg.pid == pool.pid("w1")
        assert (tmp_path / "logs" / "workers" / "w1.log").exists()


async def test_run_results_arrive_through_the_inbox(tmp_path: Path) -> None:
    """A Run sent through the pool yields Started and Finished in the inbox."""
    async with running_pool(tmp_path) as (pool, inbox):
        await pool.spawn("w1")
        await _next(inbox, wire.Hello)
        assert await pool.send("w1", _run(tmp_path, "r", "sleep 0.2; exit 5"))
        started = await _next(inbox, wire.Started)
        assert isinstance(started, AgentMessage) and isinstance(started.msg, wire.Started)
        assert started.msg.attempt_id == MARK + "r"
        done = await _next(inbox, wire.Finished)
        assert isinstance(done, AgentMessage) and isinstance(done.msg, wire.Finished)
        assert (done.msg.phase, done.msg.exit_code) == ("command", 5)


async def test_stop_is_graceful_and_reports_the_exit(tmp_path: Path) -> None:
    """stop() makes the agent exit 0; AgentExited follows its last message."""
    async with running_pool(tmp_path) as (pool, inbox):
        gen = await pool.spawn("w1")
        await _next(inbox, wire.Hello)
        await pool.stop("w1", 1.0)
        assert pool.pid("w1") is None
        item = await _next(inbox)
        assert item == AgentExited("w1", gen, 0)
        assert not await pool.send("w1", wire.Stop(grace_s=0.1))
        assert not await pool.send("nobody", wire.Stop(grace_s=0.1))


async def test_respawn_gets_a_new_generation(tmp_path: Path) -> None:
    """A replacement agent's messages carry a newer generation than its predecessor's."""
    async with running_pool(tmp_path) as (pool, inbox):
        first = await pool.spawn("w1")
        await _next(inbox, wire.Hello)
        await pool.kill("w1", task_tree=None, grace_s=0.2)
        exited = await _next(inbox)
        assert isinstance(exited, AgentExited) and exited.generation == first
        second = await pool.spawn("w1")
        hello = await _next(inbox, wire.Hello)
        assert second > first and isinstance(hello, AgentMessage)
        assert hello.generation == second


async def test_kill_of_a_stopped_agent_leaves_no_process(tmp_path: Path) -> None:
    """A SIGSTOPped agent with a running task tree (escapee included) is killed entirely."""
    async with running_pool(tmp_path) as (pool, inbox):
        await pool.spawn("w1")
        await _next(inbox, wire.Hello)
        await pool.send("w1", _run(tmp_path, "stuck", "(setsid sleep 300 &); sleep 300"))
        item = await _next(inbox, wire.Started)
        assert isinstance(item, AgentMessage) and isinstance(item.msg, wire.Started)
        started = item.msg
        with anyio.fail_after(3):
            while len(_alive_marked("stuck")) < 3:
                await anyio.sleep(0.01)
        agent_pid = pool.pid("w1")
        assert agent_pid is not None
        os.kill(agent_pid, signal.SIGSTOP)
        t0 = anyio.current_time()
        tree = TaskTree(started.pid, started.pid, started.start_ticks, MARK + "stuck")
        await pool.kill("w1", task_tree=tree, grace_s=0.3)
        assert anyio.current_time() - t0 < 2.5
        assert not psutil.pid_exists(agent_pid) or not proctree.alive(psutil.Process(agent_pid))
        assert _alive_marked("stuck") == []
        # Its tree went first; woken (SIGCONT) with a TERM pending, the agent may still say
        # its attempt is over before it exits.
        exited = await _next(inbox)
        while isinstance(exited, AgentMessage):
            assert isinstance(exited.msg, wire.Finished)
            exited = await _next(inbox)
        assert exited.returncode is not None


async def test_cancelling_the_pool_stops_every_agent(tmp_path: Path) -> None:
    """When Pool.run is cancelled, its agents (and their tasks) are stopped."""
    async with running_pool(tmp_path) as (pool, inbox):
        await pool.spawn("w1")
        await pool.spawn("w2")
        await _next(inbox, wire.Hello)
        await _next(inbox, wire.Hello)
        pids = [pool.pid("w1"), pool.pid("w2")]
        await pool.send("w1", _run(tmp_path, "busy", ["sleep", "300"]))
        await _next(inbox, wire.Started)
    for pid in pids:
        assert pid is not None and not psutil.pid_exists(pid)
    assert _alive_marked("busy") == []


async def test_agents_do_not_inherit_service_manager_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither the agent nor its tasks see NOTIFY_SOCKET, WATCHDOG_* or LISTEN_*."""
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/orchd-test/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("LISTEN_FDS", "1")
    async with running_pool(tmp_path) as (pool, inbox):
        await pool.spawn("w1")
        await _next(inbox, wire.Hello)
        agent_pid = pool.pid("w1")
        assert agent_pid is not None
        agent_env = psutil.Process(agent_pid).environ()
        assert not [
            k for k in agent_env if k == "NOTIFY_SOCKET" or k.startswith(("WATCHDOG_", "LISTEN_"))
        ]
        await pool.send("w1", _run(tmp_path, "env", ["env"]))
        await _next(inbox, wire.Finished)
    text = (tmp_path / "logs" / "env.log").read_text()
    assert "NOTIFY_SOCKET" not in text and "WATCHDOG_" not in text and "LISTEN_" not in text


# --- remote agents (through the local `env` transport: the agent runs here as on another
# host, with a lease) --------------------------------------------------------------------


def _host(transport: list[str] | None = None) -> HostConfig:
    return HostConfig(
        host="h2",
        python=sys.executable,
        transport=transport or ["env", "ORCHD_FAKE_HOST={host}", "--"],
    )


async def _swept(pool: Pool, inbox: Inbox, wid: str) -> None:
    await _next(inbox, wire.Hello)
    assert await pool.send(wid, wire.Sweep(live=[]))
    await _next(inbox, wire.Swept)


async def test_remote_agent_leases_are_renewed_and_its_output_lands_in_the_task_log(
    tmp_path: Path,
) -> None:
    """A remote agent gets Lease frames from the pool once swept, so an attempt longer
    than the lease runs to its end with nothing else sent; its output comes back in
    Output frames and is appended to the task's log here (directory made)."""
    async with running_pool(tmp_path) as (pool, inbox):
        # 20 renewals to a lease: a loaded machine's pauses do not end it.
        await pool.spawn("r1", _host(), lease_s=1.0)
        await _swept(pool, inbox, "r1")
        run = _run(tmp_path, "lease", "sleep 2; echo made it from $ORCHD_FAKE_HOST")
        run = msgspec.structs.replace(run, log_path=str(tmp_path / "logs" / "ws" / "lease.log"))
        assert await pool.send("r1", run)
        done = await _next(inbox, wire.Finished)
        assert isinstance(done, AgentMessage) and isinstance(done.msg, wire.Finished)
        assert (done.msg.phase, done.msg.fenced) == ("done", False)
        text = (tmp_path / "logs" / "ws" / "lease.log").read_text()
        assert "made it from h2" in text and "=== attempt 1" in text
        await pool.stop("r1", 1.0)


async def test_leases_held_back_let_the_shim_fence_the_attempt(tmp_path: Path) -> None:
    """renew(off): no more frames reach the agent, so its shim fences the attempt once
    the lease runs out, and the agent says so (Finished, fenced)."""
    async with running_pool(tmp_path) as (pool, inbox):
        await pool.spawn("r1", _host(), lease_s=0.5)
        await _swept(pool, inbox, "r1")
        assert await pool.send("r1", _run(tmp_path, "held", "sleep 30"))
        await _next(inbox, wire.Started)
        pool.renew("r1", False)
        done = await _next(inbox, wire.Finished, timeout_s=10.0)
        assert isinstance(done, AgentMessage) and isinstance(done.msg, wire.Finished)
        assert done.msg.fenced
        assert _alive_marked("held") == []
        await pool.stop("r1", 1.0)


async def test_transport_exit_carries_its_last_stderr_line(tmp_path: Path) -> None:
    """A transport that fails before the agent runs: its exit carries ssh's last line,
    and its whole stderr is in the worker's log."""
    script = (
        "echo 'debug1: trying' >&2; echo 'ssh: connect to host h2 port 22: refused' >&2; exit 255"
    )
    async with running_pool(tmp_path) as (pool, inbox):
        gen = await pool.spawn("r1", _host(["sh", "-c", script, "--"]), lease_s=1.0)
        item = await _next(inbox)
        assert item == AgentExited("r1", gen, 255, "ssh: connect to host h2 port 22: refused")
        wlog = (tmp_path / "logs" / "workers" / "r1.log").read_text()
        assert "debug1: trying" in wlog and "refused" in wlog


async def test_output_frames_for_an_attempt_not_given_to_the_agent_are_dropped(
    tmp_path: Path,
) -> None:
    """An agent's Output frame names an attempt, never a path: one for an attempt it was
    not given writes nothing, and the frames after it still arrive."""
    fake = (
        "import sys; from supervisor.core import wire; w = sys.stdout.buffer.write; "
        "w(wire.frame(wire.Output(attempt_id='not-yours', data=b'evil'))); "
        "w(wire.frame(wire.Heartbeat(attempt_id=None))); "
        "w(wire.frame(wire.Hello(worker_id='r1', pid=1, create_time=0.0))); sys.stdout.flush()"
    )
    async with running_pool(tmp_path) as (pool, inbox):
        await pool.spawn("r1", _host([sys.executable, "-c", fake, "--"]), lease_s=1.0)
        hello = await _next(inbox, wire.Hello)
        assert isinstance(hello, AgentMessage)
        exited = await _next(inbox)
        assert isinstance(exited, AgentExited)
        assert not [
            p for p in (tmp_path / "logs").rglob("*") if p.is_file() and b"evil" in p.read_bytes()
        ]
