"""Worker health probes: every `health_check_interval_s` each live worker's process is
probed with psutil in a thread (exists with the same start ticks, not a zombie, not
stopped; CPU, RSS and open fds kept for display), and the round goes to the engine as a
HealthReport, where core/health.py turns it into verdicts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import psutil
import structlog

from supervisor.core.inputs import HealthReport, Probe
from supervisor.workers import proctree

if TYPE_CHECKING:
    from supervisor.engine.loop import Engine

log = structlog.get_logger("orchd.health")

_SICK_STATUSES = frozenset(
    {psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD, psutil.STATUS_TRACING_STOP}
)


def probe(pid: int, ticks: int | None, procs: dict[int, psutil.Process]) -> Probe:
    """psutil's view of one worker process (blocking; run in a thread). `procs` caches the
    Process objects between checks so that cpu_percent measures since the previous one.
    The identity is the start ticks since boot, which a clock step leaves alone."""
    try:
        proc = procs.get(pid)
        if proc is None or not proc.is_running():
            proc = procs[pid] = psutil.Process(pid)
        if ticks is not None and proctree.process_identity(pid) != (pid, ticks):
            procs.pop(pid, None)
            return Probe(pid=pid, ok=False, status="gone (pid reused)")
        with proc.oneshot():
            status = proc.status()
            return Probe(
                pid=pid,
                ok=status not in _SICK_STATUSES,
                status=status,
                cpu_percent=proc.cpu_percent(),
                rss_bytes=proc.memory_info().rss,
                open_fds=proc.num_fds(),
                threads=proc.num_threads(),
            )
    except psutil.ZombieProcess:
        return Probe(pid=pid, ok=False, status=psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        procs.pop(pid, None)
        return Probe(pid=pid, ok=False, status="gone")
    except psutil.AccessDenied:
        return Probe(pid=pid, ok=True, status="unknown (access denied)")


class Health:
    """The health probes of one daemon; `run` is its service task."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._procs: dict[int, psutil.Process] = {}

    async def run(self) -> None:
        """Probe every worker each interval, on a steady cadence; never ends on an error."""
        engine = self.engine
        next_at = anyio.current_time()
        while True:
            interval = engine.cfg.health.health_check_interval_s
            next_at += interval
            await anyio.sleep(max(0.0, next_at - anyio.current_time()))
            late = anyio.current_time() - next_at
            # Ticks missed while the daemon itself was held up are not made up in a burst.
            next_at = max(next_at, anyio.current_time() - interval)
            targets = engine.probe_targets()
            try:
                results = await anyio.to_thread.run_sync(self._probe_all, targets)
                # A daemon that was itself held up (swapping, a stalled disk) has not read
                # its pipes either: its heartbeat ages say nothing about the workers then.
                stalled = late > engine.cfg.health.unresponsive_after_s / 2
                await engine.send(HealthReport(results, stalled))
            except Exception as exc:  # the checks must outlive one bad round
                log.error("health_check_failed", error=repr(exc))

    def _probe_all(self, targets: list[tuple[str, int, int | None]]) -> dict[str, Probe]:
        out = {wid: probe(pid, ct, self._procs) for wid, pid, ct in targets}
        live = {pid for _, pid, _ in targets}
        for pid in [p for p in self._procs if p not in live]:
            del self._procs[pid]
        return out
