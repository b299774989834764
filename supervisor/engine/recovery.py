"""Start-up recovery: settle what a previous life of the daemon left behind.

Runs before the engine takes any input, the socket listens or systemd hears READY=1:
resources from the config; the old life's workers recorded as shut down and its running
attempts as stopping (the record of why, durable before any signal); then everything it
left running is killed at once, within one shared grace: each interrupted attempt's tree
(with the descendants of the old agent that ran it), then the old agents themselves,
each found by pid + start ticks, never by a reused pid. While that waits, systemd is
told to extend its start timeout. Last, the attempts are retried as interrupted (no
retry spent), a task whose kill left survivors held back until they are gone, and the
worker pool is started.

An attempt that ran on another host is not killed from here (its pids are that host's):
its shim fences it once its lease runs out (the old life's frames stopped before this
one began), and the next agent on its host sweeps it. It stays running, holding its
resources, until one of those confirms its end or the lease and the grace have passed
from now (core/fencing.py); then it is retried as interrupted like the others.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from supervisor.core import survivors
from supervisor.core.dispatch import enqueue
from supervisor.core.effects import OldAgent, TaskTree
from supervisor.core.lifecycle import FENCE, fence_window, new_worker_id, spawn_worker, tree_of
from supervisor.core.machine import Machine
from supervisor.core.model import Task, TaskState, WorkerState
from supervisor.core.outcome import interrupted
from supervisor.core.policy import StopReason
from supervisor.engine.ports import Agents, Survivors

Transact = Callable[[Callable[[Machine], None]], Awaitable[None]]
Notify = Callable[[str], None]

# While recovery waits on kills: how often systemd's start timeout is extended, and by
# how much each time (from the moment it is sent).
EXTEND_EVERY_S = 2.0
EXTEND_BY_S = 3 * EXTEND_EVERY_S


def _old_agents(m: Machine) -> list[OldAgent]:
    """Every agent the previous life recorded with an identity, whatever its state (a
    worker shut down keeps its agent's identity until that agent is gone)."""
    out = []
    for wid, w in m.state.data.workers.items():
        if not w.pid:
            continue
        if w.pid_start_ticks is None and not w.pid_create_time:
            continue
        out.append(
            OldAgent(
                wid,
                w.pid,
                w.pid_start_ticks,
                legacy_create_time=None if w.pid_start_ticks is not None else w.pid_create_time,
                attempt_id=w.attempt_id,
                remote=bool(w.host),
            )
        )
    return out


def _settle_old_life(m: Machine, agents: list[OldAgent], trees: list[TaskTree]) -> None:
    data = m.state.data
    for message in m.files.repairs:
        m.emit("state_repaired", "warning", message=message)
    for rid, rc in m.cfg.resources.items():
        res = data.resources.get(rid)
        if res is None or res.max_holders != rc.max_holders:
            m.commit("resource", rid, "defined", "config", max_holders=rc.max_holders)
    agents[:] = _old_agents(m)
    for wid, worker in list(data.workers.items()):
        if worker.state != WorkerState.SHUTDOWN or worker.pid:
            m.commit(
                "worker",
                wid,
                "shutdown",
                "recovery",
                pid=None,
                task_id=None,
                attempt_id=None,
                stopping="recovery" if worker.pid else None,
            )
    for task in list(m.running_tasks()):
        m.commit("task", task.id, "running", "recovery", stopping=StopReason.SHUTDOWN)
        if task.attempts and not _remote(m, task):
            trees.append(tree_of(task.attempts[-1]))
    if agents or trees:
        m.emit(
            "recovery_kill",
            "warning",
            message=f"the previous life left {len(trees)} attempt(s) and {len(agents)} "
            "agent(s) running; killing them all at once",
            data={
                "attempts": [t.marker for t in trees],
                "agents": {a.worker_id: a.pid for a in agents},
                "grace_s": m.cfg.tasks.kill_grace_s,
            },
        )


def _remote(m: Machine, task: Task) -> bool:
    """The task's current attempt ran on another host."""
    if not task.attempts:
        return False
    w = m.state.data.workers.get(task.attempts[-1].worker_id)
    return w is not None and bool(w.host)


def _resume(m: Machine, left: dict[str, Survivors]) -> None:
    data = m.state.data
    for task in list(m.running_tasks()):
        if _remote(m, task):
            # The lease and grace its agent was started with (a previous life's config).
            worker = data.workers.get(task.attempts[-1].worker_id)
            fenced_by = m.now + fence_window(m, worker)
            m.rt.arm(FENCE, task.id, fenced_by)
            m.emit(
                "remote_attempt_fencing",
                "warning",
                task_id=task.id,
                workstream_id=task.workstream_id,
                message=f"attempt {task.attempts[-1].attempt_id} ran on another host when "
                "the daemon stopped; it is retried once its lease has run out there "
                f"(within {fenced_by - m.now:.1f}s) or its end is reported",
            )
            continue
        aid = task.attempts[-1].attempt_id if task.attempts else None
        interrupted(
            m, task, "the daemon stopped while this attempt ran; it runs again (no retry spent)"
        )
        if aid is not None and left.get(aid):
            survivors.hold(m, task, aid, left[aid])
    survivors.rearm(m)
    for task in data.tasks.values():
        if task.state == TaskState.QUEUED:
            enqueue(m, task)
        elif task.state == TaskState.FAILED and task.critical:
            m.rt.block(task.workstream_id)
    for ws in list(data.workstreams.values()):
        if ws.state in ("pending", "running"):
            m.check_workstream(ws.id)
        m.rt.mark_dirty(ws.id)
    for _ in range(m.cfg.worker_count):
        spawn_worker(m, new_worker_id(m), "recovery")
    for host in m.cfg.workers.hosts:
        for _ in range(host.count):
            spawn_worker(m, new_worker_id(m, host.host), "recovery", host=host.host)


async def _extend_start_timeout(notify: Notify, what: str) -> None:
    """EXTEND_TIMEOUT_USEC for systemd, again and again while recovery waits."""
    while True:
        notify(f"EXTEND_TIMEOUT_USEC={int(EXTEND_BY_S * 1e6)}")
        notify(f"STATUS=recovering: {what}")
        await anyio.sleep(EXTEND_EVERY_S)


async def recover(
    m: Machine, transact: Transact, agents: Agents, notify: Notify | None = None
) -> None:
    """Settle the old life through `transact` (the loop's: one durable step per call);
    everything it left running is killed together, within one grace."""
    old: list[OldAgent] = []
    trees: list[TaskTree] = []
    await transact(lambda mm: _settle_old_life(mm, old, trees))
    left: dict[str, Survivors] = {}
    if old or trees:
        async with anyio.create_task_group() as tg:
            if notify is not None:
                what = f"killing {len(trees)} interrupted attempt(s), {len(old)} old agent(s)"
                tg.start_soon(_extend_start_timeout, notify, what)
            left = await agents.kill_old_life(old, trees, m.cfg.tasks.kill_grace_s)
            tg.cancel_scope.cancel()
    await transact(lambda mm: _resume(mm, left))
