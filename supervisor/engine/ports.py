"""The engine's two seams, as protocols: the durable store it appends to and the pool of
worker agents it drives. The real ones are store/directory.py's Store and
workers/pool.py's Pool; tests/fakes.py has an in-memory store and a fake pool that
implement the same protocols, so the whole loop runs in-process in tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from supervisor.core import wire
from supervisor.core.config import HostConfig
from supervisor.core.context import Files
from supervisor.core.effects import OldAgent, TaskTree
from supervisor.core.model import Event, State, Transition

# Processes that outlived a kill, as (pid, start ticks).
Survivors = tuple[tuple[int, int], ...]


class Durable(Files, Protocol):
    """The state directory as the engine uses it."""

    @property
    def written_seq(self) -> int: ...

    @property
    def synced_seq(self) -> int: ...

    def write_batch(self, recs: Sequence[Transition]) -> None:
        """Append all of `recs` or none (StoreWriteError)."""

    def sync(self) -> None:
        """Make every record written so far durable (StoreFsyncError: never retried)."""

    def append_event(self, event: Event) -> None: ...

    def append_intervention(self, line: dict[str, Any]) -> list[Path]:
        """Append a line; the rotated files removed to make room (said by the caller)."""

    def write_snapshot(self, state: State) -> Path: ...

    def write_checkpoint(self, ws_id: str, state: State) -> Path: ...

    def snapshot_blob(self, state: State) -> Any:
        """`state` encoded now, on the loop (between steps); `install_snapshot` writes it."""

    def install_snapshot(self, blob: Any) -> Path:
        """Make `blob` current.json (after a sync), in any thread."""

    def checkpoint_blob(self, ws_id: str, state: State) -> Any:
        """A workstream's checkpoint encoded now, on the loop."""

    def install_checkpoint(self, blob: Any) -> Path:
        """Write an encoded checkpoint, in any thread."""

    def append_worker_log(self, worker_id: str, lines: Sequence[tuple[float, str]]) -> None:
        """Append timestamped lines to a worker's log, rotated at its size, in any thread
        (OSError: not written)."""

    def write_json(self, relpath: str, obj: object) -> None: ...


class Agents(Protocol):
    """The worker agents' processes."""

    async def spawn(
        self,
        worker_id: str,
        host: HostConfig | None = None,
        *,
        lease_s: float = 0.0,
        kill_grace_s: float | None = None,
    ) -> int:
        """Start an agent for `worker_id` (on `host`, through its transport, with leases
        of `lease_s` and a kill grace of `kill_grace_s`, the pool's by default); its
        generation (OSError when it cannot)."""
        ...

    def renew(self, worker_id: str, on: bool) -> None:
        """Keep sending a remote agent Lease frames (`on`), or stop."""
        ...

    async def send(self, worker_id: str, msg: wire.ToAgent) -> bool: ...

    def identity(self, worker_id: str) -> tuple[int, int] | None:
        """(pid, start ticks) of the worker's running agent, if there is one."""
        ...

    async def kill(
        self, worker_id: str, *, task_tree: TaskTree | None, grace_s: float
    ) -> Survivors:
        """Kill the attempt's tree, then the agent; what of the tree survived."""
        ...

    async def stop(self, worker_id: str, grace_s: float, *, kill: bool = True) -> bool:
        """Ask the agent to stop; True when it exited by itself within the grace."""
        ...

    async def kill_old_life(
        self, agents: list[OldAgent], trees: list[TaskTree], grace_s: float
    ) -> dict[str, Survivors]:
        """Kill a previous life's attempt trees and then its agents, all within one grace;
        the survivors by attempt marker."""
        ...

    async def kill_survivors(self, survivors: Survivors) -> Survivors:
        """SIGKILL again what outlived a kill (if still the same processes); those left."""
        ...

    def shutdown_recorded(self) -> None:
        """Every worker's shutdown is durable: agents that do not stop may be killed."""
        ...
