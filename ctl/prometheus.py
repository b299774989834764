"""The live metrics (the `metrics` response) in the Prometheus text exposition format.
Pure: no I/O.
"""

from __future__ import annotations

from typing import Any


def _label(v: object) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def exposition(m: dict[str, Any]) -> str:
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
