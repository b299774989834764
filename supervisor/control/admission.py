"""Who gets a connection slot on the control socket, and how often a refusal is logged.

Every peer uid holds at most `max_connections_per_uid` connections; of `max_connections`,
`reserved_connections` are only for root, the daemon's own user and the admins (as
PostgreSQL keeps superuser_reserved_connections), so one client that opens connections
without end cannot lock the operators out. Pure: no I/O; the time is passed in.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from supervisor.core.config import ControlConfig

# A refusal of one kind for one uid is logged at most once in this long.
LOG_INTERVAL_S = 10.0


class Admission:
    """The open connections, counted in all and by peer uid."""

    def __init__(self) -> None:
        self.total = 0
        self.by_uid: Counter[int] = Counter()

    def enter(self, uid: int, privileged: bool, cfg: ControlConfig) -> str | None:
        """Take a slot for a peer of `uid`, or return why not (the message it is sent)."""
        per_uid = cfg.max_connections_per_uid
        if self.by_uid[uid] >= per_uid:
            return (
                f"too many connections from uid {uid} (limit {per_uid}, "
                "control.max_connections_per_uid): close some of them "
                "(an `orchctl … -f` or `orchctl top` left running?) and try again"
            )
        shared = cfg.max_connections - cfg.reserved_connections
        if privileged and self.total >= cfg.max_connections:
            return (
                f"too many connections (all {cfg.max_connections} are in use, "
                "control.max_connections); try again when one closes"
            )
        if not privileged and self.total >= shared:
            return (
                f"too many connections (the {shared} open to every user are in use; the "
                f"other {cfg.reserved_connections} are kept for root, the daemon's user "
                "and control.admin_users/admin_groups); try again when one closes"
            )
        self.total += 1
        self.by_uid[uid] += 1
        return None

    def leave(self, uid: int) -> None:
        """Give back a slot taken by `enter`."""
        self.total -= 1
        self.by_uid[uid] -= 1
        if self.by_uid[uid] <= 0:
            del self.by_uid[uid]


@dataclass
class _Quiet:
    logged_at: float
    suppressed: int = 0


@dataclass
class RefusalLog:
    """Decides which refusals are logged: the first of a kind for a uid, then at most one
    every `interval_s`, carrying the count of those not logged in between (a flood of
    connections must not flood the journal)."""

    interval_s: float = LOG_INTERVAL_S
    _last: dict[tuple[str, int], _Quiet] = field(default_factory=dict)

    def should_log(self, reason: str, uid: int, now: float) -> int | None:
        """None: stay quiet; else log it, with this many earlier refusals left unlogged."""
        key = (reason, uid)
        quiet = self._last.get(key)
        if quiet is not None and now - quiet.logged_at < self.interval_s:
            quiet.suppressed += 1
            return None
        self._last[key] = _Quiet(logged_at=now)
        if len(self._last) > 1024:  # many uids: forget the ones long quiet
            for k in [k for k, q in self._last.items() if now - q.logged_at >= self.interval_s]:
                del self._last[k]
        return quiet.suppressed if quiet is not None else 0
