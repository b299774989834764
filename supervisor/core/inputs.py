"""What the engine's loop takes in: one typed message per thing that happened. Pure: no I/O.

The workers side sends agent messages and exits; the effects the engine carried out report
back (a tree killed, a spawn done or failed, a retirement finished); the health probes send
their report. Operator requests arrive as calls of the loop (engine/loop.py), which carry
a reply.
"""

from __future__ import annotations

import msgspec

from supervisor.core import wire
from supervisor.core.model import Cause


class AgentMessage(msgspec.Struct, tag=True):
    """A message from agent process `generation` of worker `worker_id`."""

    worker_id: str
    generation: int
    msg: wire.FromAgent


class AgentExited(msgspec.Struct, tag=True):
    """Agent process `generation` of worker `worker_id` has exited (after its last message)."""

    worker_id: str
    generation: int
    returncode: int | None


class TreeKilled(msgspec.Struct, tag=True):
    """The daemon itself killed an attempt's tree (the agent could not be asked to);
    `survivors` are the processes, as (pid, start ticks), that outlived the kill."""

    worker_id: str
    attempt_id: str
    survivors: tuple[tuple[int, int], ...] = ()


class SurvivorsChecked(msgspec.Struct, tag=True):
    """The survivors of a task's kill were checked (and SIGKILLed again): those left."""

    task_id: str
    left: tuple[tuple[int, int], ...]


class Spawned(msgspec.Struct, tag=True):
    """An agent process was started for `worker_id` as `generation`, with that pid and
    start ticks (0 when unknown)."""

    worker_id: str
    generation: int
    pid: int = 0
    start_ticks: int | None = None


class SpawnFailed(msgspec.Struct, tag=True):
    """An agent process could not even be started."""

    worker_id: str
    message: str


class Retired(msgspec.Struct, tag=True):
    """A retired worker's agent has been killed (or has stopped): its identity may leave
    the record."""

    worker_id: str


class Replace(msgspec.Struct, tag=True):
    """A retired worker's processes are gone: start its successor (`same_id`: under the
    same id, else a new one)."""

    worker_id: str
    same_id: bool
    cause: Cause


class Archived(msgspec.Struct, tag=True):
    """The archive of a workstream that retention (or an operator) retires is written and
    durable (`error` None), or could not be written (`error` says why)."""

    workstream_id: str
    path: str = ""
    error: str | None = None


class Probe(msgspec.Struct, kw_only=True, omit_defaults=True):
    """psutil's view of one worker's agent process."""

    pid: int
    ok: bool
    status: str
    checked_at: float = 0.0
    cpu_percent: float | None = None
    rss_bytes: int | None = None
    open_fds: int | None = None
    threads: int | None = None


class HealthReport(msgspec.Struct, tag=True):
    """One round of health probes; `stalled` when the daemon itself was held up."""

    probes: dict[str, Probe]
    stalled: bool = False


Input = (
    AgentMessage
    | AgentExited
    | TreeKilled
    | SurvivorsChecked
    | Spawned
    | SpawnFailed
    | Retired
    | Replace
    | HealthReport
    | Archived
)
