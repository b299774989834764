"""Responses as human tables or JSON. Pure: no I/O; colour decided by the caller."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgspec

from supervisor.core.graph import find_cycles

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
        if not r.get("ok"):
            detail = f"refused: {res.get('message', '')}"
        ts = r.get("at") or r.get("ts")
        when = time.strftime("%Y-%m-%d %H:%M:%S ", time.localtime(ts)) if ts else ""
        out.append(f"{when}uid={r.get('uid')} {r.get('method')} {params} {detail}".rstrip())
    return "\n".join(out)


# --- dag ----------------------------------------------------------------------------------


def _dag_parts(
    ws: dict[str, Any],
) -> tuple[list[dict[str, Any]], list[tuple[str, str]], set[str], set[tuple[str, str]]]:
    """Tasks, edges (dependency -> dependent), the tasks on a cycle and the cycle edges."""
    tasks = ws["tasks"]
    ids = {t["id"] for t in tasks}
    deps = {t["id"]: [d for d in t.get("depends_on", []) if d in ids] for t in tasks}
    cyc: set[str] = set()
    for c in find_cycles([t["id"] for t in tasks], deps):
        cyc.update(c)
    edges = [(d, t["id"]) for t in tasks for d in deps[t["id"]]]
    cyc_edges = {(a, b) for a, b in edges if a in cyc and b in cyc}
    return tasks, edges, cyc, cyc_edges


def _levels(tasks: list[dict[str, Any]], cyc: set[str]) -> dict[str, int]:
    """Longest-path depth of each task not on a cycle (downstream of one: after it)."""
    deps = {t["id"]: list(t.get("depends_on", [])) for t in tasks}
    level: dict[str, int] = {}
    remaining = [t["id"] for t in tasks if t["id"] not in cyc]
    for _ in range(len(tasks) + 1):
        left = []
        for tid in remaining:
            known = [d for d in deps[tid] if d in deps]
            if all(d in level or d in cyc for d in known):
                level[tid] = 1 + max((level.get(d, 0) for d in known), default=-1)
            else:
                left.append(tid)
        if not left or left == remaining:
            for tid in left:  # waits on a cycle further up: still shown
                level[tid] = len(tasks)
            break
        remaining = left
    return level


def dag_text(ws: dict[str, Any]) -> str:
    tasks, _, cyc, _ = _dag_parts(ws)
    level = _levels(tasks, cyc)
    lines = [f"workstream {ws['id']} ({ws['state']})"]
    order = sorted(
        (t for t in tasks if t["id"] not in cyc), key=lambda t: (level[t["id"]], t["id"])
    )
    for t in order:
        after = ", ".join(t.get("depends_on", []))
        lines.append(
            f"  {'  ' * min(level[t['id']], 10)}{t['id']} [{t['state']}]"
            + (f" <- {after}" if after else "")
        )
    if cyc:
        lines.append("  CYCLE (these wait on each other; break with `orchctl dep remove`):")
        for t in (t for t in tasks if t["id"] in cyc):
            after = ", ".join(t.get("depends_on", []))
            lines.append(f"    {t['id']} [{t['state']}] <- {after}")
    return "\n".join(lines)


_DOT_COLOURS = {
    "completed": "green",
    "running": "deepskyblue",
    "failed": "red",
    "cancelled": "orange",
    "queued": "blue",
    "pending": "gray",
}


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dag_dot(ws: dict[str, Any]) -> str:
    tasks, edges, cyc, cyc_edges = _dag_parts(ws)
    out = [f"digraph {_quote(ws['id'])} {{", "  rankdir=LR;", "  node [shape=box];"]
    for t in tasks:
        attrs = [
            f"label={_quote(t['id'] + chr(10) + t['state'])}",
            f"color={_DOT_COLOURS.get(t['state'], 'black')}",
        ]
        if t["id"] in cyc:
            attrs.append("penwidth=3")
        out.append(f"  {_quote(t['id'])} [{', '.join(attrs)}];")
    for a, b in edges:
        extra = ' [color=red, label="cycle"]' if (a, b) in cyc_edges else ""
        out.append(f"  {_quote(a)} -> {_quote(b)}{extra};")
    out.append("}")
    return "\n".join(out)


def dag_mermaid(ws: dict[str, Any]) -> str:
    tasks, edges, cyc, cyc_edges = _dag_parts(ws)
    # Task ids may hold characters mermaid reads as syntax: nodes get plain names.
    name = {t["id"]: f"t{i}" for i, t in enumerate(tasks)}
    out = ["flowchart LR"]
    for t in tasks:
        label = f"{t['id']} ({t['state']})".replace('"', "'")
        out.append(f'  {name[t["id"]]}["{label}"]:::{t["state"]}')
    for i, (a, b) in enumerate(edges):
        out.append(f"  {name[a]} {'-. cycle .->' if (a, b) in cyc_edges else '-->'} {name[b]}")
        if (a, b) in cyc_edges:
            out.append(f"  linkStyle {i} stroke:red")
    for st, c in _DOT_COLOURS.items():
        out.append(f"  classDef {st} stroke:{c}")
    if cyc:
        out.append(f"  style {','.join(name[t] for t in sorted(cyc))} stroke-width:4px")
    return "\n".join(out)


# --- prometheus ---------------------------------------------------------------------------


def _label(v: object) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus(m: dict[str, Any]) -> str:
    """The live metrics in the Prometheus text exposition format, names prefixed orchd_."""
    out: list[str] = []

    def family(name: str, kind: str, help_: str, samples: list[tuple[str, float | None]]) -> None:
        out.append(f"# HELP orchd_{name} {help_}")
        out.append(f"# TYPE orchd_{name} {kind}")
        for labels, value in samples:
            if value is not None:
                out.append(f"orchd_{name}{labels} {float(value):g}")

    def by(label: str, d: dict[str, Any]) -> list[tuple[str, float | None]]:
        return [(f'{{{label}="{_label(k)}"}}', v) for k, v in sorted(d.items())]

    family("tasks", "gauge", "Tasks by state.", by("state", m.get("tasks_by_state", {})))
    family(
        "workstreams",
        "gauge",
        "Workstreams by state.",
        by("state", m.get("workstreams_by_state", {})),
    )
    family("workers", "gauge", "Workers by state.", by("state", m.get("workers_by_state", {})))
    for key, help_ in (
        ("attempts", "Task attempts started."),
        ("retries", "Retries scheduled after a failed attempt."),
        ("timeouts", "Attempts stopped at their timeout."),
        ("completed", "Attempts that completed."),
    ):
        family(f"{key}_total", "counter", help_, [("", m.get(key, 0))])
    family(
        "failures_total",
        "counter",
        "Failed attempts by failure kind.",
        by("kind", m.get("failures_by_kind", {})),
    )
    family("events_total", "counter", "Events emitted by name.", by("event", m.get("events", {})))
    qw = m.get("queue_wait_s", {})
    family(
        "queue_wait_seconds",
        "summary",
        "Time from queued to running.",
        # A summary's sample count is a sample of its own, named with the _count suffix.
        [
            ('{quantile="0.5"}', qw.get("p50")),
            ('{quantile="0.95"}', qw.get("p95")),
            ("_count", qw.get("samples", 0)),
        ],
    )
    family(
        "transitions_per_second",
        "gauge",
        "Recent transition rate.",
        [("", m.get("transitions_per_s", 0))],
    )
    family("last_seq", "gauge", "Seq of the last transition.", [("", m.get("last_seq", 0))])
    res = m.get("resources", [])
    for name, help_, fn in (
        ("resource_holders", "Tasks holding the resource.", lambda r: len(r["holders"])),
        ("resource_max_holders", "The resource's limit.", lambda r: r["max_holders"]),
        ("resource_waiting", "Tasks waiting for the resource.", lambda r: len(r["waiting"])),
    ):
        family(name, "gauge", help_, [(f'{{resource="{_label(r["id"])}"}}', fn(r)) for r in res])
    family(
        "worker_heartbeat_age_seconds",
        "gauge",
        "Seconds since the worker's last heartbeat.",
        [
            (f'{{worker="{_label(w["id"])}"}}', w.get("last_heartbeat_age_s"))
            for w in m.get("workers_detail", [])
        ],
    )
    return "\n".join(out) + "\n"
