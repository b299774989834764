"""A workstream's dependency graph as indented text, Graphviz DOT or a mermaid flowchart,
cycles marked. Pure: no I/O; the input is the `ws_show` response.
"""

from __future__ import annotations

from typing import Any

from supervisor.core.graph import find_cycles


def _label(ws: dict[str, Any], tid: str) -> str:
    """A task as the graph shows it: its bare id when it is of this workstream (the title
    names the workstream), its full name WS/TASK when it is of another."""
    prefix = ws["id"] + "/"
    return tid[len(prefix) :] if tid.startswith(prefix) else tid


def _after(ws: dict[str, Any], t: dict[str, Any]) -> str:
    return ", ".join(_label(ws, d) for d in t.get("depends_on", []))


def _parts(
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


def text(ws: dict[str, Any]) -> str:
    """Tasks indented by depth with what each waits for; tasks on a cycle listed apart."""
    tasks, _, cyc, _ = _parts(ws)
    level = _levels(tasks, cyc)
    lines = [f"workstream {ws['id']} ({ws['state']})"]
    order = sorted(
        (t for t in tasks if t["id"] not in cyc), key=lambda t: (level[t["id"]], t["id"])
    )
    for t in order:
        after = _after(ws, t)
        lines.append(
            f"  {'  ' * min(level[t['id']], 10)}{_label(ws, t['id'])} [{t['state']}]"
            + (f" <- {after}" if after else "")
        )
    if cyc:
        lines.append("  CYCLE (these wait on each other; break with `orchctl dep remove`):")
        for t in (t for t in tasks if t["id"] in cyc):
            lines.append(f"    {_label(ws, t['id'])} [{t['state']}] <- {_after(ws, t)}")
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


def dot(ws: dict[str, Any]) -> str:
    """A Graphviz digraph, nodes coloured by state, cycle nodes and edges marked."""
    tasks, edges, cyc, cyc_edges = _parts(ws)
    out = [f"digraph {_quote(ws['id'])} {{", "  rankdir=LR;", "  node [shape=box];"]
    for t in tasks:
        attrs = [
            f"label={_quote(_label(ws, t['id']) + chr(10) + t['state'])}",
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


def mermaid(ws: dict[str, Any]) -> str:
    """A mermaid flowchart, nodes classed by state, cycle edges dotted and red."""
    tasks, edges, cyc, cyc_edges = _parts(ws)
    # Task ids may hold characters mermaid reads as syntax: nodes get plain names.
    name = {t["id"]: f"t{i}" for i, t in enumerate(tasks)}
    out = ["flowchart LR"]
    for t in tasks:
        label = f"{_label(ws, t['id'])} ({t['state']})".replace('"', "'")
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
