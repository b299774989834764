"""Worker health: psutil probes (in a thread) mapped to verdicts at the edge.

Every `health_check_interval_s` each live worker's process is probed (exists with the same
create time, not a zombie, not stopped; CPU, RSS and open fds kept for display) and the
verdicts of policy.health_verdict are carried out inside the scheduler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import psutil

from supervisor.model import WorkerState
from supervisor.policy import health_verdict

if TYPE_CHECKING:
    from supervisor.scheduler import Scheduler

_SICK_STATUSES = frozenset(
    {psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD, psutil.STATUS_TRACING_STOP}
)


class Probe(msgspec.Struct, kw_only=True):
    ok: bool
    status: str
    cpu_percent: float | None = None
    rss_bytes: int | None = None
    open_fds: int | None = None
    threads: int | None = None


def probe(pid: int, create_time: float | None, procs: dict[int, psutil.Process]) -> Probe:
    """psutil's view of one worker process (blocking; run in a thread)."""
    try:
        proc = procs.get(pid)
        if proc is None or (
            create_time is not None and abs(proc.create_time() - create_time) > 0.01
        ):
            proc = procs[pid] = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 0.01:
            return Probe(ok=False, status="gone (pid reused)")
        with proc.oneshot():
            status = proc.status()
            return Probe(
                ok=status not in _SICK_STATUSES,
                status=status,
                cpu_percent=proc.cpu_percent(),
                rss_bytes=proc.memory_info().rss,
                open_fds=proc.num_fds(),
                threads=proc.num_threads(),
            )
    except psutil.NoSuchProcess:
        procs.pop(pid, None)
        return Probe(ok=False, status="gone")
    except psutil.AccessDenied:
        return Probe(ok=True, status="unknown (access denied)")


class Health:
    def __init__(self, scheduler: Scheduler) -> None:
        self.s = scheduler
        self.probes: dict[str, Probe] = {}
        self.since: dict[str, float] = {}  # worker -> when it became unresponsive
        self._procs: dict[int, psutil.Process] = {}

    async def run(self) -> None:
        while True:
            await anyio.sleep(self.s.cfg.health.health_check_interval_s)
            targets = [
                (w.id, w.pid, w.pid_create_time)
                for w in self.s.state.data.workers.values()
                if w.state in (WorkerState.IDLE, WorkerState.BUSY, WorkerState.UNRESPONSIVE)
                and w.pid
            ]
            results = await anyio.to_thread.run_sync(self._probe_all, targets)
            await self.s.call(self.evaluate, results)

    def _probe_all(self, targets: list[tuple[str, int, float | None]]) -> dict[str, Probe]:
        return {wid: probe(pid, ct, self._procs) for wid, pid, ct in targets}

    def on_heartbeat(self, wid: str) -> None:
        """A message from the worker arrived; recovery is decided at the next check."""

    def on_timer(self, kind: str, key: str) -> None:
        """Health keeps no timers of its own: checks run on their interval."""

    def report(self, wid: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        pr = self.probes.get(wid)
        if pr is not None:
            out = msgspec.to_builtins(pr)
        if wid in self.since:
            out["unresponsive_for_s"] = round(self.s.now - self.since[wid], 3)
        return out

    def evaluate(self, results: dict[str, Probe]) -> None:
        """Apply the verdicts (runs inside the scheduler)."""
        s, h = self.s, self.s.cfg.health
        self.probes.update(results)
        for wid, pr in results.items():
            worker = s.state.data.workers.get(wid)
            if worker is None or worker.state not in (
                WorkerState.IDLE,
                WorkerState.BUSY,
                WorkerState.UNRESPONSIVE,
            ):
                continue
            since = self.since.get(wid)
            verdict = health_verdict(
                str(worker.state),
                heartbeat_age_s=s.now - s.heartbeat.get(wid, s.now),
                probe_ok=pr.ok,
                unresponsive_for_s=None if since is None else s.now - since,
                unresponsive_after_s=h.unresponsive_after_s,
                shutdown_after_s=h.shutdown_after_s,
            )
            if verdict == "unresponsive":
                self.since[wid] = s.now
                s.idle.pop(wid, None)
                s.commit("worker", wid, "unresponsive", "health")
                age = round(s.now - s.heartbeat.get(wid, s.now), 3)
                s.emit(
                    "worker_unresponsive",
                    "error",
                    worker_id=wid,
                    task_id=worker.task_id,
                    data={"heartbeat_age_s": age, "process": pr.status},
                )
                s.store.worker_log(
                    wid, f"unresponsive: last heartbeat {age}s ago, process {pr.status}"
                )
            elif verdict == "recovered":
                self.since.pop(wid, None)
                back = "busy" if worker.task_id else "idle"
                s.commit("worker", wid, back, "health")
                if back == "idle":
                    s.idle[wid] = None
                s.emit("worker_recovered", "info", worker_id=wid, task_id=worker.task_id)
                s.store.worker_log(wid, "recovered: heartbeats resumed")
            elif verdict == "shutdown":
                self.since.pop(wid, None)
                task_id = worker.task_id
                s.emit(
                    "worker_shutdown",
                    "error",
                    worker_id=wid,
                    task_id=task_id,
                    message=f"unresponsive for {h.shutdown_after_s}s; "
                    "killed, its task reassigned, a replacement started",
                )
                s.retire_worker(
                    wid, task_reason="reassign", restart_same=False, graceful=False, cause="health"
                )
