"""Config reload on SIGHUP or when the config file changes (watchfiles): the new config is
validated first; an invalid one is refused with an event and the old one kept."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import structlog

from supervisor.core.config import Config, parse_config
from supervisor.core.errors import ConfigError
from supervisor.core.reconfigure import apply, reject

if TYPE_CHECKING:
    from supervisor.engine.loop import Engine

log = structlog.get_logger("orchd.reload")


class Overrides(msgspec.Struct, frozen=True):
    """What orchd's command line sets over the config file (--state-dir, --socket,
    --log-format): applied at start and to every reloaded config alike, so a reload
    neither undoes them nor reports them as changed."""

    state_dir: str | None = None
    socket_path: str | None = None
    log_format: str | None = None

    def apply(self, cfg: Config) -> Config:
        if self.state_dir:
            cfg = msgspec.structs.replace(cfg, state_dir=self.state_dir)
        if self.socket_path:
            cfg = msgspec.structs.replace(cfg, socket_path=self.socket_path)
        if self.log_format:
            log_cfg = msgspec.structs.replace(cfg.log, format=self.log_format)
            cfg = msgspec.structs.replace(cfg, log=log_cfg)
        return cfg


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read and parse a config file (None = all defaults)."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config: {exc.strerror}") from None
    return parse_config(data, str(p))


class Reloader:
    """Reloads `path` into `engine`, with the command line's `overrides` over it;
    `on_applied` is then given the engine's config (the new one, unless the engine
    refused it) for what lives outside the engine."""

    def __init__(
        self,
        path: Path | None,
        engine: Engine,
        on_applied: Callable[[Config], None] | None = None,
        overrides: Overrides | None = None,
    ) -> None:
        self.path, self.engine, self.on_applied = path, engine, on_applied
        self.overrides = overrides or Overrides()

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
            new = self.overrides.apply(load_config(self.path))
        except ConfigError as exc:
            message = f"{exc}; old config kept"
            await self.engine.call(reject, message)
            return
        await self.engine.call(apply, new, why)
        if self.on_applied is not None:
            self.on_applied(self.engine.m.cfg)
