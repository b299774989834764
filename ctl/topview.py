"""`orchctl top`'s screen, worked out from the daemon's answers: what runs (elapsed against
its timeout), what waits and on what, the workers, the resources, the last events.

Pure: no I/O; the time and the screen's height are passed in. `screen` gives the model,
`plain` its text for a pipe or a dumb terminal; ctl/top.py draws it on a terminal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ctl import render

# Sections in screen order; the ones first get their rows first when the screen is short.
RUNNING, WAITING, WORKERS, RESOURCES, EVENTS = (
    "running",
    "waiting",
    "workers",
    "resources",
    "events",
)
# The lines a section takes beyond its rows: a blank, its title, its column headers.
_SECTION_LINES = 3
# Rows every section gets before any gets more (when there are that many).
_FIRST_ROWS = 3
# Spaces between two columns on the live screen (rich's padding and divider).
LIVE_GAP = 3


@dataclass
class Snapshot:
    """What the daemon said, at `taken_at` (wall time). `why` maps a waiting task's id to
    the daemon's reason (`orchctl deps`); `error` is set when the last try failed."""

    taken_at: float
    status: dict[str, Any] = field(default_factory=dict)
    tasks: list[dict[str, Any]] = field(default_factory=list)
    why: dict[str, str] = field(default_factory=dict)
    workers: list[dict[str, Any]] = field(default_factory=list)
    resources: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


@dataclass
class Section:
    """One table: `state_col` is the column coloured by state; `hidden` the rows left out
    for want of room (the last ones, or with `newest_last` the first ones); `more_line`:
    a line saying so is shown (there was room for it)."""

    name: str
    title: str
    headers: list[str]
    rows: list[list[str]]
    state_col: int | None = None
    newest_last: bool = False
    hidden: int = 0
    more_line: bool = False


@dataclass
class Screen:
    """`notice` is a line about the view itself (the daemon unreachable), or ""."""

    header: str
    sections: list[Section]
    notice: str = ""


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def _started_at(task: dict[str, Any]) -> float | None:
    attempts = task.get("attempts") or []
    return attempts[-1].get("started_at") if attempts else None


def running_rows(tasks: list[dict[str, Any]], now: float) -> list[list[str]]:
    """A row per running task, longest-running first: elapsed against its timeout."""
    rows = []
    running = [t for t in tasks if t["state"] == "running"]
    running.sort(key=lambda t: _started_at(t) or now)
    for t in running:
        started = _started_at(t)
        elapsed = None if started is None else max(0.0, now - started)
        timeout = float(t["timeout_s"])
        share = "" if elapsed is None else f" {min(999, round(100 * elapsed / timeout))}%"
        rows.append(
            [
                t["id"],
                t["workstream_id"],
                t.get("worker_id") or "-",
                f"{_age(elapsed)} / {_age(timeout)}{share}",
                f"{t.get('retry_count', 0)}/{t['max_retries']}",
            ]
        )
    return rows


def waiting_rows(tasks: list[dict[str, Any]], why: dict[str, str]) -> list[list[str]]:
    """Queued tasks (they wait on a resource or a worker) first, then pending ones (on
    dependencies), each in submission order, with the daemon's reason."""
    order = {"queued": 0, "pending": 1}
    waiting = [t for t in tasks if t["state"] in order]
    waiting.sort(key=lambda t: (order[t["state"]], t.get("order", 0)))
    # The state column already says "queued".
    return [
        [t["id"], t["workstream_id"], t["state"], why.get(t["id"], "-").removeprefix("queued: ")]
        for t in waiting
    ]


def worker_rows(workers: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for w in workers:
        h = w.get("health") or {}
        health = h.get("status", "-")
        if h.get("cpu_percent") is not None:
            health += f", cpu {h['cpu_percent']:.0f}%"
        if h.get("rss_bytes") is not None:
            health += f", {h['rss_bytes'] / 1048576:.0f} MiB"
        if "unresponsive_for_s" in h:
            health = f"unresponsive for {_age(h['unresponsive_for_s'])}; {health}"
        rows.append(
            [
                w["id"],
                w["state"],
                str(w.get("pid") or "-"),
                w.get("task_id") or "-",
                _age(w.get("last_heartbeat_age_s")),
                health,
            ]
        )
    return rows


def resource_rows(resources: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            r["id"],
            f"{len(r['holders'])}/{r['max_holders']}",
            ", ".join(r["holders"]) or "-",
            ", ".join(r["waiting"]) or "-",
        ]
        for r in resources
    ]


def event_rows(events: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for e in events:
        about = " ".join(
            str(e[k]) for k in ("workstream_id", "task_id", "worker_id", "resource_id") if e.get(k)
        )
        rows.append(
            [
                time.strftime("%H:%M:%S", time.localtime(e["ts"])),
                e["severity"],
                e["event"],
                about or "-",
                e.get("message") or "",
            ]
        )
    return rows


def _header(snap: Snapshot) -> str:
    s = snap.status
    when = time.strftime("%H:%M:%S", time.localtime(snap.taken_at))
    if not s:
        return f"orchd  {when}"
    counts = ", ".join(f"{k} {v}" for k, v in sorted(s.get("tasks", {}).items())) or "none"
    workers = s.get("workers", {})
    up = workers.get("idle", 0) + workers.get("busy", 0)
    flags = (" DRAINING" if s.get("draining") else "") + (
        " READ-ONLY" if s.get("read_only") else ""
    )
    return (
        f"orchd  {when}  seq {s.get('last_seq', '?')}  up {_age(s.get('uptime_s'))}"
        f"  workers {up}/{sum(workers.values())} up  tasks: {counts}{flags}"
    )


def _fit(sections: list[Section], rows: int) -> None:
    """Cut the sections' rows to `rows` lines in all: each first gets up to _FIRST_ROWS,
    then the ones higher on the screen take what is left, in order."""
    budget = max(0, rows - _SECTION_LINES * len(sections))
    take = [min(len(s.rows), _FIRST_ROWS) for s in sections]
    while sum(take) > budget:  # a tiny screen: the lowest sections give up rows first
        i = max(i for i, n in enumerate(take) if n > 0)
        take[i] -= 1
    budget -= sum(take)
    for i, s in enumerate(sections):
        more = min(len(s.rows) - take[i], budget)
        take[i] += more
        budget -= more
    for s, n in zip(sections, take, strict=True):
        if n < len(s.rows):
            # With room for two lines or more (and not for the newest events, where the
            # title's count says it), the last line says how many rows are left out.
            s.more_line = n >= 2 and not s.newest_last
            keep = n - 1 if s.more_line else n
            s.hidden = len(s.rows) - keep
            s.rows = s.rows[len(s.rows) - keep :] if s.newest_last else s.rows[:keep]


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def _fit_width(sections: list[Section], width: int, gap: int) -> None:
    """Narrow each section's last column (the reason, the health, the message: the long
    free text) so that its rows fit `width` columns with `gap` between columns."""
    for s in sections:
        widths = [max([len(h)] + [len(r[i]) for r in s.rows]) for i, h in enumerate(s.headers)]
        excess = sum(widths) + gap * (len(widths) - 1) - width
        if excess <= 0:
            continue
        last = max(len(s.headers[-1]), widths[-1] - excess)
        for r in s.rows:
            r[-1] = _clip(r[-1], last)


def screen(
    snap: Snapshot, now: float, height: int | None = None, width: int | None = None
) -> Screen:
    """The screen for a snapshot, cut to `height` lines and `width` columns (None: all),
    with LIVE_GAP between columns."""
    events = snap.events[-10:]
    sections = [
        Section(
            RUNNING,
            "Running",
            ["task", "workstream", "worker", "elapsed / timeout", "retries"],
            running_rows(snap.tasks, now),
        ),
        Section(
            WAITING,
            "Waiting",
            ["task", "workstream", "state", "waits on"],
            waiting_rows(snap.tasks, snap.why),
            state_col=2,
        ),
        Section(
            WORKERS,
            "Workers",
            ["worker", "state", "pid", "task", "heartbeat", "health"],
            worker_rows(snap.workers),
            state_col=1,
        ),
        Section(
            RESOURCES,
            "Resources",
            ["resource", "held", "holders", "waiting"],
            resource_rows(snap.resources),
        ),
        Section(
            EVENTS,
            "Last events",
            ["at", "severity", "event", "about", "message"],
            event_rows(events),
            state_col=1,
            newest_last=True,
        ),
    ]
    notice = "" if snap.error is None else f"{snap.error} (trying again)"
    header = _header(snap)
    if height is not None:
        _fit(sections, height - 2)  # the header and the notice (or the keys) line
    if width is not None:
        _fit_width(sections, width, LIVE_GAP)
        header, notice = _clip(header, width), _clip(notice, width)
    return Screen(header=header, sections=sections, notice=notice)


def plain(scr: Screen, colour: bool = False) -> str:
    """The screen as text: a table per section."""
    out = [scr.header]
    for s in scr.sections:
        out.append("")
        out.append(f"{s.title.upper()} ({len(s.rows) + s.hidden})")
        if s.rows or s.hidden:
            out.append(render.table(s.headers, s.rows, colour=colour, state_col=s.state_col))
            if s.more_line:
                out.append(f"… {s.hidden} more")
        else:
            out.append("-")
    if scr.notice:
        out.append(scr.notice)
    return "\n".join(out)
