"""One attempt in the worker agent: spawn its steps, reap them, kill its tree. I/O edge.

An attempt is its command, then its validate step if it has one. Each step runs in its own
session (so its process group is killable as a whole), with stdin on /dev/null, stdout and
stderr appended to the task's log, and the marker variable ORCHD_ATTEMPT_ID in its
environment. The runner does all the reaping of the agent's children itself (no asyncio
child watcher is involved), watching its direct child through a pidfd, which keeps a spawn
down to one fork+exec and no helper thread. What a finished step leaves behind is killed.

The agent (supervisor.workers.agent) decides when an attempt starts and when it is killed;
the runner only carries that out and says how each step ended.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from typing import BinaryIO

import anyio
import structlog

from supervisor.core import wire
from supervisor.workers import launch, proctree
from supervisor.workers.channel import FrameChannel

log = structlog.get_logger("orchd.agent")

# A command still running after this long is announced with Started; one that has ended
# by then is reported by its Finished alone, which saves the daemon a message and a
# record for every short task.
STARTED_DELAY_S = 0.005


class SpawnFailed(Exception):
    """Raised when a step's command could not be started (missing program, bad cwd, …)."""


@dataclass
class RunningAttempt:
    """One attempt as the agent runs it: the Run, the step's process, the kill's progress."""

    run: wire.Run
    step: str = "command"
    pid: int | None = None
    # The step's identity: start ticks since boot (None once it was reaped).
    start_ticks: int | None = None
    kill_requested: bool = False
    # Set once Started went out; a command that ends sooner is reported by Finished alone.
    started_sent: bool = False
    command_pid: int | None = None
    command_start_ticks: int | None = None
    # What outlived a kill or a sweep of this attempt, as (pid, start ticks).
    survivors: set[tuple[int, int]] = field(default_factory=set)
    kill_done: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)


class AttemptRunner:
    """Runs the steps of one attempt at a time, reaps the agent's children, kills trees."""

    def __init__(self, *, worker_id: str, kill_grace_s: float, channel: FrameChannel) -> None:
        self._worker_id = worker_id
        self._kill_grace_s = kill_grace_s
        self._channel = channel
        self._base_env = launch.task_base_env(os.environ)
        self._devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        # Exit statuses of reaped direct children (command/validate), by pid.
        self._direct: set[int] = set()
        self._statuses: dict[int, int] = {}

    async def kill(self, attempt: RunningAttempt, grace_s: float, reason: str) -> None:
        """Kill the attempt's tree (if a step has started); `kill_done` is set after."""
        try:
            # No step has started yet: the attempt task sees the flag and never spawns.
            if attempt.pid is not None:
                pid, ticks = attempt.pid, attempt.start_ticks
                report = await anyio.to_thread.run_sync(
                    lambda: proctree.kill_tree(
                        pid,
                        pid,
                        ticks,
                        attempt.run.attempt_id,
                        grace_s,
                        children_of=os.getpid(),
                    )
                )
                attempt.survivors.update(report.survivors)
                log.info(
                    "attempt_killed",
                    attempt_id=attempt.run.attempt_id,
                    reason=reason,
                    pids=list(report.signalled),
                    survivors=report.survivor_pids,
                )
        finally:
            attempt.kill_done.set()

    async def steps(self, attempt: RunningAttempt, out: BinaryIO) -> wire.Finished:
        """Run the command, then the validate step if there is one and the command
        succeeded; how the attempt ended (not yet marked killed)."""
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
        self, attempt: RunningAttempt, step: str, command: list[str] | str, out: BinaryIO
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
            attempt.start_ticks = proctree.start_ticks(pid)
        except (OSError, ValueError, IndexError):
            attempt.start_ticks = None  # already reaped; nothing to kill
        pidfd = os.pidfd_open(pid)
        try:
            exec_error = await launch.read_exec_status(status_r) if status_r is not None else ""
            exited = False
            if not exec_error and step == "command":
                attempt.command_pid, attempt.command_start_ticks = pid, attempt.start_ticks
                with anyio.move_on_after(STARTED_DELAY_S):
                    await anyio.wait_readable(pidfd)
                    exited = True
                if not exited:
                    attempt.started_sent = await self._channel.send(
                        wire.Started(
                            attempt_id=run.attempt_id, pid=pid, start_ticks=attempt.start_ticks
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
            self.reap()
            status = self._statuses.pop(pid, None)
            if status is not None:
                self._direct.discard(pid)
                return os.waitstatus_to_exitcode(status)
            await anyio.sleep(0.001)

    def reap(self) -> bool:
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

    async def _sweep(self, attempt: RunningAttempt) -> None:
        """Kill what a finished step left behind. Every descendant of a subreaper that is
        still alive keeps a live child of ours, so no children means nothing is left."""
        if not self.reap():
            return
        pid, ticks = attempt.pid, attempt.start_ticks
        report = await anyio.to_thread.run_sync(
            lambda: proctree.kill_tree(
                pid,
                pid,
                ticks,
                attempt.run.attempt_id,
                self._kill_grace_s,
                children_of=os.getpid(),
            )
        )
        self.reap()
        attempt.survivors.update(report.survivors)
        if report.signalled:
            log.warning(
                "leftovers_killed",
                attempt_id=attempt.run.attempt_id,
                step=attempt.step,
                pids=list(report.signalled),
            )
