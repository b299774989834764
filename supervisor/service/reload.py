"""Config reload on SIGHUP or when the config file changes (watchfiles): the new config is
validated first; an invalid one is refused with an event and the old one kept."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from supervisor.core.config import Config, parse_config
from supervisor.core.errors import ConfigError
from supervisor.core.reconfigure import apply, reject

if TYPE_CHECKING:
    from supervisor.engine.loop import Engine

log = structlog.get_logger("orchd.reload")


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
            await self.engine.call(reject, message)
            return
        await self.engine.call(apply, new, why)
