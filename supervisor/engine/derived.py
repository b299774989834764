"""The files derived from the log, written once what is appended is durable, so they
never run ahead of it: checkpoints of the workstreams that changed, the snapshot
(current.json, the old one kept as a backup), metrics.json, and the workers' own log
lines. None of them is written while the log refuses writes: what space there is goes to
the log first.

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

    def __init__(self, m: Machine, store: Durable, fx: Effects, clock: Callable[[], float]) -> None:
        self.m, self.store, self.fx, self.clock = m, store, fx, clock
        now = clock()
        self._next_checkpoint = self._next_metrics = self._next_notes = 0.0
        self._next_snapshot = now + m.cfg.store.snapshot_interval_s
        self._snapshot_seq = m.state.last_seq
        self._last_metrics: tuple[float, int] = (now, m.state.last_seq)

    def next_due(self, *, writable: bool) -> float:
        """When the next derived file is due (none but the workers' log lines while the
        log refuses writes: `write` skips the others then)."""
        due = min(self._next_snapshot, self._next_metrics) if writable else float("inf")
        if self.fx.has_notes():
            due = min(due, self._next_notes)
        if writable and self.m.rt.has_dirty():
            due = min(due, self._next_checkpoint)
        return due

    async def write(self, settle: Callable[[], Awaitable[None]], *, writable: bool) -> None:
        """Write what is due; `settle()` first makes everything appended durable."""
        now = self.clock()
        if self.fx.has_notes() and now >= self._next_notes:
            self.fx.write_notes()
            self._next_notes = now + NOTES_FLUSH_S
        if not writable:
            return
        if now >= min(self._next_checkpoint, self._next_snapshot, self._next_metrics):
            await settle()
        st = self.m.cfg.store
        rt = self.m.rt
        state = self.m.state
        if rt.has_dirty() and now >= self._next_checkpoint:
            dirty = rt.take_dirty()
            self._next_checkpoint = now + st.checkpoint_interval_s
            if not await self._derived("checkpoints", self._write_checkpoints, dirty):
                for ws_id in dirty:
                    rt.mark_dirty(ws_id)
        if now >= self._next_snapshot:
            self._next_snapshot = now + st.snapshot_interval_s
            seq = state.last_seq
            if seq != self._snapshot_seq and await self._derived(
                "current.json", self.store.write_snapshot, state
            ):
                self._snapshot_seq = seq
        if now >= self._next_metrics:
            self._next_metrics = now + st.metrics_interval_s
            await self._derived(
                "metrics.json", self.store.write_json, "metrics.json", self.metrics()
            )

    async def _derived(self, what: str, fn: Callable[..., object], *args: Any) -> bool:
        try:
            await anyio.to_thread.run_sync(fn, *args)
        except OSError as exc:
            log.error("derived_write_failed", file=what, error=str(exc))
            return False
        return True

    def _write_checkpoints(self, ws_ids: set[str]) -> None:
        state = self.m.state
        for ws_id in ws_ids:
            if ws_id in state.data.workstreams:
                self.store.write_checkpoint(ws_id, state)

    def metrics(self) -> dict[str, Any]:
        """The live figures, with the rate of transitions since the last call."""
        now, seq = self.clock(), self.m.state.last_seq
        then, seq0 = self._last_metrics
        rate = (seq - seq0) / (now - then) if now > then else 0.0
        self._last_metrics = (now, seq)
        self.m.transitions_per_s = rate
        return metrics(self.m, rate)
