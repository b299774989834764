"""Rotation of the side files on the real daemon: events.jsonl, interventions.log and the
workers' logs each rotate at their size with their count kept, and orchctl reads every
line across the rotated files, in order; an intervention is never dropped silently."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from tests.harness import Daemon, event_files, to_toml


def _wide(ws: str, n: int) -> str:
    return f'id = "{ws}"\n' + "\n".join(
        f'[[tasks]]\nid = "t{i}"\ncommand = "true"' for i in range(n)
    )


def _lines(paths: list[Path]) -> list[str]:
    out = []
    for p in paths:
        if p.exists():
            out += [line for line in p.read_text().splitlines() if line]
    return out


def _rotated(path: Path) -> list[Path]:
    found = [p for p in path.parent.glob(path.name + ".*") if p.suffix[1:].isdigit()]
    return sorted(found, key=lambda p: -int(p.suffix[1:]))


def test_events_rotate_at_size_and_read_across_files(tmp_path: Path) -> None:
    """events.jsonl rotates before it passes events_max_bytes; `orchctl events` returns
    every event across the rotated files in order; beyond events_keep the oldest file
    goes, and the journal says so."""
    d = Daemon(tmp_path, {"rotation": {"events_max_bytes": 1500, "events_keep": 4}})
    d.start()
    try:
        d.call("submit", text=_wide("ev", 60), source="test")
        d.wait_event("workstream_completed", workstream_id="ev")
        files = event_files(d.state_dir)
        assert len(files) == 5, files  # 4 rotated (the count kept) and the current one
        assert all(p.stat().st_size <= 1500 for p in files)
        on_disk = [json.loads(line) for line in _lines(files)]
        got = d.ctl_json("events", "-n", "100000")
        assert got == on_disk
        assert len(got) > 20
    finally:
        d.stop()
    journal = [json.loads(line) for line in d.output.read_text().splitlines() if "{" in line]
    removed = [e for e in journal if e.get("event") == "events_file_removed"]
    assert removed and all(e["path"].endswith("events.jsonl.4") for e in removed)


def test_interventions_rotate_and_are_never_lost(tmp_path: Path) -> None:
    """With its default keep of 0, interventions.log rotates at its size and keeps every
    rotated file: `orchctl interventions` returns every action, oldest first."""
    d = Daemon(tmp_path, {"rotation": {"interventions_max_bytes": 400}})
    d.start()
    try:
        for _ in range(6):
            d.ctl("--yes", "drain")
            d.ctl("--yes", "undrain")
        path = d.state_dir / "interventions.log"
        assert len(_rotated(path)) >= 3
        assert all(p.stat().st_size <= 400 for p in [*_rotated(path), path])
        acts = d.ctl_json("interventions", "-n", "1000")
        assert [a["method"] for a in acts] == ["drain", "undrain"] * 6
        assert acts == [json.loads(line) for line in _lines([*_rotated(path), path])]
    finally:
        d.stop()
    assert d.events("interventions_removed") == []


def test_interventions_removed_beyond_a_count_is_said(tmp_path: Path) -> None:
    """With interventions_keep set, removing the oldest rotated file is said in an
    `interventions_removed` event and in the journal, naming the file."""
    d = Daemon(tmp_path, {"rotation": {"interventions_max_bytes": 400, "interventions_keep": 1}})
    d.start()
    try:
        for _ in range(4):
            d.ctl("--yes", "drain")
            d.ctl("--yes", "undrain")
        path = d.state_dir / "interventions.log"
        assert [p.name for p in _rotated(path)] == ["interventions.log.1"]
        ev = d.wait_event("interventions_removed", timeout=10)
        assert ev["severity"] == "warning" and ev["data"]["path"].endswith("interventions.log.1")
    finally:
        d.stop()
    assert '"interventions_removed"' in d.output.read_text()


def test_worker_logs_rotate_by_copy_truncate(tmp_path: Path) -> None:
    """A worker's log (its agent holds it open) is copy-truncated at its size: the rotated
    files are kept to worker_logs_keep, the live file has no hole where the agent wrote
    on, and `orchctl worker logs` reads across the files in order."""
    d = Daemon(tmp_path, {"rotation": {"worker_log_max_bytes": 1200, "worker_logs_keep": 2}})
    d.start()
    try:
        d.call("submit", text=_wide("wl", 120), source="test")
        d.wait_ws("wl", "completed", timeout=60)
        logs = d.state_dir / "logs" / "workers"

        def most_rotated() -> int:
            return max(len(_rotated(logs / f"{w['id']}.log")) for w in d.workers())

        # The daemon's notes reach the files every 0.25 s: wait for their flush.
        d.wait_for(lambda: most_rotated() == 2, 10, "a worker log rotated twice")
        for w in d.workers():
            # Never more than the count kept; each file the limit and at most a line or
            # two (rotated between two lines of a flush; the agent may add one meanwhile).
            rotated = _rotated(logs / f"{w['id']}.log")
            assert len(rotated) <= 2
            assert all(p.stat().st_size < 1200 + 600 for p in rotated), [
                p.stat().st_size for p in rotated
            ]
        wid = max(d.workers(), key=lambda w: len(_rotated(logs / f"{w['id']}.log")))["id"]
        path = logs / f"{wid}.log"
        files = [*_rotated(path), path]
        assert len(files) == 3, [(p.name, p.stat().st_size) for p in files]
        assert all(b"\0" not in p.read_bytes() for p in files)
        got: dict[str, list[str]] = {}

        def same() -> bool:  # the daemon's notes are flushed every 0.25 s: until stable
            got["lines"] = d.ctl_json("worker", "logs", wid, "-n", "100000")["lines"]
            return got["lines"] == _lines(files)

        d.wait_for(same, 10, "worker logs to show the files' lines")
        assert sum("took task" in line for line in got["lines"]) > 10
    finally:
        d.stop()


def test_a_reload_applies_new_rotation_sizes_without_a_restart(tmp_path: Path) -> None:
    """Rotation sizes (and the store's other bounds) take effect on a reload: events.jsonl,
    never rotated under the first config, rotates at the size a SIGHUP brought in, and the
    reload names the settings it changed with none needing a restart."""
    d = Daemon(tmp_path, {"rotation": {"events_max_bytes": 0}})
    d.start()
    try:
        d.call("submit", text=_wide("before", 30), source="test")
        d.wait_ws("before", "completed", timeout=60)
        assert _rotated(d.state_dir / "events.jsonl") == []
        d.cfg["rotation"] = d.cfg["rotation"] | {"events_max_bytes": 2000, "events_keep": 2}
        d.config_path.write_text(to_toml(d.cfg))
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        ev = d.wait_event("config_reloaded")
        assert "rotation.events_max_bytes" in ev["data"]["changed"]
        assert ev["data"]["needs_restart"] == []
        d.call("submit", text=_wide("after", 30), source="test")
        d.wait_ws("after", "completed", timeout=60)
        rotated = _rotated(d.state_dir / "events.jsonl")
        assert [p.name for p in rotated] == ["events.jsonl.2", "events.jsonl.1"]
        assert all(p.stat().st_size <= 2000 for p in rotated[1:])
    finally:
        d.stop()
