"""Workers' lifecycle: spawn, hello, exit and crash-loop back-off, retirement (restart,
shutdown, replacement), the release of a worker after an attempt, and how a running
attempt is stopped (by its agent when it can answer, else from the daemon). Pure: no I/O.

A worker that exits while starting, or soon after (within `unresponsive_after_s` of its
hello), is restarted under the same id after a growing delay, with an event each time: a
broken interpreter or an agent that dies at once never restarts in a tight loop. One that
ran for longer is replaced at once.
"""

from __future__ import annotations

from supervisor.core import wire
from supervisor.core.context import Core
from supervisor.core.effects import KillTree, Retire, Send, Spawn, TaskTree
from supervisor.core.model import Attempt, Cause, Task, TaskState, WorkerState
from supervisor.core.policy import STOP_RULES, StopReason


def tree_of(attempt: Attempt) -> TaskTree:
    """Where an attempt's processes are: its session (led by the recorded pid, known by its
    start ticks, or by the epoch create time of an older record) and marker, and its cgroup
    when it has one."""
    pid = attempt.pid or 0
    return TaskTree(
        pid,
        pid,
        attempt.pid_start_ticks,
        attempt.attempt_id,
        legacy_create_time=None if attempt.pid_start_ticks is not None else attempt.pid_create_time,
        cgroup=attempt.cgroup,
    )


def new_worker_id(m: Core) -> str:
    while True:
        wid = f"worker-{m.next_worker:03d}"
        m.next_worker += 1
        w = m.state.data.workers.get(wid)
        if w is None or (w.state == "shutdown" and not m.rt.knows_generation(wid)):
            return wid


def spawn_worker(m: Core, wid: str, cause: Cause, delay: float = 0.0) -> None:
    """Record the worker as starting, then start its agent (after `delay`)."""
    w = m.state.data.workers.get(wid)
    restarts = (w.restarts + 1) if w is not None else 0
    m.commit(
        "worker",
        wid,
        "starting",
        cause,
        pid=None,
        pid_start_ticks=None,
        pid_create_time=None,
        task_id=None,
        attempt_id=None,
        started_at=m.wall,
        restarts=restarts,
        stopping=None,
    )
    m.rt.expect_beat(wid, m.now + delay)
    m.effect(Spawn(wid, restarts, delay))


def spawn_wanted(m: Core, wid: str, restarts: int) -> bool:
    """A delayed spawn is still wanted: the worker was not retired or restarted since."""
    w = m.state.data.workers.get(wid)
    return w is not None and w.state == WorkerState.STARTING and w.restarts == restarts


def on_spawned(m: Core, wid: str, generation: int, pid: int, ticks: int | None) -> bool:
    """An agent was started: its pid and identity are recorded at once (before its hello),
    so that a daemon that dies meanwhile leaves a record by which the next one finds it.
    True when a record was made (one nothing waits on: it rides with the next sync)."""
    if not fresh(m, wid, generation):
        return False
    worker = m.state.data.workers.get(wid)
    if worker is None or worker.state != WorkerState.STARTING or not pid or worker.pid:
        return False
    m.commit("worker", wid, "starting", "auto", pid=pid, pid_start_ticks=ticks)
    return True


def fresh(m: Core, wid: str, generation: int) -> bool:
    """A message from agent `generation` is current (not from a process already replaced)."""
    if generation < m.rt.generation(wid):
        return False
    if generation != m.rt.generation(wid) or not m.rt.knows_generation(wid):
        m.rt.set_generation(wid, generation)
    return True


def on_hello(m: Core, wid: str, msg: wire.Hello) -> None:
    worker = m.state.data.workers.get(wid)
    if worker is None or worker.state != WorkerState.STARTING:
        return
    m.commit(
        "worker",
        wid,
        "idle",
        "auto",
        pid=msg.pid,
        pid_start_ticks=msg.start_ticks,
        started_at=m.wall,
    )
    m.rt.set_up_since(wid, m.now)
    m.rt.set_idle(wid)
    m.note(wid, f"agent up, pid {msg.pid}")


def attempt_task(m: Core, wid: str, attempt_id: str) -> Task | None:
    """The running task whose current attempt is `attempt_id` on `wid`, if any."""
    worker = m.state.data.workers.get(wid)
    if worker is None or worker.attempt_id != attempt_id or worker.task_id is None:
        return None
    task = m.state.data.tasks.get(worker.task_id)
    if task is None or task.state != TaskState.RUNNING or not task.attempts:
        return None
    return task if task.attempts[-1].attempt_id == attempt_id else None


def on_started(m: Core, wid: str, msg: wire.Started) -> bool:
    """Record the pid of an attempt; False when the attempt is no longer current."""
    task = attempt_task(m, wid, msg.attempt_id)
    if task is None:
        m.emit("late_agent_message", "warning", worker_id=wid, message=f"Started {msg.attempt_id}")
        return False
    m.commit(
        "task",
        task.id,
        "running",
        "auto",
        pid=msg.pid,
        attempt_update={"pid": msg.pid, "pid_start_ticks": msg.start_ticks},
    )
    return True


def on_agent_exit(m: Core, wid: str, generation: int, returncode: int | None) -> None:
    """An agent process ended: its task is stopped and the worker restarted or replaced."""
    if not fresh(m, wid, generation):
        return
    worker = m.state.data.workers.get(wid)
    if worker is None or worker.state == WorkerState.SHUTDOWN:
        return
    rt, h = m.rt, m.cfg.health
    was_starting = worker.state == WorkerState.STARTING
    up = rt.up_since(wid)
    young = was_starting or up is None or m.now - up < h.unresponsive_after_s
    task_id = worker.task_id
    rt.take_idle(wid)
    m.commit("worker", wid, "shutdown", "health", pid=None)
    rt.set_generation(wid, generation + 1)  # anything later from the dead process is stale
    if not rt.draining:
        m.emit("worker_exited", "error", worker_id=wid, data={"returncode": returncode})
    m.note(
        wid,
        f"agent exited, returncode {returncode}"
        + (" (while starting)" if was_starting else "")
        + (f", its task {task_id} stopped" if task_id else ""),
    )
    if task_id is not None:
        task = m.state.data.tasks[task_id]
        if task.state == TaskState.RUNNING:
            reason = StopReason(task.stopping) if task.stopping else StopReason.REASSIGN
            stop_task(m, task, reason, direct=True)
    if rt.draining:
        return
    if not young:
        rt.set_start_failures(wid, None)
        spawn_worker(m, new_worker_id(m), "health")
        return
    n = rt.start_failures(wid) + 1
    rt.set_start_failures(wid, None)
    # Its task's tree is still being killed under this id (and the kill is addressed to
    # this id's agent): the restart takes a fresh id, and the count goes with it.
    new_id = wid if task_id is None else new_worker_id(m)
    rt.set_start_failures(new_id, n)
    # A first early exit of a worker that did come up is replaced at once; from then on,
    # and for any exit while starting, the delay doubles up to its cap.
    k = n if was_starting else n - 1
    delay = min(h.restart_backoff_base_s * 2 ** (k - 1), h.restart_backoff_max_s) if k else 0.0
    when = "while starting" if was_starting else "soon after starting"
    if delay:  # else worker_exited said it all: it is replaced at once
        m.emit(
            "worker_start_failed",
            "error",
            worker_id=wid,
            message=f"worker exited {when} ({n} in a row); {new_id} starts in {delay:.1f}s",
            data={"failures": n, "delay_s": delay, "returncode": returncode, "next": new_id},
        )
    m.note(wid, f"exited {when} ({n} in a row): {new_id} starts in {delay:.1f}s")
    spawn_worker(m, new_id, "health", delay=delay)


def on_spawn_failed(m: Core, wid: str, message: str) -> None:
    m.emit("worker_spawn_failed", "error", worker_id=wid, message=message)
    on_agent_exit(m, wid, m.rt.generation(wid), None)


def retire_worker(
    m: Core,
    wid: str,
    *,
    task_reason: StopReason,
    restart_same: bool,
    graceful: bool,
    cause: Cause = "operator",
    replace: bool = True,
) -> int:
    """Shut a worker down: its running task stopped for `task_reason`, the process (and
    the task's tree, by pid, even if the agent cannot answer) killed, then the worker is
    restarted under the same id or replaced by a new one so the pool keeps its size."""
    rt = m.rt
    worker = m.state.data.workers[wid]
    # A stopped or wedged agent cannot act on Stop: waiting for it would only delay.
    graceful = graceful and worker.state in (WorkerState.IDLE, WorkerState.BUSY)
    task = m.state.data.tasks.get(worker.task_id) if worker.task_id else None
    running = task is not None and task.state == TaskState.RUNNING
    if task is not None and running and task.stopping is None:
        m.commit("task", task.id, "running", cause, stopping=task_reason)
    rt.take_idle(wid)
    # The agent's pid and start ticks stay on record until it is gone (Retired): a daemon
    # that dies meanwhile leaves the next one a way to find it.
    rec = m.commit("worker", wid, "shutdown", cause, stopping=str(cause))
    rt.set_generation(wid, rt.generation(wid) + 1)  # the old process is stale from now on
    rt.set_start_failures(wid, None)
    rt.set_unresponsive_since(wid, None)
    attempt = task.attempts[-1] if task is not None and running else None
    m.note(
        wid,
        f"shut down ({cause}"
        + (f"; task {task.id} stopped: {task.stopping}" if task is not None and running else "")
        + ("; restarted under the same id)" if restart_same else "; replaced)"),
    )
    m.effect(
        Retire(
            wid,
            m.cfg.tasks.kill_grace_s,
            graceful,
            tree=None if attempt is None else tree_of(attempt),
            attempt_id=None if attempt is None else attempt.attempt_id,
            replace=replace and not rt.draining,
            same_id=restart_same,
            cause=cause,
        )
    )
    return rec.seq


def on_retired(m: Core, wid: str) -> bool:
    """A retired worker's agent is gone: its identity leaves the record (a record nothing
    waits on). True when a record was made."""
    w = m.state.data.workers.get(wid)
    if w is None or w.state != WorkerState.SHUTDOWN or not (w.pid or w.stopping):
        return False
    m.commit("worker", wid, "shutdown", "auto", pid=None, pid_start_ticks=None, stopping=None)
    return True


def on_replace(m: Core, wid: str, same_id: bool, cause: Cause) -> None:
    """A retired worker's processes are gone: its successor starts."""
    if not m.rt.draining:
        spawn_worker(m, wid if same_id else new_worker_id(m), cause)


def stop_task(m: Core, task: Task, reason: StopReason, *, direct: bool = False) -> None:
    """Begin killing a running attempt; its outcome is decided when the tree is gone."""
    attempt = task.attempts[-1]
    wid = task.worker_id or attempt.worker_id
    cause = STOP_RULES[reason].cause
    if task.stopping != reason:
        m.commit("task", task.id, "running", cause, stopping=reason)
    grace = m.cfg.tasks.kill_grace_s
    worker = m.state.data.workers.get(wid)
    if not direct and worker is not None and worker.state in (WorkerState.IDLE, WorkerState.BUSY):
        m.effect(Send(wid, wire.Kill(attempt_id=attempt.attempt_id, grace_s=grace, reason=reason)))
        return
    if (
        not direct
        and worker is not None
        and worker.state == WorkerState.UNRESPONSIVE
        and worker.attempt_id == attempt.attempt_id
    ):
        # The agent cannot act on a Kill: the daemon kills it and the tree and replaces it.
        m.emit(
            "worker_shutdown",
            "error",
            worker_id=wid,
            task_id=task.id,
            message=f"unresponsive while its task had to stop ({reason}); killed with the "
            "task's tree",
        )
        retire_worker(m, wid, task_reason=reason, restart_same=False, graceful=False, cause=cause)
        return
    m.effect(KillTree(wid, attempt.attempt_id, tree_of(attempt), grace))


def release_worker(m: Core, wid: str) -> None:
    """The worker's attempt is over: busy → idle (a worker in another state keeps it)."""
    worker = m.state.data.workers.get(wid)
    if worker is None:
        return
    if worker.state == WorkerState.BUSY:
        m.commit("worker", wid, "idle", "auto", task_id=None, attempt_id=None)
        m.rt.set_idle(wid)
    elif worker.task_id is not None:
        m.commit("worker", wid, str(worker.state), "auto", task_id=None, attempt_id=None)
