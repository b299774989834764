"""Fakes for the engine's seams (STYLE.md habit 3): a clock, an in-memory store implementing
`engine.ports.Durable` and a pool of pretend agents implementing `engine.ports.Agents`.

They hold no logic of their own beyond what the real ones promise: the store appends a
batch whole or not at all and keeps every record, event and derived file in lists and
dicts; the pool hands out increasing generations and reports what its agents "say"
through the engine's inbox, using the same input types (`core.inputs`) as workers/pool.py.
What an agent says and when is up to the test (`start`, `finish`, `die`, or a script).
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import msgspec

from supervisor.core import wire
from supervisor.core.config import HostConfig
from supervisor.core.effects import OldAgent, TaskTree
from supervisor.core.errors import StoreFsyncError, StoreWriteError
from supervisor.core.inputs import AgentExited, AgentMessage, Input
from supervisor.core.model import Event, State, StateData, Transition
from supervisor.store.snapshot import checkpoint_doc

# --- time ---------------------------------------------------------------------------------


class FakeClock:
    """A monotonic clock and a wall clock that move only when told. `advance` moves both
    (time passes); `step_wall` moves the wall clock alone (an NTP step, a VM resume)."""

    def __init__(self, now: float = 1000.0, wall: float = 1_700_000_000.0) -> None:
        self.now = now
        self.wall = wall

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.wall

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock never goes back")
        self.now += seconds
        self.wall += seconds

    def step_wall(self, seconds: float) -> None:
        self.wall += seconds


# --- the store ----------------------------------------------------------------------------


class MemoryStore:
    """`engine.ports.Durable` in memory. Records, events and interventions are lists;
    snapshots, checkpoints and JSON files are dicts of builtins. Nothing touches the disk:
    the log paths are names under `root`, and `tail` reads `files` (what a test put there).

    `fail_writes` (True) makes every `write_batch` raise StoreWriteError with nothing
    appended, as the real store does after cutting a failed append back;
    `fail_next_writes(n)` does so for the next `n` batches only. `fail_sync` makes `sync`
    raise StoreFsyncError."""

    def __init__(self, root: Path | str = "/nonexistent/orchd-memory") -> None:
        self.root = Path(root)
        self.records: list[Transition] = []
        self.events: list[Event] = []
        self.interventions: list[dict[str, Any]] = []
        self.snapshots: list[dict[str, Any]] = []
        self.checkpoints: dict[str, dict[int, dict[str, Any]]] = {}
        self.json_files: dict[str, Any] = {}
        self.files: dict[Path, list[str]] = {}
        self.fail_writes = False
        self.fail_sync = False
        self.refused = 0  # batches refused so far
        self._fail_countdown = 0
        self._written = 0
        self._synced = 0
        self._repairs: list[str] = []

    # -- Files -----------------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self.root

    @property
    def repairs(self) -> list[str]:
        return self._repairs

    def task_log_path(self, task_id: str) -> Path:
        return self.root / "logs" / f"{task_id}.log"

    def worker_log_path(self, worker_id: str) -> Path:
        return self.root / "logs" / "workers" / f"{worker_id}.log"

    def tail(self, path: Path, lines: int) -> list[str]:
        text = self.files.get(Path(path), [])
        return text[-lines:] if lines > 0 else []

    def read_events(self, *, after_line: int = 0) -> list[Event]:
        return list(self.events[after_line:])

    def list_checkpoints(self, ws_id: str) -> list[int]:
        return sorted(self.checkpoints.get(ws_id, {}))

    def read_checkpoint(self, ws_id: str, which: int | Literal["latest"]) -> dict[str, Any]:
        kept = self.checkpoints.get(ws_id, {})
        seq = max(kept, default=None) if which == "latest" else which
        if seq is None or seq not in kept:
            raise FileNotFoundError(f"no checkpoint {which!r} of {ws_id}")
        return dict(kept[seq])

    # -- the log ---------------------------------------------------------------------------

    @property
    def written_seq(self) -> int:
        return self._written

    @property
    def synced_seq(self) -> int:
        return self._synced

    def fail_next_writes(self, n: int) -> None:
        """Refuse the next `n` batches (then take writes again)."""
        self._fail_countdown = n

    def write_batch(self, recs: Sequence[Transition]) -> None:
        """Append all of `recs` or none: ValueError when their seqs do not follow on,
        StoreWriteError when writes are refused (nothing appended either way)."""
        for i, rec in enumerate(recs):
            if rec.seq != self._written + 1 + i:
                raise ValueError(f"record seq {rec.seq} does not follow {self._written + i}")
        if self.fail_writes or self._fail_countdown > 0:
            self._fail_countdown = max(0, self._fail_countdown - 1)
            self.refused += 1
            raise StoreWriteError(f"[Errno {errno.ENOSPC}] No space left on device (fake)")
        # A copy: the machine must not be able to change what is "on disk".
        self.records.extend(msgspec.structs.replace(r, changes=_deep(r.changes)) for r in recs)
        self._written += len(recs)

    def sync(self) -> None:
        if self.fail_sync:
            raise StoreFsyncError("fdatasync failed (fake)")
        self._synced = self._written

    def replay(self) -> State:
        """A fresh state with every record applied in order (what a restart would load)."""
        state = State()
        for rec in self.records:
            state.apply(msgspec.structs.replace(rec, changes=_deep(rec.changes)))
        return state

    # -- side files ------------------------------------------------------------------------

    def append_event(self, event: Event) -> None:
        self.events.append(event)

    def append_intervention(self, line: dict[str, Any]) -> list[Path]:
        self.interventions.append(dict(line))
        return []

    def events_cut(self) -> MemoryCut:
        return MemoryCut([msgspec.json.encode(e) for e in self.events])

    def interventions_cut(self) -> MemoryCut:
        return MemoryCut([msgspec.json.encode(i) for i in self.interventions])

    def worker_log_cut(self, worker_id: str) -> MemoryCut:
        lines = self.files.get(self.worker_log_path(worker_id), [])
        return MemoryCut([line.encode() for line in lines])

    def append_worker_log(self, worker_id: str, lines: Sequence[tuple[float, str]]) -> None:
        self.files.setdefault(self.worker_log_path(worker_id), []).extend(text for _, text in lines)

    def snapshot_blob(self, state: State) -> tuple[int, dict[str, Any]]:
        if state.last_seq > self._written:
            raise ValueError(f"state at seq {state.last_seq} is ahead of the log")
        return state.last_seq, msgspec.to_builtins(state.data)

    def install_snapshot(self, blob: tuple[int, dict[str, Any]]) -> Path:
        self._synced = self._written  # a snapshot never covers records that are not durable
        self.snapshots.append(blob[1])
        return self.root / "current.json"

    def checkpoint_blob(self, ws_id: str, state: State) -> tuple[str, int, dict[str, Any]]:
        return ws_id, state.last_seq, checkpoint_doc(ws_id, state, 0.0)

    def install_checkpoint(self, blob: tuple[str, int, dict[str, Any]]) -> Path:
        ws_id, seq, doc = blob
        self.checkpoints.setdefault(ws_id, {})[seq] = doc
        return self.root / "checkpoints" / f"{ws_id}_{seq}.json"

    def write_snapshot(self, state: State) -> Path:
        if state.last_seq > self._written:
            raise ValueError(f"state at seq {state.last_seq} is ahead of the log")
        self._synced = self._written  # a snapshot never covers records that are not durable
        self.snapshots.append(msgspec.to_builtins(state.data))
        return self.root / "current.json"

    def write_checkpoint(self, ws_id: str, state: State) -> Path:
        doc = checkpoint_doc(ws_id, state, 0.0)
        self.checkpoints.setdefault(ws_id, {})[state.last_seq] = doc
        return self.root / "checkpoints" / f"{ws_id}_{state.last_seq}.json"

    def write_json(self, relpath: str, obj: object) -> None:
        self.json_files[relpath] = msgspec.to_builtins(obj)

    def snapshot_data(self, i: int = -1) -> StateData:
        """A kept snapshot decoded back into state data."""
        return msgspec.convert(self.snapshots[i], StateData)


class MemoryCut:
    """A LineCut over lines held in memory (MemoryStore's side files)."""

    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines

    def reverse_lines(self) -> Iterator[bytes]:
        return reversed(self.lines)

    def tail(self, n: int) -> list[bytes]:
        return self.lines[-n:] if n > 0 else []

    def close(self) -> None:
        pass


def _deep(value: Any) -> Any:
    return msgspec.json.decode(msgspec.json.encode(value))


# --- the pool -----------------------------------------------------------------------------


class Postbox(Protocol):
    """Where the pool posts what its agents say: the engine's inbox (an anyio memory
    object stream) or, for tests that drive the machine directly, a list-backed box."""

    def send_nowait(self, item: Any) -> None: ...


class ListBox:
    """A Postbox that keeps what is posted, in order, for the test to take."""

    def __init__(self) -> None:
        self.items: list[Input] = []

    def send_nowait(self, item: Any) -> None:
        self.items.append(item)

    def take(self) -> list[Input]:
        out, self.items = self.items, []
        return out

    def __len__(self) -> int:
        return len(self.items)


class FakePool:
    """`engine.ports.Agents` with pretend agents (see the module docstring).

    - `spawn` gives the worker a new generation; unless `hello_on_spawn` is False, the
      agent says Hello at once. `spawn_failures` (a countdown) makes the next spawns raise
      OSError, as a failing fork does.
    - `send(Run)` records the run in `runs` and as the worker's `current` attempt; the test
      then calls `start` / `finish`. `send(Kill)` records it in `kills_sent` and, with
      `answer_kill` (the default), the agent kills the attempt and reports it Finished,
      killed. `send(Stop)` stops the agent: it exits, an AgentExited is posted.
      `send(Sweep)` (a remote agent's first frame) is answered by an empty Swept unless
      `answer_sweep` is False.
    - `kill` and `stop` record the call and make the agent exit (AgentExited).
    - `die(worker)` is an agent that dies on its own.
    Messages go to `inbox` tagged with the generation, like the real pool's."""

    def __init__(self, inbox: Postbox) -> None:
        self.inbox = inbox
        self._generations = itertools.count(1)
        self.alive: dict[str, int] = {}  # worker id -> generation of its live agent
        self.pids: dict[str, int] = {}
        self.current: dict[str, wire.Run] = {}
        self.runs: list[tuple[str, wire.Run]] = []
        self.kills_sent: list[tuple[str, wire.Kill]] = []
        self.spawns: list[tuple[str, int]] = []
        self.kill_calls: list[tuple[str, TaskTree | None]] = []
        self.stop_calls: list[str] = []
        self.killed_trees: list[TaskTree] = []
        self.killed_old_agents: list[OldAgent] = []
        # What a kill of the tree with this marker leaves alive, as (pid, start ticks).
        self.survivors: dict[str, tuple[tuple[int, int], ...]] = {}
        # Survivors still alive when checked again (CheckSurvivors).
        self.stuck: set[tuple[int, int]] = set()
        self.may_kill = False
        self.sent: list[tuple[str, wire.ToAgent]] = []
        self.renewals: list[tuple[str, bool]] = []
        self.hello_on_spawn = True
        self.answer_kill = True
        self.answer_sweep = True  # a remote agent's Sweep is answered at once (nothing found)
        self.spawn_failures = 0
        self.on_run: Callable[[str, wire.Run], None] | None = None
        self._pids = itertools.count(4000)

    # -- the protocol ------------------------------------------------------------------

    async def spawn(
        self,
        worker_id: str,
        host: HostConfig | None = None,
        *,
        lease_s: float = 0.0,
        kill_grace_s: float | None = None,
    ) -> int:
        return self.spawn_now(worker_id)

    def renew(self, worker_id: str, on: bool) -> None:
        self.renewals.append((worker_id, on))

    async def send(self, worker_id: str, msg: wire.ToAgent) -> bool:
        return self.send_now(worker_id, msg)

    async def kill(
        self, worker_id: str, *, task_tree: TaskTree | None, grace_s: float
    ) -> tuple[tuple[int, int], ...]:
        return self.kill_now(worker_id, task_tree)

    async def stop(self, worker_id: str, grace_s: float, *, kill: bool = True) -> bool:
        return self.stop_now(worker_id)

    async def kill_old_life(
        self, agents: list[OldAgent], trees: list[TaskTree], grace_s: float
    ) -> dict[str, tuple[tuple[int, int], ...]]:
        self.killed_old_agents.extend(agents)
        self.killed_trees.extend(trees)
        return {t.marker: self.survivors.get(t.marker, ()) for t in trees}

    async def kill_survivors(
        self, survivors: tuple[tuple[int, int], ...]
    ) -> tuple[tuple[int, int], ...]:
        return tuple(x for x in survivors if x in self.stuck)

    def shutdown_recorded(self) -> None:
        self.may_kill = True

    def identity(self, worker_id: str) -> tuple[int, int] | None:
        if worker_id not in self.alive:
            return None
        return self.pids[worker_id], 100 + self.pids[worker_id]

    # -- the same, callable without an event loop -----------------------------------------

    def spawn_now(self, worker_id: str) -> int:
        if self.spawn_failures > 0:
            self.spawn_failures -= 1
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable (fake spawn)")
        previous = self.alive.get(worker_id)
        if previous is not None:
            self._exit(worker_id, previous, -9)  # replaced while alive: the old one is gone
        gen = next(self._generations)
        self.alive[worker_id] = gen
        self.pids[worker_id] = next(self._pids)
        self.spawns.append((worker_id, gen))
        if self.hello_on_spawn:
            self.hello(worker_id)
        return gen

    def send_now(self, worker_id: str, msg: wire.ToAgent) -> bool:
        gen = self.alive.get(worker_id)
        if gen is None:
            return False
        self.sent.append((worker_id, msg))
        match msg:
            case wire.Run():
                self.runs.append((worker_id, msg))
                self.current[worker_id] = msg
                if self.on_run is not None:
                    self.on_run(worker_id, msg)
            case wire.Kill():
                self.kills_sent.append((worker_id, msg))
                run = self.current.get(worker_id)
                if self.answer_kill and run is not None and run.attempt_id == msg.attempt_id:
                    self.finish(worker_id, phase="command", killed=True, signal=15)
            case wire.Stop():
                self._exit(worker_id, gen, 0)
            case wire.Sweep():
                if self.answer_sweep:
                    self._post(worker_id, wire.Swept())
        return True

    def kill_now(self, worker_id: str, task_tree: TaskTree | None) -> tuple[tuple[int, int], ...]:
        self.kill_calls.append((worker_id, task_tree))
        gen = self.alive.get(worker_id)
        if gen is not None:
            self._exit(worker_id, gen, -15)
        return () if task_tree is None else self.survivors.get(task_tree.marker, ())

    def stop_now(self, worker_id: str) -> bool:
        self.stop_calls.append(worker_id)
        gen = self.alive.get(worker_id)
        if gen is not None:
            self._exit(worker_id, gen, 0)
        return gen is not None

    # -- what the agents say ------------------------------------------------------------

    def _post(self, worker_id: str, msg: wire.FromAgent) -> None:
        gen = self.alive.get(worker_id)
        if gen is None:
            raise AssertionError(f"{worker_id} has no live agent to say {type(msg).__name__}")
        self.inbox.send_nowait(AgentMessage(worker_id, gen, msg))

    def hello(self, worker_id: str) -> None:
        self._post(
            worker_id,
            wire.Hello(
                worker_id=worker_id,
                pid=self.pids[worker_id],
                create_time=1.0,
                start_ticks=100 + self.pids[worker_id],
            ),
        )

    def heartbeat(self, worker_id: str) -> None:
        run = self.current.get(worker_id)
        self._post(worker_id, wire.Heartbeat(attempt_id=None if run is None else run.attempt_id))

    def start(self, worker_id: str, pid: int | None = None) -> None:
        """The worker's current attempt runs (Started with a pid)."""
        run = self.current[worker_id]
        self._post(
            worker_id,
            wire.Started(
                attempt_id=run.attempt_id,
                pid=(pid := pid or next(self._pids)),
                create_time=2.0,
                start_ticks=200 + pid,
            ),
        )

    def finish(
        self,
        worker_id: str,
        *,
        phase: str = "done",
        exit_code: int | None = 0,
        killed: bool = False,
        signal: int | None = None,
    ) -> str:
        """The worker's current attempt is over; returns its attempt id."""
        run = self.current.pop(worker_id)
        if killed and exit_code == 0:
            exit_code = None
        self._post(
            worker_id,
            wire.Finished(
                attempt_id=run.attempt_id,
                phase=phase,
                exit_code=exit_code,
                signal=signal,
                killed=killed,
            ),
        )
        return run.attempt_id

    def die(self, worker_id: str, returncode: int | None = -9) -> None:
        """The worker's agent dies on its own (its attempt dies with it)."""
        gen = self.alive.get(worker_id)
        if gen is None:
            raise AssertionError(f"{worker_id} has no live agent to die")
        self._exit(worker_id, gen, returncode)

    def _exit(self, worker_id: str, gen: int, returncode: int | None) -> None:
        del self.alive[worker_id]
        self.current.pop(worker_id, None)
        self.inbox.send_nowait(AgentExited(worker_id, gen, returncode))


if TYPE_CHECKING:
    # mypy checks that the fakes implement the engine's ports.
    from supervisor.engine.ports import Agents, Durable

    _store: Durable = MemoryStore()
    _pool: Agents = FakePool(ListBox())
