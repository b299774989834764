"""Pure rendering of orchctl output: dependency graphs (text, DOT, mermaid) with cycles
visible, and metrics in the Prometheus text exposition format."""

from __future__ import annotations

import re
from typing import Any

from ctl import dag, prometheus, render


def _ws(*tasks: tuple[str, str, list[str]]) -> dict[str, Any]:
    return {
        "id": "ws-1",
        "state": "running",
        "tasks": [{"id": i, "state": s, "depends_on": d} for i, s, d in tasks],
    }


DIAMOND = _ws(
    ("a", "completed", []),
    ("b", "running", ["a"]),
    ("c", "pending", ["a"]),
    ("d", "pending", ["b", "c"]),
)
CYCLIC = _ws(("x", "pending", ["y"]), ("y", "pending", ["x"]), ("z", "pending", ["x"]))


def test_dag_text_orders_by_depth_and_lists_cycles() -> None:
    """Text output lists tasks deepest last with their dependencies; a cycle gets its own
    section naming its tasks."""
    lines = dag.text(DIAMOND).splitlines()
    assert lines[0] == "workstream ws-1 (running)"
    names = [ln.split()[0] for ln in lines[1:]]
    assert names == ["a", "b", "c", "d"] and lines[4].strip() == "d [pending] <- b, c"
    assert "CYCLE" not in dag.text(DIAMOND)
    text = dag.text(CYCLIC)
    cycle_part = text.split("CYCLE", 1)[1]
    assert "x [pending] <- y" in cycle_part and "y [pending] <- x" in cycle_part
    assert "z" not in cycle_part and "z [pending] <- x" in text


def test_dag_dot_draws_edges_from_dependency_and_marks_cycle_edges() -> None:
    """DOT edges run dependency -> dependent; cycle edges are red, others are not."""
    dot = dag.dot(CYCLIC)
    assert dot.startswith('digraph "ws-1" {') and dot.endswith("}")
    assert '"y" -> "x" [color=red, label="cycle"];' in dot
    assert '"x" -> "z";' in dot
    assert "color=red" not in dag.dot(DIAMOND).replace("color=red,", "")


def test_dag_mermaid_uses_safe_node_names_and_dotted_cycle_links() -> None:
    """Mermaid nodes get plain names with the task id in the label; cycle links are dotted."""
    ws = _ws(("build-1.x", "failed", []), ("p", "pending", ["q"]), ("q", "pending", ["p"]))
    out = dag.mermaid(ws)
    assert out.startswith("flowchart LR")
    assert 't0["build-1.x (failed)"]:::failed' in out
    assert out.count("-. cycle .->") == 2 and "linkStyle" in out
    assert "-. cycle" not in dag.mermaid(DIAMOND)


METRICS: dict[str, Any] = {
    "last_seq": 42,
    "tasks_by_state": {"failed": 1, "running": 2},
    "workstreams_by_state": {"running": 1},
    "workers_by_state": {"busy": 2},
    "attempts": 7,
    "retries": 3,
    "timeouts": 1,
    "completed": 4,
    "failures_by_kind": {"timeout": 1},
    "events": {"task_failed": 1},
    "queue_wait_s": {"p50": 0.01, "p95": None, "samples": 5},
    "transitions_per_s": 1.5,
    "resources": [{"id": 'git"repo', "max_holders": 1, "holders": ["t1"], "waiting": []}],
    "workers_detail": [{"id": "w1", "state": "busy", "last_heartbeat_age_s": 0.25}],
}


def test_prometheus_exposition_is_well_formed() -> None:
    """Every family has HELP and TYPE; every sample line is `orchd_name{labels} value`;
    label values are escaped; unknown values (None) are left out."""
    text = prometheus.exposition(METRICS)
    assert text.endswith("\n")
    sample = re.compile(r'^orchd_[a-z_]+(\{[a-z]+="(?:[^"\\]|\\.)*"\})? -?[0-9.e+-]+$')
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
        elif not line.startswith("# HELP "):
            assert sample.match(line), line
    assert 'orchd_tasks{state="failed"} 1' in text
    assert "orchd_attempts_total 7" in text and "orchd_timeouts_total 1" in text
    assert 'orchd_failures_total{kind="timeout"} 1' in text
    assert 'orchd_queue_wait_seconds{quantile="0.5"} 0.01' in text
    assert 'quantile="0.95"' not in text and "orchd_queue_wait_seconds_count 5" in text
    assert 'orchd_resource_holders{resource="git\\"repo"} 1' in text
    assert 'orchd_worker_heartbeat_age_seconds{worker="w1"} 0.25' in text
    assert {"orchd_tasks", "orchd_attempts_total", "orchd_queue_wait_seconds"} <= typed


def test_dag_shows_a_runs_own_tasks_by_bare_id_and_others_by_full_name() -> None:
    """In `dag nightly-3` the run's tasks read `compile`, a dependency on another
    workstream's task keeps its full name; DOT node ids stay the full names."""
    run = {
        "id": "nightly-3",
        "state": "running",
        "tasks": [
            {"id": "nightly-3/fetch", "state": "completed", "depends_on": ["tools-1/build"]},
            {"id": "nightly-3/compile", "state": "running", "depends_on": ["nightly-3/fetch"]},
        ],
    }
    text = dag.text(run)
    assert "  fetch [completed] <- tools-1/build" in text
    assert "compile [running] <- fetch" in text
    dot = dag.dot(run)
    assert '"nightly-3/fetch" -> "nightly-3/compile"' in dot and 'label="compile' in dot
    assert '["compile (running)"]' in dag.mermaid(run)


def test_interventions_name_the_task_a_bare_id_resolved_to() -> None:
    """An action given a bare id shows the full name it acted on."""
    line = render.interventions_lines(
        [
            {
                "ts": 1.0,
                "uid": 0,
                "method": "retry",
                "params": {"task_id": "compile"},
                "ok": True,
                "result": {"task_id": "nightly-3/compile", "seq": 7},
            }
        ]
    )
    assert line.endswith("retry task_id=compile seq 7 (nightly-3/compile)")
