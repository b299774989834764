"""Wiring only: open the store, settle the containment, start the pool, engine and
control socket in one task group, notify systemd, turn signals into a clean stop or a
config reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import structlog

from supervisor.control.server import Server, SocketInUse
from supervisor.core.config import Config
from supervisor.core.context import Containment
from supervisor.core.errors import StoreCorrupt, StoreError, StoreFsyncError, StoreLocked
from supervisor.core.model import Event
from supervisor.engine.loop import Engine
from supervisor.service import heap
from supervisor.service.notify import Notifier
from supervisor.service.reload import Overrides, Reloader
from supervisor.store.directory import Store
from supervisor.store.sidelog import Rotation
from supervisor.workers.cgroup import Hierarchy, Unavailable
from supervisor.workers.health import Health
from supervisor.workers.pool import Pool, daemon_id

log = structlog.get_logger("orchd")

EXIT_CORRUPT = 65
STATUS_INTERVAL_S = 5.0
# While an operator drains it, how often the daemon looks whether the line has news
# (the drain began or ended, a task finished): `systemctl status` then says it at once.
STATUS_DRAIN_POLL_S = 0.25
EXIT_LOCKED = 75  # EX_TEMPFAIL: another daemon owns the state directory
EXIT_IOERR = 74  # EX_IOERR: the state directory could not be read or repaired
EXIT_CONFIG = 78  # EX_CONFIG: the config is invalid, or cannot be met on this host


def _ignore_cancelled_wakeups(loop: asyncio.AbstractEventLoop) -> None:
    """A socket that became readable or writable in the same turn as its waiter was
    cancelled (a client going away mid-request) has its wake-up callback run on a
    cancelled future: asyncio reports an InvalidStateError that means nothing. Those are
    dropped; every other unhandled error still goes to the log."""

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, asyncio.InvalidStateError) and "set_result" in str(
            context.get("handle", "")
        ):
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


async def run(cfg: Config, config_path: Path | None, overrides: Overrides | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; the process exit code."""
    with contextlib.suppress(RuntimeError):  # not on asyncio: nothing to quieten
        _ignore_cancelled_wakeups(asyncio.get_running_loop())
    notifier = Notifier()
    store = Store(cfg.state_dir, **store_limits(cfg))
    try:
        state = await anyio.to_thread.run_sync(store.open)
    except StoreLocked as exc:
        print(f"orchd: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except StoreCorrupt as exc:
        print(f"orchd: {exc}", file=sys.stderr)
        notifier.send(f"STATUS=state corrupt: {exc}")
        return EXIT_CORRUPT
    except StoreError as exc:
        print(f"orchd: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # E.g. ENOSPC while a torn tail is kept aside: say what and where, not a traceback.
        # Not EXIT_CORRUPT: nothing is wrong with the state, and a restart once the cause is
        # fixed (space freed) starts normally.
        where = f"{exc.filename}: " if exc.filename else ""
        print(
            f"orchd: cannot open the state in {cfg.state_dir}: {where}{exc.strerror or exc}; "
            f"fix that (free space, permissions) and start again; nothing in the state was "
            f"lost",
            file=sys.stderr,
        )
        notifier.send(f"STATUS=cannot open the state: {exc.strerror or exc}")
        return EXIT_IOERR
    log.info(
        "state_loaded",
        state_dir=cfg.state_dir,
        last_seq=state.last_seq,
        tasks=len(state.data.tasks),
    )
    try:
        hierarchy, containment = await anyio.to_thread.run_sync(
            _containment, cfg.workers.containment, cfg.state_dir
        )
    except Unavailable as exc:
        print(
            f'orchd: workers.containment is "cgroup", but {exc}; set it to "auto" or "process" '
            "to run with the process containment instead",
            file=sys.stderr,
        )
        notifier.send(f"STATUS=no cgroup can be made: {exc}")
        await anyio.to_thread.run_sync(store.close, None)
        return EXIT_CONFIG
    send, recv = anyio.create_memory_object_stream[Any](100_000)
    pool = Pool(
        python=cfg.workers.python or sys.executable,
        log_dir=store.state_dir / "logs",
        heartbeat_s=cfg.health.heartbeat_interval_s,
        inbox=send,
        kill_grace_s=cfg.tasks.kill_grace_s,
        daemon_id=daemon_id(store.state_dir),
    )
    engine = Engine(cfg, store, state, pool, recv, send, notify=notifier.send)
    engine.m.containment = containment
    _announce(engine, containment, hierarchy)
    health = Health(engine)
    clean = True
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(pool.run)
            await tg.start(engine.run)
            if hierarchy is not None and hierarchy.stale:
                # Recovery killed the interrupted attempts' cgroups; any other a dead
                # daemon left goes now.
                for k in await anyio.to_thread.run_sync(hierarchy.clear_stale):
                    log.warning("stale_cgroup_removed", cgroup=k.path, pids=list(k.signalled))
            await tg.start(Server(cfg.socket, engine, cfg.control).run)
            tg.start_soon(health.run)
            tg.start_soon(heap.trim_forever)
            reloader = Reloader(
                config_path,
                engine,
                on_applied=partial(_reconfigure, store, pool),
                overrides=overrides,
            )
            if config_path is not None:
                tg.start_soon(reloader.watch)
            if notifier.watchdog_s:
                tg.start_soon(_watchdog, notifier, engine)
            if notifier.enabled:
                tg.start_soon(_status_lines, notifier, engine)
            notifier.send("READY=1", f"STATUS=running; state {cfg.state_dir}, socket {cfg.socket}")
            log.info(
                "daemon_ready",
                pid=os.getpid(),
                socket=cfg.socket,
                workers=cfg.worker_count,
                remote_workers={h.host: h.count for h in cfg.workers.hosts} or None,
            )
            with anyio.open_signal_receiver(
                signal.SIGTERM, signal.SIGINT, signal.SIGHUP
            ) as signals:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        await reloader.reload("SIGHUP")
                        continue
                    log.info("daemon_stopping", signal=signal.Signals(signum).name)
                    notifier.send("STOPPING=1", "STATUS=draining: stopping running tasks")
                    break
            await engine.drain()
            tg.cancel_scope.cancel()
    except* SocketInUse as group:
        clean = False
        print(f"orchd: {group.exceptions[0]}", file=sys.stderr)
    except* StoreFsyncError as group:
        # Never retried: the kernel may have dropped the dirty pages. Exit and let the
        # next start recover from what the log really holds.
        clean = False
        first = group.exceptions[0]
        log.critical("fsync_failed", error=str(first))
        print(f"orchd: {first}; exiting, the next start recovers from the log", file=sys.stderr)
    finally:
        with anyio.CancelScope(shield=True):
            if hierarchy is not None:
                # The agents are gone (the pool stopped them): whatever is still in an
                # attempt's cgroup is killed, and every cgroup the daemon made is removed.
                left = await anyio.to_thread.run_sync(hierarchy.close, cfg.tasks.kill_grace_s)
                for k in left:
                    log.warning(
                        "attempt_cgroup_killed",
                        cgroup=k.path,
                        pids=list(k.signalled),
                        removed=k.removed,
                    )
            try:
                await anyio.to_thread.run_sync(store.close, state if clean else None)
            except StoreError as exc:
                clean = False
                print(f"orchd: closing the state failed: {exc}", file=sys.stderr)
    log.info("daemon_stopped", last_seq=state.last_seq, clean=clean)
    return 0 if clean else 1


def store_limits(cfg: Config) -> dict[str, Any]:
    """The store's bounds on history from the config: at start, and again on a reload."""
    rot = cfg.rotation
    return {
        "backups_keep": cfg.store.backups_keep,
        "checkpoints_keep": cfg.store.checkpoints_keep,
        "segment_bytes": cfg.store.segment_bytes,
        "backups_full": cfg.store.backups_full,
        "events": Rotation(rot.events_max_bytes, rot.events_keep),
        "interventions": Rotation(rot.interventions_max_bytes, rot.interventions_keep),
        "worker_logs": Rotation(rot.worker_log_max_bytes, rot.worker_logs_keep),
    }


def _reconfigure(store: Store, pool: Pool, cfg: Config) -> None:
    """What a reloaded config changes outside the engine's step: the store's bounds, and
    the heartbeat and kill grace the agents started from now on are given."""
    store.configure(**store_limits(cfg))
    pool.configure(heartbeat_s=cfg.health.heartbeat_interval_s, kill_grace_s=cfg.tasks.kill_grace_s)


def _containment(setting: str, state_dir: str) -> tuple[Hierarchy | None, Containment]:
    """The containment in force: a cgroup per attempt where the setting allows it and the
    host gives the daemon a cgroup of its own, else the process mode (and why). Raises
    Unavailable when the setting is "cgroup" and no cgroup can be made."""
    if setting == "process":
        return None, Containment(mode="process", setting=setting)
    try:
        h = Hierarchy.open(state_dir)
    except Unavailable as exc:
        if setting == "cgroup":
            raise
        return None, Containment(mode="process", setting=setting, reason=str(exc))
    return h, Containment(
        mode="cgroup",
        setting=setting,
        base=h.base,
        attempts=h.attempts,
        controllers=list(h.controllers),
    )


def _announce(engine: Engine, c: Containment, h: Hierarchy | None) -> None:
    """Say once, at start, which containment is in force (an event when "auto" had to
    fall back; the journal either way)."""
    log.info(
        "containment",
        mode=c.mode,
        setting=c.setting,
        cgroup=c.base,
        controllers=c.controllers,
        reason=c.reason,
        pid=os.getpid(),
    )
    if h is not None and h.stale:
        log.warning("stale_cgroups_found", cgroups=list(h.stale))
    if c.reason is not None:
        engine.fx.publish(
            Event(
                event="containment_fallback",
                severity="warning",
                ts=engine.wall(),
                message=f"no cgroup per attempt: {c.reason}; attempts are held by session, "
                "subreaper and marker sweep instead",
                data={"setting": c.setting, "reason": c.reason},
            )
        )


async def _status_lines(notifier: Notifier, engine: Engine) -> None:
    """A STATUS= line for `systemctl status`: what runs, waits and failed, and the workers."""
    await anyio.sleep(1.0)
    while True:
        notifier.send("STATUS=" + engine.status_line())
        seen = engine.drain_state()
        with anyio.move_on_after(STATUS_INTERVAL_S):
            while engine.drain_state() == seen or not (seen[0] or engine.drain_state()[0]):
                await anyio.sleep(STATUS_DRAIN_POLL_S)


async def _watchdog(notifier: Notifier, engine: Engine) -> None:
    """WATCHDOG=1 from the event loop, only while the engine keeps stepping."""
    interval = notifier.watchdog_s / 2
    while True:
        await anyio.sleep(interval)
        if engine.healthy(notifier.watchdog_s):
            notifier.send("WATCHDOG=1")
        else:
            log.error("watchdog_withheld", reason="engine loop is stuck")
