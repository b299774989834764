"""Readiness and dispatch: pending tasks whose dependencies are met (and back-off is over)
become queued; queued tasks go to idle workers in priority order when all their resources
have room (all or none, no hold-and-wait). Pure: no I/O.

Each queued task waits in the lane of its placement (`runs_on`, core/placement.py); a
dispatch step looks only at lanes that an idle worker can serve, so tasks bound for a
busy host cost nothing while others run. A task whose resource is full is parked on it
(per resource and lane); one whose per-host resources are full on every host it may use
with an idle worker is parked on its placement. A release wakes the first task parked
for the slot, and that task, once it has started or found another reason to wait, wakes
the next (`Runtime.wake`): a release costs one look, however many tasks wait.

Nothing starts while an operator holds dispatch: in a paused workstream (its queued tasks
are parked on it, as after a critical failure) or anywhere while the daemon is drained
(the queue is left as it is). Queued tasks stay queued either way, and their queue-wait
alert is not raised while they are held: the wait is the operator's choice. It is armed
again, a full `queue_timeout_s` away, when the hold is lifted (`rearm_queue_alerts`).
"""

from __future__ import annotations

from collections.abc import Iterable

from supervisor.core import wire
from supervisor.core.context import Core
from supervisor.core.effects import Send
from supervisor.core.model import Task, TaskState
from supervisor.core.placement import instance
from supervisor.core.queue import Entry


def promote(m: Core) -> None:
    """Pending tasks that may have become ready are queued, or wait out their back-off."""
    tasks, graph, rt = m.state.data.tasks, m.state.graph, m.rt
    for tid in graph.drain_ready():
        task = tasks.get(tid)
        if task is None or task.state != TaskState.PENDING or graph.unmet.get(tid):
            continue
        if task.survivors:
            continue  # held back (core/survivors.py): marked ready again on its release
        ws = m.state.data.workstreams[task.workstream_id]
        if ws.state not in ("pending", "running"):
            continue
        due = backoff_due(m, task)
        if due is not None and due > m.now:
            rt.arm("backoff", tid, due)
            continue
        m.commit("task", tid, "queued", "auto", queued_at=m.wall, not_before=None)
        enqueue(m, task)


def backoff_due(m: Core, task: Task) -> float | None:
    """The monotonic end of the task's back-off. `not_before` is wall time (it is
    persisted); it is turned into a monotonic deadline once, when first seen, so a clock
    step neither cuts a back-off short nor stretches it."""
    due = m.rt.backoff_until(task.id)
    if due is None and task.not_before is not None:
        due = m.now + max(0.0, task.not_before - m.wall)
        m.rt.set_backoff_until(task.id, due)
    return due


def enqueue(m: Core, task: Task) -> None:
    """Put a queued task in the dispatch queue and arm its queue-wait alert."""
    rt = m.rt
    lane = lane_of(task)
    rt.push(task.priority, task.order, task.id, lane)
    if lane and not m.hosts.hosts_for(lane):
        # The host it needs is not configured (any more): it waits, and says so.
        host_missing(m, [task.id], lane)
    if rt.queued_at(task.id) is None:
        # Since when it waits, on the monotonic clock (queued_at is the wall time).
        waited = max(0.0, m.wall - task.queued_at) if task.queued_at is not None else 0.0
        rt.set_queued_at(task.id, m.now - waited)
    qt = task.queue_timeout_s or m.cfg.tasks.queue_timeout_s
    if qt:
        rt.arm("queue_alert", task.id, (rt.queued_at(task.id) or m.now) + qt)


def host_missing(m: Core, task_ids: list[str], lane: str) -> None:
    """An event: queued tasks need a host or label that no configured host has."""
    m.emit(
        "task_host_missing",
        "warning",
        task_id=task_ids[0] if len(task_ids) == 1 else None,
        tasks=task_ids,
        message=(
            f"no configured host is {lane!r} (known: {', '.join(m.hosts.known())}); "
            "the task waits until one is configured again"
        ),
        data={"runs_on": lane},
    )


def hosts_reloaded(m: Core) -> None:
    """After a reload: each lane of queued tasks that names no host any more is reported
    (its tasks wait; a reload that brings the host back lets them go)."""
    tasks = m.state.data.tasks
    for lane in m.rt.lanes():
        if lane and not m.hosts.hosts_for(lane):
            waiting = [
                t
                for t in dict.fromkeys(m.rt.lane_tasks(lane))
                if (task := tasks.get(t)) is not None and task.state == TaskState.QUEUED
            ]
            if waiting:
                host_missing(m, sorted(waiting), lane)


def held(m: Core, task: Task) -> bool:
    """An operator holds dispatch for this task: the daemon is drained or its workstream
    is paused."""
    return m.state.data.draining() or m.state.data.workstreams[task.workstream_id].paused


def rearm_queue_alerts(m: Core, tasks: Iterable[Task]) -> None:
    """Dispatch is no longer held for `tasks`: each queued one is reported if it still
    waits a full queue timeout from now."""
    for task in tasks:
        qt = task.queue_timeout_s or m.cfg.tasks.queue_timeout_s
        if qt and task.state == TaskState.QUEUED and not held(m, task):
            m.rt.arm("queue_alert", task.id, m.now + qt)


def dispatch(m: Core) -> None:
    """Give queued tasks to idle workers while both last: each to a worker on a host its
    placement allows (core/placement.py), where its per-host resources have room."""
    rt = m.rt
    data = m.state.data
    if rt.draining or data.draining():
        return
    hosts = m.hosts
    # Idle workers by host, built only when a task is placed other than "anywhere on the
    # first idle worker" (the common case stays as cheap as with one host).
    idle: _Idle | None = None
    if rt.has_placement_parks():
        idle = _Idle(m)
        seen = rt.idle_hosts_seen()
        fresh = [h for h in idle.by_host if h not in seen]
        for h in fresh:
            rt.unpark_placement(hosts.selectors_of(h))
    while rt.has_idle():
        if rt.only_any_lane():
            entry = rt.pop()
        else:
            if idle is None:
                idle = _Idle(m)
            lane = _best_lane(m, idle)
            if lane is None:
                break
            entry = rt.pop(lane)
        if entry is None:
            break
        woken = rt.take_woken(entry[2])
        parked, idle = _one(m, entry, idle)
        if woken is not None and parked != woken:
            # Woken for a slot it did not take (it started, or waits for something else):
            # the next task parked there may take it.
            rt.wake_key(woken)
    if idle is not None and rt.has_placement_parks():
        rt.set_idle_hosts_seen(frozenset(h for h, w in idle.by_host.items() if w))
    for r in rt.alerted_resources():
        if not rt.waiting_on(r):
            rt.set_resource_alerted(r, False)


def _one(m: Core, entry: Entry, idle: _Idle | None) -> tuple[str | None, _Idle | None]:
    """Dispatch one popped queue entry: start it on a worker, or park it. Returns the key
    it was parked on (None: started, or dropped as stale) and the idle index (built here
    when the task's placement needs it)."""
    rt, data, graph = m.rt, m.state.data, m.state.graph
    task = data.tasks.get(entry[2])
    if task is None or task.state != TaskState.QUEUED:
        return None, idle
    if task.survivors:
        return None, idle  # held back (core/survivors.py): queued again on its release
    ws_id = task.workstream_id
    if rt.is_blocked(ws_id) or data.workstreams[ws_id].paused:
        rt.park_ws(ws_id, entry)
        return None, idle
    per_host = m.hosts.per_host
    resources = data.resources
    full = next(
        (
            r
            for r in sorted(task.resources)
            if r not in per_host and len(graph.holders_of(r)) >= resources[r].max_holders
        ),
        None,
    )
    wid: str | None = None
    if full is None and (entry[3] or (per_host and not per_host.isdisjoint(task.resources))):
        if idle is None:
            idle = _Idle(m)
        wid = idle.place(m, task, entry[3])
        if wid is None:
            # Every host it may use that has an idle worker lacks room in one of its
            # per-host resources: it waits for a host event (a release, a new idle).
            key = placement_key(entry[3], task.resources)
            rt.park_placement(key, entry[3], entry)
            _alert_later(m, task, key)
            return key, idle
    elif full is None:
        wid = next(rt.idle())
    if full is not None:
        rt.park(full, entry)
        _alert_later(m, task, full)
        return rt.park_key(full, entry[3]), idle
    assert wid is not None
    rt.take_idle(wid)
    if idle is not None:
        idle.take(wid)
    start_attempt(m, task, wid)
    return None, idle


def placement_key(lane: str, resources: list[str]) -> str:
    """Where a task waits for room in its per-host resources: one key per lane and set
    of resources, so that the first task parked there stands for all of them."""
    return "@" + lane + "\x1f" + ",".join(sorted(resources))


def _alert_later(m: Core, task: Task, key: str) -> None:
    """A parked task is reported once it has waited `resource_wait_alert_s`."""
    rt = m.rt
    rt.set_parked_on(task.id, key)
    if rt.armed("resource_alert", task.id) is None and not rt.resource_alerted(key):
        since = rt.queued_at(task.id)
        rt.arm(
            "resource_alert",
            task.id,
            (m.now if since is None else since) + m.cfg.tasks.resource_wait_alert_s,
        )


class _Idle:
    """The idle workers of one dispatch by host ("" = local), in the runtime's order."""

    __slots__ = ("by_host", "host_of")

    def __init__(self, m: Core) -> None:
        workers = m.state.data.workers
        self.by_host: dict[str, dict[str, None]] = {}
        self.host_of: dict[str, str] = {}
        for wid in m.rt.idle():
            w = workers.get(wid)
            host = w.host if w is not None else ""
            self.host_of[wid] = host
            self.by_host.setdefault(host, {})[wid] = None

    def take(self, wid: str) -> None:
        host = self.host_of.pop(wid, None)
        if host is not None:
            self.by_host[host].pop(wid, None)

    def serves(self, m: Core, lane: str) -> bool:
        """Some idle worker may run a task of `lane`."""
        if not lane:
            return bool(self.host_of)
        hosts = m.hosts
        return any(w and hosts.matches(lane, h) for h, w in self.by_host.items())

    def place(self, m: Core, task: Task, lane: str) -> str | None:
        """The first idle worker on a host that `lane` allows and where every per-host
        resource of `task` has room; None when there is none."""
        hosts, graph, resources = m.hosts, m.state.graph, m.state.data.resources
        per = [r for r in task.resources if r in hosts.per_host]
        for host, wids in self.by_host.items():
            if not wids or not hosts.matches(lane, host):
                continue
            if all(
                len(graph.holders_of(instance(r, host))) < resources[r].max_holders for r in per
            ):
                return next(iter(wids))
        return None


def _best_lane(m: Core, idle: _Idle) -> str | None:
    """The lane whose first task goes next: the best (priority, order) head among the
    lanes an idle worker can serve. Lanes are few (one per host, label and "anywhere")."""
    best: tuple[int, int, str, str] | None = None
    for lane in m.rt.lanes():
        head = m.rt.peek(lane)
        if head is not None and (best is None or head < best) and idle.serves(m, lane):
            best = head
    return None if best is None else best[3]


def lane_of(task: Task) -> str:
    """The dispatch lane of a task: its `runs_on` ("" = any host)."""
    return task.runs_on or ""


def start_attempt(m: Core, task: Task, wid: str) -> None:
    """Task to running and worker to busy, in one step, then Run is sent."""
    rt = m.rt
    n = len(task.attempts) + 1
    # A random suffix: an attempt id is never reused, even by a task rolled back or retried.
    # It names the attempt's cgroup, so it is one path component: WS/TASK becomes WS:TASK.
    attempt_id = f"{task.id.replace('/', ':')}.{n}.{int(m.rand() * 0x1000000):06x}"
    rt.set_parked_on(task.id, None)
    rt.disarm("queue_alert", task.id)
    rt.disarm("resource_alert", task.id)
    since = rt.queued_at(task.id)
    if since is not None:
        rt.queue_wait(m.now - since)
    attempt: dict[str, object] = {
        "attempt_id": attempt_id,
        "number": n,
        "worker_id": wid,
        "started_at": m.wall,
    }
    worker = m.state.data.workers.get(wid)
    host = worker.host if worker is not None else ""
    if host:
        attempt["host"] = host
    placed: dict[str, object] = {}
    if task.resources:
        holds = m.hosts.holds(task.resources, host)
        # Recorded unless it is the plain list and nothing older is recorded to replace.
        if holds != task.resources or task.holds:
            placed["holds"] = holds
    # Containment "cgroup": the attempt's cgroup is in its record before the process starts.
    # The daemon's cgroups are on its own host: a remote attempt is held by its shim.
    local = m.containment.attempts is not None and not host
    cgroup = f"{m.containment.attempts}/{attempt_id}" if local else None
    if cgroup is not None:
        attempt["cgroup"] = cgroup
    m.commit(
        "task",
        task.id,
        "running",
        "auto",
        worker_id=wid,
        pid=None,
        stopping=None,
        attempt=attempt,
        **placed,
    )
    m.commit("worker", wid, "busy", "auto", task_id=task.id, attempt_id=attempt_id)
    m.note(wid, f"took task {task.id}, attempt {n} ({attempt_id})")
    rt.count("attempts")
    rt.arm("timeout", task.id, m.now + task.timeout_s)
    run = wire.Run(
        attempt_id=attempt_id,
        task_id=task.id,
        number=n,
        # A revalidation runs the validate step alone, as the attempt's command.
        command=task.validate if task.revalidate and task.validate else task.command,
        cwd=task.cwd,
        env=task.env,
        validate=None if task.revalidate else task.validate,
        rlimits=task.rlimits,
        log_path=str(m.files.task_log_path(task.id)),
        cgroup=cgroup,
    )
    m.effect(Send(wid, run))
