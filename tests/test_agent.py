"""The worker agent as a real process: runs, reports, logs, kills whole trees, heartbeats."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import struct
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import psutil
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from supervisor.core import wire
from supervisor.core.model import Rlimits
from supervisor.workers import proctree
from supervisor.workers.pool import agent_env

MARK = f"test-agent-{uuid.uuid4().hex[:8]}-"
M = TypeVar("M", bound=wire.FromAgent)


# Every test here must leave no live child and no process carrying MARK (conftest.py).
pytestmark = pytest.mark.usefixtures("no_leftover_processes")


class Driver:
    """The daemon's end of one agent's pipes."""

    def __init__(self, process: Process, tmp_path: Path) -> None:
        self.process = process
        self.tmp_path = tmp_path
        assert process.stdout is not None
        self._reader = BufferedByteReceiveStream(process.stdout)

    async def send(self, msg: wire.ToAgent) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(wire.frame(msg))

    async def send_raw(self, data: bytes) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(data)

    async def recv(self, timeout_s: float = 5.0) -> wire.FromAgent:
        with anyio.fail_after(timeout_s):
            header = await self._reader.receive_exactly(4)
            body = await self._reader.receive_exactly(wire.frame_length(header))
        msg: wire.FromAgent = wire.from_agent_decoder.decode(body)
        return msg

    async def expect(self, kind: type[M], timeout_s: float = 5.0) -> M:
        """The next message of `kind`, skipping heartbeats; anything else fails the test."""
        with anyio.fail_after(timeout_s):
            while True:
                msg = await self.recv(timeout_s)
                if isinstance(msg, kind):
                    return msg
                assert isinstance(msg, wire.Heartbeat), f"expected {kind.__name__}, got {msg}"

    async def started_and_finished(self, timeout_s: float = 5.0) -> tuple[int, wire.Finished]:
        """The command's pid and the Finished: from Started, or, for a command that ended at
        once, from the Finished itself (the agent then sends no Started)."""
        while True:
            msg = await self.recv(timeout_s)
            if isinstance(msg, wire.Heartbeat):
                continue
            if isinstance(msg, wire.Started):
                done = await self.expect(wire.Finished, timeout_s)
                assert done.attempt_id == msg.attempt_id and done.pid is None
                return msg.pid, done
            assert isinstance(msg, wire.Finished), f"expected Started or Finished, got {msg}"
            assert msg.pid is not None and msg.start_ticks
            return msg.pid, msg

    async def outcome(self, run: wire.Run, timeout_s: float = 5.0) -> wire.Finished:
        """Send `run`; its Finished, after checking the command's pid was reported."""
        await self.send(run)
        pid, done = await self.started_and_finished(timeout_s)
        assert pid > 0 and done.attempt_id == run.attempt_id
        return done

    def run(self, name: str, command: list[str] | str, **kw: Any) -> wire.Run:
        return wire.Run(
            attempt_id=MARK + name,
            task_id=f"task-{name}",
            number=1,
            command=command,
            log_path=str(self.tmp_path / "logs" / f"task-{name}.log"),
            **kw,
        )

    def log_text(self, name: str) -> str:
        return (self.tmp_path / "logs" / f"task-{name}.log").read_text()


@asynccontextmanager
async def agent(
    tmp_path: Path,
    *,
    heartbeat_s: float = 0.2,
    extra_env: dict[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
    args: tuple[str, ...] = (),
) -> AsyncIterator[Driver]:
    env = agent_env({**os.environ, **(extra_env or {})})
    process = await anyio.open_process(
        [
            sys.executable,
            "-m",
            "supervisor.workers.agent",
            "--worker-id",
            "w1",
            "--heartbeat-s",
            str(heartbeat_s),
            "--kill-grace-s",
            "1.0",
            "--log",
            str(tmp_path / "agent.log"),
            *args,
        ],
        env=env,
        start_new_session=True,
        pass_fds=pass_fds,
    )
    try:
        driver = Driver(process, tmp_path)
        hello = await driver.recv(timeout_s=10)
        assert isinstance(hello, wire.Hello)
        assert hello.pid == process.pid and hello.worker_id == "w1"
        yield driver
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.aclose()


def _alive_marked(name: str) -> list[psutil.Process]:
    return [p for p in proctree.find_marked(MARK + name) if proctree.alive(p)]


async def _until_marked(name: str, count: int, timeout_s: float = 3.0) -> None:
    with anyio.fail_after(timeout_s):
        while len(_alive_marked(name)) < count:
            await anyio.sleep(0.01)


HEADER = re.compile(
    r"^=== attempt 1 task task-(\S+) worker w1 start \d{4}-\d\d-\d\dT[\d:.]+Z command: (.*) ===$",
    re.M,
)


async def test_command_exit_code_is_reported_and_logged(tmp_path: Path) -> None:
    """A failing command gives Started then Finished(command, exit 3); output is in the log."""
    async with agent(tmp_path) as a:
        await a.send(a.run("exit3", "echo to-out; echo to-err >&2; exit 3"))
        pid, done = await a.started_and_finished()
        assert done.attempt_id == MARK + "exit3" and pid > 0
        assert (done.phase, done.exit_code, done.signal, done.killed) == ("command", 3, None, False)
        text = a.log_text("exit3")
        header = HEADER.search(text)
        assert header and header.groups() == ("exit3", "echo to-out; echo to-err >&2; exit 3")
        assert text.index("to-out\n") > header.end() and "to-err\n" in text
        assert "result: command, exit 3" in text


async def test_success_and_signal_are_reported(tmp_path: Path) -> None:
    """exit 0 is phase done; a command killed by a signal reports the signal number."""
    async with agent(tmp_path) as a:
        done = await a.outcome(a.run("ok", ["true"]))
        assert (done.phase, done.exit_code) == ("done", 0)
        done = await a.outcome(a.run("sig", "kill -USR1 $$"))
        assert (done.phase, done.exit_code, done.signal) == ("command", None, signal.SIGUSR1)


async def test_validate_failure_is_reported(tmp_path: Path) -> None:
    """A command that succeeds but whose validate step fails reports phase validate."""
    async with agent(tmp_path) as a:
        done = await a.outcome(a.run("val", ["true"], validate="echo checking; exit 4"))
        assert (done.phase, done.exit_code, done.validate_exit_code) == ("validate", 0, 4)
        text = a.log_text("val")
        assert "worker w1 validate " in text and "checking" in text
        done = await a.outcome(a.run("val-ok", ["true"], validate=["true"]))
        assert done.phase == "done"


@pytest.mark.parametrize(
    ("name", "command", "cwd", "needle"),
    [
        ("noexec", ["/nonexistent/program"], None, "/nonexistent/program"),
        ("badcwd", ["true"], "/nonexistent/dir", "/nonexistent/dir"),
    ],
)
async def test_spawn_failure_is_reported(
    tmp_path: Path, name: str, command: list[str], cwd: str | None, needle: str
) -> None:
    """A missing executable or working directory gives Finished(spawn) and no Started."""
    async with agent(tmp_path) as a:
        await a.send(a.run(name, command, cwd=cwd))
        done = await a.expect(wire.Finished)  # a Started first would fail expect()
        assert done.phase == "spawn" and done.message and needle in done.message
        assert "could not start" in a.log_text(name)


async def test_kill_takes_background_children_too(tmp_path: Path) -> None:
    """Kill ends the shell and its background job; nothing with the marker survives."""
    async with agent(tmp_path) as a:
        await a.send(a.run("bg", "sleep 300 & sleep 300"))
        await a.expect(wire.Started)
        await _until_marked("bg", 3)
        await a.send(wire.Kill(attempt_id=MARK + "bg", grace_s=0.5, reason="timeout"))
        done = await a.expect(wire.Finished, timeout_s=1.5)
        assert done.killed and done.signal == signal.SIGTERM
        assert _alive_marked("bg") == []


async def test_kill_escalates_for_a_shell_that_ignores_term(tmp_path: Path) -> None:
    """A tree ignoring SIGTERM is SIGKILLed after the grace period."""
    async with agent(tmp_path) as a:
        await a.send(a.run("trap", "trap '' TERM; sleep 300 & while :; do sleep 0.05; done"))
        await a.expect(wire.Started)
        await _until_marked("trap", 2)
        await a.send(wire.Kill(attempt_id=MARK + "trap", grace_s=0.3, reason="timeout"))
        done = await a.expect(wire.Finished, timeout_s=1.3)
        assert done.killed and done.signal == signal.SIGKILL
        assert _alive_marked("trap") == []


async def test_kill_finds_a_double_forked_escapee(tmp_path: Path) -> None:
    """A setsid'd, re-parented escapee (adopted by the subreaper agent) is killed as well."""
    async with agent(tmp_path) as a:
        await a.send(a.run("esc", "(setsid sleep 300 &); sleep 300"))
        started = await a.expect(wire.Started)
        await _until_marked("esc", 3)
        # The subshell that forks the escapee comes and goes on the way: wait until the
        # escapee stands alone in its session, adopted by the agent.
        with anyio.fail_after(5):
            while True:
                escapee = [p for p in _alive_marked("esc") if os.getsid(p.pid) != started.pid]
                if len(escapee) == 1 and escapee[0].ppid() == a.process.pid:
                    break
                await anyio.sleep(0.01)
        await a.send(wire.Kill(attempt_id=MARK + "esc", grace_s=0.5, reason="timeout"))
        done = await a.expect(wire.Finished, timeout_s=1.5)
        assert done.killed
        assert _alive_marked("esc") == []


async def test_leftovers_of_a_finished_command_are_swept(tmp_path: Path) -> None:
    """A command that exits leaving an escapee behind: Finished comes only once it is gone."""
    async with agent(tmp_path) as a:
        await a.send(a.run("left", "(setsid sleep 300 &); sleep 0.2; exit 0"))
        await a.expect(wire.Started)
        await _until_marked("left", 2)
        done = await a.expect(wire.Finished, timeout_s=3)
        assert done.phase == "done" and not done.killed
        assert _alive_marked("left") == []


async def test_eof_on_stdin_kills_the_tree_and_exits(tmp_path: Path) -> None:
    """When the daemon goes away (EOF), the agent kills its attempt's tree and exits 0."""
    async with agent(tmp_path) as a:
        await a.send(a.run("eof", "sleep 300 & sleep 300"))
        await a.expect(wire.Started)
        await _until_marked("eof", 3)
        assert a.process.stdin is not None
        await a.process.stdin.aclose()
        with anyio.fail_after(3):
            assert await a.process.wait() == 0
        assert _alive_marked("eof") == []


async def test_stop_kills_the_attempt_and_exits(tmp_path: Path) -> None:
    """Stop kills the running attempt (reported as killed) and the agent exits 0."""
    async with agent(tmp_path) as a:
        await a.send(a.run("stop", ["sleep", "300"]))
        await a.expect(wire.Started)
        await a.send(wire.Stop(grace_s=0.5))
        done = await a.expect(wire.Finished, timeout_s=2)
        assert done.killed
        with anyio.fail_after(3):
            assert await a.process.wait() == 0
        assert _alive_marked("stop") == []


async def test_memory_rlimit_stops_an_allocation_past_it(tmp_path: Path) -> None:
    """With rlimits.memory_mb, a task allocating past the cap fails with MemoryError."""
    alloc = [sys.executable, "-c", "b = bytearray(1024 * 1024 * 1024)"]
    async with agent(tmp_path) as a:
        await a.send(a.run("mem", alloc, rlimits=Rlimits(memory_mb=256)))
        await a.expect(wire.Started)
        done = await a.expect(wire.Finished, timeout_s=10)
        assert (done.phase, done.exit_code) == ("command", 1)
        assert "MemoryError" in a.log_text("mem")


async def test_rlimit_wrapper_reports_a_missing_program_as_spawn_failure(
    tmp_path: Path,
) -> None:
    """Through the limits wrapper, an exec failure is still a spawn failure, not an exit."""
    async with agent(tmp_path) as a:
        await a.send(a.run("rlnoexec", ["/nonexistent/x"], rlimits=Rlimits(open_files=64)))
        done = await a.expect(wire.Finished, timeout_s=10)
        assert done.phase == "spawn" and done.message and "/nonexistent/x" in done.message


async def test_task_env_has_marker_and_lacks_service_variables(tmp_path: Path) -> None:
    """Tasks get their env and ORCHD_ATTEMPT_ID, never NOTIFY_SOCKET/WATCHDOG_*/LISTEN_*."""
    private = {"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "5", "LISTEN_FDS": "1"}
    async with agent(tmp_path, extra_env=private) as a:
        done = await a.outcome(a.run("env", ["env"], env={"FOO": "bar"}))
        assert done.phase == "done"
        lines = a.log_text("env").splitlines()
    assert "FOO=bar" in lines
    assert f"ORCHD_ATTEMPT_ID={MARK}env" in lines and "ORCHD_TASK_ID=task-env" in lines
    assert not [x for x in lines if x.startswith(("NOTIFY_SOCKET=", "WATCHDOG_", "LISTEN_"))]
    assert not [x for x in lines if x.startswith("ORCHD_ORIGINAL_PYTHONPATH=")]
    # The agent's own PYTHONPATH (extended so that it imports) is not handed down.
    original = os.environ.get("PYTHONPATH")
    pythonpath = [x for x in lines if x.startswith("PYTHONPATH=")]
    assert pythonpath == ([f"PYTHONPATH={original}"] if original else [])


async def test_heartbeats_arrive_at_the_interval(tmp_path: Path) -> None:
    """Heartbeats come every heartbeat_s and name the running attempt."""
    async with agent(tmp_path, heartbeat_s=0.05) as a:
        await a.send(a.run("hb", ["sleep", "300"]))
        await a.expect(wire.Started)
        stamps = []
        for _ in range(10):
            beat = await a.recv(timeout_s=1)
            assert isinstance(beat, wire.Heartbeat) and beat.attempt_id == MARK + "hb"
            stamps.append(anyio.current_time())
        mean_gap = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        assert 0.035 < mean_gap < 0.1
        await a.send(wire.Kill(attempt_id=MARK + "hb", grace_s=0.5, reason="test"))
        await a.expect(wire.Finished)


async def test_kill_for_an_unknown_attempt_is_ignored(tmp_path: Path) -> None:
    """A late Kill for an attempt the agent does not run changes nothing."""
    async with agent(tmp_path) as a:
        await a.send(wire.Kill(attempt_id="no-such-attempt", grace_s=0.1, reason="late"))
        done = await a.outcome(a.run("after", ["true"]))
        assert done.phase == "done" and not done.killed
        assert a.process.returncode is None


@pytest.mark.parametrize(
    "data",
    [
        struct.pack(">I", wire.MAX_FRAME + 1),
        struct.pack(">I", 3) + b"\xc1\xc1\xc1",
    ],
    ids=["oversized", "undecodable"],
)
async def test_bad_frame_makes_the_agent_exit_non_zero(tmp_path: Path, data: bytes) -> None:
    """An oversized or undecodable frame is logged and the agent exits with code 2."""
    async with agent(tmp_path) as a:
        await a.send_raw(data)
        with anyio.fail_after(3):
            assert await a.process.wait() == 2
        assert "bad_frame" in (tmp_path / "agent.log").read_text()


async def test_quick_command_is_reported_by_finished_alone(tmp_path: Path) -> None:
    """A command that ends at once is reported by one Finished carrying its pid; one that
    runs on is announced with Started first."""
    async with agent(tmp_path) as a:
        await a.send(a.run("quick", ["true"]))
        first = await a.expect(wire.Finished)
        assert first.phase == "done" and first.pid is not None and first.start_ticks
        await a.send(a.run("slow", "sleep 0.3"))
        started = await a.expect(wire.Started)
        assert started.attempt_id == MARK + "slow"
        done = await a.expect(wire.Finished)
        assert done.phase == "done" and done.pid is None


async def test_a_task_gets_no_fd_but_0_1_2(tmp_path: Path) -> None:
    """A task sees only stdin, stdout and stderr, even of fds the agent itself inherited;
    with a working directory (the other spawn path) too."""
    leaked_r, leaked_w = os.pipe()
    os.set_inheritable(leaked_w, True)
    try:
        async with agent(tmp_path, pass_fds=(leaked_w,)) as a:
            os.close(leaked_w)
            for name, cwd in (("fds", None), ("fds-cwd", str(tmp_path))):
                done = await a.outcome(a.run(name, "ls /proc/$$/fd", cwd=cwd))
                assert done.phase == "done"
                listed = a.log_text(name).splitlines()[1:-1]
                assert listed == ["0", "1", "2"], (name, listed)
    finally:
        os.close(leaked_r)
        with contextlib.suppress(OSError):
            os.close(leaked_w)


async def test_a_program_is_found_on_the_task_path(tmp_path: Path) -> None:
    """A bare program name is looked up on the task's own PATH, as execvp would."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "orchd-test-tool"
    tool.write_text("#!/bin/sh\necho tool ran\n")
    tool.chmod(0o755)
    path = f"{bin_dir}:{os.environ.get('PATH', os.defpath)}"
    async with agent(tmp_path) as a:
        done = await a.outcome(a.run("tool", ["orchd-test-tool"], env={"PATH": path}))
        assert done.phase == "done" and "tool ran" in a.log_text("tool")
        await a.send(a.run("no-tool", ["orchd-test-tool"]))
        done = await a.expect(wire.Finished)
        assert done.phase == "spawn" and done.message and "orchd-test-tool" in done.message


async def test_a_task_starts_with_sigpipe_at_its_default(tmp_path: Path) -> None:
    """SIGPIPE (ignored by Python) is back to its default in a task: a writer to a closed
    pipe just ends."""
    async with agent(tmp_path) as a:
        done = await a.outcome(a.run("pipe", ["sh", "-c", "yes | head -n 1"]))
        assert done.phase == "done"
        assert "Broken pipe" not in a.log_text("pipe")


async def test_an_empty_command_is_a_spawn_failure(tmp_path: Path) -> None:
    """Regression: an empty command list crashed the agent; it is a spawn failure now, and
    an empty validate list fails the validate step."""
    async with agent(tmp_path) as a:
        await a.send(a.run("empty", []))
        done = await a.expect(wire.Finished)
        assert done.phase == "spawn" and done.message and "empty" in done.message
        done = await a.outcome(a.run("empty-validate", ["true"], validate=[]))
        assert done.phase == "validate" and done.message and "empty" in done.message
        assert a.process.returncode is None
