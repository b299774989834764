"""Entities, their states, the transition tables and `apply`. Pure: no I/O, no clock reads.

Every change of state in orchd is a `Transition` record. The engine builds one, the
store makes it durable, and `State.apply` performs it; replaying the log performs the
very same `apply`, so a replayed state equals the live one by construction.
"""

from __future__ import annotations

import enum
from typing import Any, Final, Literal

import msgspec

from supervisor.core.errors import IllegalTransition
from supervisor.core.graph import Graph


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


class DaemonState(enum.StrEnum):
    """Whether the daemon starts new tasks: `draining` is an operator's `orchctl drain`."""

    RUNNING = "running"
    DRAINING = "draining"


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


Entity = Literal["task", "workstream", "worker", "resource", "daemon"]
Cause = Literal[
    "submit", "auto", "timeout", "failure", "health", "operator", "recovery", "shutdown", "config"
]
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
    "completed": frozenset({"completed", "running", "merged", "retired"}),
    "failed": frozenset({"failed", "running", "completed", "cancelled", "retired"}),
    "cancelled": frozenset({"cancelled", "running", "retired"}),
    "merged": frozenset({"merged", "retired"}),
}
# Not a state anything is in: the record that takes a finished workstream and its tasks
# out of the live state (core/retention.py), once its archive is written.
RETIRED: Final = "retired"
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
# The daemon itself, one entity (DAEMON_ID), made by its first drain or undrain.
DAEMON_TRANSITIONS: Final[dict[str | None, frozenset[str]]] = {
    None: frozenset({"running", "draining"}),
    "running": frozenset({"running", "draining"}),
    "draining": frozenset({"draining", "running"}),
}
TABLES: Final[dict[str, dict[str | None, frozenset[str]]]] = {
    "task": TASK_TRANSITIONS,
    "workstream": WORKSTREAM_TRANSITIONS,
    "worker": WORKER_TRANSITIONS,
    "resource": RESOURCE_TRANSITIONS,
    "daemon": DAEMON_TRANSITIONS,
}
DAEMON_ID: Final = "orchd"

TERMINAL_TASK_STATES: Final = frozenset(
    {TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED}
)
# A dependency is met by these states (a skip is a completion).
SATISFYING_STATES: Final = frozenset({"completed", "cancelled"})


# The entities are never tracked by the cyclic garbage collector (gc=False): they hold
# only JSON-like values, so they can be in no reference cycle, and a big state would
# otherwise add hundreds of thousands of objects to every full collection (and slow
# down decoding a snapshot, which creates them all at once).
class Rlimits(
    msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, gc=False
):
    memory_mb: int | None = None
    cpu_s: int | None = None
    open_files: int | None = None


class Attempt(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """One try at running a task, from dispatch to its outcome."""

    attempt_id: str
    number: int
    worker_id: str
    started_at: float
    pid: int | None = None
    # The command's identity: its start time in clock ticks since boot (a clock step
    # leaves it alone). Records from before it carry the epoch `pid_create_time` only.
    pid_start_ticks: int | None = None
    pid_create_time: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    failure_kind: FailureKind | None = None
    reassigned: bool = False
    message: str | None = None
    # Containment "cgroup": the attempt's cgroup, recorded before its process starts (so
    # a later life can kill it), and the accounting read from it at the attempt's end.
    cgroup: str | None = None
    cpu_s: float | None = None
    memory_peak_bytes: int | None = None
    # The host its worker was on ("" = the daemon's own), recorded at dispatch.
    host: str = ""


class Task(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
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
    # Where it may run (core/placement.py): a host's name, one of its labels or "local";
    # None = any host. A pinned workstream's tasks carry its host.
    runs_on: str | None = None
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
    # The next attempt runs only the validate step (`orchctl revalidate`).
    revalidate: bool = False
    # Processes of an attempt that outlived its kill, as [pid, start ticks]: the task is
    # held back (not queued or dispatched) until they are gone.
    survivors: list[list[int]] = []
    # The resource ids its latest attempt holds (a per-host resource as `ID@HOST`),
    # decided at dispatch; kept after the attempt so its release matches its hold.
    holds: list[str] = []

    @property
    def name(self) -> str:
        """The task's id as its workstream file wrote it (`compile`); `id` is its full
        name in the daemon, `WS/TASK` (`nightly-42/compile`). A task recorded before
        full names existed has a bare id, which is then its full name as well."""
        return self.id.rpartition("/")[2]


class Workstream(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    id: str
    state: WorkstreamState = WorkstreamState.PENDING
    task_ids: list[str] = []
    submitted_at: float = 0.0
    ended_at: float | None = None
    source: str | None = None
    reason: str | None = None
    # `orchctl ws pause`: nothing new starts in it until `ws unpause`; running tasks go on.
    paused: bool = False
    # The pipeline this is a run of (the file's `name`), and the run's number in it
    # (`nightly-42` is run 42 of `nightly`; None for an explicit id).
    name: str | None = None
    number: int | None = None
    # Pinned to one host (its checkout lives there): every task of it runs there.
    host: str | None = None


class Worker(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    id: str
    state: WorkerState = WorkerState.STARTING
    # The host its agent runs on, as named in [[workers.hosts]]; "" = the daemon's own.
    host: str = ""
    pid: int | None = None
    # The agent's identity: start ticks since boot (older records: `pid_create_time`).
    pid_start_ticks: int | None = None
    pid_create_time: float | None = None
    task_id: str | None = None
    attempt_id: str | None = None
    started_at: float | None = None
    restarts: int = 0
    # Why the daemon is killing this worker's agent (recorded before the signal).
    stopping: str | None = None
    # A remote agent's lease and kill grace, as it was started with: its shims fence an
    # attempt within these, whatever a later config says (0: not recorded, older logs).
    lease_s: float = 0.0
    kill_grace_s: float = 0.0


class Resource(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    id: str
    max_holders: int = 1
    state: str = "defined"


class Daemon(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """The daemon's own durable state: whether an operator drained it, since when, why."""

    id: str
    state: DaemonState = DaemonState.RUNNING
    since: float | None = None
    reason: str | None = None


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
    # At most one entry, DAEMON_ID; absent until the first drain.
    daemon: dict[str, Daemon] = {}
    # The highest run number given to each pipeline name: kept here, not derived from
    # the workstreams, so that a number is never given twice even once its run is gone.
    run_numbers: dict[str, int] = {}

    def draining(self) -> bool:
        """An operator drained the daemon: no task starts anywhere."""
        d = self.daemon.get(DAEMON_ID)
        return d is not None and d.state == DaemonState.DRAINING


def full_task_id(ws_id: str, task_id: str) -> str:
    """A task's full name, `WS/TASK` (ids never hold a `/`, so it splits back at once)."""
    return f"{ws_id}/{task_id}"


_ATTEMPT_FIELDS: Final = frozenset(Attempt.__struct_fields__)
# Keys a record's `changes` may carry, by entity; `state` is set from `to` alone.
_FIELDS: Final[dict[str, frozenset[str]]] = {
    "task": frozenset(Task.__struct_fields__) - {"id", "state", "workstream_id"}
    | {"attempt", "attempt_update"},
    "workstream": frozenset(Workstream.__struct_fields__) - {"id", "state", "task_ids"}
    | {"workstream", "tasks", "archive"},
    "worker": frozenset(Worker.__struct_fields__) - {"id", "state"},
    "resource": frozenset(Resource.__struct_fields__) - {"id", "state"},
    "daemon": frozenset(Daemon.__struct_fields__) - {"id", "state"},
}


# Lookup tables for the hot path of `apply` (every replay runs it once per record).
_ENTITY_ATTR: Final[dict[str, str]] = {
    "task": "tasks",
    "workstream": "workstreams",
    "worker": "workers",
    "resource": "resources",
    "daemon": "daemon",
}
_TASK_STATE: Final = {s.value: s for s in TaskState}
_WORKSTREAM_STATE: Final = {s.value: s for s in WorkstreamState}
_WORKER_STATE: Final = {s.value: s for s in WorkerState}
_DAEMON_STATE: Final = {s.value: s for s in DaemonState}
# Task change keys that are not a plain field assignment.
_TASK_SPECIAL: Final = frozenset({"attempt", "attempt_update", "depends_on"})
# entity -> (its StateData attribute, its transition table, the keys its changes may carry)
_ENTITY_INFO: Final = {e: (_ENTITY_ATTR[e], TABLES[e], _FIELDS[e]) for e in _ENTITY_ATTR}
_convert = msgspec.convert


class State:
    """The durable data plus the derived indexes (graph) kept in step by `apply`."""

    __slots__ = ("data", "graph")

    def __init__(self, data: StateData | None = None) -> None:
        self.data = data if data is not None else StateData()
        self.graph = Graph()
        self.graph.rebuild(self.data.tasks.values(), self.data.tasks)

    @property
    def last_seq(self) -> int:
        return self.data.last_seq

    def current(self, entity: Entity, id_: str) -> str | None:
        """The state name of an entity, or None when it does not exist."""
        obj = getattr(self.data, _ENTITY_ATTR[entity]).get(id_)
        return None if obj is None else str(obj.state)

    def check(self, rec: Transition) -> None:
        """Raise IllegalTransition unless `rec` is legal now; never changes anything."""
        self._check(rec)

    def _check(self, rec: Transition) -> Any:
        """`check`, returning the entity's object (None when the record creates it), so
        that `apply` need not look it up again; replay runs this once per record."""
        entity, from_, to = rec.entity, rec.from_, rec.to
        data = self.data
        if rec.seq != data.last_seq + 1:
            raise IllegalTransition(
                entity, rec.id, from_, to, f"seq {rec.seq} after {data.last_seq}"
            )
        attr, table, fields = _ENTITY_INFO[entity]
        obj = getattr(data, attr).get(rec.id)
        # A StrEnum state compares equal to its name, so no conversion is needed here.
        actual = None if obj is None else obj.state
        if actual != from_:
            raise IllegalTransition(entity, rec.id, from_, to, f"it is {actual}")
        allowed = table.get(from_)
        if allowed is None or to not in allowed:
            raise IllegalTransition(entity, rec.id, from_, to, "not in the table")
        changes = rec.changes
        if from_ is None:
            if entity == "task":
                # The table's None -> pending is the creation record of the task's workstream.
                raise IllegalTransition(
                    "task", rec.id, None, to, "created only with its workstream"
                )
            if entity == "workstream":
                if "workstream" not in changes or "tasks" not in changes:
                    raise IllegalTransition(entity, rec.id, None, to, "creation without tasks")
                tasks = data.tasks
                for t in changes["tasks"]:
                    if t["id"] in tasks:
                        raise IllegalTransition(entity, rec.id, None, to, f"task {t['id']} exists")
        if changes:
            if not fields.issuperset(changes):
                for key in changes:
                    if key not in fields:
                        raise IllegalTransition(entity, rec.id, from_, to, f"unknown field {key!r}")
            # Only tasks have "attempt_update" among their fields, and a task exists here.
            if "attempt_update" in changes and not obj.attempts:
                raise IllegalTransition(entity, rec.id, from_, to, "no attempt to update")
        if to == RETIRED and entity == "workstream":
            why = self.retire_problem(rec.id)
            if why is not None:
                raise IllegalTransition(entity, rec.id, from_, to, why)
        return obj

    def retire_problem(self, ws_id: str) -> str | None:
        """Why workstream `ws_id` may not leave the state now (a task of it runs, or a
        worker still names one), or None."""
        if self.graph.ws_counts.get(ws_id, {}).get("running"):
            return "a task of it is running"
        tasks = self.data.tasks
        for w in self.data.workers.values():
            if w.task_id is not None:
                t = tasks.get(w.task_id)
                if t is not None and t.workstream_id == ws_id:
                    return f"worker {w.id} still names its task {t.id}"
        return None

    def apply(self, rec: Transition) -> None:
        """Check and perform one transition; an illegal one raises and changes nothing."""
        self.apply_checked(rec, self._check(rec))

    def check_entity(self, rec: Transition) -> Any:
        """`check`, returning what `apply_checked` needs (the engine checks, writes the
        record to the log, then applies: one check instead of two on its hot path)."""
        return self._check(rec)

    def apply_checked(self, rec: Transition, obj: Any) -> None:
        """Perform `rec`, which `check_entity` just passed (returning `obj`), nothing else
        having changed the state in between."""
        entity = rec.entity
        # Tasks make two thirds of a log's records: their case is written out here
        # rather than in a method of its own.
        if entity == "task":
            old = obj.state
            special = _TASK_SPECIAL
            for key, value in rec.changes.items():
                if key not in special:
                    setattr(obj, key, value)
                elif key == "attempt":
                    obj.attempts.append(_convert(value, Attempt))
                elif key == "attempt_update":
                    last = obj.attempts[-1]
                    for akey, avalue in value.items():
                        if akey in _ATTEMPT_FIELDS:
                            setattr(last, akey, avalue)
                else:
                    self.graph.set_dependencies(obj, list(value), self.data.tasks)
            to = rec.to
            if to != old:
                obj.state = _TASK_STATE[to]
                self.graph.on_task_state(obj, old, self.data.tasks)
        elif entity == "worker":
            if obj is None:
                obj = self.data.workers[rec.id] = Worker(id=rec.id)
            for key, value in rec.changes.items():
                setattr(obj, key, value)
            obj.state = _WORKER_STATE[rec.to]
        elif entity == "workstream":
            self._apply_workstream(rec)
        elif entity == "daemon":
            self._apply_daemon(rec)
        else:
            self._apply_resource(rec)
        self.data.last_seq = rec.seq

    def _apply_workstream(self, rec: Transition) -> None:
        if rec.to == RETIRED:
            self._retire_workstream(rec.id)
            return
        if rec.from_ is None:
            ws = msgspec.convert(rec.changes["workstream"], Workstream)
            tasks = msgspec.convert(rec.changes["tasks"], list[Task])
            ws.task_ids = [t.id for t in tasks]
            self.data.workstreams[ws.id] = ws
            if ws.name is not None and ws.number is not None:
                runs = self.data.run_numbers
                runs[ws.name] = max(runs.get(ws.name, 0), ws.number)
            for t in tasks:
                self.data.tasks[t.id] = t
            self.graph.add_tasks(tasks, self.data.tasks)
            return
        ws = self.data.workstreams[rec.id]
        for key, value in rec.changes.items():
            setattr(ws, key, value)
        ws.state = _WORKSTREAM_STATE[rec.to]

    def _retire_workstream(self, ws_id: str) -> None:
        """The workstream and its tasks leave the state (and the graph); `run_numbers`
        keeps its number, so NAME-N is never given again."""
        ws = self.data.workstreams.pop(ws_id)
        tasks = self.data.tasks
        gone = [t for tid in ws.task_ids if (t := tasks.pop(tid, None)) is not None]
        self.graph.forget(gone, ws_id)

    def _apply_daemon(self, rec: Transition) -> None:
        d = self.data.daemon.get(rec.id)
        if d is None:
            d = self.data.daemon[rec.id] = Daemon(id=rec.id)
        for key, value in rec.changes.items():
            setattr(d, key, value)
        d.state = _DAEMON_STATE[rec.to]

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
    """True when two states hold the same data (dict order aside).

    Structs compare field by field with ==. Comparing encodings would not do: msgspec's
    omit_defaults drops a default by identity, so a float equal to its default (600.0 read
    back from a log) is written while the default object itself is not."""
    return a == b
