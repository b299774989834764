"""Dependency bookkeeping, readiness, resource holders, cycles and downstream sets. Pure: no I/O.

`Graph` is a derived index over the tasks, kept in step incrementally by `State.apply`:
a transition touches only the counters of the task and its direct dependents, so its cost
does not grow with the number of tasks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol


class Task(Protocol):
    """What the graph reads of a task (model.Task is one); it only ever sets depends_on."""

    depends_on: list[str]

    @property
    def id(self) -> str: ...

    @property
    def workstream_id(self) -> str: ...

    @property
    def state(self) -> str: ...

    @property
    def resources(self) -> list[str]: ...


_SATISFYING = frozenset({"completed", "cancelled"})


class Graph:
    """Unmet-dependency counts, reverse edges, resource holders and per-workstream counts."""

    __slots__ = ("dependents", "holders", "ready", "unmet", "ws_counts")

    def __init__(self) -> None:
        self.dependents: dict[str, list[str]] = {}
        self.unmet: dict[str, int] = {}
        self.holders: dict[str, list[str]] = {}
        self.ws_counts: dict[str, dict[str, int]] = {}
        # Pending tasks whose dependencies became met; drained by dispatch. A dict is
        # an ordered set here.
        self.ready: dict[str, None] = {}

    def rebuild(self, tasks: Iterable[Task], index: Mapping[str, Task] | None = None) -> None:
        """Recompute everything from scratch (on load). `index` maps every task id to its
        task (the state's own dict; built from `tasks` when not given)."""
        self.__init__()  # type: ignore[misc]
        if index is None:
            listed = list(tasks)
            self.add_tasks(listed, {t.id: t for t in listed})
        else:
            self.add_tasks(tasks, index)

    def add_tasks(self, new: Iterable[Task], tasks: Mapping[str, Task]) -> None:
        """Index newly created tasks (they may depend on each other or on existing ones);
        `tasks` holds every task, the new ones included.

        One pass with everything bound to locals: a start from a snapshot runs this over
        every task before the daemon can do anything else, and a replay over every
        workstream submitted."""
        dependents, unmet, holders = self.dependents, self.unmet, self.holders
        ws_counts, ready = self.ws_counts, self.ready
        satisfying, find = _SATISFYING, tasks.get
        last_ws: str | None = None
        counts: dict[str, int] = {}
        for task in new:
            tid, state, ws = task.id, task.state, task.workstream_id
            # The tasks of a workstream are usually next to each other.
            if ws != last_ws:
                got = ws_counts.get(ws)
                if got is None:
                    got = ws_counts[ws] = {}
                counts, last_ws = got, ws
            counts[state] = counts.get(state, 0) + 1
            n = 0
            for dep in task.depends_on:
                lst = dependents.get(dep)
                if lst is None:
                    dependents[dep] = [tid]
                else:
                    lst.append(tid)
                d = find(dep)
                if d is None or d.state not in satisfying:
                    n += 1
            unmet[tid] = n
            if state == "running":
                for r in task.resources:
                    held = holders.get(r)
                    if held is None:
                        holders[r] = [tid]
                    else:
                        held.append(tid)
            elif n == 0 and state == "pending":
                ready[tid] = None

    def _recount(self, task: Task, tasks: Mapping[str, Task]) -> None:
        n = 0
        for dep in task.depends_on:
            d = tasks.get(dep)
            if d is None or d.state not in _SATISFYING:
                n += 1
        self.unmet[task.id] = n
        if n == 0 and task.state == "pending":
            self.ready[task.id] = None

    def _hold(self, task: Task) -> None:
        for r in task.resources:
            self.holders.setdefault(r, []).append(task.id)

    def _release(self, task: Task) -> None:
        for r in task.resources:
            held = self.holders.get(r)
            if held and task.id in held:
                held.remove(task.id)

    def on_task_state(self, task: Task, old: str, tasks: Mapping[str, Task]) -> None:
        """Account for `task` having moved from `old` to its current state."""
        # Runs for most replayed records: locals, and no call unless there is work.
        new = task.state
        counts = self.ws_counts[task.workstream_id]
        counts[old] -= 1
        counts[new] = counts.get(new, 0) + 1
        if task.resources:
            if old == "running":
                self._release(task)
            elif new == "running":
                self._hold(task)
        now = new in _SATISFYING
        if (old in _SATISFYING) != now:
            dependents = self.dependents.get(task.id)
            if dependents:
                delta = -1 if now else 1
                unmet, ready = self.unmet, self.ready
                for dep_id in dependents:
                    left = unmet[dep_id] + delta
                    unmet[dep_id] = left
                    if left == 0 and tasks[dep_id].state == "pending":
                        ready[dep_id] = None
        if new == "pending" and self.unmet.get(task.id, 0) == 0:
            self.ready[task.id] = None

    def set_dependencies(self, task: Task, deps: list[str], tasks: Mapping[str, Task]) -> None:
        """Replace the dependency list of `task` and recount it."""
        for dep in task.depends_on:
            lst = self.dependents.get(dep)
            if lst and task.id in lst:
                lst.remove(task.id)
        task.depends_on = deps
        for dep in deps:
            self.dependents.setdefault(dep, []).append(task.id)
        self._recount(task, tasks)

    def forget(self, tasks: Iterable[Task], ws_id: str) -> None:
        """Drop every trace of `tasks` (the whole of workstream `ws_id`, leaving the state)."""
        dependents, unmet, ready = self.dependents, self.unmet, self.ready
        for task in tasks:
            tid = task.id
            dependents.pop(tid, None)
            unmet.pop(tid, None)
            ready.pop(tid, None)
            for dep in task.depends_on:
                lst = dependents.get(dep)
                if lst is not None and tid in lst:
                    lst.remove(tid)
                    if not lst:
                        del dependents[dep]
            if task.state == "running":
                self._release(task)
        for r in [r for r, held in self.holders.items() if not held]:
            del self.holders[r]
        self.ws_counts.pop(ws_id, None)

    def mark_ready(self, task_id: str) -> None:
        """`task_id` may be ready now (its back-off ended, an operator changed it)."""
        self.ready[task_id] = None

    def drain_ready(self) -> list[str]:
        """Task ids that may have become ready since the last drain (callers re-check)."""
        out = list(self.ready)
        self.ready.clear()
        return out

    def holders_of(self, resource_id: str) -> list[str]:
        return self.holders.get(resource_id, [])

    def downstream(self, task_id: str) -> list[str]:
        """Every task that depends on `task_id`, directly or not (breadth-first order)."""
        seen: dict[str, None] = {}
        frontier = [task_id]
        while frontier:
            nxt: list[str] = []
            for t in frontier:
                for d in self.dependents.get(t, ()):
                    if d not in seen and d != task_id:
                        seen[d] = None
                        nxt.append(d)
            frontier = nxt
        return list(seen)


def find_cycles(task_ids: Iterable[str], deps: Mapping[str, list[str]]) -> list[list[str]]:
    """The dependency cycles among `task_ids`, each as a list of the task ids in it.

    Tarjan's strongly connected components, iterative so deep chains do not hit the
    recursion limit; a component of two or more tasks, or a task depending on itself,
    is a cycle.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = 0
    for root in task_ids:
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            edges = [d for d in deps.get(node, ()) if d in deps]
            recurse = False
            while i < len(edges):
                nxt = edges[i]
                i += 1
                if nxt not in index:
                    work.append((node, i))
                    work.append((nxt, 0))
                    recurse = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if recurse:
                continue
            if low[node] == index[node]:
                comp: list[str] = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1 or node in deps.get(node, ()):
                    cycles.append(sorted(comp))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return cycles
