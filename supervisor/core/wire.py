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


class Kill(msgspec.Struct, tag=True, kw_only=True):
    """Kill the attempt's whole tree: SIGTERM to its group, SIGKILL after grace_s, a sweep."""

    attempt_id: str
    grace_s: float
    reason: str


class Stop(msgspec.Struct, tag=True, kw_only=True):
    """Kill any running attempt (as Kill) and exit."""

    grace_s: float


# --- agent -> daemon -------------------------------------------------------------------


class Hello(msgspec.Struct, tag=True, kw_only=True):
    """The agent is up: its pid and identity (start ticks since boot)."""

    worker_id: str
    pid: int
    create_time: float = 0.0
    start_ticks: int | None = None


class Heartbeat(msgspec.Struct, tag=True, kw_only=True):
    attempt_id: str | None = None


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


ToAgent = Run | Kill | Stop
FromAgent = Hello | Heartbeat | Started | Finished

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
