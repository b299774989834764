"""Quiesce without cancelling, decided: a workstream paused or resumed, the daemon drained
or undrained. Pure: no I/O.

Each is one durable record (the workstream's `paused` field; the `daemon` entity's state),
so it survives a restart, and an event. Running tasks are never touched: they finish as
they would have; what changes is only whether dispatch starts anything new (see
dispatch.py). Asking for the state something is already in records nothing.
"""

from __future__ import annotations

from supervisor.core.context import Core
from supervisor.core.dispatch import rearm_queue_alerts
from supervisor.core.model import DAEMON_ID, DaemonState, Transition

__all__ = ["DAEMON_ID", "drain", "pause", "running_count", "undrain", "unpause"]


def running_count(m: Core) -> int:
    """How many tasks run now, from the per-workstream counts (no scan of the tasks)."""
    return sum(c.get("running", 0) for c in m.state.graph.ws_counts.values())


def pause(m: Core, ws_id: str, reason: str | None) -> Transition | None:
    """Nothing new starts in `ws_id` until it is resumed; None when it was paused already."""
    ws = m.state.data.workstreams[ws_id]
    if ws.paused:
        return None
    rec = m.commit("workstream", ws_id, str(ws.state), "operator", paused=True)
    m.rt.mark_dirty(ws_id)
    m.emit(
        "workstream_paused",
        "warning",
        workstream_id=ws_id,
        message=reason or "paused by an operator: running tasks finish, nothing new starts",
    )
    return rec


def unpause(m: Core, ws_id: str, reason: str | None) -> Transition | None:
    """`ws_id` dispatches again; None when it was not paused."""
    ws = m.state.data.workstreams[ws_id]
    if not ws.paused:
        return None
    rec = m.commit("workstream", ws_id, str(ws.state), "operator", paused=False)
    m.rt.mark_dirty(ws_id)
    if not m.rt.is_blocked(ws_id):
        m.rt.unpark_ws(ws_id)  # its queued tasks go back into the dispatch queue
    tasks = m.state.data.tasks
    rearm_queue_alerts(m, (tasks[t] for t in ws.task_ids))
    m.emit("workstream_unpaused", "info", workstream_id=ws_id, message=reason)
    return rec


def drain(m: Core, reason: str | None) -> Transition | None:
    """No task starts anywhere until `undrain`; None when the daemon is drained already."""
    if m.state.data.draining():
        return None
    rec = m.commit(
        "daemon", DAEMON_ID, str(DaemonState.DRAINING), "operator", since=m.wall, reason=reason
    )
    running = running_count(m)
    m.emit(
        "daemon_draining",
        "warning",
        message=reason
        or f"drained by an operator: {running} running task(s) finish, nothing new starts",
        data={"running": running},
    )
    return rec


def undrain(m: Core, reason: str | None) -> Transition | None:
    """Dispatch starts again; None when the daemon was not drained."""
    if not m.state.data.draining():
        return None
    rec = m.commit(
        "daemon", DAEMON_ID, str(DaemonState.RUNNING), "operator", since=None, reason=None
    )
    rearm_queue_alerts(m, m.state.data.tasks.values())
    m.emit("daemon_undrained", "info", message=reason)
    return rec
