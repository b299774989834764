"""The worker agent: a long-lived process that runs one attempt at a time for the daemon.

    python -m supervisor.workers.agent --worker-id W --heartbeat-s 0.1 \
        [--kill-grace-s 5] [--log PATH]

It reads `wire` frames (Run, Kill, Stop) on stdin and writes frames (Hello, Heartbeat,
Started, Finished) on stdout; its own log lines go to stderr (or --log). It heartbeats from
its event loop, so an agent that is stopped or wedged stops heartbeating.

Each attempt runs in its own session (so its process group is killable as a whole), with
stdin on /dev/null, stdout and stderr appended to the task's log, and the marker variable
ORCHD_ATTEMPT_ID in its environment. The agent is a child subreaper: orphans of an attempt
are re-parented to it, so they remain findable and it reaps them. The agent does all the
reaping of its children itself (no asyncio child watcher is involved), watching its direct
child through a pidfd, which keeps a spawn down to one fork+exec and no helper thread.

When the daemon goes away (EOF on stdin) or asks it to stop, the agent kills the running
attempt's tree before it exits: no task outlives its supervisor unseen.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import BinaryIO

import anyio
import psutil
import structlog
from anyio.abc import TaskGroup

from supervisor.core import wire
from supervisor.workers import launch, proctree
from supervisor.workers.channel import FrameChannel, ProtocolError

log = structlog.get_logger("orchd.agent")

EXIT_PROTOCOL_ERROR = 2
# A command still running after this long is announced with Started; one that has ended
# by then is reported by its Finished alone, which saves the daemon a message and a
# record for every short task.
STARTED_DELAY_S = 0.005


class SpawnFailed(Exception):
    """Raised when a step's command could not be started (missing program, bad cwd, …)."""


@dataclass
class _Attempt:
    run: wire.Run
    step: str = "command"
    pid: int | None = None
    create_time: float = 0.0
    kill_requested: bool = False
    # Set once Started went out; a command that ends sooner is reported by Finished alone.
    started_sent: bool = False
    command_pid: int | None = None
    command_create_time: float = 0.0
    kill_done: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)


class Agent:
    """One worker's agent: frames in, one attempt at a time, frames out."""

    def __init__(
        self, *, worker_id: str, heartbeat_s: float, kill_grace_s: float, channel: FrameChannel
    ) -> None:
        self._worker_id = worker_id
        self._heartbeat_s = heartbeat_s
        self._kill_grace_s = kill_grace_s
        self._channel = channel
        self._base_env = launch.task_base_env(os.environ)
        self._devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._attempt: _Attempt | None = None
        # Exit statuses of reaped direct children (command/validate), by pid.
        self._direct: set[int] = set()
        self._statuses: dict[int, int] = {}
        self._exit = anyio.Event()
        self._exit_code = 0
        self._exit_grace_s = kill_grace_s
        self._tg: TaskGroup | None = None
        # The next attempt for `_attempt_loop`, which `_wake` rouses: one long-lived task
        # runs every attempt, rather than a task started per Run.
        self._next: _Attempt | None = None
        self._wake = anyio.Event()

    async def run(self) -> int:
        """Serve until Stop, EOF, a protocol error or SIGTERM; returns the exit code."""
        subreaper = proctree.set_child_subreaper()
        me = psutil.Process()
        log.info("agent_started", pid=me.pid, subreaper=subreaper)
        await self._channel.send(
            wire.Hello(worker_id=self._worker_id, pid=me.pid, create_time=me.create_time())
        )
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._read_loop)
            tg.start_soon(self._heartbeat_loop)
            tg.start_soon(self._signal_loop)
            tg.start_soon(self._attempt_loop)
            await self._exit.wait()
            attempt = self._attempt
            if attempt is not None:
                self._request_kill(attempt, self._exit_grace_s, "agent_exit")
                await attempt.done.wait()
            tg.cancel_scope.cancel()
        self._reap()
        log.info("agent_exiting", code=self._exit_code)
        return self._exit_code

    def _shutdown(self, code: int, grace_s: float) -> None:
        if not self._exit.is_set():
            self._exit_code, self._exit_grace_s = code, grace_s
            self._exit.set()

    # --- inbound -----------------------------------------------------------------------

    async def _read_loop(self) -> None:
        while True:
            try:
                msg = await self._channel.receive()
            except ProtocolError as exc:
                log.error("bad_frame", error=str(exc))
                self._shutdown(EXIT_PROTOCOL_ERROR, self._kill_grace_s)
                return
            match msg:
                case None:
                    log.warning("daemon_gone")
                    self._shutdown(0, self._kill_grace_s)
                    return
                case wire.Run():
                    self._start(msg)
                case wire.Kill():
                    self._on_kill(msg)
                case wire.Stop():
                    log.info("stop_requested", grace_s=msg.grace_s)
                    self._shutdown(0, msg.grace_s)
                    return

    def _start(self, run: wire.Run) -> None:
        assert self._tg is not None
        if self._attempt is not None:
            busy = self._attempt.run.attempt_id
            log.error("run_while_busy", attempt_id=run.attempt_id, running=busy)
            refusal = wire.Finished(
                attempt_id=run.attempt_id, phase="spawn", message=f"worker busy with {busy}"
            )
            self._tg.start_soon(self._channel.send, refusal)
            return
        self._attempt = self._next = _Attempt(run)
        self._wake.set()

    def _on_kill(self, kill: wire.Kill) -> None:
        attempt = self._attempt
        if attempt is None or attempt.run.attempt_id != kill.attempt_id:
            log.warning("kill_for_unknown_attempt", attempt_id=kill.attempt_id)
            return
        log.info("kill_requested", attempt_id=kill.attempt_id, reason=kill.reason)
        self._request_kill(attempt, kill.grace_s, kill.reason)

    def _request_kill(self, attempt: _Attempt, grace_s: float, reason: str) -> None:
        assert self._tg is not None
        if attempt.kill_requested:
            return
        attempt.kill_requested = True
        self._tg.start_soon(self._kill, attempt, grace_s, reason)

    async def _kill(self, attempt: _Attempt, grace_s: float, reason: str) -> None:
        try:
            # No step has started yet: the attempt task sees the flag and never spawns.
            if attempt.pid is not None:
                pid, create_time = attempt.pid, attempt.create_time
                report = await anyio.to_thread.run_sync(
                    lambda: proctree.kill_tree(
                        pid,
                        pid,
                        create_time,
                        attempt.run.attempt_id,
                        grace_s,
                        children_of=os.getpid(),
                    )
                )
                log.info(
                    "attempt_killed",
                    attempt_id=attempt.run.attempt_id,
                    reason=reason,
                    pids=list(report.signalled),
                    survivors=list(report.survivors),
                )
        finally:
            attempt.kill_done.set()

    # --- outbound ----------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        next_at = anyio.current_time()
        while True:
            next_at += self._heartbeat_s
            await anyio.sleep(max(0.0, next_at - anyio.current_time()))
            # Orphans re-parented to us die as zombies until someone waits for them.
            self._reap()
            attempt_id = self._attempt.run.attempt_id if self._attempt is not None else None
            if not await self._channel.send(wire.Heartbeat(attempt_id=attempt_id)):
                log.warning("daemon_gone", on="heartbeat")
                self._shutdown(0, self._kill_grace_s)
                return

    async def _signal_loop(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("signal_received", signal=signal.Signals(signum).name)
                self._shutdown(0, self._kill_grace_s)

    # --- attempts ------------------------------------------------------------------------

    async def _attempt_loop(self) -> None:
        while True:
            await self._wake.wait()
            # Replaced before `_next` is taken, so a Run that comes meanwhile is not missed.
            self._wake = anyio.Event()
            attempt, self._next = self._next, None
            if attempt is not None:
                await self._run_attempt(attempt)

    async def _run_attempt(self, attempt: _Attempt) -> None:
        run = attempt.run
        result = wire.Finished(attempt_id=run.attempt_id, phase="spawn")
        try:
            with launch.open_log(run.log_path) as out:
                result = await self._steps(attempt, out)
                if attempt.kill_requested:
                    await attempt.kill_done.wait()
                    result.killed = True
                launch.write_line(out, launch.footer(run, result))
        except OSError as exc:
            result = wire.Finished(attempt_id=run.attempt_id, phase="spawn", message=str(exc))
        finally:
            if attempt.kill_requested:
                await attempt.kill_done.wait()
                result.killed = True
            # Successes are many and the daemon records them; keep the worker's log for the rest.
            (log.debug if result.phase == "done" and not result.killed else log.info)(
                "attempt_finished",
                attempt_id=run.attempt_id,
                phase=result.phase,
                exit_code=result.exit_code,
                signal=result.signal,
                killed=result.killed,
            )
            self._attempt = None
            if not attempt.started_sent and attempt.command_pid is not None:
                result.pid, result.create_time = attempt.command_pid, attempt.command_create_time
            await self._channel.send(result)
            attempt.done.set()

    async def _steps(self, attempt: _Attempt, out: BinaryIO) -> wire.Finished:
        run = attempt.run
        finished = wire.Finished(attempt_id=run.attempt_id, phase="command")
        try:
            code = await self._step(attempt, "command", run.command, out)
        except SpawnFailed as exc:
            return wire.Finished(attempt_id=run.attempt_id, phase="spawn", message=str(exc))
        if code is None:
            finished.message = "killed before start"
            return finished
        launch.set_code(finished, code, validate=False)
        if code != 0 or run.validate is None or attempt.kill_requested:
            if code == 0 and not attempt.kill_requested:
                finished.phase = "done"
            return finished
        finished.phase = "validate"
        try:
            vcode = await self._step(attempt, "validate", run.validate, out)
        except SpawnFailed as exc:
            finished.message = f"validate could not start: {exc}"
            return finished
        if vcode is None:
            return finished
        launch.set_code(finished, vcode, validate=True)
        if vcode == 0 and not attempt.kill_requested:
            finished.phase = "done"
        return finished

    async def _step(
        self, attempt: _Attempt, step: str, command: list[str] | str, out: BinaryIO
    ) -> int | None:
        """Run one step to its end and sweep what it left; its returncode (negative for a
        signal), or None when a kill came before it started."""
        run = attempt.run
        argv = launch.command_argv(command)
        word = "start" if step == "command" else "validate"
        launch.write_line(out, launch.header(run, self._worker_id, word, command))
        if attempt.kill_requested:
            return None
        status_r: int | None = None
        pass_fds: tuple[int, ...] = ()
        if run.rlimits is not None:
            status_r, status_w = os.pipe()
            pass_fds = (status_w,)
            argv = launch.limits_argv(run.rlimits, status_w) + argv
        env = dict(self._base_env)
        env.update(run.env)
        env[launch.TASK_ID_ENV] = run.task_id
        env[proctree.MARKER_ENV] = run.attempt_id
        proc: subprocess.Popen[bytes] | None = None
        pid = None
        if status_r is None and run.cwd is None:
            pid = launch.spawn(argv, env, stdin=self._devnull, out=out.fileno())
        if pid is None:
            try:
                # No preexec_fn: it would rule out vfork, which keeps a spawn cheap.
                proc = subprocess.Popen(
                    argv,
                    stdin=self._devnull,
                    stdout=out,
                    stderr=out,
                    cwd=run.cwd,
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=pass_fds,
                )
            except (OSError, ValueError) as exc:
                if status_r is not None:
                    os.close(status_r)
                launch.write_line(
                    out, f"=== attempt {run.number} {step} could not start: {exc} ==="
                )
                raise SpawnFailed(str(exc)) from exc
            finally:
                for fd in pass_fds:
                    os.close(fd)
            pid = proc.pid
        self._direct.add(pid)
        attempt.step, attempt.pid = step, pid
        try:
            attempt.create_time = proctree.create_time(pid)
        except (OSError, ValueError, IndexError):
            attempt.create_time = 0.0  # already reaped; nothing to kill
        pidfd = os.pidfd_open(pid)
        try:
            exec_error = await launch.read_exec_status(status_r) if status_r is not None else ""
            exited = False
            if not exec_error and step == "command":
                attempt.command_pid, attempt.command_create_time = pid, attempt.create_time
                with anyio.move_on_after(STARTED_DELAY_S):
                    await anyio.wait_readable(pidfd)
                    exited = True
                if not exited:
                    attempt.started_sent = await self._channel.send(
                        wire.Started(
                            attempt_id=run.attempt_id, pid=pid, create_time=attempt.create_time
                        )
                    )
            if not exited:
                await anyio.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        code = await self._collect(pid)
        if proc is not None:
            # Popen never waited itself; tell it the outcome so it does not try to later.
            proc.returncode = code
        await self._sweep(attempt)
        if exec_error:
            raise SpawnFailed(exec_error)
        return code

    async def _collect(self, pid: int) -> int:
        """The exit code of direct child `pid`, which has exited (its pidfd said so)."""
        while True:
            self._reap()
            status = self._statuses.pop(pid, None)
            if status is not None:
                self._direct.discard(pid)
                return os.waitstatus_to_exitcode(status)
            await anyio.sleep(0.001)

    def _reap(self) -> bool:
        """Wait for every exited child; keep direct children's statuses. True if children
        remain. Safe to wait for any pid here: this process has no other child watcher."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            if pid in self._direct:
                self._statuses[pid] = status
            else:
                log.debug("orphan_reaped", pid=pid)

    async def _sweep(self, attempt: _Attempt) -> None:
        """Kill what a finished step left behind. Every descendant of a subreaper that is
        still alive keeps a live child of ours, so no children means nothing is left."""
        if not self._reap():
            return
        pid, create_time = attempt.pid, attempt.create_time
        report = await anyio.to_thread.run_sync(
            lambda: proctree.kill_tree(
                pid,
                pid,
                create_time,
                attempt.run.attempt_id,
                self._kill_grace_s,
                children_of=os.getpid(),
            )
        )
        self._reap()
        if report.signalled:
            log.warning(
                "leftovers_killed",
                attempt_id=attempt.run.attempt_id,
                step=attempt.step,
                pids=list(report.signalled),
            )


def _configure_logging(worker_id: str) -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.KeyValueRenderer(
                key_order=["timestamp", "level", "event", "worker_id"], drop_missing=True
            ),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(20),  # INFO
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(worker_id=worker_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="supervisor.workers.agent", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--heartbeat-s", type=float, default=5.0)
    parser.add_argument("--kill-grace-s", type=float, default=5.0)
    parser.add_argument("--log", help="append the agent's own log (and stderr) to this file")
    args = parser.parse_args(argv)
    if args.log:
        fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 2)
        os.close(fd)
    # The protocol gets private copies of stdin/stdout, and fds 0/1 are pointed elsewhere,
    # so that a stray print or a library's read can never corrupt the frame stream.
    rfd, wfd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)
    launch.private_fds()
    _configure_logging(args.worker_id)
    agent = Agent(
        worker_id=args.worker_id,
        heartbeat_s=args.heartbeat_s,
        kill_grace_s=args.kill_grace_s,
        channel=FrameChannel(rfd, wfd),
    )
    return anyio.run(agent.run)


if __name__ == "__main__":
    sys.exit(main())
