"""What the control socket and systemd are shown, from the pure views (no I/O)."""

from __future__ import annotations

from supervisor.core.views import status_line


def test_status_line_counts_tasks_and_live_workers() -> None:
    """The STATUS= line counts running, queued, pending and failed tasks, and up workers
    among those not shut down."""
    line = status_line(
        {
            "tasks": {"running": 2, "queued": 5, "failed": 1, "completed": 9},
            "workers": {"busy": 2, "unresponsive": 1},
        }
    )
    assert line == "2 running, 5 queued, 0 pending, 1 failed; workers 2/3 up"
