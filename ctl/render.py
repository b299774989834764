"""Responses as human tables or JSON. Pure: no I/O; colour decided by the caller."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

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
    """`obj` (plain JSON values, as a reply decodes to) as indented JSON. The standard json
    module, not msgspec: importing msgspec would be most of a short command's start-up."""
    return json.dumps(obj, indent=2, ensure_ascii=False)


def compact(obj: Any) -> str:
    """One JSON object on one line (streams of JSON lines)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def paint(text: str, colour: bool) -> str:
    code = _COLOURS.get(text)
    return f"\x1b[{code}m{text}\x1b[0m" if colour and code else text


def local_time(ts: float) -> str:
    """A wall time as the operator reads it (local, to the second)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


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


def containment_line(c: dict[str, Any]) -> str:
    """`orchctl status`: how attempts' processes are held together, and why."""
    if c.get("mode") == "cgroup":
        controllers = ", ".join(c.get("controllers") or []) or "none"
        return f"containment: cgroup per attempt under {c.get('base')} (controllers: {controllers})"
    why = f" ({c['setting']}: {c['reason']})" if c.get("reason") else ""
    return f"containment: process (session, subreaper, marker sweep){why}"


def _accounting(a: dict[str, Any]) -> str:
    parts = []
    if a.get("cpu_s") is not None:
        parts.append(f" cpu={a['cpu_s']:.2f}s")
    if a.get("memory_peak_bytes") is not None:
        parts.append(f" mem_peak={a['memory_peak_bytes'] / 1048576:.1f}MiB")
    return "".join(parts)


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
            f"{' reassigned' if a.get('reassigned') else ''}{_accounting(a)}"
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


def deps_view(d: dict[str, Any], colour: bool = False) -> str:
    """`orchctl deps`: what the task waits for, who waits for it, and why."""
    lines = [f"task {d['task_id']}: {paint(d['state'], colour)}, {d['unmet']} unmet"]
    lines.append(f"  why: {d['why']}")
    for title, key in (("depends on", "depends_on"), ("dependents", "dependents")):
        lines.append(f"  {title}:" + ("" if d[key] else " -"))
        for e in d[key]:
            mark = "met" if e["satisfied"] else "unmet"
            lines.append(f"    {e['id']:<24} {paint(e['state'], colour):<10} {mark}")
    return "\n".join(lines)


def analysis_view(a: dict[str, Any]) -> str:
    """`orchctl ws analyze`: findings, each with its commands, then what to run next."""
    counts = ", ".join(f"{k} {v}" for k, v in sorted(a["counts"].items()))
    lines = [f"workstream {a['workstream_id']}: {a['state']} ({counts})"]
    for f in a["findings"]:
        lines.append(f"- {f['text']}")
        lines.extend(f"    {c}" for c in f["commands"])
    if a["next"]:
        lines.append("next:")
        lines.extend(f"    {c}" for c in a["next"])
    return "\n".join(lines)


def debug_view(d: dict[str, Any]) -> str:
    """`orchctl debug`: the diagnosis of one task (the menu is the caller's)."""
    t = d["task"]
    lines = [
        f"task {t['id']} ({t['workstream_id']}): {t['state']}"
        + (f", failure {t['failure_kind']}" if t.get("failure_kind") else ""),
        f"  retries {t['retry_count']}/{t['max_retries']}, timeout {t['timeout_s']}s",
    ]
    lines.extend(f"  diagnosis: {x}" for x in d["diagnosis"])
    lines.append("  attempts:" + ("" if d["attempts"] else " none"))
    for a in d["attempts"]:
        code = a.get("exit_code")
        end = code if code is not None else (f"signal {a['signal']}" if a.get("signal") else "-")
        lines.append(
            f"    #{a['number']} on {a['worker_id']}: exit {end} {a.get('failure_kind') or ''}"
            + (f" — {a['message']}" if a.get("message") else "")
        )
    deps = ", ".join(f"{x['id']} ({x['state']})" for x in d["dependencies"])
    lines.append(f"  dependencies: {deps or '-'}")
    w = d.get("worker")
    if w:
        status = (w.get("health") or {}).get("status", "-")
        age = w.get("last_heartbeat_age_s")
        hb = "-" if age is None else f"{age:.1f}s ago"
        lines.append(f"  worker {w['id']}: {w['state']}, heartbeat {hb}, process {status}")
    lines.append(f"  log ({d['log_path']}):")
    lines.extend("    " + x for x in d["log_tail"] or ["(empty)"])
    return "\n".join(lines)


def checkpoints_table(rows: list[dict[str, Any]]) -> str:
    return table(
        ["seq", "at", "state", "completed", "failed", "pending", "cancelled"],
        [
            [r[k] for k in ("seq", "checkpoint_at", "state", "completed", "failed")]
            + [r["pending"], r["cancelled"]]
            for r in rows
        ],
    )


def interventions_lines(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        params = " ".join(f"{k}={v}" for k, v in (r.get("params") or {}).items() if v is not None)
        res = r.get("result") or {}
        detail = f"seq {res['seq']}" if r.get("ok") and res.get("seq") is not None else ""
        resolved = res.get("task_id") if r.get("ok") else None
        if resolved and resolved != (r.get("params") or {}).get("task_id"):
            detail += f" ({resolved})"  # the task a bare id named, by its full name
        if not r.get("ok"):
            detail = f"refused: {res.get('message', '')}"
        ts = r.get("at") or r.get("ts")
        when = time.strftime("%Y-%m-%d %H:%M:%S ", time.localtime(ts)) if ts else ""
        out.append(f"{when}uid={r.get('uid')} {r.get('method')} {params} {detail}".rstrip())
    return "\n".join(out)
