"""The daemon's settings: TOML decoded into typed Structs, validated, diffed. Pure: no I/O
(service/reload.py reads the file).

Every setting and its default is documented in config/orchd.toml; the names are those of
DESIGN.md §9, grouped into tables.
"""

from __future__ import annotations

import os
from typing import Literal

import msgspec

from supervisor.core.errors import ConfigError


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


# How a remote agent is reached: any argv that gives a byte stream to the agent's stdin
# and stdout. `{host}` is the host's name; the agent's own argv follows the template.
DEFAULT_TRANSPORT = [
    "ssh",
    "-T",
    "-o",
    "BatchMode=yes",
    "-o",
    "ServerAliveInterval=5",
    "-o",
    "ServerAliveCountMax=3",
    "-o",
    "ConnectTimeout=10",
    "{host}",
    "--",
]


class HostConfig(_Section):
    """Workers on another host, reached through `transport` (ssh by default)."""

    host: str
    count: int = 1
    # Names a task's `runs_on` may use for this host besides its own name (e.g. "gpu").
    labels: list[str] = []
    transport: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_TRANSPORT))
    # The interpreter on that host that has orchd installed.
    python: str = "python3"


class WorkersConfig(_Section):
    count: int = 0  # 0 = one per CPU (none when `hosts` are configured)
    python: str = ""  # interpreter that runs the agents; "" = the daemon's own
    # How an attempt's processes are held together: "cgroup" (one cgroup v2 per attempt),
    # "process" (session + subreaper + marker sweep), "auto" (cgroup where one can be made).
    containment: Literal["auto", "cgroup", "process"] = "auto"
    # Workers on other hosts, besides the `count` local ones.
    hosts: list[HostConfig] = []


class HealthConfig(_Section):
    heartbeat_interval_s: float = 5.0
    health_check_interval_s: float = 5.0
    unresponsive_after_s: float = 30.0
    shutdown_after_s: float = 180.0
    restart_backoff_base_s: float = 1.0
    restart_backoff_max_s: float = 60.0
    # A remote attempt's shim kills its tree after this long without a frame from the
    # daemon. agent_lease_s + tasks.kill_grace_s must stay below shutdown_after_s.
    agent_lease_s: float = 60.0


class TasksConfig(_Section):
    timeout_s: float = 600.0
    max_retries: int = 3
    kill_grace_s: float = 10.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0
    backoff_jitter: float = 0.0
    resource_wait_alert_s: float = 60.0
    queue_timeout_s: float = 0.0  # 0 = no queue-wait report unless a task sets one


class StoreConfig(_Section):
    snapshot_interval_s: float = 60.0
    backups_keep: int = 100
    # Of the kept backups, about this many are full copies; the rest are restore points.
    backups_full: int = 4
    # The active log file is sealed as a segment once it reaches this size (0: never).
    segment_bytes: int = 16 * 1024 * 1024
    checkpoint_interval_s: float = 1.0
    checkpoints_keep: int = 20
    metrics_interval_s: float = 10.0


class RotationConfig(_Section):
    """Size-based rotation of the appended side files (0 bytes: never rotated; a keep of
    0: no rotated file is ever removed)."""

    events_max_bytes: int = 64 * 1024 * 1024
    events_keep: int = 8
    interventions_max_bytes: int = 16 * 1024 * 1024
    interventions_keep: int = 0
    worker_log_max_bytes: int = 16 * 1024 * 1024
    worker_logs_keep: int = 3


class RetentionConfig(_Section):
    """How long finished workstreams stay live before they are archived and retired."""

    # A completed, cancelled or merged run leaves after this long ...
    keep_finished_s: float = 7 * 24 * 3600.0
    # ... or once this many newer finished runs of its pipeline (`name`) exist.
    keep_finished: int = 50
    # A failed run waits for an operator: it leaves only after this long.
    keep_failed_s: float = 30 * 24 * 3600.0


class ControlConfig(_Section):
    # Who may use the socket, by user name/uid and group name/gid. root and the daemon's
    # own user may always do everything.
    users: list[str] = []
    groups: list[str] = []
    read_users: list[str] = []
    read_groups: list[str] = []
    # Admins have every right of `users` and may also take the reserved connections.
    admin_users: list[str] = []
    admin_groups: list[str] = []
    max_connections: int = 64
    # No one uid holds more than this many connections at once (root included).
    max_connections_per_uid: int = 16
    # Of max_connections, these are only for root, the daemon's own user and the admins.
    reserved_connections: int = 8
    idle_timeout_s: float = 300.0
    request_timeout_s: float = 30.0
    # The largest workstream file `orchctl submit` may upload (in chunks, on one connection).
    max_submit_bytes: int = 64 * 1024 * 1024


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "console", "json", "journald"] = "auto"


class ResourceConfig(_Section):
    max_holders: int = 1
    # One resource per host (core/placement.py): `max_holders` on each host, held as
    # `<id>@<host>` by a task running there.
    per_host: bool = False


class Config(_Section):
    state_dir: str = ".state"
    socket_path: str = ""  # "" = <state_dir>/orchd.sock
    shutdown_grace_s: float = 30.0
    workers: WorkersConfig = msgspec.field(default_factory=WorkersConfig)
    health: HealthConfig = msgspec.field(default_factory=HealthConfig)
    tasks: TasksConfig = msgspec.field(default_factory=TasksConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    rotation: RotationConfig = msgspec.field(default_factory=RotationConfig)
    control: ControlConfig = msgspec.field(default_factory=ControlConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    retention: RetentionConfig = msgspec.field(default_factory=RetentionConfig)
    resources: dict[str, ResourceConfig] = {}

    @property
    def socket(self) -> str:
        return self.socket_path or os.path.join(self.state_dir, "orchd.sock")

    @property
    def worker_count(self) -> int:
        """Local workers: `workers.count`, 0 = one per CPU (none when remote hosts are
        configured: a farm of remote workers only)."""
        if self.workers.hosts:
            return self.workers.count
        return self.workers.count or (os.cpu_count() or 1)


def _check_ranges(cfg: Config, where: str) -> None:
    problems: list[str] = []

    def positive(name: str, value: float, *, zero_ok: bool = False) -> None:
        if value < 0 or (value == 0 and not zero_ok):
            problems.append(
                f"{where}: `{name}` must be {'>= 0' if zero_ok else '> 0'}, got {value}"
            )

    positive("workers.count", cfg.workers.count, zero_ok=True)
    for section in ("health", "tasks", "store", "retention"):
        sub = getattr(cfg, section)
        for name in sub.__struct_fields__:
            value = getattr(sub, name)
            zero_ok = name in {
                "backoff_jitter",
                "queue_timeout_s",
                "kill_grace_s",
                "backoff_base_s",
                "segment_bytes",  # 0: one log file, never sealed (nor compacted)
            }
            positive(f"{section}.{name}", value, zero_ok=zero_ok)
    if cfg.tasks.backoff_jitter > 1:
        problems.append(f"{where}: `tasks.backoff_jitter` must be between 0 and 1")
    if cfg.health.shutdown_after_s < cfg.health.unresponsive_after_s:
        problems.append(
            f"{where}: `health.shutdown_after_s` must be >= `health.unresponsive_after_s`"
        )
    h = cfg.health
    if cfg.workers.hosts and h.agent_lease_s + cfg.tasks.kill_grace_s >= h.shutdown_after_s:
        problems.append(
            f"{where}: `health.agent_lease_s` + `tasks.kill_grace_s` "
            f"({h.agent_lease_s} + {cfg.tasks.kill_grace_s}) must be below "
            f"`health.shutdown_after_s` ({h.shutdown_after_s}): a remote attempt must be "
            "fenced before its task is reassigned"
        )
    problems.extend(_host_problems(cfg, where))
    for rid, res in cfg.resources.items():
        if res.max_holders < 1:
            problems.append(f"{where}: `resources.{rid}.max_holders` must be >= 1")
    for name in RotationConfig.__struct_fields__:
        positive(f"rotation.{name}", getattr(cfg.rotation, name), zero_ok=True)
    positive("shutdown_grace_s", cfg.shutdown_grace_s)
    ctl = cfg.control
    positive("control.max_connections", ctl.max_connections)
    positive("control.max_connections_per_uid", ctl.max_connections_per_uid)
    if not 0 <= ctl.reserved_connections < ctl.max_connections:
        problems.append(
            f"{where}: `control.reserved_connections` must be >= 0 and below "
            f"`control.max_connections` ({ctl.max_connections}), got {ctl.reserved_connections}"
        )
    positive("control.max_submit_bytes", cfg.control.max_submit_bytes)
    if problems:
        raise ConfigError("\n".join(problems))


def _host_problems(cfg: Config, where: str) -> list[str]:
    """Host names and labels a task's `runs_on` can tell apart: unique, not `local` (the
    daemon's own host), no label that is another host's name."""
    out: list[str] = []
    names = [h.host for h in cfg.workers.hosts]
    for i, h in enumerate(cfg.workers.hosts):
        at = f"{where}: `workers.hosts[{i}]`"
        if not h.host or h.host == "local" or "@" in h.host:
            out.append(f"{at}: `host` {h.host!r} cannot name a host (empty, `local` or with '@')")
        elif names.index(h.host) != i:
            out.append(f"{at}: host {h.host!r} is listed twice; give it one table")
        for label in h.labels:
            if label in ("", "local") or (label in names and label != h.host):
                out.append(
                    f"{at}: label {label!r} of {h.host!r} is empty, `local` or another "
                    "host's name: a task's `runs_on` could not tell them apart"
                )
    return out


def parse_config(text: bytes | str, where: str = "<config>") -> Config:
    """Decode and validate a config; an unknown key or a wrong type names the key and file."""
    try:
        cfg = msgspec.toml.decode(text, type=Config)
    except msgspec.ValidationError as exc:
        # msgspec says e.g. "Object contains unknown field `x` - at `$.tasks`".
        message = str(exc).replace("$.", "")
        if "resources[...]" in message:
            message = message.replace("resources[...]", f"resources.{_bad_resource(text)}")
        raise ConfigError(f"{where}: {message}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    _check_ranges(cfg, where)
    return cfg


def _bad_resource(text: bytes | str) -> str:
    """The id of the first [resources.<id>] table that does not decode (msgspec's error
    path shows a dict key only as `[...]`)."""
    raw = msgspec.toml.decode(text).get("resources", {})
    for rid, table in raw.items():
        try:
            msgspec.convert(table, ResourceConfig)
        except msgspec.ValidationError:
            return str(rid)
    return "[...]"


def diff(old: Config, new: Config) -> list[str]:
    """Dotted names of the settings that differ between two configs."""
    a, b = msgspec.to_builtins(old), msgspec.to_builtins(new)
    out: list[str] = []

    def walk(x: object, y: object, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}{k}.")
        elif x != y:
            out.append(prefix.rstrip("."))

    walk(a, b, "")
    return out
