"""Workers' lifecycle: spawn, hello, exit and crash-loop back-off, retirement (restart,
shutdown, replacement), the release of a worker after an attempt, and how a running
attempt is stopped (by its agent when it can answer, else from the daemon). Pure: no I/O.

A worker that exits while starting, or soon after (within `unresponsive_after_s` of its
hello), is restarted under the same id after a growing delay, with an event each time: a
broken interpreter or an agent that dies at once never restarts in a tight loop. One that
ran for longer is replaced at once.

A worker on another host (`Worker.host`) is reached through its transport (ssh): a
transport that fails before the agent's hello is a `transport_failed` event and the same
back-off. Its attempts' processes are out of the daemon's reach, so an exit of its
transport while it runs an attempt makes it unresponsive, not dead (the attempt may still
live there), and a kill the agent cannot carry out is settled by the lease rule
(core/fencing.py) instead of by a kill from here.
"""

from __future__ import annotations

from supervisor.core import wire
from supervisor.core.context import Core
from supervisor.core.effects import KillTree, Retire, Send, Spawn, TaskTree
from supervisor.core.model import Attempt, Cause, Task, TaskState, Worker, WorkerState
from supervisor.core.policy import STOP_RULES, StopReason
from supervisor.core.remote import host_component

# The timer of a remote attempt whose death the daemon waits to be sure of, by task id.
FENCE = "fence"


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


def new_worker_id(m: Core, host: str = "") -> str:
    """A fresh worker id; one on another host names it (`worker-007@build-2`)."""
    suffix = f"@{host_component(host)}" if host else ""
    while True:
        wid = f"worker-{m.next_worker:03d}{suffix}"
        m.next_worker += 1
        w = m.state.data.workers.get(wid)
        if w is None or (w.state == "shutdown" and not m.rt.knows_generation(wid)):
            return wid


def is_remote(m: Core, wid: str | None) -> bool:
    """The worker's agent runs on another host."""
    w = m.state.data.workers.get(wid) if wid else None
    return w is not None and bool(w.host)


def spawn_worker(
    m: Core, wid: str, cause: Cause, delay: float = 0.0, host: str | None = None
) -> None:
    """Record the worker as starting, then start its agent (after `delay`); on `host`
    (by default the one the worker had, "" for a new one: this host)."""
    w = m.state.data.workers.get(wid)
    restarts = (w.restarts + 1) if w is not None else 0
    if host is None:
        host = w.host if w is not None else ""
    # A remote agent's lease and kill grace are recorded: the lease rule counts on those
    # it was given, not on a config reloaded or changed across a restart since.
    lease_s = m.cfg.health.agent_lease_s if host else 0.0
    grace_s = m.cfg.tasks.kill_grace_s
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
        host=host,
        **({"lease_s": lease_s, "kill_grace_s": grace_s} if host else {}),
    )
    m.remote.set_gone(m.rt, wid, False)
    m.remote.forget(wid)  # the figures of its previous agent
    m.rt.expect_beat(wid, m.now + delay)
    m.effect(Spawn(wid, restarts, delay, host=host, lease_s=lease_s, kill_grace_s=grace_s))


def spawn_wanted(m: Core, wid: str, restarts: int) -> bool:
    """A delayed spawn is still wanted: the worker was not retired or restarted since."""
    w = m.state.data.workers.get(wid)
    if w is not None and w.host and not any(h.host == w.host for h in m.cfg.workers.hosts):
        return False  # its host left the config meanwhile
    return w is not None and w.state == WorkerState.STARTING and w.restarts == restarts


def on_spawned(m: Core, wid: str, generation: int, pid: int, ticks: int | None) -> bool:
    """An agent was started: its pid and identity are recorded at once (before its hello),
    so that a daemon that dies meanwhile leaves a record by which the next one finds it.
    True when a record was made (one nothing waits on: it rides with the next sync)."""
    if not fresh(m, wid, generation):
        return False
    worker = m.state.data.workers.get(wid)
    if worker is None or not pid or worker.pid:
        return False
    # A remote worker's record keeps its transport's identity (the local process that a
    # next life may kill), even when the agent's hello came first.
    up = (WorkerState.IDLE, WorkerState.BUSY) if worker.host else ()
    if worker.state != WorkerState.STARTING and worker.state not in up:
        return False
    m.commit("worker", wid, str(worker.state), "auto", pid=pid, pid_start_ticks=ticks)
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
    if worker.host:
        # The agent's pid is on its host: the record keeps the transport's (Spawned), and
        # the agent's own identity goes to the figures. Its first frame is its Sweep.
        m.commit("worker", wid, "idle", "auto", started_at=m.wall)
        m.remote.observe(wid, m.now, pid=msg.pid, start_ticks=msg.start_ticks)
        m.rt.set_up_since(wid, m.now)
        m.remote.pending_sweeps.append((wid, len(m.effects)))
        m.note(wid, f"agent up on {worker.host}, pid {msg.pid} there")
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
    make_idle(m, wid)
    m.note(wid, f"agent up, pid {msg.pid}")


def end_sweep(m: Core, wid: str) -> tuple[str, ...] | None:
    """The worker's Sweep is answered (or never will be: its agent is gone); once no
    Sweep is unanswered, the idle remote workers take tasks again. The live list that
    Sweep carried, None if none was pending."""
    w = m.state.data.workers.get(wid)
    if w is None or not w.host:
        return None
    live = m.remote.sweep_answered(m.rt, w.host, wid)
    if live is not None and not m.remote.sweeping():
        for other in list(m.state.data.workers.values()):
            if other.state == WorkerState.IDLE:
                m.rt.set_idle(other.id)
    return live


def make_idle(m: Core, wid: str) -> None:
    """The worker may take a task, unless it is remote and a new remote agent has not
    answered its Sweep yet (it is made idle then, core/fencing.py). A local worker's
    attempts are never a sweep's (they hold no lease)."""
    w = m.state.data.workers.get(wid)
    if w is not None and w.host and m.remote.sweeping():
        return
    m.rt.set_idle(wid)


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


def on_agent_exit(
    m: Core, wid: str, generation: int, returncode: int | None, stderr: str = ""
) -> None:
    """An agent process ended: its task is stopped and the worker restarted or replaced.
    A remote worker's transport that exits while it runs an attempt leaves the attempt
    to its lease (`_transport_lost`)."""
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
    if worker.host and m.remote.is_gone(wid):
        return  # its transport's exit was already handled
    end_sweep(m, wid)
    if worker.host and not was_starting and task_id is not None:
        task = m.state.data.tasks.get(task_id)
        if task is not None and task.state == TaskState.RUNNING:
            _transport_lost(m, wid, generation, returncode, stderr, task)
            return
    if worker.host and was_starting:
        m.emit(
            "transport_failed",
            "error",
            worker_id=wid,
            message=f"the transport to {worker.host} exited {returncode} before the agent "
            "said hello" + (f": {stderr}" if stderr else ""),
            data={"host": worker.host, "returncode": returncode, "stderr": stderr},
        )
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
    host = worker.host
    if host and not any(h.host == host for h in m.cfg.workers.hosts):
        return  # its host left the config: not replaced
    if not young:
        rt.set_start_failures(wid, None)
        spawn_worker(m, new_worker_id(m, host), "health", host=host)
        return
    n = rt.start_failures(wid) + 1
    rt.set_start_failures(wid, None)
    # Its task's tree is still being killed under this id (and the kill is addressed to
    # this id's agent): the restart takes a fresh id, and the count goes with it.
    new_id = wid if task_id is None else new_worker_id(m, host)
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
    spawn_worker(m, new_id, "health", delay=delay, host=host)


def _transport_lost(
    m: Core, wid: str, generation: int, returncode: int | None, stderr: str, task: Task
) -> None:
    """A remote worker's transport exited while it ran an attempt: the attempt may still
    live on its host. The worker is unresponsive (its task keeps running and holding its
    resources; nothing renews its leases now, so its shim fences it) and is shut down and
    its task reassigned by the health check at shutdown_after_s. A task that was being
    stopped anyway is settled by the lease rule at once."""
    worker = m.state.data.workers[wid]
    rt = m.rt
    rt.take_idle(wid)
    rt.set_generation(wid, generation + 1)  # anything later from the dead process is stale
    m.remote.set_gone(m.rt, wid, True)
    if worker.state != WorkerState.UNRESPONSIVE:
        rt.set_unresponsive_since(wid, m.now)
    m.commit("worker", wid, "unresponsive", "health", pid=None, pid_start_ticks=None)
    m.emit(
        "worker_unresponsive",
        "error",
        worker_id=wid,
        task_id=task.id,
        message=f"the transport to {worker.host} exited {returncode} while task {task.id} "
        "ran; it may still run there until its lease fences it"
        + (f" (transport: {stderr})" if stderr else ""),
        data={"host": worker.host, "returncode": returncode, "stderr": stderr},
    )
    m.note(wid, f"transport exited {returncode} while task {task.id} ran: unresponsive")
    if task.stopping is not None:
        retire_worker(
            m,
            wid,
            task_reason=StopReason(task.stopping),
            restart_same=False,
            graceful=False,
            cause="health",
        )


def fence_at(m: Core, wid: str) -> float:
    """When a remote attempt of `wid` is dead for sure: the last frame that may have
    renewed its lease, plus agent_lease_s and kill_grace_s (plus a heartbeat for a frame
    in flight). The daemon renews an agent's leases until it finds its worker
    unresponsive; after that, only frames already sent may still arrive."""
    w = m.state.data.workers.get(wid)
    last = m.now
    if w is not None and w.state == WorkerState.UNRESPONSIVE:
        marks = (m.rt.unresponsive_since(wid), m.rt.heartbeat_at(wid))
        last = max((x for x in marks if x is not None), default=m.now)
    return last + fence_window(m, w)


def fence_window(m: Core, w: Worker | None) -> float:
    """How long after its last renewal a remote agent's attempt may still live: its lease
    and kill grace (the larger of what the worker was started with and the config now:
    a reload or a restart with a shorter lease never shortens it for an agent started
    before), and a heartbeat for a frame in flight."""
    h = m.cfg.health
    lease = max(h.agent_lease_s, w.lease_s if w is not None else 0.0)
    grace = max(m.cfg.tasks.kill_grace_s, w.kill_grace_s if w is not None else 0.0)
    return lease + grace + h.heartbeat_interval_s


def await_fence(m: Core, task: Task, wid: str) -> None:
    """A remote attempt cannot be killed from here: it is settled when its death is
    confirmed (its Finished, a new agent's Swept) or its lease has surely run out."""
    when = fence_at(m, wid)
    if m.rt.armed(FENCE, task.id) is None:
        m.rt.arm(FENCE, task.id, when)
        m.note(wid, f"task {task.id}: settled when its lease has run out, in {when - m.now:.1f}s")


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
    remote = bool(worker.host)
    if remote and task is not None and running:
        # Its tree is out of reach: the lease rule settles the attempt (read before the
        # worker's state changes, which the rule reads).
        await_fence(m, task, wid)
    end_sweep(m, wid)
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
            tree=None if attempt is None or remote else tree_of(attempt),
            attempt_id=None if attempt is None else attempt.attempt_id,
            replace=replace and not rt.draining,
            same_id=restart_same,
            cause=cause,
            remote=remote,
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
    if m.rt.draining:
        return
    w = m.state.data.workers.get(wid)
    host = w.host if w is not None else ""
    if host and not any(h.host == host for h in m.cfg.workers.hosts):
        return  # its host left the config
    spawn_worker(m, wid if same_id else new_worker_id(m, host), cause, host=host)


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
    if is_remote(m, wid) or is_remote(m, attempt.worker_id):
        await_fence(m, task, wid)  # out of reach from here: the lease rule settles it
        return
    m.effect(KillTree(wid, attempt.attempt_id, tree_of(attempt), grace))


def release_worker(m: Core, wid: str) -> None:
    """The worker's attempt is over: busy → idle (a worker in another state keeps it)."""
    worker = m.state.data.workers.get(wid)
    if worker is None:
        return
    if worker.state == WorkerState.BUSY:
        m.commit("worker", wid, "idle", "auto", task_id=None, attempt_id=None)
        if worker.host and not any(h.host == worker.host for h in m.cfg.workers.hosts):
            retire_unwanted(m, wid)  # its host left the config while it ran a task
            return
        make_idle(m, wid)
    elif worker.task_id is not None:
        m.commit("worker", wid, str(worker.state), "auto", task_id=None, attempt_id=None)


def retire_unwanted(m: Core, wid: str) -> None:
    """A worker the config no longer wants (fewer workers, its host gone): stopped
    gracefully, not replaced; a task it still runs is reassigned."""
    retire_worker(
        m,
        wid,
        task_reason=StopReason.REASSIGN,
        restart_same=False,
        graceful=True,
        cause="config",
        replace=False,
    )
