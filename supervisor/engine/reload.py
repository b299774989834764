"""Config reload on SIGHUP or when the config file changes (watchfiles): the new config is
validated first; an invalid one is refused with an event and the old one kept."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import structlog

from supervisor.core.config import Config, diff, load_config
from supervisor.core.errors import ConfigError
from supervisor.core.lifecycle import new_worker_id, retire_worker, spawn_worker
from supervisor.core.machine import Machine
from supervisor.core.policy import StopReason

if TYPE_CHECKING:
    from supervisor.engine.loop import Engine

log = structlog.get_logger("orchd.reload")

# Settings read once at start; a change needs a restart.
RESTART_ONLY = ("state_dir", "socket_path", "workers.python", "log.format")


class Reloader:
    def __init__(self, path: Path | None, engine: Engine) -> None:
        self.path, self.engine = path, engine

    async def watch(self) -> None:
        import watchfiles

        assert self.path is not None
        name = self.path.name
        async for _changes in watchfiles.awatch(
            self.path.parent,
            debounce=200,
            recursive=False,
            watch_filter=lambda _c, p: Path(p).name == name,
        ):
            await self.reload("file changed")

    async def reload(self, why: str) -> None:
        if self.path is None:
            log.info("config_reload_skipped", reason="no config file")
            return
        try:
            new = load_config(self.path)
        except ConfigError as exc:
            message = f"{exc}; old config kept"
            await self.engine.call(_reject, message)
            return
        await self.engine.call(apply, new, why)


def _reject(m: Machine, message: str) -> None:
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
    live = [w for w in s.state.data.workers.values() if w.state != "shutdown"]
    for _ in range(new.worker_count - len(live)):
        spawn_worker(s, new_worker_id(s), "config")
    surplus = len(live) - new.worker_count
    for wid in list(s.rt.idle())[: max(0, surplus)]:
        retire_worker(
            s,
            wid,
            task_reason=StopReason.REASSIGN,
            restart_same=False,
            graceful=True,
            cause="config",
            replace=False,
        )
    needs_restart = [c for c in changed if c.startswith(RESTART_ONLY)]
    s.emit(
        "config_reloaded",
        "info",
        message=why,
        data={"changed": changed, "needs_restart": needs_restart},
    )
