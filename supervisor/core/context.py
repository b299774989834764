"""The decision context every rule works in: the state, the runtime, the settings, the
step's clocks, and the three ways a rule acts — record a transition, emit an event, ask
for an effect. Pure: no I/O, no clock reads (`now` is monotonic, `wall` goes into
records; both are set by the loop for each step).

`commit` is where the rules that follow from a transition itself live, written once:
leaving `running` clears the task's worker, pid and stopping mark, disarms its timeout
and frees its resources; a task that starts makes its workstream run; a task that ends
may decide its workstream's verdict.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

import msgspec

from supervisor.core import placement
from supervisor.core.config import Config
from supervisor.core.effects import Archive, Effect, Emit, Note
from supervisor.core.graph import held_by
from supervisor.core.model import (
    RETIRED,
    Cause,
    Entity,
    Event,
    Severity,
    State,
    Task,
    TaskState,
    Transition,
)
from supervisor.core.policy import workstream_verdict
from supervisor.core.remote import RemoteBook
from supervisor.core.runtime import Runtime
from supervisor.core.txn import Txn
from supervisor.core.views import task_view

_LEAVE_RUNNING = {"worker_id": None, "pid": None, "stopping": None}
_TERMINAL = (TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED)


class LineCut(Protocol):
    """A file and its rotated files as they were at one moment (taken in a step, read
    after it in a worker thread: store/sidelog.py)."""

    def reverse_lines(self) -> Iterator[bytes]: ...

    def tail(self, n: int) -> list[bytes]: ...

    def close(self) -> None: ...


class Files(Protocol):
    """What the rules and the operator's queries may read of the state directory. The
    cuts are taken in a step; reading them, and `tail` and `read_events`, read files:
    those run after the step, in a worker thread (control/queries.py)."""

    @property
    def state_dir(self) -> Path: ...

    @property
    def repairs(self) -> list[str]: ...

    def task_log_path(self, task_id: str) -> Path: ...

    def worker_log_path(self, worker_id: str) -> Path: ...

    def tail(self, path: Path, lines: int) -> list[str]: ...

    def read_events(self, *, after_line: int = 0) -> list[Event]: ...

    def events_cut(self) -> LineCut: ...

    def interventions_cut(self) -> LineCut: ...

    def worker_log_cut(self, worker_id: str) -> LineCut: ...

    def list_checkpoints(self, ws_id: str) -> list[int]: ...

    def read_checkpoint(self, ws_id: str, which: Any) -> dict[str, Any]: ...


class Containment(msgspec.Struct, kw_only=True):
    """How attempts' processes are held together, decided once at start (service/daemon.py
    finds out what the host allows; `workers.containment` says what is wanted)."""

    mode: Literal["cgroup", "process"] = "process"
    setting: str = "process"
    # Why the process mode is in force although the setting allowed cgroups ("auto").
    reason: str | None = None
    # Mode "cgroup": the daemon's subtree, the directory of the attempts' cgroups and the
    # controllers those have.
    base: str | None = None
    attempts: str | None = None
    controllers: list[str] = []


class Core:
    """State + runtime + settings + the open step (see the module docstring)."""

    def __init__(
        self,
        cfg: Config,
        state: State,
        files: Files,
        *,
        rand: Callable[[], float],
        now: float = 0.0,
        wall: float = 0.0,
    ) -> None:
        self.cfg, self.state, self.files, self.rand = cfg, state, files, rand
        self.rt = Runtime()
        self.now, self.wall = now, wall
        self.started_at = now
        self.txn = Txn(state)
        self.effects: list[Effect] = []
        self.next_worker = 1
        # For display: the last health probe of each worker, the engine's rate of
        # transitions, and why the log refuses writes (None while it takes them).
        self.probes: dict[str, Any] = {}
        self.transitions_per_s = 0.0
        self.read_only: str | None = None
        self.containment = Containment()
        # Remote agents: their own figures, transports gone, sweeps unanswered.
        self.remote = RemoteBook()
        self._hosts: dict[int, tuple[Config, placement.Hosts]] = {}

    @property
    def hosts(self) -> placement.Hosts:
        """The hosts of the settings in force, with their selectors (core/placement.py)."""
        return placement.of(self.cfg, self._hosts)

    def set_config(self, new: Config) -> None:
        """Settings reloaded, as part of the open step (taken back with it)."""
        old, self.cfg = self.cfg, new
        self.rt.on_undo(lambda: setattr(self, "cfg", old))
        self.rt.retention_changed()

    # -- acting --------------------------------------------------------------------------

    def commit(self, entity: Entity, id_: str, to: str, cause: Cause, **changes: Any) -> Transition:
        """Record one transition in the open step (checked, then applied at once so the
        next decision sees it); IllegalTransition changes nothing."""
        frm = self.state.current(entity, id_)
        if entity == "task" and frm == "running" and to != "running":
            changes = _LEAVE_RUNNING | changes
        rec = Transition(
            seq=self.state.last_seq + 1,
            ts=self.wall,
            entity=entity,
            id=id_,
            from_=frm,
            to=to,
            cause=cause,
            changes=changes,
        )
        self.txn.record(rec)
        self.rt.count("transitions")
        if entity == "workstream":
            self.rt.retention_changed()
            if to != RETIRED:
                # It changed while its archive is written: that archive is not the one
                # to retire it with (it is asked for again when the workstream is due).
                self.rt.set_archiving(id_, None)
        if entity == "task":
            self._after_task(self.state.data.tasks[id_], frm or "")
        return rec

    def effect(self, eff: Effect) -> None:
        """Carry out `eff` once the step's records are durable."""
        self.effects.append(eff)

    def emit(self, event: str, severity: Severity, **fields: Any) -> None:
        """An event, published once the step's records are durable."""
        self.rt.count(f"event.{event}")
        self.effects.append(Emit(Event(event=event, severity=severity, ts=self.wall, **fields)))

    def note(self, worker_id: str, text: str) -> None:
        """A line in the worker's own log."""
        self.effects.append(Note(worker_id, self.wall, text))

    # -- the rules that follow from a task's transition ---------------------------------

    def _after_task(self, task: Task, frm: str) -> None:
        rt = self.rt
        rt.mark_dirty(task.workstream_id)
        if rt.archiving(task.workstream_id) is not None:
            rt.set_archiving(task.workstream_id, None)  # see `commit`
        if frm == "running" and task.state != TaskState.RUNNING:
            rt.disarm("timeout", task.id)
            for r in held_by(task):
                rt.wake(r)  # the first task waiting on it; dispatch wakes the next
            if task.attempts and rt.has_placement_parks():
                # Room on its host: tasks waiting for a place there may go now.
                rt.unpark_placement(self.hosts.selectors_of(task.attempts[-1].host))
        if task.state == frm:
            return
        if frm == "pending":
            rt.set_backoff_until(task.id, None)
        if frm == "queued":
            rt.set_queued_at(task.id, None)
        ws = self.state.data.workstreams[task.workstream_id]
        if frm == "running" and ws.state not in ("pending", "running"):
            rt.retention_changed()  # a finished workstream may be retired once nothing runs
        if frm == "failed" and rt.is_blocked(ws.id):
            # Dispatch stopped for a critical task's final failure; it resumes once no
            # critical task of the workstream is failed (retried, skipped, cancelled).
            tasks = self.state.data.tasks
            if not any(
                tasks[t].state == TaskState.FAILED and tasks[t].critical for t in ws.task_ids
            ):
                rt.unblock(ws.id)
        if task.state == TaskState.RUNNING and ws.state == "pending":
            self.commit("workstream", ws.id, "running", "auto")
        # A verdict may follow from a task ending, or from the last running task going
        # back (pending, queued) in a workstream that a failure already settled.
        if task.state in _TERMINAL or frm == "running":
            self.check_workstream(ws.id)

    def check_workstream(self, ws_id: str) -> None:
        """Decide the workstream's verdict, if its tasks settle it."""
        ws = self.state.data.workstreams[ws_id]
        if ws.state not in ("pending", "running"):
            return
        graph = self.state.graph
        counts = graph.ws_counts.get(ws_id, {})
        critical = runnable = False
        if counts.get("failed") and not counts.get("running"):
            tasks = [self.state.data.tasks[t] for t in ws.task_ids]
            critical = any(t.state == TaskState.FAILED and t.critical for t in tasks)
            runnable = any(
                t.state == TaskState.PENDING and graph.unmet.get(t.id) == 0 for t in tasks
            )
        verdict = workstream_verdict(
            counts, critical_failed=critical, has_runnable_pending=runnable
        )
        if verdict is None:
            return
        self.commit("workstream", ws_id, str(verdict), "auto", ended_at=self.wall)
        self.rt.mark_dirty(ws_id)
        if verdict == "failed":
            self.emit("workstream_failed", "critical", workstream_id=ws_id)
            payload = {
                "workstream": self.state.data.workstreams[ws_id],
                "tasks": [task_view(self.state.data.tasks[t]) for t in ws.task_ids],
            }
            self.effect(Archive(ws_id, payload))
        else:
            self.emit("workstream_completed", "info", workstream_id=ws_id)

    # -- small shared lookups -------------------------------------------------------------

    def heartbeat_age(self, wid: str) -> float | None:
        seen = self.rt.heartbeat_at(wid)
        return None if seen is None else max(0.0, self.now - seen)

    def running_tasks(self) -> Iterable[Task]:
        return (t for t in self.state.data.tasks.values() if t.state == TaskState.RUNNING)
