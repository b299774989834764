"""Remote attempts, whose processes the daemon cannot see or kill: the lease rule, the
sweep of a new agent's host, and what a remote agent's late words mean. Pure: no I/O.

An attempt on another host runs under its own shim, which kills the attempt's tree once
agent_lease_s pass without a frame from the daemon. The daemon stops renewing an agent's
leases when it finds its worker unresponsive (and a transport that exited renews
nothing), so it knows a bound: the attempt is dead by the last frame that may have
reached it + agent_lease_s + kill_grace_s (lifecycle.fence_at). Until then, or until a
frame confirms the death (its Finished, a new agent's Swept), the task stays running and
keeps its resources; then it goes on as a killed attempt would (reassigned, retried,
cancelled: by why it was stopped).

A newly started agent is first told which attempts are live (Sweep) and kills every other
leased attempt it finds on its host. Until it answers, nothing starts on any remote worker:
an attempt started meanwhile would not be on the list it was given (and two host names
may be one machine). Local workers go on: their attempts hold no lease, so no sweep
touches them. Agents start rarely, and a Sweep is answered within a round trip; one
that is not within unresponsive_after_s is retired (core/health.py).
"""

from __future__ import annotations

from supervisor.core import wire
from supervisor.core.context import Core
from supervisor.core.effects import Send
from supervisor.core.lifecycle import FENCE, attempt_task, end_sweep
from supervisor.core.model import Task, TaskState, WorkerState
from supervisor.core.outcome import interrupted, on_finished


def live_on(m: Core, host: str) -> tuple[str, ...]:
    """The attempts the daemon lists as live for a new agent on `host`: every running
    attempt of this daemon that is not given up (waiting for its lease to run out), on
    whatever host. Attempts of other hosts are not on `host` if it is really another
    machine; listing them keeps them safe when it is not (a host name that is this
    machine, or two names for one machine)."""
    out = []
    workers = m.state.data.workers
    for task in m.running_tasks():
        if not task.attempts or m.rt.armed(FENCE, task.id) is not None:
            continue
        a = task.attempts[-1]
        w = workers.get(a.worker_id)
        if w is None or w.attempt_id != a.attempt_id:
            continue
        reachable = w.state in (WorkerState.BUSY, WorkerState.UNRESPONSIVE)
        if not w.host or (reachable and not m.remote.is_gone(w.id)):
            out.append(a.attempt_id)
    return tuple(sorted(out))


def send_sweeps(m: Core) -> None:
    """The Sweep of each remote agent that said hello in this step, made now (after the
    step's dispatch) and put before anything else the step sends it. Its host takes no
    new task until it answers."""
    pending, m.remote.pending_sweeps = m.remote.pending_sweeps, []
    for wid, at in reversed(pending):
        w = m.state.data.workers.get(wid)
        if w is None or w.state != WorkerState.IDLE or not w.host:
            continue
        live = live_on(m, w.host)
        m.remote.sweep_sent(m.rt, w.host, wid, live, m.now)
        for other in m.state.data.workers.values():
            if other.host:
                m.rt.take_idle(other.id)
        m.effects.insert(at, Send(wid, wire.Sweep(live=list(live))))


def on_swept(m: Core, wid: str, msg: wire.Swept) -> None:
    """A new agent swept its host: what it killed is an event; an attempt given up there
    and not on its list is now known dead (unless something outlived the sweep); the
    host takes tasks again."""
    w = m.state.data.workers.get(wid)
    if w is None or not w.host:
        return
    live = end_sweep(m, wid)
    if live is None:
        m.emit("late_frame", "warning", worker_id=wid, message="Swept without a Sweep; ignored")
        return
    if msg.killed or msg.survivors:
        m.emit(
            "sweep_killed",
            "error" if msg.survivors else "warning",
            worker_id=wid,
            message=f"the new agent on {w.host} killed attempt(s) the daemon does not list "
            f"as live: {', '.join(msg.killed) or '(unmarked)'}"
            + (f"; {len(msg.survivors)} process(es) outlived the kill" if msg.survivors else ""),
            data={
                "host": w.host,
                "killed": list(msg.killed),
                "pids": list(msg.pids),
                "survivors": [pid for pid, _ in msg.survivors],
            },
        )
    m.note(wid, f"swept {w.host}: killed {list(msg.killed) or 'nothing'}")
    if not msg.survivors:
        for task in list(m.running_tasks()):
            a = task.attempts[-1] if task.attempts else None
            if a is None or a.attempt_id in live or m.rt.armed(FENCE, task.id) is None:
                continue
            owner = m.state.data.workers.get(a.worker_id)
            if owner is not None and owner.host == w.host:
                settle_lost(m, task, f"the sweep of {w.host} found it gone")


def on_due(m: Core, task: Task) -> None:
    """The fence timer of a given-up remote attempt: its lease has surely run out."""
    if task.state == TaskState.RUNNING:
        settle_lost(m, task, "its lease has run out")


def settle_lost(m: Core, task: Task, why: str) -> None:
    """A given-up remote attempt is dead: its task goes on as after a kill (by its
    `stopping`), or, when no worker holds it any more (a previous life's attempt), as
    interrupted."""
    m.rt.disarm(FENCE, task.id)
    a = task.attempts[-1]
    m.emit(
        "attempt_fenced",
        "warning",
        task_id=task.id,
        workstream_id=task.workstream_id,
        worker_id=a.worker_id,
        message=f"attempt {a.attempt_id} is over: {why}",
        data={"attempt_id": a.attempt_id},
    )
    if attempt_task(m, a.worker_id, a.attempt_id) is task:
        on_finished(
            m,
            a.worker_id,
            wire.Finished(attempt_id=a.attempt_id, phase="command", killed=True, message=why),
        )
        return
    interrupted(
        m,
        task,
        "the daemon stopped while this attempt ran on another host; it was fenced "
        "there and runs again (no retry spent)",
    )


def on_finished_remote(m: Core, wid: str, msg: wire.Finished) -> bool:
    """A Finished from a remote agent that is not its current attempt's: the confirmed
    end of a given-up attempt (reported by a new agent from its host's spool, or the old
    one's last word), or else an event (`late_frame`), never a completion. False when
    the message is about the worker's current attempt (the caller settles it)."""
    if attempt_task(m, wid, msg.attempt_id) is not None:
        return False
    task = _running_with(m, msg.attempt_id)
    if task is not None and m.rt.armed(FENCE, task.id) is not None:
        settle_lost(m, task, "its end was reported" + (" (fenced)" if msg.fenced else ""))
        return True
    late(m, wid, msg)
    return True


def late(m: Core, wid: str, msg: wire.FromAgent) -> None:
    """A frame of an attempt the daemon already gave up: an event, nothing else."""
    aid = getattr(msg, "attempt_id", None)
    data: dict[str, object] = {"frame": type(msg).__name__, "attempt_id": aid}
    if isinstance(msg, wire.Finished):
        data |= {"phase": msg.phase, "exit_code": msg.exit_code, "fenced": msg.fenced}
    m.emit(
        "late_frame",
        "warning",
        worker_id=wid,
        message=f"{type(msg).__name__} of attempt {aid}, which was already given up; ignored",
        data=data,
    )


def _running_with(m: Core, attempt_id: str) -> Task | None:
    for task in m.running_tasks():
        if task.attempts and task.attempts[-1].attempt_id == attempt_id:
            return task
    return None
