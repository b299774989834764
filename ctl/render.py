"""Responses as human tables or JSON. Pure: no I/O; colour decided by the caller."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgspec

_COLOURS = {
    "completed": "32",
    "running": "36",
    "failed": "31",
    "cancelled": "33",
    "queued": "34",
    "unresponsive": "31",
    "shutdown": "90",
    "busy": "36",
    "idle": "32",
    "critical": "1;31",
    "error": "31",
    "warning": "33",
}


def to_json(obj: Any) -> str:
    return msgspec.json.format(msgspec.json.encode(obj), indent=2).decode()


def paint(text: str, colour: bool) -> str:
    code = _COLOURS.get(text)
    return f"\x1b[{code}m{text}\x1b[0m" if colour and code else text


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    colour: bool = False,
    state_col: int | None = None,
) -> str:
    """Left-aligned columns; the state column coloured on a TTY."""
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for r in cells:
        parts = []
        for i, (v, w) in enumerate(zip(r, widths, strict=True)):
            pad = v.ljust(w)
            parts.append(pad.replace(v, paint(v, colour), 1) if i == state_col else pad)
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def tasks_table(tasks: list[dict[str, Any]], colour: bool = False) -> str:
    rows = [
        (
            t["id"],
            t["workstream_id"],
            t["state"] + (" (skipped)" if t.get("skipped") else ""),
            f"{t['retry_count']}/{t['max_retries']}",
            t.get("worker_id") or "-",
            t.get("failure_kind") or "-",
        )
        for t in tasks
    ]
    return table(
        ["task", "workstream", "state", "retries", "worker", "failure"],
        rows,
        colour=colour,
        state_col=2,
    )


def workers_table(workers: list[dict[str, Any]], colour: bool = False) -> str:
    rows = []
    for w in workers:
        age = w.get("last_heartbeat_age_s")
        rows.append(
            (
                w["id"],
                w["state"],
                w.get("pid") or "-",
                w.get("task_id") or "-",
                "-" if age is None else f"{age:.1f}s",
                (w.get("health") or {}).get("status", "-"),
            )
        )
    return table(
        ["worker", "state", "pid", "task", "heartbeat", "process"], rows, colour=colour, state_col=1
    )


def resources_table(res: list[dict[str, Any]]) -> str:
    rows = [
        (
            r["id"],
            f"{len(r['holders'])}/{r['max_holders']}",
            ",".join(r["holders"]) or "-",
            ",".join(r["waiting"]) or "-",
        )
        for r in res
    ]
    return table(["resource", "held", "holders", "waiting"], rows)


def events_lines(events: list[dict[str, Any]], colour: bool = False) -> str:
    out = []
    for e in events:
        ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["ts"]))
        ids = " ".join(
            f"{k}={e[k]}"
            for k in ("workstream_id", "task_id", "worker_id", "resource_id")
            if e.get(k)
        )
        extra = f" tasks={','.join(e['tasks'])}" if e.get("tasks") else ""
        msg = f" — {e['message']}" if e.get("message") else ""
        out.append(f"{ts} {paint(e['severity'], colour):8} {e['event']} {ids}{extra}{msg}")
    return "\n".join(out)


def task_detail(t: dict[str, Any]) -> str:
    skipped = f" (skipped: {t.get('skip_reason')})" if t.get("skipped") else ""
    deps = ", ".join(f"{d} ({s})" for d, s in t.get("dependencies", {}).items())
    lines = [
        f"task {t['id']}  ({t['workstream_id']})",
        f"  state:      {t['state']}{skipped}",
        f"  command:    {t['command']}",
        f"  retries:    {t['retry_count']}/{t['max_retries']}   timeout: {t['timeout_s']}s",
        f"  depends on: {deps or '-'}",
        f"  worker:     {t.get('worker_id') or '-'}   failure: {t.get('failure_kind') or '-'}",
        "  attempts:",
    ]
    for a in t.get("attempts", []):
        end = (
            a.get("exit_code")
            if a.get("exit_code") is not None
            else (f"signal {a['signal']}" if a.get("signal") else "-")
        )
        lines.append(
            f"    #{a['number']} {a['worker_id']} exit={end} {a.get('failure_kind') or ''}"
            f"{' reassigned' if a.get('reassigned') else ''}"
        )
    if t.get("log_tail") is not None:
        lines.append(f"  log ({t.get('log_path')}):")
        lines.extend("    " + line for line in t["log_tail"])
    return "\n".join(lines)


def worker_detail(w: dict[str, Any]) -> str:
    """`orchctl worker check`: state, heartbeat, the process as psutil saw it, recent log."""
    h = w.get("health") or {}
    age = w.get("last_heartbeat_age_s")
    rss = h.get("rss_bytes")
    lines = [
        f"worker {w['id']}",
        f"  state:      {w['state']}"
        + (f" for {h['unresponsive_for_s']:.1f}s" if "unresponsive_for_s" in h else ""),
        f"  pid:        {w.get('pid') or '-'}   restarts: {w.get('restarts', 0)}",
        f"  task:       {w.get('task_id') or '-'}",
        f"  heartbeat:  {'-' if age is None else f'{age:.1f}s ago'}",
        f"  process:    {h.get('status', '-')}"
        + (f", cpu {h['cpu_percent']:.0f}%" if h.get("cpu_percent") is not None else "")
        + (f", rss {rss / 1048576:.1f} MiB" if rss is not None else "")
        + (f", {h['open_fds']} fds" if h.get("open_fds") is not None else "")
        + (f", {h['threads']} threads" if h.get("threads") is not None else "")
        + (f" (checked {h['checked_age_s']:.1f}s ago)" if "checked_age_s" in h else ""),
    ]
    if w.get("log_tail"):
        lines.append("  log:")
        lines.extend("    " + line for line in w["log_tail"])
    return "\n".join(lines)
