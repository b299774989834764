"""What a step asks the world to do, carried out by engine/effects.py only once the records
that justify it are durable (the write-ahead rule). Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

import msgspec

from supervisor.core import wire
from supervisor.core.model import Cause, Event, Transition


class TaskTree(msgspec.Struct, frozen=True):
    """How to find an attempt's processes: its group and leader (pid + start ticks, so a
    reused pid is never signalled) and the marker its environment carries.
    `legacy_create_time` is the epoch create time of a record from before start ticks."""

    pgid: int
    pid: int
    start_ticks: int | None
    marker: str
    legacy_create_time: float | None = None
    # The attempt's cgroup when it has one: then a kill is that cgroup's, whole.
    cgroup: str | None = None


class OldAgent(msgspec.Struct, frozen=True):
    """An agent of the daemon's previous life, as its worker record had it: pid and
    start ticks (or a legacy epoch create time), and the attempt it ran, if any."""

    worker_id: str
    pid: int
    start_ticks: int | None
    legacy_create_time: float | None = None
    attempt_id: str | None = None
    # A remote worker's: the pid is its transport's, here; its attempt is on its host,
    # fenced there by its lease, and nothing under the transport is swept from here.
    remote: bool = False


class Send(msgspec.Struct, tag=True):
    """Send `msg` to the worker's agent."""

    worker_id: str
    msg: wire.ToAgent


class KillTree(msgspec.Struct, tag=True):
    """Kill the attempt's tree and then the worker's agent from the daemon, then report
    TreeKilled with any survivors (the agent cannot be asked: it is gone or wedged)."""

    worker_id: str
    attempt_id: str
    tree: TaskTree
    grace_s: float


class Spawn(msgspec.Struct, tag=True):
    """Start an agent for `worker_id` after `delay_s`, unless by then the worker was
    retired or restarted again (its `restarts` count moved on). `host` names its
    [[workers.hosts]] table ("" = this host): the agent starts through its transport,
    with leases of `lease_s` and a kill grace of `kill_grace_s` (those the worker's record
    holds, which the lease rule counts on)."""

    worker_id: str
    restarts: int
    delay_s: float = 0.0
    host: str = ""
    lease_s: float = 0.0
    kill_grace_s: float | None = None


class Renew(msgspec.Struct, tag=True):
    """Keep renewing the leases of a remote agent's attempts (`on`), or stop: the pool's
    keepalive sends an agent Lease frames only while its worker is not unresponsive, so
    its shims fence within agent_lease_s of the verdict."""

    worker_id: str
    on: bool


class Retire(msgspec.Struct, tag=True):
    """Stop the worker's agent (asked first when `graceful`), kill it and the attempt's
    tree, report TreeKilled for `attempt_id`, then Retired, then Replace when `replace`.

    `remote`: the attempt's tree is on another host, out of the daemon's reach. TreeKilled
    is then reported only if the agent, asked to stop, exited by itself (it kills its
    attempt first); else the lease rule (core/fencing.py) settles the attempt."""

    worker_id: str
    grace_s: float
    graceful: bool
    tree: TaskTree | None = None
    attempt_id: str | None = None
    replace: bool = True
    same_id: bool = False
    cause: Cause = "operator"
    remote: bool = False


class KillStarting(msgspec.Struct, tag=True):
    """Kill an agent that never said hello, if the worker is still at start `restarts`."""

    worker_id: str
    restarts: int
    grace_s: float


class CheckSurvivors(msgspec.Struct, tag=True):
    """SIGKILL again what survived a kill of the task's attempt (the task's `survivors`
    record says which and why), then report SurvivorsChecked."""

    task_id: str
    survivors: tuple[tuple[int, int], ...]


class Emit(msgspec.Struct, tag=True):
    """Publish an event: events.jsonl, the journal and every follower."""

    event: Event


class Note(msgspec.Struct, tag=True):
    """A line for the worker's own log, logs/workers/<id>.log."""

    worker_id: str
    ts: float
    text: str


class Archive(msgspec.Struct, tag=True):
    """Write archive/<ws>.json (a workstream that failed)."""

    workstream_id: str
    payload: dict[str, Any]


class WriteArchive(msgspec.Struct, tag=True):
    """Write archive/<ws>.tar.gz: `document` (the workstream, its tasks and their attempts
    as JSON, encoded in the step that decided it) with the workstream's checkpoints and
    task logs; then report Archived. Nothing is deleted yet."""

    workstream_id: str
    document: bytes


class DropFiles(msgspec.Struct, tag=True):
    """The workstream's retirement is durable: delete its checkpoints and task logs (its
    archive holds them)."""

    workstream_id: str


class Published(msgspec.Struct, tag=True):
    """Hand a step's records, now durable, to the followers of transitions (`ws_follow`).
    The engine adds it to a step while someone follows; the rules never ask for it."""

    records: list[Transition]


Effect = (
    Send
    | KillTree
    | Spawn
    | Renew
    | Retire
    | KillStarting
    | CheckSurvivors
    | Emit
    | Note
    | Archive
    | WriteArchive
    | DropFiles
    | Published
)
