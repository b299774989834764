"""Entities, their states, the transition tables and `apply`. Pure: no I/O, no clock reads.

Every change of state in orchd is a `Transition` record. The scheduler builds one, the
store makes it durable, and `State.apply` performs it; replaying the log performs the
very same `apply`, so a replayed state equals the live one by construction.
"""

from __future__ import annotations

import enum
from typing import Any, Final, Literal

import msgspec

from supervisor.errors import IllegalTransition
from supervisor.graph import Graph


class TaskState(enum.StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class WorkstreamState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    MERGED = "merged"


class WorkerState(enum.StrEnum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    UNRESPONSIVE = "unresponsive"
    SHUTDOWN = "shutdown"


class FailureKind(enum.StrEnum):
    EXIT_CODE = "exit_code"
    TIMEOUT = "timeout"
    VALIDATION = "validation"
    WORKER_LOST = "worker_lost"
    SPAWN_ERROR = "spawn_error"
    # The daemon stopped or died while the attempt ran; does not spend a retry.
    INTERRUPTED = "interrupted"


Entity = Literal["task", "workstream", "worker", "resource"]
Cause = Literal["submit", "auto", "timeout", "failure", "health", "operator", "recovery", "shutdown", "config"]
Severity = Literal["debug", "info", "warning", "error", "critical"]

# The one place where the legal moves live: {from: {to, ...}}; None is "does not exist yet".
# Self-loops are field updates (a pid learnt, a kill begun, an operator's edit).
TASK_TRANSITIONS: Final[dict[str | None, frozenset[str]]] = {
    None: frozenset({"pending"}),
    "pending": frozenset({"pending", "queued", "completed", "cancelled"}),
    "queued": frozenset({"queued", "pending", "running", "completed", "cancelled"}),
    "running": frozenset({"running", "pending", "queued", "completed", "failed", "cancelled"}),
    "completed": frozenset({"completed", "pending"}),
    "failed": frozenset({"failed", "pending", "completed", "cancelled"}),
    "cancelled": frozenset({"cancelled", "pending"}),
}
WORKSTREAM_TRANSITIONS: Final[dict[str | None, frozenset[str]]] = {
    None: frozenset({"pending"}),
    "pending": frozenset({"pending", "running", "completed", "failed", "cancelled"}),
    "running": frozenset({"running", "completed", "failed", "cancelled"}),
    "completed": frozenset({"completed", "running", "merged"}),
    "failed": frozenset({"failed", "running", "completed", "cancelled"}),
    "cancelled": frozenset({"cancelled", "running"}),
    "merged": frozenset({"merged"}),
}
WORKER_TRANSITIONS: Final[dict[str | None, frozenset[str]]] = {
    None: frozenset({"starting"}),
    "starting": frozenset({"starting", "idle", "unresponsive", "shutdown"}),
    "idle": frozenset({"idle", "busy", "unresponsive", "shutdown", "starting"}),
    "busy": frozenset({"busy", "idle", "unresponsive", "shutdown", "starting"}),
    "unresponsive": frozenset({"unresponsive", "idle", "busy", "shutdown", "starting"}),
    "shutdown": frozenset({"shutdown", "starting"}),
}
RESOURCE_TRANSITIONS: Final[dict[str | None, frozenset[str]]] = {
    None: frozenset({"defined"}),
    "defined": frozenset({"defined"}),
}
TABLES: Final[dict[str, dict[str | None, frozenset[str]]]] = {
    "task": TASK_TRANSITIONS,
    "workstream": WORKSTREAM_TRANSITIONS,
    "worker": WORKER_TRANSITIONS,
    "resource": RESOURCE_TRANSITIONS,
}

TERMINAL_TASK_STATES: Final = frozenset({TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED})
# A dependency is met by these states (a skip is a completion).
SATISFYING_STATES: Final = frozenset({"completed", "cancelled"})


class Rlimits(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    memory_mb: int | None = None
    cpu_s: int | None = None
    open_files: int | None = None


class Attempt(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One try at running a task, from dispatch to its outcome."""

    attempt_id: str
    number: int
    worker_id: str
    started_at: float
    pid: int | None = None
    pid_create_time: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    failure_kind: FailureKind | None = None
    reassigned: bool = False
    message: str | None = None


class Task(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    workstream_id: str
    command: list[str] | str
    cwd: str | None = None
    env: dict[str, str] = {}
    timeout_s: float = 600.0
    max_retries: int = 3
    depends_on: list[str] = []
    resources: list[str] = []
    critical: bool = True
    validate: list[str] | str | None = None
    priority: int = 0
    no_retry_exit_codes: list[int] = []
    queue_timeout_s: float | None = None
    rlimits: Rlimits | None = None
    # Run-time fields.
    state: TaskState = TaskState.PENDING
    order: int = 0
    retry_count: int = 0
    worker_id: str | None = None
    pid: int | None = None
    attempts: list[Attempt] = []
    not_before: float | None = None
    queued_at: float | None = None
    failure_kind: FailureKind | None = None
    skipped: bool = False
    skip_reason: str | None = None
    stopping: str | None = None


class Workstream(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    state: WorkstreamState = WorkstreamState.PENDING
    task_ids: list[str] = []
    submitted_at: float = 0.0
    ended_at: float | None = None
    source: str | None = None
    reason: str | None = None


class Worker(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    state: WorkerState = WorkerState.STARTING
    pid: int | None = None
    pid_create_time: float | None = None
    task_id: str | None = None
    attempt_id: str | None = None
    started_at: float | None = None
    restarts: int = 0


class Resource(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    max_holders: int = 1
    state: str = "defined"


class Transition(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One record of the transitions log."""

    seq: int
    ts: float
    entity: Entity
    id: str
    from_: str | None = msgspec.field(default=None, name="from")
    to: str
    cause: Cause
    changes: dict[str, Any] = {}


class Event(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Something an operator may want to know; written to events.jsonl and logged."""

    event: str
    severity: Severity
    ts: float
    task_id: str | None = None
    workstream_id: str | None = None
    worker_id: str | None = None
    resource_id: str | None = None
    tasks: list[str] | None = None
    message: str | None = None
    data: dict[str, Any] = {}


class StateData(msgspec.Struct, kw_only=True):
    """Everything that is durable; what a snapshot holds."""

    last_seq: int = 0
    tasks: dict[str, Task] = {}
    workstreams: dict[str, Workstream] = {}
    workers: dict[str, Worker] = {}
    resources: dict[str, Resource] = {}


_ATTEMPT_FIELDS: Final = frozenset(Attempt.__struct_fields__)
# Keys a record's `changes` may carry, by entity; `state` is set from `to` alone.
_FIELDS: Final[dict[str, frozenset[str]]] = {
    "task": frozenset(Task.__struct_fields__) - {"id", "state", "workstream_id"}
    | {"attempt", "attempt_update"},
    "workstream": frozenset(Workstream.__struct_fields__) - {"id", "state", "task_ids"}
    | {"workstream", "tasks"},
    "worker": frozenset(Worker.__struct_fields__) - {"id", "state"},
    "resource": frozenset(Resource.__struct_fields__) - {"id", "state"},
}


class State:
    """The durable data plus the derived indexes (graph) kept in step by `apply`."""

    __slots__ = ("data", "graph")

    def __init__(self, data: StateData | None = None) -> None:
        self.data = data if data is not None else StateData()
        self.graph = Graph()
        self.graph.rebuild(self.data.tasks.values())

    @property
    def last_seq(self) -> int:
        return self.data.last_seq

    def current(self, entity: Entity, id_: str) -> str | None:
        """The state name of an entity, or None when it does not exist."""
        obj: Task | Workstream | Worker | Resource | None
        if entity == "task":
            obj = self.data.tasks.get(id_)
        elif entity == "workstream":
            obj = self.data.workstreams.get(id_)
        elif entity == "worker":
            obj = self.data.workers.get(id_)
        else:
            obj = self.data.resources.get(id_)
        return None if obj is None else str(obj.state)

    def check(self, rec: Transition) -> None:
        """Raise IllegalTransition unless `rec` is legal now; never changes anything."""
        if rec.seq != self.data.last_seq + 1:
            raise IllegalTransition(rec.entity, rec.id, rec.from_, rec.to, f"seq {rec.seq} after {self.data.last_seq}")
        actual = self.current(rec.entity, rec.id)
        if actual != rec.from_:
            raise IllegalTransition(rec.entity, rec.id, rec.from_, rec.to, f"it is {actual}")
        table = TABLES[rec.entity]
        allowed = table.get(rec.from_)
        if allowed is None or rec.to not in allowed:
            raise IllegalTransition(rec.entity, rec.id, rec.from_, rec.to, "not in the table")
        fields = _FIELDS[rec.entity]
        for key in rec.changes:
            if key not in fields:
                raise IllegalTransition(rec.entity, rec.id, rec.from_, rec.to, f"unknown field {key!r}")
        if "attempt_update" in rec.changes and not self.data.tasks[rec.id].attempts:
            raise IllegalTransition(rec.entity, rec.id, rec.from_, rec.to, "no attempt to update")
        if rec.entity == "workstream" and rec.from_ is None:
            if "workstream" not in rec.changes or "tasks" not in rec.changes:
                raise IllegalTransition(rec.entity, rec.id, None, rec.to, "creation without tasks")
            for t in rec.changes["tasks"]:
                if t["id"] in self.data.tasks:
                    raise IllegalTransition(rec.entity, rec.id, None, rec.to, f"task {t['id']} exists")

    def apply(self, rec: Transition) -> None:
        """Check and perform one transition; an illegal one raises and changes nothing."""
        self.check(rec)
        if rec.entity == "task":
            self._apply_task(rec)
        elif rec.entity == "workstream":
            self._apply_workstream(rec)
        elif rec.entity == "worker":
            self._apply_worker(rec)
        else:
            self._apply_resource(rec)
        self.data.last_seq = rec.seq

    def _apply_task(self, rec: Transition) -> None:
        task = self.data.tasks[rec.id]
        old = task.state
        for key, value in rec.changes.items():
            if key == "attempt":
                task.attempts.append(msgspec.convert(value, Attempt))
            elif key == "attempt_update":
                last = task.attempts[-1]
                for akey, avalue in value.items():
                    if akey in _ATTEMPT_FIELDS:
                        setattr(last, akey, avalue)
            elif key == "depends_on":
                self.graph.set_dependencies(task, list(value), self.data.tasks)
            else:
                setattr(task, key, value)
        if rec.to != old:
            task.state = TaskState(rec.to)
            self.graph.on_task_state(task, old, self.data.tasks)

    def _apply_workstream(self, rec: Transition) -> None:
        if rec.from_ is None:
            ws = msgspec.convert(rec.changes["workstream"], Workstream)
            tasks = msgspec.convert(rec.changes["tasks"], list[Task])
            ws.task_ids = [t.id for t in tasks]
            self.data.workstreams[ws.id] = ws
            for t in tasks:
                self.data.tasks[t.id] = t
            self.graph.add_tasks(tasks, self.data.tasks)
            return
        ws = self.data.workstreams[rec.id]
        for key, value in rec.changes.items():
            setattr(ws, key, value)
        ws.state = WorkstreamState(rec.to)

    def _apply_worker(self, rec: Transition) -> None:
        worker = self.data.workers.get(rec.id)
        if worker is None:
            worker = self.data.workers[rec.id] = Worker(id=rec.id)
        for key, value in rec.changes.items():
            setattr(worker, key, value)
        worker.state = WorkerState(rec.to)

    def _apply_resource(self, rec: Transition) -> None:
        res = self.data.resources.get(rec.id)
        if res is None:
            res = self.data.resources[rec.id] = Resource(id=rec.id)
        for key, value in rec.changes.items():
            setattr(res, key, value)


def task_to_builtins(task: Task) -> dict[str, Any]:
    """A task as plain JSON-able builtins (what a creation record carries)."""
    out: dict[str, Any] = msgspec.to_builtins(task)
    return out


def equal_states(a: StateData, b: StateData) -> bool:
    """True when two states hold the same data (encoded forms compared, order-free)."""
    enc = msgspec.json.Encoder(order="sorted")
    return enc.encode(a) == enc.encode(b)
