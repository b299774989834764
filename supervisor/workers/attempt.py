"""One attempt in the worker agent: spawn its steps, reap them, kill its tree. I/O edge.

An attempt is its command, then its validate step if it has one. Each step runs in its own
session (so its process group is killable as a whole), with stdin on /dev/null, stdout and
stderr appended to the task's log, and the marker variable ORCHD_ATTEMPT_ID in its
environment. With containment "cgroup" (the Run names a cgroup) the attempt also has a
cgroup of its own: made before its first step, every step born inside it
(supervisor.workers.cgroup.inside), killed whole through it, accounted from it and removed
at the attempt's end; the process-mode tree kill is then not used.

The runner does all the reaping of the agent's children itself (no asyncio child watcher
is involved), watching its direct child through a pidfd, which keeps a spawn
down to one fork+exec and no helper thread. What a finished step leaves behind is killed.

With a lease (an agent on another host) each step runs under its own shim instead
(supervisor.workers.shim), which leads the step's session, reports the command's pid, and
fences the step on its own when the lease runs out; the runner renews the lease through a
pipe, asks the shim for its kills, and reads a fence it recorded in the spool (where it stays
for the host's next agent to report).

The agent (supervisor.workers.agent) decides when an attempt starts and when it is killed;
the runner only carries that out and says how each step ended.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import anyio
import msgspec
import structlog

from supervisor.core import wire
from supervisor.core.model import Rlimits
from supervisor.workers import cgroup, launch, proctree, shim, spool
from supervisor.workers.channel import FrameChannel

log = structlog.get_logger("orchd.agent")

# A command still running after this long is announced with Started; one that has ended
# by then is reported by its Finished alone, which saves the daemon a message and a
# record for every short task.
STARTED_DELAY_S = 0.005
# How long past its grace the agent waits for a shim to carry out its kill request before
# killing the step's tree itself (a shim that does not answer: stopped, wedged).
SHIM_KILL_SLACK_S = 2.0


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
    # Containment "cgroup": the attempt's cgroup once made (None in the process mode).
    cgroup: str | None = None
    kill_done: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    # With a lease: the write end of the running step's lease pipe to its shim (each byte
    # renews the lease), and an event set once that step's shim has been reaped.
    lease_w: int | None = None
    step_ended: anyio.Event = field(default_factory=anyio.Event)
    # The step's shim fenced the attempt on its own (its record, taken from the spool).
    fenced: spool.Fenced | None = None


class AttemptRunner:
    """Runs the steps of one attempt at a time, reaps the agent's children, kills trees."""

    def __init__(
        self,
        *,
        worker_id: str,
        kill_grace_s: float,
        channel: FrameChannel,
        lease_s: float = 0.0,
        spool_dir: Path | None = None,
    ) -> None:
        self._worker_id = worker_id
        self._kill_grace_s = kill_grace_s
        # With a lease (> 0), every step runs under a shim that fences it on its own.
        self._lease_s = lease_s
        self._spool = spool_dir
        self._channel = channel
        self._base_env = launch.task_base_env(os.environ)
        self._devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        # Exit statuses of reaped direct children (command/validate), by pid.
        self._direct: set[int] = set()
        self._statuses: dict[int, int] = {}
        # This agent's own cgroup, to come back to after starting a step inside an
        # attempt's (read once, at the first attempt that has a cgroup).
        self._home_cgroup: str | None = None

    def open_cgroup(self, attempt: RunningAttempt) -> None:
        """Make the attempt's cgroup (containment "cgroup"), with its memory limit where
        the memory controller is there. Raises OSError when it cannot be made."""
        path = attempt.run.cgroup
        if path is None:
            return
        if self._home_cgroup is None:
            self._home_cgroup = cgroup.own_cgroup()
            if self._home_cgroup is None:
                raise OSError("this agent is in no cgroup v2")
        cgroup.create(path)
        attempt.cgroup = path

    async def close_cgroup(self, attempt: RunningAttempt, result: wire.Finished) -> None:
        """The attempt is over: read its accounting into `result`, kill anything still in
        its cgroup and remove the cgroup."""
        path = attempt.cgroup
        if path is None:
            return
        if cgroup.populated(path):
            report = await anyio.to_thread.run_sync(lambda: cgroup.kill(path, self._kill_grace_s))
        else:
            # The usual end: nothing left, so nothing blocks; no worker thread is needed.
            report = cgroup.kill(path, 0.0)
        attempt.cgroup = None
        self.reap()
        result.cpu_s, result.memory_peak_bytes = report.cpu_s, report.memory_peak_bytes
        if report.signalled:
            log.warning(
                "leftovers_killed",
                attempt_id=attempt.run.attempt_id,
                cgroup=path,
                pids=list(report.signalled),
            )
        if not report.removed:
            log.error(
                "cgroup_not_removed",
                attempt_id=attempt.run.attempt_id,
                cgroup=path,
                survivors=list(report.survivors),
            )

    async def kill(self, attempt: RunningAttempt, grace_s: float, reason: str) -> None:
        """Kill the attempt's tree (if a step has started); `kill_done` is set after."""
        try:
            if await self._kill_through_shim(attempt, grace_s):
                log.info("attempt_killed", attempt_id=attempt.run.attempt_id, reason=reason)
                return
            # No step has started yet: the attempt task sees the flag and never spawns.
            if attempt.pid is not None and attempt.cgroup is not None:
                # Containment "cgroup": the attempt's cgroup holds all of it.
                path = attempt.cgroup
                killed = await anyio.to_thread.run_sync(
                    lambda: cgroup.kill(path, grace_s, remove=False)
                )
                log.info(
                    "attempt_killed",
                    attempt_id=attempt.run.attempt_id,
                    reason=reason,
                    cgroup=path,
                    pids=list(killed.signalled),
                    survivors=list(killed.survivors),
                )
                attempt.survivors.update(_identities(killed.survivors))
            elif attempt.pid is not None:
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

    def renew(self, attempt: RunningAttempt) -> None:
        """Renew the lease of the attempt's running step (a byte to its shim)."""
        fd = attempt.lease_w
        if fd is not None:
            # A full pipe (the shim does not read) or a gone shim: nothing to renew.
            with contextlib.suppress(OSError):
                os.write(fd, b".")

    async def _kill_through_shim(self, attempt: RunningAttempt, grace_s: float) -> bool:
        """Ask the running step's shim to kill its tree and wait for it to end; False when
        there is no shim to ask or it did not do it in time (the caller kills directly)."""
        fd, ended = attempt.lease_w, attempt.step_ended
        if fd is None or attempt.pid is None:
            return False
        try:
            os.write(fd, shim.KILL + f"{grace_s!r}\n".encode())
        except OSError:
            return False
        with anyio.move_on_after(grace_s + SHIM_KILL_SLACK_S):
            await ended.wait()
        if not ended.is_set():
            log.warning("shim_kill_timeout", attempt_id=attempt.run.attempt_id, pid=attempt.pid)
        return ended.is_set()

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
        over = attempt.kill_requested or attempt.fenced is not None
        if code != 0 or run.validate is None or over:
            if code == 0 and not over:
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
        if vcode == 0 and not attempt.kill_requested and attempt.fenced is None:
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
        if not argv:
            launch.write_line(out, f"=== attempt {run.number} {step} could not start: empty ===")
            raise SpawnFailed(f"the {step} is an empty list: nothing to run")
        if self._lease_s > 0:
            return await self._shim_step(attempt, step, argv, out)
        status_r: int | None = None
        pass_fds: tuple[int, ...] = ()
        rlimits, memory_mb = _memory_plan(attempt)
        if rlimits is not None and rlimits != Rlimits():
            status_r, status_w = os.pipe()
            pass_fds = (status_w,)
            argv = launch.limits_argv(rlimits, status_w) + argv
        env = dict(self._base_env)
        env.update(run.env)
        env[launch.TASK_ID_ENV] = run.task_id
        env[proctree.MARKER_ENV] = run.attempt_id
        proc: subprocess.Popen[bytes] | None = None
        pid = None
        try:
            with self._inside(attempt, lift_memory_max=memory_mb is not None):
                if status_r is None and run.cwd is None:
                    pid = launch.spawn(argv, env, stdin=self._devnull, out=out.fileno())
                if pid is None:
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
                    pid = proc.pid
        except (OSError, ValueError) as exc:
            if status_r is not None:
                os.close(status_r)
            launch.write_line(out, f"=== attempt {run.number} {step} could not start: {exc} ===")
            raise SpawnFailed(str(exc)) from exc
        finally:
            for fd in pass_fds:
                os.close(fd)
        if memory_mb is not None and attempt.cgroup is not None:
            # Only now that the agent is out of the cgroup again (see cgroup.py).
            cgroup.set_memory_max(attempt.cgroup, memory_mb)
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

    async def _shim_step(
        self, attempt: RunningAttempt, step: str, argv: list[str], out: BinaryIO
    ) -> int:
        """Run one step under its shim (an agent with a lease): the shim leads the step's
        session, renewed through a pipe, and fences the step on its own; its exit status is
        the command's."""
        run = attempt.run
        assert self._spool is not None
        rlimits, memory_mb = _memory_plan(attempt)
        wrapped = rlimits is not None and rlimits != Rlimits()
        if wrapped:
            assert rlimits is not None
            argv = launch.limits_argv(rlimits, launch.SHIM_EXEC_STATUS_FD) + argv
        argv = (
            launch.shim_argv(
                run.attempt_id,
                lease_s=self._lease_s,
                kill_grace_s=self._kill_grace_s,
                spool=str(self._spool),
                cwd=run.cwd,
                exec_wrapper=wrapped,
            )
            + argv
        )
        env = dict(self._base_env)
        env.update(run.env)
        env[launch.TASK_ID_ENV] = run.task_id
        env[proctree.MARKER_ENV] = run.attempt_id
        env[proctree.SPOOL_ENV] = str(self._spool)
        lease_r, lease_w = os.pipe()
        status_r, status_w = os.pipe()
        try:
            with self._inside(attempt, lift_memory_max=memory_mb is not None):
                pid = launch.spawn_shim(
                    argv,
                    env,
                    stdin=self._devnull,
                    out=out.fileno(),
                    lease_fd=lease_r,
                    status_fd=status_w,
                )
        except (OSError, ValueError) as exc:
            for fd in (lease_w, status_r):
                os.close(fd)
            launch.write_line(out, f"=== attempt {run.number} {step} could not start: {exc} ===")
            raise SpawnFailed(str(exc)) from exc
        finally:
            os.close(lease_r)
            os.close(status_w)
        if memory_mb is not None and attempt.cgroup is not None:
            # Only now that the agent is out of the cgroup again (see cgroup.py).
            cgroup.set_memory_max(attempt.cgroup, memory_mb)
        os.set_blocking(lease_w, False)
        self._direct.add(pid)
        attempt.step, attempt.pid = step, pid
        attempt.lease_w, attempt.step_ended = lease_w, anyio.Event()
        try:
            attempt.start_ticks = proctree.start_ticks(pid)
        except (OSError, ValueError, IndexError):
            attempt.start_ticks = None
        pidfd = os.pidfd_open(pid)
        try:
            said = await launch.read_shim_status(status_r)
            if not isinstance(said, str) and step == "command":
                attempt.command_pid, attempt.command_start_ticks = said
                with anyio.move_on_after(STARTED_DELAY_S) as scope:
                    await anyio.wait_readable(pidfd)
                if scope.cancelled_caught:
                    attempt.started_sent = await self._channel.send(
                        wire.Started(attempt_id=run.attempt_id, pid=said[0], start_ticks=said[1])
                    )
            await anyio.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        try:
            code = await self._collect(pid)
        finally:
            attempt.lease_w = None
            os.close(lease_w)
            attempt.step_ended.set()
        if self._spool is not None:
            # The record stays in the spool: this agent's Finished may go into a link a
            # partition broke, so a later agent's sweep reports it again (a late frame to a
            # daemon that heard it already is one more event, never a completion).
            fenced = spool.read_fenced(spool.fenced_path(self._spool, run.attempt_id))
            if fenced is not None:
                attempt.fenced = fenced
                log.warning("attempt_fenced", attempt_id=run.attempt_id, why=fenced.why)
        await self._sweep(attempt)
        if isinstance(said, str):
            launch.write_line(out, f"=== attempt {run.number} {step} could not start: {said} ===")
            raise SpawnFailed(said)
        return code

    @contextlib.contextmanager
    def _inside(self, attempt: RunningAttempt, *, lift_memory_max: bool) -> Iterator[None]:
        """Spawn inside the attempt's cgroup, if it has one (see cgroup.py for why the agent
        moves itself there and back rather than its child moving itself). Its memory limit
        is lifted meanwhile (no process of the attempt runs between steps), so that what
        the agent allocates there can never OOM-kill it."""
        path, home = attempt.cgroup, self._home_cgroup
        if path is None or home is None:
            yield
            return
        if lift_memory_max:
            cgroup.set_memory_max(path, None)
        with cgroup.inside(path, home):
            yield

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
        still alive keeps a live child of ours, so no children means nothing is left (with a
        cgroup, the cgroup says so)."""
        if not self.reap() and (attempt.cgroup is None or not cgroup.populated(attempt.cgroup)):
            return
        if attempt.cgroup is not None:
            path = attempt.cgroup
            killed = await anyio.to_thread.run_sync(
                lambda: cgroup.kill(path, self._kill_grace_s, remove=False)
            )
            self.reap()
            if killed.signalled:
                log.warning(
                    "leftovers_killed",
                    attempt_id=attempt.run.attempt_id,
                    step=attempt.step,
                    cgroup=path,
                    pids=list(killed.signalled),
                )
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


def _memory_plan(attempt: RunningAttempt) -> tuple[Rlimits | None, int | None]:
    """The rlimits to apply to a step, and the memory.max (MB) to give its cgroup instead
    of RLIMIT_AS, if any."""
    rlimits = attempt.run.rlimits
    memory_mb = rlimits.memory_mb if rlimits is not None else None
    if memory_mb is None or attempt.cgroup is None:
        return rlimits, None
    if not cgroup.has_controller(attempt.cgroup, "memory"):
        return rlimits, None
    # The cgroup's memory.max replaces RLIMIT_AS where the memory controller is there: it
    # limits what the whole tree uses, not each process's address space.
    assert rlimits is not None
    return msgspec.structs.replace(rlimits, memory_mb=None), memory_mb


def _identities(pids: tuple[int, ...]) -> set[tuple[int, int]]:
    """(pid, start ticks) of the pids still alive (a cgroup kill reports bare pids)."""
    return {i for i in (proctree.process_identity(p) for p in pids) if i is not None}
