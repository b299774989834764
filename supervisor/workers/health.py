"""Worker health: psutil probes (in a thread) mapped to verdicts at the edge.

Every `health_check_interval_s` each live worker's process is probed (exists with the same
create time, not a zombie, not stopped; CPU, RSS and open fds kept for display) and the
verdicts of policy.health_verdict are carried out inside the scheduler: unresponsive (no
new task for it, its task keeps running), recovered, or shut down (killed with its task's
tree by pid, the task reassigned, a replacement started). A worker that never says hello
is killed after `shutdown_after_s`, which sends it through the start back-off.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import psutil
import structlog

from supervisor.core.model import WorkerState
from supervisor.core.policy import health_verdict

if TYPE_CHECKING:
    from supervisor.engine.loop import Scheduler

log = structlog.get_logger("orchd.health")

_SICK_STATUSES = frozenset(
    {psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD, psutil.STATUS_TRACING_STOP}
)
_WATCHED = (WorkerState.IDLE, WorkerState.BUSY, WorkerState.UNRESPONSIVE)
# psutil derives create_time from clock ticks (1/100 s).
_CREATE_TIME_TOLERANCE = 0.01


class Probe(msgspec.Struct, kw_only=True, omit_defaults=True):
    """psutil's view of one worker's agent process at `checked_at`."""

    pid: int
    ok: bool
    status: str
    checked_at: float = 0.0
    cpu_percent: float | None = None
    rss_bytes: int | None = None
    open_fds: int | None = None
    threads: int | None = None


def probe(pid: int, create_time: float | None, procs: dict[int, psutil.Process]) -> Probe:
    """psutil's view of one worker process (blocking; run in a thread). `procs` caches the
    Process objects between checks so that cpu_percent measures since the previous one."""
    try:
        proc = procs.get(pid)
        if proc is None or (
            create_time is not None
            and abs(proc.create_time() - create_time) > _CREATE_TIME_TOLERANCE
        ):
            proc = procs[pid] = psutil.Process(pid)
        if (
            create_time is not None
            and abs(proc.create_time() - create_time) > _CREATE_TIME_TOLERANCE
        ):
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
    """The health checks of one daemon; `run` is its service task."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.s = scheduler
        self.probes: dict[str, Probe] = {}
        self.since: dict[str, float] = {}  # worker -> when it became unresponsive
        self._procs: dict[int, psutil.Process] = {}
        self._start_killed: set[tuple[str, int]] = set()  # (worker, restarts) already killed

    async def run(self) -> None:
        """Check every worker each interval, on a steady cadence; never ends on an error."""
        next_at = anyio.current_time()
        while True:
            interval = self.s.cfg.health.health_check_interval_s
            next_at += interval
            await anyio.sleep(max(0.0, next_at - anyio.current_time()))
            late = anyio.current_time() - next_at
            # Ticks missed while the daemon itself was held up are not made up in a burst.
            next_at = max(next_at, anyio.current_time() - interval)
            targets = [
                (w.id, w.pid, w.pid_create_time)
                for w in self.s.state.data.workers.values()
                if w.state in _WATCHED and w.pid
            ]
            try:
                results = await anyio.to_thread.run_sync(self._probe_all, targets)
                # A daemon that was itself held up (swapping, a stalled disk) has not read
                # its pipes either: its heartbeat ages say nothing about the workers then.
                stalled = late > self.s.cfg.health.unresponsive_after_s / 2
                await self.s.call(self.evaluate, results, stalled)
            except Exception as exc:  # the checks must outlive one bad round
                log.error("health_check_failed", error=repr(exc))

    def _probe_all(self, targets: list[tuple[str, int, float | None]]) -> dict[str, Probe]:
        out = {wid: probe(pid, ct, self._procs) for wid, pid, ct in targets}
        live = {pid for _, pid, _ in targets}
        for pid in [p for p in self._procs if p not in live]:
            del self._procs[pid]
        return out

    def report(self, wid: str) -> dict[str, Any]:
        """The last probe of a worker, and how long it has been unresponsive, for display."""
        out: dict[str, Any] = {}
        worker = self.s.state.data.workers.get(wid)
        pr = self.probes.get(wid)
        if pr is not None and worker is not None and pr.pid == worker.pid:
            out = msgspec.to_builtins(pr)
            out["checked_age_s"] = round(max(0.0, self.s.now - pr.checked_at), 3)
            del out["checked_at"]
        if worker is not None and worker.state == WorkerState.UNRESPONSIVE and wid in self.since:
            out["unresponsive_for_s"] = round(self.s.now - self.since[wid], 3)
        return out

    def evaluate(self, results: dict[str, Probe], stalled: bool = False) -> None:
        """Apply the verdicts (runs inside the scheduler)."""
        s, h = self.s, self.s.cfg.health
        for pr in results.values():
            pr.checked_at = s.now
        self.probes.update(results)
        if stalled:
            log.warning("health_check_skipped", reason="the daemon was held up")
            return
        self._check_starting()
        for wid, pr in results.items():
            worker = s.state.data.workers.get(wid)
            # The worker may have been restarted (another pid) since it was probed.
            if worker is None or worker.state not in _WATCHED or worker.pid != pr.pid:
                continue
            since = self.since.get(wid) if worker.state == WorkerState.UNRESPONSIVE else None
            age = max(0.0, s.now - s.heartbeat.get(wid, s.now))
            verdict = health_verdict(
                str(worker.state),
                heartbeat_age_s=age,
                probe_ok=pr.ok,
                unresponsive_for_s=None if since is None else s.now - since,
                unresponsive_after_s=h.unresponsive_after_s,
                shutdown_after_s=h.shutdown_after_s,
            )
            if verdict == "unresponsive":
                self._unresponsive(wid, age, pr)
            elif verdict == "recovered":
                self._recovered(wid)
            elif verdict == "shutdown":
                self._shutdown(wid)

    def _unresponsive(self, wid: str, age: float, pr: Probe) -> None:
        s = self.s
        worker = s.state.data.workers[wid]
        self.since[wid] = s.now
        s.idle.pop(wid, None)  # no new task for it; its running task carries on
        s.commit("worker", wid, "unresponsive", "health")
        s.emit(
            "worker_unresponsive",
            "error",
            worker_id=wid,
            task_id=worker.task_id,
            message=f"last heartbeat {age:.1f}s ago, process {pr.status}",
            data={"heartbeat_age_s": round(age, 3), "process": pr.status},
        )
        s.worker_note(wid, f"unresponsive: last heartbeat {age:.3f}s ago, process {pr.status}")

    def _recovered(self, wid: str) -> None:
        s = self.s
        worker = s.state.data.workers[wid]
        down_for = s.now - self.since.pop(wid, s.now)
        back = "busy" if worker.task_id else "idle"
        s.commit("worker", wid, back, "health")
        if back == "idle":
            s.idle[wid] = None
        s.emit(
            "worker_recovered",
            "info",
            worker_id=wid,
            task_id=worker.task_id,
            message=f"heartbeats resumed after {down_for:.1f}s unresponsive",
        )
        s.worker_note(wid, f"recovered: heartbeats resumed after {down_for:.3f}s, now {back}")

    def _shutdown(self, wid: str) -> None:
        s, h = self.s, self.s.cfg.health
        self.since.pop(wid, None)
        task_id = s.state.data.workers[wid].task_id
        s.emit(
            "worker_shutdown",
            "error",
            worker_id=wid,
            task_id=task_id,
            message=f"unresponsive for {h.shutdown_after_s}s; killed"
            + (f", task {task_id} reassigned" if task_id else "")
            + ", a replacement started",
        )
        s.retire_worker(
            wid, task_reason="reassign", restart_same=False, graceful=False, cause="health"
        )

    def _check_starting(self) -> None:
        """An agent that started but never said hello within shutdown_after_s is killed;
        its exit then counts as a failed start (growing back-off, an event)."""
        s, h = self.s, self.s.cfg.health
        starting = {
            (wid, w.restarts)
            for wid, w in s.state.data.workers.items()
            if w.state == WorkerState.STARTING
        }
        self._start_killed &= starting
        for wid, _ in starting:
            key = (wid, s.state.data.workers[wid].restarts)
            waited = s.now - s.heartbeat.get(wid, s.now)
            if key in self._start_killed or waited < h.shutdown_after_s:
                continue
            pid = s.pool.pid(wid)
            if pid is None:
                continue  # not spawned yet, or already gone: its exit is on its way
            self._start_killed.add(key)
            s.emit(
                "worker_start_timeout",
                "error",
                worker_id=wid,
                message=f"no hello from the agent (pid {pid}) within {h.shutdown_after_s}s; "
                "killed, restarted with back-off",
            )
            s.worker_note(wid, f"no hello within {h.shutdown_after_s}s: killed pid {pid}")
            s.background(self._killer(wid, key[1]))

    def _killer(self, wid: str, restarts: int) -> Callable[[], Coroutine[Any, Any, None]]:
        async def kill() -> None:
            w = self.s.state.data.workers.get(wid)
            if w is not None and w.state == WorkerState.STARTING and w.restarts == restarts:
                await self.s.pool.kill(wid, task_tree=None, grace_s=self.s.cfg.tasks.kill_grace_s)

        return kill
