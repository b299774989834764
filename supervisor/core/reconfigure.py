"""A new config, decided inside a step: resources redefined, workers added or retired to
the new count (on this host and on each of `workers.hosts`; a host left out of the new
config loses all its workers), an event naming what changed and what needs a restart.
Pure: no I/O (the file is read and watched by service/reload.py).
"""

from __future__ import annotations

import msgspec

from supervisor.core.config import Config, diff
from supervisor.core.dispatch import hosts_reloaded
from supervisor.core.lifecycle import new_worker_id, retire_unwanted, spawn_worker
from supervisor.core.machine import Machine

# Settings read once at start; a change needs a restart.
RESTART_ONLY = ("state_dir", "socket_path", "workers.python", "workers.containment", "log.format")


def reject(m: Machine, message: str) -> None:
    m.emit("config_rejected", "error", message=message)


def apply(s: Machine, new: Config, why: str) -> None:
    """A new config, decided inside a step: resources, worker count, an event."""
    old = s.cfg
    # Keep what only a restart can change, so the daemon stays coherent.
    new = msgspec.structs.replace(new, state_dir=old.state_dir, socket_path=old.socket_path)
    changed = diff(old, new)
    if not changed:
        return
    s.set_config(new)
    for rid, rc in new.resources.items():
        res = s.state.data.resources.get(rid)
        if res is None or res.max_holders != rc.max_holders:
            s.commit("resource", rid, "defined", "config", max_holders=rc.max_holders)
            s.rt.unpark(rid)
    _resize(s, "", new.worker_count)
    wanted = {h.host: h.count for h in new.workers.hosts}
    for host, count in wanted.items():
        _resize(s, host, count)
    for w in list(s.state.data.workers.values()):
        if w.host and w.host not in wanted and s.rt.is_idle(w.id):
            # Its host left the config: its idle workers go now, the busy ones once their
            # task is over (lifecycle.release_worker).
            retire_unwanted(s, w.id)
    # Hosts may have come or gone: tasks that wait for one come back to the queue, those
    # whose host is gone are reported.
    s.rt.unpark_all_placement()
    hosts_reloaded(s)
    needs_restart = [c for c in changed if c.startswith(RESTART_ONLY)]
    s.emit(
        "config_reloaded",
        "info",
        message=why,
        data={"changed": changed, "needs_restart": needs_restart},
    )


def _resize(s: Machine, host: str, count: int) -> None:
    """Workers added on `host` ("" = this one) up to `count`, or idle ones retired down
    to it."""
    live = [w for w in s.state.data.workers.values() if w.state != "shutdown" and w.host == host]
    for _ in range(count - len(live)):
        spawn_worker(s, new_worker_id(s, host), "config", host=host)
    surplus = len(live) - count
    idle = [wid for wid in s.rt.idle() if s.state.data.workers[wid].host == host]
    for wid in idle[: max(0, surplus)]:
        retire_unwanted(s, wid)
