"""`ws pause` / `ws unpause` and `drain` / `undrain` against the real daemon, through the
real orchctl: nothing new starts while held, running tasks finish, queued tasks stay
queued, and both holds survive a restart."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from tests.faultkit import records
from tests.harness import Daemon, assert_no_leftovers


def gated(tid: str, gate: Path, **extra: str) -> str:
    """A task that runs until `gate` exists."""
    more = "".join(f"{k} = {v}\n" for k, v in extra.items())
    return (
        f'[[tasks]]\nid = "{tid}"\ncommand = "while [ ! -e {gate} ]; do sleep 0.02; done"\n{more}'
    )


def quick(tid: str, *deps: str) -> str:
    return f'[[tasks]]\nid = "{tid}"\ncommand = ["true"]\ndepends_on = {json.dumps(list(deps))}\n'


def attempts(d: Daemon, tid: str) -> int:
    return len(d.task(tid)["attempts"])


def ok(d: Daemon, *args: str) -> str:
    r = d.ctl(*args)
    assert r.returncode == 0, f"orchctl {' '.join(args)} exited {r.returncode}: {r.stderr}"
    return r.stdout


def test_paused_workstream_starts_nothing_while_another_runs_and_stays_paused(
    tmp_path: Path,
) -> None:
    """A paused workstream's running task finishes and its ready tasks stay queued while
    another workstream runs to the end; after a restart it is still paused; unpause runs
    the rest."""
    gate = tmp_path / "gate"
    d = Daemon(tmp_path).start()
    try:
        d.submit('id = "ws-a"\n' + gated("a1", gate) + quick("a2", "a1") + quick("a3", "a1"))
        d.wait_task("a1", "running")
        out = ok(d, "ws", "pause", "ws-a", "--reason", "bisecting a flaky shard")
        assert "paused (seq" in out and "1 running" in out
        gate.touch()
        d.wait_task("a1", "completed")
        d.submit('id = "ws-b"\n' + quick("b1") + quick("b2", "b1") + quick("b3"), "b.toml")
        d.wait_ws("ws-b", "completed")
        # ws-b's whole run gave dispatch every chance: ws-a's ready tasks never started.
        assert d.task("a2")["state"] == d.task("a3")["state"] == "queued"
        assert attempts(d, "a2") == attempts(d, "a3") == 0
        listed = {w["id"]: w for w in d.ctl_json("ws", "list")}
        assert listed["ws-a"]["paused"] is True and listed["ws-b"]["paused"] is False
        assert "paused" in ok(d, "ws", "list")
        assert "(paused: nothing new starts)" in ok(d, "ws", "show", "ws-a")
        assert "its workstream is paused" in ok(d, "deps", "a2")
        assert d.call("status")["paused_workstreams"] == ["ws-a"]

        assert d.stop() == 0
        d.start()
        assert d.call("ws_show", workstream="ws-a")["paused"] is True
        d.submit('id = "ws-c"\n' + quick("c1"), "c.toml")
        d.wait_ws("ws-c", "completed")
        assert attempts(d, "a2") == attempts(d, "a3") == 0

        out = ok(d, "ws", "unpause", "ws-a")
        assert "starts tasks again" in out
        d.wait_ws("ws-a", "completed")
        assert "was not paused" in ok(d, "ws", "unpause", "ws-a")
        paused = [e for e in d.events("workstream_paused") if e["workstream_id"] == "ws-a"]
        assert [e["message"] for e in paused] == ["bisecting a flaky shard"]
        assert d.events("workstream_unpaused")
        actions = [
            json.loads(x)["method"]
            for x in (d.state_dir / "interventions.log").read_text().splitlines()
        ]
        assert actions.count("ws_pause") == 1 and actions.count("ws_unpause") == 2
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
        assert_no_leftovers()


def test_drain_holds_every_start_until_undrain_across_a_restart(tmp_path: Path) -> None:
    """After drain the running task finishes and nothing starts anywhere; `drain --wait`
    returns once nothing runs; the stop that follows has nothing to kill; the restarted
    daemon is still drained; undrain runs what waited."""
    gate = tmp_path / "gate"
    d = Daemon(tmp_path).start()
    try:
        d.submit('id = "ws-a"\n' + gated("g", gate) + quick("q1", "g") + quick("q2"))
        d.wait_task("q2", "completed")
        d.wait_task("g", "running")
        out = ok(d, "drain", "--reason", "kernel update")
        assert "draining (seq" in out and "1 running task(s) finish" in out
        status = ok(d, "status")
        assert "DRAINING: 1 RUNNING" in status and "kernel update" in status
        d.submit('id = "ws-b"\n' + quick("b1"), "b.toml")
        d.wait_task("b1", "queued")
        gate.touch()
        waited = d.ctl("drain", "--wait")
        assert waited.returncode == 0 and "drained: nothing running" in waited.stdout
        d.wait_task("g", "completed")
        # The step that freed the worker would have started q1 or b1: neither started.
        assert d.task("q1")["state"] == d.task("b1")["state"] == "queued"
        assert attempts(d, "q1") == attempts(d, "b1") == 0
        assert "DRAINED: NOTHING RUNNING" in ok(d, "status")
        assert d.call("status")["drain"]["reason"] == "kernel update"

        assert d.stop() == 0
        stopped = [r for r in records(d.state_dir) if r["cause"] == "shutdown"]
        assert [r["entity"] for r in stopped if r["entity"] == "task"] == []
        d.start()
        d.wait_for(
            lambda: sorted(w["state"] for w in d.workers()) == ["idle", "idle"],
            10,
            "both workers idle after the restart",
        )
        status_json = d.call("status")
        assert status_json["drain"] is not None and status_json["drain"]["running"] == 0
        assert attempts(d, "q1") == attempts(d, "b1") == 0
        assert "already" in ok(d, "drain")

        out = ok(d, "undrain")
        assert "starts tasks again" in out
        d.wait_ws("ws-a", "completed")
        d.wait_ws("ws-b", "completed")
        assert d.call("status")["drain"] is None
        assert [e["event"] for e in d.events() if e["event"].startswith("daemon_")] == [
            "daemon_draining",
            "daemon_undrained",
        ]
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
        assert_no_leftovers()


def _status_lines(ns: socket.socket, want: str) -> list[str]:
    got: list[str] = []
    while not any(want in m for m in got):
        got.append(ns.recv(4096).decode())
    return got


def test_systemd_status_line_says_draining_then_drained(tmp_path: Path) -> None:
    """Under systemd the STATUS= line says "draining: 1 running" soon after a drain, and
    "drained: nothing running" once the running task has finished."""
    gate = tmp_path / "gate"
    notify_path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
        ns.bind(notify_path)
        ns.settimeout(10)
        d = Daemon(tmp_path).start(env_extra={"NOTIFY_SOCKET": notify_path})
        try:
            d.submit('id = "ws-a"\n' + gated("g", gate))
            d.wait_task("g", "running")
            ok(d, "drain")
            before = _status_lines(ns, "STATUS=draining: 1 running")
            assert not any("drained" in m for m in before)
            gate.touch()
            after = _status_lines(ns, "STATUS=drained: nothing running")
            d.wait_task("g", "completed")
            assert after[-1].startswith("STATUS=drained: nothing running; 0 running")
        finally:
            d.stop()
            assert_no_leftovers()
