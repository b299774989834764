"""The worker agent: a long-lived process that runs one attempt at a time for the daemon.

    python -m supervisor.workers.agent --worker-id W --heartbeat-s 0.1 \
        [--kill-grace-s 5] [--lease-s 0] [--spool DIR] [--log PATH]

It reads `wire` frames (Run, Kill, Stop, Lease, Sweep) on stdin and writes frames (Hello,
Heartbeat, Started, Finished, Swept, Output) on stdout; its own log lines go to stderr (or
--log). It heartbeats from its event loop, so an agent that is stopped or wedged stops
heartbeating; each heartbeat carries the agent's own pid, start ticks, CPU and RSS.

With --lease-s (a worker on another host) each step of an attempt runs under its own shim
(supervisor.workers.shim), which leads the step's session and fences it on its own when
the lease runs out: every frame from the daemon renews the leases. The host-local spool
(--spool, default `${XDG_RUNTIME_DIR:-/tmp}/orchd-agent-<uid>`) holds the shims' fence
records and streamed output (supervisor.workers.spool); on Sweep the agent kills what
an earlier agent left behind and reports the fences it finds there.

This module holds the agent's loops (frames in, heartbeats, signals, one attempt at a
time) and `main`; how an attempt's steps are spawned, reaped and killed is in
supervisor.workers.attempt. The agent is a child subreaper: orphans of an attempt are
re-parented to it, so they remain findable and it reaps them.

When the daemon goes away (EOF on stdin) or asks it to stop, the agent kills the running
attempt's tree before it exits: no task outlives its supervisor unseen.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sys
from pathlib import Path

import anyio
import psutil
import structlog
from anyio.abc import TaskGroup

from supervisor.core import wire
from supervisor.workers import launch, proctree, spool
from supervisor.workers.attempt import AttemptRunner, RunningAttempt
from supervisor.workers.channel import FrameChannel, ProtocolError
from supervisor.workers.outstream import OutputStream

log = structlog.get_logger("orchd.agent")

EXIT_PROTOCOL_ERROR = 2
EXIT_BAD_SPOOL = 3


class Agent:
    """One worker's agent: frames in, one attempt at a time, frames out."""

    def __init__(
        self,
        *,
        worker_id: str,
        heartbeat_s: float,
        kill_grace_s: float,
        channel: FrameChannel,
        lease_s: float = 0.0,
        spool_dir: Path | None = None,
        daemon_id: str = "",
    ) -> None:
        self._worker_id = worker_id
        self._heartbeat_s = heartbeat_s
        self._kill_grace_s = kill_grace_s
        self._channel = channel
        self._spool = spool_dir
        self._daemon_id = daemon_id
        self._runner = AttemptRunner(
            worker_id=worker_id,
            kill_grace_s=kill_grace_s,
            channel=channel,
            lease_s=lease_s,
            spool_dir=spool_dir,
        )
        # Our own figures for the heartbeat: one Process kept, so that its CPU percent is
        # since the previous beat.
        self._me = psutil.Process()
        self._start_ticks: int | None = None
        # Set while a Sweep is carried out: no attempt starts before it is done.
        self._sweeping: anyio.Event | None = None
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
        me = self._me
        log.info("agent_started", pid=me.pid, subreaper=subreaper)
        self._start_ticks = proctree.start_ticks(me.pid)
        me.cpu_percent(None)  # the first call only starts the count
        await self._channel.send(
            wire.Hello(
                worker_id=self._worker_id,
                pid=me.pid,
                create_time=me.create_time(),
                start_ticks=self._start_ticks,
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
            if msg is not None and self._attempt is not None:
                # Every frame from the daemon says it is still there.
                self._runner.renew(self._attempt)
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
                    self._shutdown(0, self._grace(msg.grace_s))
                    return
                case wire.Sweep():
                    self._start_sweep(msg)
                case wire.Lease():
                    pass

    def _start(self, run: wire.Run) -> None:
        assert self._tg is not None
        if not spool.one_component(run.attempt_id):
            log.error("bad_attempt_id", attempt_id=run.attempt_id)
            refusal = wire.Finished(
                attempt_id=run.attempt_id,
                phase="spawn",
                message=f"attempt id {run.attempt_id!r} is not one path component",
            )
            self._tg.start_soon(self._channel.send, refusal)
            return
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
        self._request_kill(attempt, self._grace(kill.grace_s), kill.reason)

    def _grace(self, grace_s: float) -> float:
        """A kill's grace as asked, or ours when what was asked is no duration at all."""
        return grace_s if math.isfinite(grace_s) and grace_s >= 0 else self._kill_grace_s

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
            if not await self._channel.send(self._heartbeat(attempt_id)):
                log.warning("daemon_gone", on="heartbeat")
                self._shutdown(0, self._kill_grace_s)
                return

    def _heartbeat(self, attempt_id: str | None) -> wire.Heartbeat:
        me = self._me
        try:
            with me.oneshot():
                cpu, rss = me.cpu_percent(None), me.memory_info().rss
        except psutil.Error:
            cpu, rss = None, None
        return wire.Heartbeat(
            attempt_id=attempt_id,
            pid=me.pid,
            start_ticks=self._start_ticks,
            cpu_percent=cpu,
            rss_bytes=rss,
        )

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
                if self._sweeping is not None:
                    await self._sweeping.wait()
                await self._run_attempt(attempt)

    # --- sweep -----------------------------------------------------------------------------

    def _start_sweep(self, sweep: wire.Sweep) -> None:
        assert self._tg is not None
        if self._sweeping is not None and not self._sweeping.is_set():
            log.warning("sweep_while_sweeping")
            return
        if self._spool is None:
            # A sweep is scoped to the spool; an agent started without one uses the default.
            try:
                self._spool = spool.prepare_default(os.environ, self._daemon_id)
            except spool.SpoolError as exc:
                log.error("bad_spool", error=str(exc))
                self._tg.start_soon(self._channel.send, wire.Swept())
                return
        self._sweeping = anyio.Event()
        self._tg.start_soon(self._sweep, sweep, self._sweeping)

    async def _sweep(self, sweep: wire.Sweep, done: anyio.Event) -> None:
        """Kill what other attempts left on this host, answer Swept, then report the
        fences an earlier agent's shims recorded in the spool."""
        try:
            live = set(sweep.live)
            if self._attempt is not None:
                live.add(self._attempt.run.attempt_id)
            own = os.environ.get(proctree.MARKER_ENV)
            if own:
                live.add(own)  # this agent runs inside an attempt itself: not ours to kill
            grace_s, scope = self._kill_grace_s, str(self._spool)
            report = await anyio.to_thread.run_sync(
                lambda: proctree.sweep_foreign(live, scope, grace_s)
            )
            self._runner.reap()
            (log.warning if report.killed else log.info)(
                "swept",
                live=sorted(sweep.live),
                killed=list(report.killed),
                pids=list(report.pids),
                survivors=list(report.survivors),
            )
            await self._channel.send(
                wire.Swept(
                    killed=list(report.killed), pids=list(report.pids), survivors=report.survivors
                )
            )
            await self._report_spooled(live)
        finally:
            done.set()

    async def _report_spooled(self, live: set[str]) -> None:
        assert self._spool is not None
        for path, rec in spool.all_fenced(self._spool):
            if rec.attempt_id in live:
                continue
            late = wire.Finished(
                attempt_id=rec.attempt_id,
                phase="command",
                exit_code=rec.exit_code,
                signal=rec.signal,
                message=f"fenced by its shim ({rec.why}) at {launch.utc_at(rec.when)}",
                survivors=tuple((p, t) for p, t in rec.survivors),
                fenced=True,
            )
            log.info("spooled_outcome", attempt_id=rec.attempt_id, why=rec.why)
            if not await self._channel.send(late):
                return  # kept in the spool for the next agent
            path.unlink(missing_ok=True)
        for path in self._spool.glob("*.out"):
            if path.stem not in live:
                path.unlink(missing_ok=True)  # an earlier agent's stream, never sent

    async def _run_attempt(self, attempt: RunningAttempt) -> None:
        run = attempt.run
        result = wire.Finished(attempt_id=run.attempt_id, phase="spawn")
        stream: OutputStream | None = None
        try:
            log_path = run.log_path
            if run.stream_output:
                if self._spool is None:
                    self._spool = spool.prepare_default(os.environ, self._daemon_id)
                log_path = str(spool.output_path(self._spool, run.attempt_id))
            with launch.open_log(log_path) as out:
                if run.stream_output:
                    assert self._tg is not None
                    stream = OutputStream(run.attempt_id, Path(log_path), self._channel)
                    self._tg.start_soon(stream.run)
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
        except (OSError, ValueError, spool.SpoolError) as exc:
            # ValueError: a path with a NUL byte in it.
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
            if attempt.fenced is not None:
                result.fenced = True
                result.message = f"fenced by its shim ({attempt.fenced.why})"
            if stream is not None:
                with anyio.CancelScope(shield=True):
                    await stream.close()
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
    parser.add_argument(
        "--lease-s",
        type=float,
        default=0.0,
        help="run each step under a shim that fences it after this long without a frame "
        "from the daemon (0: no lease, for workers on the daemon's host)",
    )
    parser.add_argument(
        "--spool",
        help="host-local directory for fence records and streamed output "
        "(default ${XDG_RUNTIME_DIR:-/tmp}/orchd-agent-<uid>)",
    )
    parser.add_argument(
        "--daemon-id",
        default="",
        help="the daemon's name for itself: the default spool is a directory of that name "
        "in the one above, so agents of two daemons on one host keep apart",
    )
    parser.add_argument("--log", help="append the agent's own log (and stderr) to this file")
    args = parser.parse_args(argv)
    if args.daemon_id and not re.fullmatch(r"[A-Za-z0-9._-]+", args.daemon_id):
        parser.error("--daemon-id must be letters, digits, '.', '_' or '-'")
    if args.lease_s < 0:
        parser.error("--lease-s must be 0 (no lease) or more")
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
    spool_dir: Path | None = None
    if args.lease_s > 0 or args.spool:
        try:
            spool_dir = (
                spool.prepare(Path(args.spool))
                if args.spool
                else spool.prepare_default(os.environ, args.daemon_id)
            )
        except spool.SpoolError as exc:
            log.error("bad_spool", error=str(exc))
            return EXIT_BAD_SPOOL
    agent = Agent(
        worker_id=args.worker_id,
        heartbeat_s=args.heartbeat_s,
        kill_grace_s=args.kill_grace_s,
        channel=FrameChannel(rfd, wfd),
        lease_s=args.lease_s,
        spool_dir=spool_dir,
        daemon_id=args.daemon_id,
    )
    return anyio.run(agent.run)


if __name__ == "__main__":
    sys.exit(main())
