"""What the core keeps about remote agents beside the durable state: their own figures
from their last heartbeat (the daemon cannot probe a process on another host), the
workers whose transport is known to have exited, and the sweeps still unanswered on each
host. Pure: no I/O. Lost with the process, like the runtime: a new life starts new
agents, and those sweep their hosts.
"""

from __future__ import annotations

import re
from typing import Any

from supervisor.core.runtime import Runtime

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def host_component(host: str) -> str:
    """`host` as a part of a worker id (ids name files and cgroups: one path component)."""
    return _UNSAFE.sub("_", host) or "_"


class RemoteBook:
    """The remote agents' bookkeeping (see the module docstring). Changes that steps
    decide are undone with the step (through the runtime's journal); figures are
    observations and are kept whatever happens to the step."""

    def __init__(self) -> None:
        self.figures: dict[str, dict[str, Any]] = {}
        self._gone: set[str] = set()
        # host -> {worker whose Sweep is unanswered: the attempts that Sweep listed live}
        self._sweeps: dict[str, dict[str, tuple[str, ...]]] = {}
        # When each unanswered Sweep was sent (monotonic).
        self.sweep_sent_at: dict[str, float] = {}
        # This step's hellos of remote agents, each with where its Sweep goes among the
        # step's effects: the Sweep is made at the end of the step (Machine.settle), so
        # that it lists the attempts dispatched in the same step, and it goes first.
        self.pending_sweeps: list[tuple[str, int]] = []

    # -- figures ---------------------------------------------------------------------

    def observe(self, wid: str, now: float, **figures: Any) -> None:
        """The agent's own figures (from Hello or a Heartbeat), as of `now`."""
        seen = self.figures.setdefault(wid, {})
        seen.update({k: v for k, v in figures.items() if v is not None})
        seen["reported_at"] = now

    def forget(self, wid: str) -> None:
        self.figures.pop(wid, None)

    # -- transports known gone -------------------------------------------------------

    def is_gone(self, wid: str) -> bool:
        return wid in self._gone

    def set_gone(self, rt: Runtime, wid: str, gone: bool) -> None:
        if gone and wid not in self._gone:
            self._gone.add(wid)
            rt.on_undo(lambda: self._gone.discard(wid))
        elif not gone and wid in self._gone:
            self._gone.discard(wid)
            rt.on_undo(lambda: self._gone.add(wid))

    # -- sweeps ----------------------------------------------------------------------

    def sweeping(self, host: str | None = None) -> bool:
        """A new agent (on `host`; None: on any) has not answered its Sweep yet: nothing
        starts until it does."""
        return bool(self._sweeps.get(host) if host is not None else self._sweeps)

    def unanswered(self) -> list[tuple[str, float]]:
        """(worker, when its Sweep was sent) of every unanswered Sweep."""
        return [(wid, self.sweep_sent_at.get(wid, 0.0)) for s in self._sweeps.values() for wid in s]

    def sweep_sent(
        self, rt: Runtime, host: str, wid: str, live: tuple[str, ...], now: float
    ) -> None:
        self.sweep_sent_at[wid] = now
        sweeps = self._sweeps.setdefault(host, {})
        old = sweeps.get(wid)
        sweeps[wid] = live
        rt.on_undo(lambda: self._restore(host, wid, old))

    def sweep_answered(self, rt: Runtime, host: str, wid: str) -> tuple[str, ...] | None:
        """The live list the worker's Sweep carried (None: no Sweep of it was pending)."""
        sweeps = self._sweeps.get(host, {})
        if wid not in sweeps:
            return None
        live = sweeps.pop(wid)
        if not sweeps:
            self._sweeps.pop(host, None)
        rt.on_undo(lambda: self._restore(host, wid, live))
        return live

    def _restore(self, host: str, wid: str, live: tuple[str, ...] | None) -> None:
        sweeps = self._sweeps.setdefault(host, {})
        if live is None:
            sweeps.pop(wid, None)
        else:
            sweeps[wid] = live
        if not sweeps:
            self._sweeps.pop(host, None)
