"""Worker health verdicts carried out: unresponsive (no new task for it, its task keeps
running), recovered, or shut down (killed with its task's tree, the task reassigned, a
replacement started); an agent that never says hello is killed. Pure: no I/O — the probes
themselves run in workers/health.py and arrive as a HealthReport.

A worker on another host is not probed (its agent is not a process here): its health is
its heartbeat's age, and its transport's exit (core/lifecycle.py). While it is
unresponsive the daemon holds back its leases (Renew), so its attempts' shims fence
them before shutdown_after_s runs out; a new agent that does not answer its Sweep within
unresponsive_after_s is retired like one that never said hello.
"""

from __future__ import annotations

from supervisor.core.context import Core
from supervisor.core.effects import KillStarting, Renew
from supervisor.core.inputs import HealthReport, Probe
from supervisor.core.lifecycle import make_idle, retire_worker
from supervisor.core.model import WorkerState
from supervisor.core.policy import StopReason, health_verdict

_WATCHED = (WorkerState.IDLE, WorkerState.BUSY, WorkerState.UNRESPONSIVE)


def evaluate(m: Core, report: HealthReport) -> None:
    """Apply the verdicts of one round of probes."""
    h = m.cfg.health
    for pr in report.probes.values():
        pr.checked_at = m.now
    m.probes.update(report.probes)
    if report.stalled:
        return
    check_starting(m)
    check_sweeps(m)
    probes = dict(report.probes)
    for w in m.state.data.workers.values():
        if w.host and w.state in _WATCHED:
            gone = m.remote.is_gone(w.id)
            status = "transport exited" if gone else "remote"
            probes[w.id] = Probe(pid=w.pid or 0, ok=not gone, status=status)
    for wid, pr in probes.items():
        worker = m.state.data.workers.get(wid)
        # The worker may have been restarted (another pid) since it was probed.
        if worker is None or worker.state not in _WATCHED or (worker.pid or 0) != pr.pid:
            continue
        if worker.host and wid in report.probes:
            continue  # a remote worker is judged by its heartbeats alone
        since = m.rt.unresponsive_since(wid) if worker.state == WorkerState.UNRESPONSIVE else None
        age = m.heartbeat_age(wid) or 0.0
        verdict = health_verdict(
            str(worker.state),
            heartbeat_age_s=age,
            probe_ok=pr.ok,
            unresponsive_for_s=None if since is None else m.now - since,
            unresponsive_after_s=h.unresponsive_after_s,
            shutdown_after_s=h.shutdown_after_s,
        )
        if verdict == "unresponsive":
            _unresponsive(m, wid, age, pr)
        elif verdict == "recovered":
            _recovered(m, wid)
        elif verdict == "shutdown":
            _shutdown(m, wid)


def _unresponsive(m: Core, wid: str, age: float, pr: Probe) -> None:
    worker = m.state.data.workers[wid]
    m.rt.set_unresponsive_since(wid, m.now)
    m.rt.take_idle(wid)  # no new task for it; its running task carries on
    m.commit("worker", wid, "unresponsive", "health")
    if worker.host:
        m.effect(Renew(wid, False))  # its shims fence within agent_lease_s from now
    m.emit(
        "worker_unresponsive",
        "error",
        worker_id=wid,
        task_id=worker.task_id,
        message=f"last heartbeat {age:.1f}s ago, process {pr.status}",
        data={"heartbeat_age_s": round(age, 3), "process": pr.status},
    )
    m.note(wid, f"unresponsive: last heartbeat {age:.3f}s ago, process {pr.status}")


def _recovered(m: Core, wid: str) -> None:
    worker = m.state.data.workers[wid]
    since = m.rt.unresponsive_since(wid)
    down_for = m.now - (m.now if since is None else since)
    m.rt.set_unresponsive_since(wid, None)
    back = "busy" if worker.task_id else "idle"
    m.commit("worker", wid, back, "health")
    if worker.host:
        m.effect(Renew(wid, True))
    if back == "idle":
        make_idle(m, wid)
    m.emit(
        "worker_recovered",
        "info",
        worker_id=wid,
        task_id=worker.task_id,
        message=f"heartbeats resumed after {down_for:.1f}s unresponsive",
    )
    m.note(wid, f"recovered: heartbeats resumed after {down_for:.3f}s, now {back}")


def _shutdown(m: Core, wid: str) -> None:
    h = m.cfg.health
    task_id = m.state.data.workers[wid].task_id
    m.emit(
        "worker_shutdown",
        "error",
        worker_id=wid,
        task_id=task_id,
        message=f"unresponsive for {h.shutdown_after_s}s; killed"
        + (f", task {task_id} reassigned" if task_id else "")
        + ", a replacement started",
    )
    retire_worker(
        m, wid, task_reason=StopReason.REASSIGN, restart_same=False, graceful=False, cause="health"
    )


def check_starting(m: Core) -> None:
    """An agent that started but never said hello within shutdown_after_s is killed (once
    per start); its exit then counts as a failed start (growing back-off, an event). A
    record (the worker's `stopping`) and the event say why its process is signalled."""
    h = m.cfg.health
    for wid, w in list(m.state.data.workers.items()):
        if w.state != WorkerState.STARTING or m.rt.start_killed(wid, w.restarts):
            continue
        seen = m.rt.heartbeat_at(wid)
        if seen is None or m.now - seen < h.shutdown_after_s:
            continue
        m.rt.set_start_killed(wid, w.restarts)
        # The record of why comes before the signal (write-ahead), as for every kill.
        m.commit("worker", wid, "starting", "health", stopping="start_timeout")
        m.emit(
            "worker_start_timeout",
            "error",
            worker_id=wid,
            message=f"no hello from the agent within {h.shutdown_after_s}s; killed, restarted "
            "with back-off",
        )
        m.note(wid, f"no hello within {h.shutdown_after_s}s: killed")
        m.effect(KillStarting(wid, w.restarts, m.cfg.tasks.kill_grace_s))


def check_sweeps(m: Core) -> None:
    """A new remote agent that has not answered its Sweep within unresponsive_after_s
    holds the remote workers' dispatch for nothing: it is retired (and replaced), with an
    event."""
    h = m.cfg.health
    for wid, sent in m.remote.unanswered():
        w = m.state.data.workers.get(wid)
        if w is None or m.now - sent < h.unresponsive_after_s:
            continue
        m.emit(
            "sweep_timeout",
            "error",
            worker_id=wid,
            message=f"the agent on {w.host} did not answer its Sweep within "
            f"{h.unresponsive_after_s}s; retired and replaced",
            data={"host": w.host},
        )
        retire_worker(
            m,
            wid,
            task_reason=StopReason.REASSIGN,
            restart_same=False,
            graceful=False,
            cause="health",
        )
