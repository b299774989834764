"""`orchd`: run the supervisor daemon in the foreground."""

from __future__ import annotations

import argparse
import faulthandler
import sys
from pathlib import Path

import anyio

from supervisor.core.errors import ConfigError
from supervisor.service import heap
from supervisor.service.logs import configure_logging
from supervisor.service.reload import Overrides, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="orchd", description="Supervisor daemon that runs and recovers build work."
    )
    parser.add_argument(
        "--config", type=Path, help="config file (TOML); defaults apply without one"
    )
    parser.add_argument("--state-dir", help="override state_dir from the config")
    parser.add_argument("--socket", help="override socket_path from the config")
    parser.add_argument(
        "--log-format", choices=["auto", "console", "json", "journald"], help="override log.format"
    )
    args = parser.parse_args(argv)
    faulthandler.enable()  # a watchdog kill (SIGABRT) leaves a traceback in the journal
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"orchd: {exc}", file=sys.stderr)
        return 78  # EX_CONFIG
    overrides = Overrides(
        state_dir=args.state_dir, socket_path=args.socket, log_format=args.log_format
    )
    cfg = overrides.apply(cfg)
    configure_logging(cfg.log.level, cfg.log.format)
    heap.limit_arenas()  # before the first worker thread
    from supervisor.service import daemon

    return anyio.run(daemon.run, cfg, args.config, overrides)


if __name__ == "__main__":
    sys.exit(main())
