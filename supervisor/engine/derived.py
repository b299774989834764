"""The files derived from the log, written once what they cover is durable, so they never
run ahead of it: checkpoints of the workstreams that changed, the snapshot (current.json,
the old one kept as a backup), metrics.json, and the workers' own log lines. None of them
is written while the log refuses writes: what space there is goes to the log first.

The loop only encodes (`Store.snapshot_blob`, `Store.checkpoint_blob`: the entities are
changed in place by later steps, so they are encoded between two steps); a background
task waits for the log to be durable up to what they cover and installs them in a worker
thread (fsyncs, renames, backups), while the loop goes on stepping. One such write is in
flight at a time: the next one due waits for it, and the loop is woken when it is done.

Being derived, each can be regenerated: a failed write (a full disk) is reported and
tried again at the next interval, never fatal.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import structlog

from supervisor.core.figures import metrics
from supervisor.core.machine import Machine
from supervisor.engine.effects import Effects
from supervisor.engine.ports import Durable

log = structlog.get_logger("orchd.engine")

# How often the lines for workers' own logs are written out.
NOTES_FLUSH_S = 0.25


class DerivedFiles:
    """When each derived file is due, and writing it (see the module docstring)."""

    def __init__(
        self,
        m: Machine,
        store: Durable,
        fx: Effects,
        clock: Callable[[], float],
        settle: Callable[[], Awaitable[None]],
        wake: Callable[[], None],
    ) -> None:
        self.m, self.store, self.fx, self.clock = m, store, fx, clock
        self.settle, self.wake = settle, wake
        now = clock()
        self._next_checkpoint = self._next_metrics = self._next_notes = 0.0
        self._next_snapshot = now + m.cfg.store.snapshot_interval_s
        self._snapshot_seq = m.state.last_seq
        self._last_metrics: tuple[float, int] = (now, m.state.last_seq)
        self.busy = False  # a write in flight (its background task)
        self.written = 0  # writes done (a figure for tests)

    def next_due(self, *, writable: bool) -> float:
        """When the next derived file is due (none but the workers' log lines while the
        log refuses writes, or while a write is in flight: `write` skips the others then)."""
        due = float("inf")
        if writable and not self.busy:
            due = min(self._next_snapshot, self._next_metrics)
            if self.m.rt.has_dirty():
                due = min(due, self._next_checkpoint)
        if self.fx.has_notes():
            due = min(due, self._next_notes)
        return due

    async def write(self, *, writable: bool) -> None:
        """Encode what is due and hand it to a background task (see the module
        docstring); the loop does not wait for it."""
        now = self.clock()
        if self.fx.has_notes() and now >= self._next_notes:
            self.fx.write_notes()
            self._next_notes = now + NOTES_FLUSH_S
        if not writable or self.busy:
            return
        st = self.m.cfg.store
        rt = self.m.rt
        state = self.m.state
        checkpoints: list[Any] = []
        dirty: set[str] = set()
        snapshot: tuple[int, Any] | None = None
        doc: dict[str, Any] | None = None
        if rt.has_dirty() and now >= self._next_checkpoint:
            dirty = rt.take_dirty()
            self._next_checkpoint = now + st.checkpoint_interval_s
            checkpoints = [
                self.store.checkpoint_blob(ws_id, state)
                for ws_id in sorted(dirty)
                if ws_id in state.data.workstreams
            ]
        if now >= self._next_snapshot:
            self._next_snapshot = now + st.snapshot_interval_s
            if state.last_seq != self._snapshot_seq:
                snapshot = (state.last_seq, self.store.snapshot_blob(state))
        if now >= self._next_metrics:
            self._next_metrics = now + st.metrics_interval_s
            doc = self.metrics()
        if not (checkpoints or snapshot is not None or doc is not None):
            return
        assert self.fx.tg is not None
        self.busy = True
        self.fx.tg.start_soon(self._install, checkpoints, dirty, snapshot, doc)

    async def _install(
        self,
        checkpoints: list[Any],
        dirty: set[str],
        snapshot: tuple[int, Any] | None,
        doc: dict[str, Any] | None,
    ) -> None:
        try:
            if checkpoints:
                await self.settle()  # a checkpoint never covers records not yet durable
                if not await self._derived("checkpoints", self._install_checkpoints, checkpoints):
                    for ws_id in dirty:
                        self.m.rt.mark_dirty(ws_id)
            if snapshot is not None and await self._derived(
                "current.json", self.store.install_snapshot, snapshot[1]
            ):
                self._snapshot_seq = snapshot[0]
            if doc is not None:
                await self._derived("metrics.json", self.store.write_json, "metrics.json", doc)
        finally:
            self.busy = False
            self.written += 1
            self.wake()  # the next one may be due already

    async def _derived(self, what: str, fn: Callable[..., object], *args: Any) -> bool:
        try:
            await anyio.to_thread.run_sync(fn, *args)
        except OSError as exc:
            log.error("derived_write_failed", file=what, error=str(exc))
            return False
        return True

    def _install_checkpoints(self, blobs: list[Any]) -> None:
        for blob in blobs:
            self.store.install_checkpoint(blob)

    def metrics(self) -> dict[str, Any]:
        """The live figures, with the rate of transitions since the last call."""
        now, seq = self.clock(), self.m.state.last_seq
        then, seq0 = self._last_metrics
        rate = (seq - seq0) / (now - then) if now > then else 0.0
        self._last_metrics = (now, seq)
        self.m.transitions_per_s = rate
        return metrics(self.m, rate)
