"""The dependency graph: unmet counts kept incrementally, readiness, downstream sets,
resource holders and cycle detection."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from supervisor.core.graph import Graph, find_cycles
from supervisor.core.model import TASK_TRANSITIONS, State, Task, Transition, task_to_builtins


class Driver:
    """A State fed with records, each one `from` the task's current state."""

    def __init__(self, tasks: list[Task], ws_id: str = "ws-1") -> None:
        self.state = State()
        self.record(
            "workstream",
            ws_id,
            None,
            "pending",
            workstream={"id": ws_id},
            tasks=[task_to_builtins(t) for t in tasks],
        )

    def record(self, entity: Any, id_: str, from_: str | None, to: str, **changes: Any) -> None:
        self.state.apply(
            Transition(
                seq=self.state.last_seq + 1,
                ts=0.0,
                entity=entity,
                id=id_,
                from_=from_,
                to=to,
                cause="auto",
                changes=changes,
            )
        )

    def move(self, task_id: str, *path: str, **changes: Any) -> None:
        for to in path:
            self.record("task", task_id, self.state.current("task", task_id), to, **changes)

    @property
    def graph(self) -> Graph:
        return self.state.graph


def task(tid: str, *deps: str, resources: tuple[str, ...] = (), ws: str = "ws-1") -> Task:
    return Task(
        id=tid, workstream_id=ws, command="true", depends_on=list(deps), resources=list(resources)
    )


def diamond() -> Driver:
    return Driver([task("a"), task("b", "a"), task("c", "a"), task("d", "b", "c")])


def test_unmet_counts_start_from_the_dependencies() -> None:
    """Each task starts with one unmet dependency per prerequisite; only roots are ready."""
    d = diamond()
    assert d.graph.unmet == {"a": 0, "b": 1, "c": 1, "d": 2}
    assert d.graph.drain_ready() == ["a"]
    assert d.graph.drain_ready() == []


def test_completion_and_cancel_meet_dependencies() -> None:
    """Completing or cancelling a prerequisite lowers its dependents' counts; at 0 they
    become ready."""
    d = diamond()
    d.graph.drain_ready()
    d.move("a", "queued", "running", "completed")
    assert (d.graph.unmet["b"], d.graph.unmet["c"]) == (0, 0)
    assert sorted(d.graph.drain_ready()) == ["b", "c"]
    d.move("b", "cancelled")
    assert d.graph.unmet["d"] == 1
    d.move("c", "queued", "running", "completed")
    assert d.graph.unmet["d"] == 0
    assert d.graph.drain_ready() == ["d"]


def test_failure_leaves_dependents_waiting() -> None:
    """A failed prerequisite does not satisfy its dependents."""
    d = diamond()
    d.move("a", "queued", "running", "failed")
    assert (d.graph.unmet["b"], d.graph.unmet["c"]) == (1, 1)


def test_retry_of_a_completed_task_raises_counts_again() -> None:
    """Sending a completed task back to pending makes its dependents wait for it again, and
    the task itself is ready again."""
    d = diamond()
    d.move("a", "queued", "running", "completed")
    d.graph.drain_ready()
    d.move("a", "pending")
    assert (d.graph.unmet["b"], d.graph.unmet["c"]) == (1, 1)
    assert d.graph.drain_ready() == ["a"]


def test_back_off_return_to_pending_makes_task_ready_again() -> None:
    """A task back in pending after a failed attempt shows up in the ready set."""
    d = Driver([task("a")])
    d.graph.drain_ready()
    d.move("a", "queued", "running", "pending")
    assert d.graph.drain_ready() == ["a"]


def test_removing_a_dependency_recounts_the_task() -> None:
    """Dropping an unmet dependency (dep remove) lowers the count and can make it ready."""
    d = diamond()
    d.move("a", "queued", "running", "completed")
    d.graph.drain_ready()
    d.move("d", "pending", depends_on=["b"])
    assert d.graph.unmet["d"] == 1
    d.move("d", "pending", depends_on=[])
    assert d.graph.unmet["d"] == 0
    assert "d" in d.graph.drain_ready()
    assert d.graph.downstream("c") == []


def test_downstream_sets() -> None:
    """downstream() lists every direct and indirect dependent, never the task itself."""
    d = diamond()
    assert set(d.graph.downstream("a")) == {"b", "c", "d"}
    assert d.graph.downstream("b") == ["d"]
    assert d.graph.downstream("d") == []
    cyc = Driver([task("x", "y"), task("y", "x")], ws_id="ws-2")
    assert cyc.graph.downstream("x") == ["y"]


def test_running_tasks_hold_their_resources() -> None:
    """Holders are exactly the running tasks naming a resource."""
    d = Driver([task("a", resources=("r",)), task("b", resources=("r", "s"))])
    d.move("a", "queued", "running")
    d.move("b", "queued", "running")
    assert (d.graph.holders_of("r"), d.graph.holders_of("s")) == (["a", "b"], ["b"])
    d.move("a", "completed")
    assert d.graph.holders_of("r") == ["b"]


def test_workstream_counts_follow_task_states() -> None:
    """Per-workstream state counts move with every task transition."""
    d = diamond()
    d.move("a", "queued", "running")
    counts = {k: v for k, v in d.graph.ws_counts["ws-1"].items() if v}
    assert counts == {"pending": 3, "running": 1}


def test_find_cycles_two_cycle() -> None:
    """Two tasks depending on each other form one named cycle."""
    assert find_cycles(["a", "b"], {"a": ["b"], "b": ["a"]}) == [["a", "b"]]


def test_find_cycles_three_cycle_beside_a_dag() -> None:
    """A three-task loop is named; the tasks hanging off it are not part of it."""
    deps = {"a": ["c"], "b": ["a"], "c": ["b"], "d": ["a"], "e": []}
    assert find_cycles(list(deps), deps) == [["a", "b", "c"]]


def test_find_cycles_self_loop() -> None:
    """A task depending on itself is a cycle of one."""
    assert find_cycles(["a", "b"], {"a": ["a"], "b": ["a"]}) == [["a"]]


def test_find_cycles_none_in_a_dag() -> None:
    """A DAG, even a deep one, has no cycles (and no recursion limit is hit)."""
    deps = {f"t{i}": [f"t{i - 1}"] if i else [] for i in range(5000)}
    deps["t4999"].append("t0")
    assert find_cycles(list(deps), deps) == []


def test_find_cycles_ignores_dependencies_outside_the_set() -> None:
    """An edge to a task that is not in the set considered cannot close a cycle."""
    assert find_cycles(["a"], {"a": ["elsewhere"]}) == []


def test_find_cycles_two_separate_cycles() -> None:
    """Every cycle is reported, each once."""
    deps = {"a": ["b"], "b": ["a"], "c": ["d"], "d": ["c"]}
    assert sorted(find_cycles(list(deps), deps)) == [["a", "b"], ["c", "d"]]


def comparable(g: Graph) -> tuple[object, ...]:
    """The graph's contents, with empty entries and list order left out."""
    return (
        g.unmet,
        {k: sorted(v) for k, v in g.dependents.items() if v},
        {k: sorted(v) for k, v in g.holders.items() if v},
        {ws: {s: n for s, n in c.items() if n} for ws, c in g.ws_counts.items()},
    )


@st.composite
def workloads(draw: st.DrawFn) -> tuple[list[Task], list[tuple[int, int, list[int] | None]]]:
    n = draw(st.integers(min_value=1, max_value=8))
    ids = [f"t{i}" for i in range(n)]
    tasks = []
    for i, tid in enumerate(ids):
        deps = draw(st.lists(st.sampled_from(ids), unique=True, max_size=3))
        res = draw(st.lists(st.sampled_from(["r1", "r2"]), unique=True, max_size=2))
        tasks.append(
            Task(
                id=tid, workstream_id=f"ws-{i % 2}", command="true", depends_on=deps, resources=res
            )
        )
    steps = draw(
        st.lists(
            st.tuples(
                st.integers(0, n - 1),
                st.integers(0, 6),
                st.none() | st.lists(st.integers(0, n - 1), unique=True, max_size=3),
            ),
            max_size=60,
        )
    )
    return tasks, steps


@given(workloads())
def test_incremental_counts_equal_a_rebuild(
    work: tuple[list[Task], list[tuple[int, int, list[int] | None]]],
) -> None:
    """After any sequence of legal transitions the incremental graph equals one rebuilt from
    scratch, and every ready task is in the ready set."""
    tasks, steps = work
    state = State()
    by_ws: dict[str, list[Task]] = {}
    for t in tasks:
        by_ws.setdefault(t.workstream_id, []).append(t)
    seq = 0
    for ws_id, ws_tasks in by_ws.items():
        seq += 1
        state.apply(
            Transition(
                seq=seq,
                ts=0.0,
                entity="workstream",
                id=ws_id,
                to="pending",
                cause="submit",
                changes={
                    "workstream": {"id": ws_id},
                    "tasks": [task_to_builtins(t) for t in ws_tasks],
                },
            )
        )
    ids = [t.id for t in tasks]
    for index, choice, new_deps in steps:
        tid = ids[index]
        current = state.data.tasks[tid].state
        changes: dict[str, Any] = {}
        if new_deps is not None and current == "pending":
            to = "pending"
            changes["depends_on"] = [ids[i] for i in new_deps]
        else:
            options = sorted(TASK_TRANSITIONS[current])
            to = options[choice % len(options)]
        seq += 1
        state.apply(
            Transition(
                seq=seq,
                ts=0.0,
                entity="task",
                id=tid,
                from_=current,
                to=to,
                cause="auto",
                changes=changes,
            )
        )
    fresh = Graph()
    fresh.rebuild(state.data.tasks.values())
    assert comparable(state.graph) == comparable(fresh)
    assert set(fresh.ready) <= set(state.graph.ready)
