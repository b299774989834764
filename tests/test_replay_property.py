"""Replaying the log yields exactly the live state, across random work and crashes.

A Hypothesis state machine performs random legal operations (submit DAG workstreams,
queue, dispatch, pid updates, complete, fail with retry, skip, cancel, operator retry,
worker moves, retirement of finished workstreams), writing each record through a real
Store while an in-memory State is the model. It snapshots, checkpoints and crashes at
random (with or without a torn partial line), reopening from disk. After every step the
on-disk state, read from snapshot+tail and by a full replay, equals the model.
Size: ORCHD_TORTURE_SIZE examples (default 30).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from test_store_log import Driver

from supervisor.core.model import WORKER_TRANSITIONS, State, Transition, equal_states
from supervisor.store.directory import Store, read_state
from supervisor.store.logfile import seal

SIZE = int(os.environ.get("ORCHD_TORTURE_SIZE", "30"))
RESOURCES = ["repo", "db", "gpu"]
WORKERS = ["w-0", "w-1", "w-2"]


def _tasks_in(model: State, *states: str) -> list[str]:
    return sorted(t.id for t in model.data.tasks.values() if t.state in states)


class ReplayMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="orchd-replay-"))
        self.ws_count = 0
        self.store = Store(self.dir, fsync=False, backups_keep=3, checkpoints_keep=2)
        self.drv = Driver(self.store, self.store.open())

    @property
    def model(self) -> State:
        return self.drv.model

    @initialize()
    def start_workers(self) -> None:
        for r in RESOURCES:
            self.drv.do("resource", r, "defined", "config", max_holders=2)
        for w in WORKERS:
            self.drv.do("worker", w, "starting", pid=100)
        for w in WORKERS[:2]:
            self.drv.do("worker", w, "idle")

    # -- work -------------------------------------------------------------------------

    @rule(data=st.data(), n=st.integers(1, 6))
    def submit(self, data: st.DataObject, n: int) -> None:
        ws = f"ws-{self.ws_count}"
        self.ws_count += 1
        ids = [f"{ws}-t{i}" for i in range(n)]
        tasks = []
        for i, tid in enumerate(ids):
            # Depending only on earlier tasks keeps the graph acyclic.
            deps = (
                data.draw(st.lists(st.sampled_from(ids[:i]), unique=True, max_size=3)) if i else []
            )
            task: dict[str, Any] = {
                "id": tid,
                "workstream_id": ws,
                "command": ["sh", "-c", f"echo {i}"],
            }
            task["depends_on"] = deps
            task["resources"] = data.draw(
                st.lists(st.sampled_from(RESOURCES), unique=True, max_size=2)
            )
            task["max_retries"] = data.draw(st.integers(1, 3))
            task["critical"] = data.draw(st.booleans())
            task["order"] = i
            tasks.append(task)
        self.drv.do(
            "workstream",
            ws,
            "pending",
            "submit",
            workstream={"id": ws, "submitted_at": self.drv.ts},
            tasks=tasks,
        )

    def _ready(self) -> list[str]:
        return [
            t for t in _tasks_in(self.model, "pending") if self.model.graph.unmet.get(t, 0) == 0
        ]

    @rule(data=st.data())
    def queue(self, data: st.DataObject) -> None:
        ready = self._ready()
        if ready:
            self.drv.do("task", data.draw(st.sampled_from(ready)), "queued", queued_at=self.drv.ts)

    @rule(data=st.data())
    def dispatch(self, data: st.DataObject) -> None:
        queued = _tasks_in(self.model, "queued")
        if not queued:
            return
        tid = data.draw(st.sampled_from(queued))
        w = data.draw(st.sampled_from(WORKERS))
        n = len(self.model.data.tasks[tid].attempts) + 1
        attempt = {
            "attempt_id": f"{tid}-{n}",
            "number": n,
            "worker_id": w,
            "started_at": self.drv.ts,
        }
        self.drv.do("task", tid, "running", worker_id=w, queued_at=None, attempt=attempt)

    @rule(data=st.data(), pid=st.integers(2, 99999))
    def learn_pid(self, data: st.DataObject, pid: int) -> None:
        running = _tasks_in(self.model, "running")
        if running:
            tid = data.draw(st.sampled_from(running))
            upd = {"pid": pid, "pid_create_time": self.drv.ts}
            self.drv.do("task", tid, "running", pid=pid, attempt_update=upd)

    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        running = _tasks_in(self.model, "running")
        if running:
            tid = data.draw(st.sampled_from(running))
            end = {"ended_at": self.drv.ts, "exit_code": 0}
            self.drv.do("task", tid, "completed", worker_id=None, pid=None, attempt_update=end)

    @rule(
        data=st.data(), kind=st.sampled_from(["exit_code", "timeout", "validation", "worker_lost"])
    )
    def fail(self, data: st.DataObject, kind: str) -> None:
        running = _tasks_in(self.model, "running")
        if not running:
            return
        tid = data.draw(st.sampled_from(running))
        task = self.model.data.tasks[tid]
        count = task.retry_count + 1
        end = {"ended_at": self.drv.ts, "exit_code": 1, "failure_kind": kind}
        common = {
            "worker_id": None,
            "pid": None,
            "retry_count": count,
            "failure_kind": kind,
            "attempt_update": end,
        }
        if count < task.max_retries:
            self.drv.do(
                "task", tid, "pending", "failure", not_before=self.drv.ts + 2.0**count, **common
            )
        else:
            self.drv.do("task", tid, "failed", "failure", not_before=None, **common)

    @rule(data=st.data())
    def skip(self, data: st.DataObject) -> None:
        cands = _tasks_in(self.model, "pending", "queued", "failed")
        if cands:
            tid = data.draw(st.sampled_from(cands))
            self.drv.do(
                "task", tid, "completed", "operator", skipped=True, skip_reason="not needed"
            )

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        cands = _tasks_in(self.model, "pending", "queued", "running", "failed")
        if cands:
            tid = data.draw(st.sampled_from(cands))
            self.drv.do("task", tid, "cancelled", "operator", worker_id=None, pid=None)

    @rule(data=st.data(), timeout=st.none() | st.floats(1, 3600))
    def operator_retry(self, data: st.DataObject, timeout: float | None) -> None:
        cands = _tasks_in(self.model, "failed", "cancelled", "completed")
        if not cands:
            return
        tid = data.draw(st.sampled_from(cands))
        changes: dict[str, Any] = {
            "retry_count": 0,
            "skipped": False,
            "skip_reason": None,
            "not_before": None,
        }
        if timeout is not None:
            changes["timeout_s"] = timeout
        self.drv.do("task", tid, "pending", "operator", **changes)

    @rule(data=st.data())
    def remove_dependency(self, data: st.DataObject) -> None:
        cands = [t for t in _tasks_in(self.model, "pending") if self.model.data.tasks[t].depends_on]
        if cands:
            tid = data.draw(st.sampled_from(cands))
            deps = self.model.data.tasks[tid].depends_on[1:]
            self.drv.do("task", tid, "pending", "operator", depends_on=deps)

    @rule(data=st.data())
    def workstream_moves(self, data: st.DataObject) -> None:
        wss = sorted(self.model.data.workstreams)
        if not wss:
            return
        ws = data.draw(st.sampled_from(wss))
        cur = self.model.current("workstream", ws)
        nxt = {"pending": "running", "running": "completed", "completed": "merged"}.get(cur or "")
        if nxt:
            self.drv.do("workstream", ws, nxt, ended_at=self.drv.ts if nxt == "completed" else None)

    @rule(data=st.data())
    def retire(self, data: st.DataObject) -> None:
        """A workstream with nothing of it running is finished (if it is not yet) and
        leaves the state with its tasks."""
        model = self.model
        cands = [w for w in sorted(model.data.workstreams) if model.retire_problem(w) is None]
        if cands:
            ws = data.draw(st.sampled_from(cands))
            if model.current("workstream", ws) in ("pending", "running"):
                self.drv.do("workstream", ws, "completed", ended_at=self.drv.ts)
            self.drv.do("workstream", ws, "retired", archive=f"archive/{ws}.tar.gz")
            assert ws not in model.data.workstreams
            assert not any(t.workstream_id == ws for t in model.data.tasks.values())

    @rule(
        w=st.sampled_from(WORKERS),
        to=st.sampled_from(["starting", "idle", "busy", "unresponsive", "shutdown"]),
    )
    def worker_move(self, w: str, to: str) -> None:
        cur = self.model.current("worker", w)
        if to in WORKER_TRANSITIONS[cur]:
            changes: dict[str, Any] = {"task_id": None} if to in ("idle", "shutdown") else {}
            if cur is None or to == "starting":
                changes.update(pid=200 + len(self.model.data.workers), restarts=1)
            self.drv.do("worker", w, to, "health", **changes)

    # -- the disk -----------------------------------------------------------------------

    @rule()
    def snapshot(self) -> None:
        self.store.write_snapshot(self.model)

    @rule(data=st.data())
    def checkpoint(self, data: st.DataObject) -> None:
        wss = sorted(self.model.data.workstreams)
        if wss:
            ws = data.draw(st.sampled_from(wss))
            self.store.write_checkpoint(ws, self.model)
            assert self.store.read_checkpoint(ws, "latest")["seq"] == self.model.last_seq

    @rule(snapshot_first=st.booleans(), torn=st.integers(0, 60))
    def crash(self, snapshot_first: bool, torn: int) -> None:
        """The process dies: memory is gone; maybe mid-write of the next record."""
        if snapshot_first:
            self.store.write_snapshot(self.model)
        self.store.close()  # written records are in the page cache: a process crash keeps them
        if torn:
            nxt = Transition(
                seq=self.model.last_seq + 1,
                ts=1.0,
                entity="worker",
                id="w-x",
                to="starting",
                cause="auto",
            )
            line = seal(msgspec.json.encode(nxt))
            with open(self.dir / "transitions.jsonl", "ab") as f:
                f.write(line[: min(torn, len(line) - 1)])
        self.store = Store(self.dir, fsync=False, backups_keep=3, checkpoints_keep=2)
        reopened = self.store.open()
        assert equal_states(reopened.data, self.model.data)
        assert bool(torn) == any("torn write" in r for r in self.store.repairs)
        self.drv.store = self.store

    @invariant()
    def disk_equals_model(self) -> None:
        assert self.store.written_seq == self.store.synced_seq == self.model.last_seq
        from_snapshot = read_state(self.dir)
        full = read_state(self.dir, full=True)
        assert equal_states(from_snapshot.data, self.model.data)
        assert equal_states(full.data, self.model.data)
        assert from_snapshot.graph.unmet == self.model.graph.unmet

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


ReplayMachine.TestCase.settings = settings(
    max_examples=SIZE,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestReplayProperty = ReplayMachine.TestCase
TestReplayProperty.__doc__ = (
    "Snapshot + tail and a full replay equal the live state after every step."
)
