"""The worker agent: a long-lived process that runs one attempt at a time for the daemon.

    python -m supervisor.workers.agent --worker-id W --heartbeat-s 0.1 \
        [--kill-grace-s 5] [--log PATH]

It reads `wire` frames (Run, Kill, Stop) on stdin and writes frames (Hello, Heartbeat,
Started, Finished) on stdout; its own log lines go to stderr (or --log). It heartbeats from
its event loop, so an agent that is stopped or wedged stops heartbeating.

This module holds the agent's loops (frames in, heartbeats, signals, one attempt at a
time) and `main`; how an attempt's steps are spawned, reaped and killed is in
supervisor.workers.attempt. The agent is a child subreaper: orphans of an attempt are
re-parented to it, so they remain findable and it reaps them.

When the daemon goes away (EOF on stdin) or asks it to stop, the agent kills the running
attempt's tree before it exits: no task outlives its supervisor unseen.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import anyio
import psutil
import structlog
from anyio.abc import TaskGroup

from supervisor.core import wire
from supervisor.workers import launch, proctree
from supervisor.workers.attempt import AttemptRunner, RunningAttempt
from supervisor.workers.channel import FrameChannel, ProtocolError

log = structlog.get_logger("orchd.agent")

EXIT_PROTOCOL_ERROR = 2


class Agent:
    """One worker's agent: frames in, one attempt at a time, frames out."""

    def __init__(
        self, *, worker_id: str, heartbeat_s: float, kill_grace_s: float, channel: FrameChannel
    ) -> None:
        self._worker_id = worker_id
        self._heartbeat_s = heartbeat_s
        self._kill_grace_s = kill_grace_s
        self._channel = channel
        self._runner = AttemptRunner(
            worker_id=worker_id, kill_grace_s=kill_grace_s, channel=channel
        )
        self._attempt: RunningAttempt | None = None
        self._exit = anyio.Event()
        self._exit_code = 0
        self._exit_grace_s = kill_grace_s
        self._tg: TaskGroup | None = None
        # The next attempt for `_attempt_loop`, which `_wake` rouses: one long-lived task
        # runs every attempt, rather than a task started per Run.
        self._next: RunningAttempt | None = None
        self._wake = anyio.Event()

    async def run(self) -> int:
        """Serve until Stop, EOF, a protocol error or SIGTERM; returns the exit code."""
        subreaper = proctree.set_child_subreaper()
        me = psutil.Process()
        log.info("agent_started", pid=me.pid, subreaper=subreaper)
        await self._channel.send(
            wire.Hello(
                worker_id=self._worker_id,
                pid=me.pid,
                create_time=me.create_time(),
                start_ticks=proctree.start_ticks(me.pid),
            )
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
        self._runner.reap()
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
        self._attempt = self._next = RunningAttempt(run)
        self._wake.set()

    def _on_kill(self, kill: wire.Kill) -> None:
        attempt = self._attempt
        if attempt is None or attempt.run.attempt_id != kill.attempt_id:
            log.warning("kill_for_unknown_attempt", attempt_id=kill.attempt_id)
            return
        log.info("kill_requested", attempt_id=kill.attempt_id, reason=kill.reason)
        self._request_kill(attempt, kill.grace_s, kill.reason)

    def _request_kill(self, attempt: RunningAttempt, grace_s: float, reason: str) -> None:
        assert self._tg is not None
        if attempt.kill_requested:
            return
        attempt.kill_requested = True
        self._tg.start_soon(self._runner.kill, attempt, grace_s, reason)

    # --- outbound ----------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        next_at = anyio.current_time()
        while True:
            next_at += self._heartbeat_s
            await anyio.sleep(max(0.0, next_at - anyio.current_time()))
            # Orphans re-parented to us die as zombies until someone waits for them.
            self._runner.reap()
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

    async def _run_attempt(self, attempt: RunningAttempt) -> None:
        run = attempt.run
        result = wire.Finished(attempt_id=run.attempt_id, phase="spawn")
        try:
            with launch.open_log(run.log_path) as out:
                try:
                    self._runner.open_cgroup(attempt)
                except OSError as exc:
                    result.message = f"cannot make the attempt's cgroup {run.cgroup}: {exc}"
                    launch.write_line(out, f"=== attempt {run.number} {result.message} ===")
                else:
                    result = await self._runner.steps(attempt, out)
                if attempt.kill_requested:
                    await attempt.kill_done.wait()
                    result.killed = True
                await self._runner.close_cgroup(attempt, result)
                launch.write_line(out, launch.footer(run, result))
        except OSError as exc:
            result = wire.Finished(attempt_id=run.attempt_id, phase="spawn", message=str(exc))
        finally:
            if attempt.kill_requested:
                await attempt.kill_done.wait()
                result.killed = True
            if attempt.cgroup is not None:
                # Not closed above (the log could not be opened, or a cancel): still no
                # cgroup of ours is left behind.
                with anyio.CancelScope(shield=True):
                    await self._runner.close_cgroup(attempt, result)
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
            result.survivors = proctree.living(attempt.survivors)
            if not attempt.started_sent and attempt.command_pid is not None:
                result.pid, result.start_ticks = attempt.command_pid, attempt.command_start_ticks
            await self._channel.send(result)
            attempt.done.set()


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
