"""Messages between the daemon and a worker agent, and their framing. Pure: no I/O.

A frame is a 4-byte big-endian length followed by a msgpack body. The agent speaks it on
its stdin/stdout, so the same agent can run over any byte stream (a pipe today, an
`ssh -T host … agent` tomorrow). Every message about an attempt carries its attempt id; a
message for an attempt the daemon already gave up is recorded as an event, never acted on.
"""

from __future__ import annotations

import struct
from typing import Final

import msgspec

from supervisor.core.model import Rlimits

MAX_FRAME: Final = 4 * 1024 * 1024
_LEN = struct.Struct(">I")


# --- daemon -> agent -------------------------------------------------------------------


class Run(msgspec.Struct, tag=True, kw_only=True):
    """Run one attempt: the command in its own session, output appended to log_path."""

    attempt_id: str
    task_id: str
    number: int
    command: list[str] | str
    cwd: str | None = None
    env: dict[str, str] = {}
    validate: list[str] | str | None = None
    rlimits: Rlimits | None = None
    log_path: str
    # The attempt's own cgroup (containment "cgroup"): the agent makes it, starts every
    # step inside it, kills it whole and removes it at the attempt's end.
    cgroup: str | None = None
    # The task logs live with the daemon, not on the agent's host (a worker on another
    # host): the agent sends the attempt's output (headers included) in Output frames
    # instead of writing log_path.
    stream_output: bool = False


class Kill(msgspec.Struct, tag=True, kw_only=True):
    """Kill the attempt's whole tree: SIGTERM to its group, SIGKILL after grace_s, a sweep."""

    attempt_id: str
    grace_s: float
    reason: str


class Stop(msgspec.Struct, tag=True, kw_only=True):
    """Kill any running attempt (as Kill) and exit."""

    grace_s: float


class Lease(msgspec.Struct, tag=True, kw_only=True):
    """The daemon is still there. Sent to an agent at least every heartbeat interval;
    every frame from the daemon renews the leases of the agent's attempts, and an
    attempt's shim that hears nothing for `agent_lease_s` kills the attempt's tree
    (fencing: a partitioned or stopped agent never runs an attempt the daemon has
    given up)."""


class Sweep(msgspec.Struct, tag=True, kw_only=True):
    """The first frame to a newly started agent: the attempts the daemon lists as live
    on the agent's host. The agent kills every process marked with any other attempt id
    before it runs anything, and answers with Swept."""

    live: list[str] = []


# --- agent -> daemon -------------------------------------------------------------------


class Hello(msgspec.Struct, tag=True, kw_only=True):
    """The agent is up: its pid and identity (start ticks since boot)."""

    worker_id: str
    pid: int
    create_time: float = 0.0
    start_ticks: int | None = None


class Heartbeat(msgspec.Struct, tag=True, kw_only=True):
    """The agent is alive, with its own figures (the daemon cannot probe a process on
    another host): pid, identity, CPU percent since the last beat, resident memory."""

    attempt_id: str | None = None
    pid: int | None = None
    start_ticks: int | None = None
    cpu_percent: float | None = None
    rss_bytes: int | None = None


class Swept(msgspec.Struct, tag=True, kw_only=True):
    """The answer to Sweep: attempts found alive that the daemon did not list (and were
    killed), with the pids killed and those that outlived the kill."""

    killed: list[str] = []
    pids: list[int] = []
    survivors: tuple[tuple[int, int], ...] = ()


class Output(msgspec.Struct, tag=True, kw_only=True):
    """A piece of an attempt's output, from an agent whose task logs live with the
    daemon (a worker on another host): appended to the attempt's log_path there."""

    attempt_id: str
    data: bytes


class Started(msgspec.Struct, tag=True, kw_only=True):
    """The attempt's command runs: `pid` leads process group `pid`."""

    attempt_id: str
    pid: int
    create_time: float = 0.0
    start_ticks: int | None = None


class Finished(msgspec.Struct, tag=True, kw_only=True):
    """The attempt is over and no process of its tree is left (but `survivors`).

    phase is "spawn" (the command could not start), "command" (it exited non-zero or by a
    signal), "validate" (the command succeeded, its validate step did not) or "done".
    `killed` is true when the tree was killed on a Kill or Stop request."""

    attempt_id: str
    phase: str
    exit_code: int | None = None
    signal: int | None = None
    validate_exit_code: int | None = None
    killed: bool = False
    message: str | None = None
    # The command's pid and identity when no Started was sent (it ended that quickly).
    pid: int | None = None
    create_time: float | None = None
    start_ticks: int | None = None
    # Processes of the attempt that outlived its kill or sweep, as (pid, start ticks).
    survivors: tuple[tuple[int, int], ...] = ()
    # Read from the attempt's cgroup at its end: CPU time and, with the memory
    # controller, peak memory.
    cpu_s: float | None = None
    memory_peak_bytes: int | None = None
    # The attempt's shim killed its tree on its own: its lease ran out or its agent went
    # away. Such a Finished is only ever late (the daemon gave the attempt up first).
    fenced: bool = False


ToAgent = Run | Kill | Stop | Lease | Sweep
FromAgent = Hello | Heartbeat | Started | Finished | Swept | Output

_encoder = msgspec.msgpack.Encoder()
to_agent_decoder: Final = msgspec.msgpack.Decoder(ToAgent)
from_agent_decoder: Final = msgspec.msgpack.Decoder(FromAgent)


def frame(msg: ToAgent | FromAgent) -> bytes:
    """One message as a length-prefixed frame."""
    body = _encoder.encode(msg)
    return _LEN.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    """The body length announced by a 4-byte header; refuses oversized frames."""
    n = int(_LEN.unpack(header)[0])
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
    return n
