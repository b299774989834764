"""10,000 fuzzed frames through the ssh stream: a fake agent on the second host says Hello
and then sends random frames (every agent message type, with random and hostile field
values), each connection ending in a malformed frame; the daemon never crashes and keeps
answering and running tasks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.harness import ROOT, Daemon, assert_no_leftovers
from tests.remote_host import RemoteHost, needs_remote_host

pytestmark = needs_remote_host

FRAMES = 10_000
PER_CONNECTION = 2_000


def test_ten_thousand_fuzzed_frames_over_ssh_never_crash_the_daemon(tmp_path: Path) -> None:
    """Every frame of a hostile agent at the far end of ssh is answered by at most that
    agent's replacement: the daemon stays up and answering, and runs a task afterwards."""
    fake_dir = Path(tmp_path / "fake")
    fake_dir.mkdir()
    fake = fake_dir / "fake-agent"
    fake.write_text(
        f"#!/bin/sh\nexec {sys.executable} {ROOT}/tests/fake_remote_agent.py"
        f' {fake_dir} {FRAMES} {PER_CONNECTION} "$@"\n'
    )
    fake.chmod(0o755)
    with RemoteHost(python=str(fake)) as host:
        d = Daemon(
            tmp_path,
            {
                "workers": {"count": 1, "hosts": [host.host_config(1)]},
                "health": {"agent_lease_s": 2.0, "shutdown_after_s": 5.0},
            },
        ).start()
        try:
            sent = fake_dir / "sent"

            def all_sent() -> bool:
                assert d.proc is not None and d.proc.poll() is None, "the daemon died"
                d.call("status")
                return sent.exists() and int(sent.read_text()) >= FRAMES

            Daemon.wait_for(all_sent, 120, f"{FRAMES} frames to be sent")
            # They were read, not dropped with the first connection: the frames about
            # attempts the daemon never ran are events, from every connection.
            Daemon.wait_for(
                lambda: len(d.events("worker_exited")) >= FRAMES // PER_CONNECTION - 1,
                20,
                "every fake agent's connection to end",
            )
            assert len(d.events("late_frame")) > FRAMES // 10
            work = tmp_path / "work"
            work.mkdir()
            d.submit(
                f'id = "ws"\n[[tasks]]\nid = "after"\ncommand = "echo ok > {work}/ok"\n', "ws.toml"
            )
            assert d.wait_task("ws/after", "completed", timeout=20)["retry_count"] == 0
            assert (work / "ok").read_text() == "ok\n"
            assert d.proc is not None and d.proc.poll() is None
            status = d.call("status")
            assert json.dumps(status)
        finally:
            if d.proc is not None and d.proc.poll() is None:
                assert d.stop() == 0
            assert_no_leftovers()
