"""The transition tables and `State.apply`: every legal move works, every other one raises
and leaves the state exactly as it was."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from supervisor.core.errors import IllegalTransition
from supervisor.core.model import (
    RETIRED,
    TABLES,
    Attempt,
    Daemon,
    DaemonState,
    Entity,
    Resource,
    State,
    StateData,
    Task,
    TaskState,
    Transition,
    Worker,
    WorkerState,
    Workstream,
    WorkstreamState,
    equal_states,
    task_to_builtins,
)

START_SEQ = 5
ALL_STATES: dict[str, set[str]] = {
    entity: {s for s in table if s is not None} | {s for v in table.values() for s in v}
    for entity, table in TABLES.items()
}
ENTITY_ID = {
    "task": "t1",
    "workstream": "ws-1",
    "worker": "w1",
    "resource": "r1",
    "daemon": "orchd",
}


def state_with(entity: str, current: str) -> State:
    """A state holding one entity of each kind, the one of `entity` in state `current`."""
    task_state = current if entity == "task" else "pending"
    data = StateData(
        last_seq=START_SEQ,
        tasks={
            "t1": Task(
                id="t1",
                workstream_id="ws-1",
                command="true",
                state=TaskState(task_state),
                resources=["r1"],
            )
        },
        workstreams={
            "ws-1": Workstream(
                id="ws-1",
                task_ids=["t1"],
                state=WorkstreamState(current if entity == "workstream" else "pending"),
            )
        },
        workers={
            "w1": Worker(id="w1", state=WorkerState(current if entity == "worker" else "idle"))
        },
        resources={"r1": Resource(id="r1")},
        daemon={
            "orchd": Daemon(
                id="orchd", state=DaemonState(current if entity == "daemon" else "running")
            )
        },
    )
    return State(data)


def copy_data(data: StateData) -> StateData:
    return msgspec.json.decode(msgspec.json.encode(data), type=StateData)


def rec(
    entity: Entity, id_: str, from_: str | None, to: str, seq: int = START_SEQ + 1, **changes: Any
) -> Transition:
    return Transition(
        seq=seq, ts=1.0, entity=entity, id=id_, from_=from_, to=to, cause="auto", changes=changes
    )


def assert_refused(state: State, record: Transition) -> None:
    """`record` raises IllegalTransition and the state is unchanged, seq included."""
    before = copy_data(state.data)
    with pytest.raises(IllegalTransition):
        state.apply(record)
    assert equal_states(before, state.data)
    assert state.last_seq == before.last_seq


LEGAL = [
    (entity, src, dst)
    for entity, table in TABLES.items()
    for src, dsts in table.items()
    if src is not None
    for dst in sorted(dsts)
]
ILLEGAL = [
    (entity, src, dst)
    for entity, table in TABLES.items()
    for src, dsts in table.items()
    if src is not None
    for dst in sorted(ALL_STATES[entity] - dsts)
]


@pytest.mark.parametrize(("entity", "src", "dst"), LEGAL)
def test_every_table_entry_is_legal(entity: Entity, src: str, dst: str) -> None:
    """Each move listed in a transition table is applied and the seq advances."""
    state = state_with(entity, src)
    state.apply(rec(entity, ENTITY_ID[entity], src, dst))
    # A retirement takes the workstream (and its tasks) out of the state.
    assert state.current(entity, ENTITY_ID[entity]) == (None if dst == RETIRED else dst)
    assert state.last_seq == START_SEQ + 1


@pytest.mark.parametrize(("entity", "src", "dst"), ILLEGAL)
def test_pair_outside_the_table_is_refused(entity: Entity, src: str, dst: str) -> None:
    """A move missing from the table raises and changes nothing."""
    assert_refused(state_with(entity, src), rec(entity, ENTITY_ID[entity], src, dst))


def test_illegal_pairs_exist_for_every_entity_with_choices() -> None:
    """The tables are not all-to-all: each entity with several states forbids some moves."""
    entities = {entity for entity, _, _ in ILLEGAL}
    assert entities == {"task", "workstream", "worker"}


def test_wrong_from_state_is_refused() -> None:
    """A record whose `from` is not the entity's current state is refused."""
    assert_refused(state_with("task", "pending"), rec("task", "t1", "queued", "running"))


@pytest.mark.parametrize("seq", [START_SEQ, START_SEQ + 2, 0])
def test_seq_must_be_the_next_one(seq: int) -> None:
    """Only last_seq + 1 is accepted: a repeat or a gap is refused."""
    assert_refused(state_with("task", "pending"), rec("task", "t1", "pending", "queued", seq=seq))


@pytest.mark.parametrize(
    ("entity", "src", "key"),
    [
        ("task", "pending", "bogus"),
        ("task", "pending", "state"),
        ("task", "pending", "id"),
        ("task", "pending", "workstream_id"),
        ("worker", "idle", "colour"),
        ("workstream", "pending", "task_ids"),
        ("resource", "defined", "holders"),
    ],
)
def test_unknown_change_key_is_refused(entity: Entity, src: str, key: str) -> None:
    """A change naming a field the entity does not have (or may not set) is refused."""
    state = state_with(entity, src)
    record = Transition(
        seq=START_SEQ + 1,
        ts=1.0,
        entity=entity,
        id=ENTITY_ID[entity],
        from_=src,
        to=src,
        cause="operator",
        changes={key: "x"},
    )
    assert_refused(state, record)


def test_unknown_entity_id_is_refused() -> None:
    """A record about a task that does not exist is refused (its `from` does not match)."""
    assert_refused(state_with("task", "pending"), rec("task", "nope", "pending", "queued"))


def test_task_is_not_created_by_a_task_record() -> None:
    """Tasks come into being only with their workstream's creation record."""
    assert_refused(
        state_with("task", "pending"), rec("task", "t9", None, "pending", command="true")
    )


def creation(ws_id: str, tasks: list[Task], seq: int = START_SEQ + 1) -> Transition:
    return rec(
        "workstream",
        ws_id,
        None,
        "pending",
        seq=seq,
        workstream={"id": ws_id, "submitted_at": 2.0},
        tasks=[task_to_builtins(t) for t in tasks],
    )


def test_workstream_creation_adds_it_and_its_tasks() -> None:
    """One creation record adds the workstream, its tasks and their graph entries."""
    state = state_with("task", "pending")
    tasks = [
        Task(id="a", workstream_id="ws-2", command=["make"]),
        Task(id="b", workstream_id="ws-2", command="make test", depends_on=["a"]),
    ]
    state.apply(creation("ws-2", tasks))
    assert state.data.workstreams["ws-2"].task_ids == ["a", "b"]
    assert state.data.workstreams["ws-2"].state == "pending"
    assert state.data.tasks["b"].depends_on == ["a"]
    assert state.graph.unmet["b"] == 1
    assert "a" in state.graph.drain_ready()
    assert state.last_seq == START_SEQ + 1


def test_creation_without_tasks_is_refused() -> None:
    """A workstream creation record must carry its tasks."""
    state = state_with("task", "pending")
    assert_refused(state, rec("workstream", "ws-2", None, "pending", workstream={"id": "ws-2"}))


def test_creation_reusing_a_task_id_is_refused() -> None:
    """A creation record whose task id already exists is refused as a whole."""
    state = state_with("task", "pending")
    tasks = [
        Task(id="new", workstream_id="ws-2", command="x"),
        Task(id="t1", workstream_id="ws-2", command="x"),
    ]
    assert_refused(state, creation("ws-2", tasks))
    assert "new" not in state.data.tasks


def test_creating_an_existing_workstream_is_refused() -> None:
    """A second creation record for the same workstream id is refused."""
    state = state_with("task", "pending")
    assert_refused(state, creation("ws-1", [Task(id="z", workstream_id="ws-1", command="x")]))


def attempt(n: int) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(
        Attempt(attempt_id=f"att-{n}", number=n, worker_id="w1", started_at=10.0 * n)
    )
    return out


def test_attempts_are_appended_then_updated() -> None:
    """`attempt` appends an Attempt; `attempt_update` merges into the last one only."""
    state = state_with("task", "queued")
    state.apply(rec("task", "t1", "queued", "running", attempt=attempt(1), worker_id="w1"))
    state.apply(
        rec(
            "task",
            "t1",
            "running",
            "running",
            seq=START_SEQ + 2,
            attempt_update={"pid": 4242, "pid_create_time": 11.5},
        )
    )
    state.apply(
        rec(
            "task",
            "t1",
            "running",
            "pending",
            seq=START_SEQ + 3,
            attempt_update={"ended_at": 12.0, "exit_code": 1},
            retry_count=1,
        )
    )
    state.apply(rec("task", "t1", "pending", "queued", seq=START_SEQ + 4))
    state.apply(rec("task", "t1", "queued", "running", seq=START_SEQ + 5, attempt=attempt(2)))
    state.apply(
        rec(
            "task",
            "t1",
            "running",
            "completed",
            seq=START_SEQ + 6,
            attempt_update={"ended_at": 30.0, "exit_code": 0},
        )
    )
    first, second = state.data.tasks["t1"].attempts
    assert (first.attempt_id, first.pid, first.exit_code) == ("att-1", 4242, 1)
    assert first.ended_at == 12.0
    assert (second.attempt_id, second.pid, second.exit_code) == ("att-2", None, 0)
    assert state.data.tasks["t1"].retry_count == 1
    assert state.last_seq == START_SEQ + 6


def test_attempt_update_without_attempt_is_refused() -> None:
    """Updating the last attempt of a task that never ran is refused."""
    state = state_with("task", "running")
    assert_refused(state, rec("task", "t1", "running", "running", attempt_update={"pid": 1}))


def test_running_task_holds_its_resources_until_it_leaves_running() -> None:
    """Entering running takes the task's resources in the graph; leaving releases them."""
    state = state_with("task", "queued")
    state.apply(rec("task", "t1", "queued", "running"))
    assert state.graph.holders_of("r1") == ["t1"]
    state.apply(rec("task", "t1", "running", "failed", seq=START_SEQ + 2))
    assert state.graph.holders_of("r1") == []


def test_worker_and_resource_are_created_by_their_first_record() -> None:
    """A worker's first record (from None) creates it; likewise a resource definition."""
    state = state_with("task", "pending")
    state.apply(rec("worker", "w2", None, "starting", pid=99))
    state.apply(rec("resource", "db", None, "defined", seq=START_SEQ + 2, max_holders=3))
    assert state.data.workers["w2"].pid == 99
    assert state.data.resources["db"].max_holders == 3


def test_refused_record_does_not_block_the_next_legal_one() -> None:
    """After a refusal the same seq is still free for a legal record."""
    state = state_with("task", "pending")
    assert_refused(state, rec("task", "t1", "pending", "failed"))
    state.apply(rec("task", "t1", "pending", "queued"))
    assert state.current("task", "t1") == "queued"


def test_replaying_the_records_gives_an_equal_state() -> None:
    """Applying the same records to a fresh state yields an equal state."""
    records = [
        creation(
            "ws-2",
            [
                Task(id="a", workstream_id="ws-2", command="x"),
                Task(id="b", workstream_id="ws-2", command="y", depends_on=["a"]),
            ],
            seq=1,
        ),
        rec("task", "a", "pending", "queued", seq=2, queued_at=3.0),
        rec("task", "a", "queued", "running", seq=3, attempt=attempt(1)),
        rec("task", "a", "running", "completed", seq=4, attempt_update={"exit_code": 0}),
        rec("workstream", "ws-2", "pending", "running", seq=5),
    ]
    live, replay = State(), State()
    for r in records:
        live.apply(r)
    for r in msgspec.json.decode(msgspec.json.encode(records), type=list[Transition]):
        replay.apply(r)
    assert equal_states(live.data, replay.data)
    assert replay.graph.unmet == live.graph.unmet == {"a": 0, "b": 0}
