"""Commands that throw work away ask first: with no terminal and no --yes they exit 2 and
change nothing; on a terminal (a real pty) they show the plan, `n` or end of input changes
nothing, `y` acts. Commands that lose nothing do not ask. Real orchd, real orchctl."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ctl.client import RemoteError
from tests.harness import ROOT, Daemon, assert_no_leftovers
from tests.test_operator import ws_file

LIVE = ws_file(
    "ws-live",
    {"id": "long", "command": "sleep 600", "timeout_s": 900},
    {"id": "after", "command": "true", "depends_on": ["long"]},
)
DONE = ws_file(
    "ws-done",
    {"id": "d1", "command": "true"},
    {"id": "d2", "command": "true", "depends_on": ["d1"]},
)
BAD = ws_file("ws-bad", {"id": "bad", "command": "exit 3", "max_retries": 1})

# Every command that throws work away, on the state the `world` fixture sets up.
DESTRUCTIVE = {
    "cancel-running": ["cancel", "long"],
    "skip": ["skip", "after", "--reason", "not needed"],
    "ws-rollback": ["ws", "rollback", "ws-live", "--to-checkpoint", "latest"],
    "ws-retry": ["ws", "retry", "ws-done"],
    "ws-resume": ["ws", "resume", "ws-done", "--from-task", "d1"],
    "worker-shutdown-force": ["worker", "shutdown", "{worker}", "--force"],
    "state-restore": ["state", "restore", "--from-transitions", "--state-dir", "{offline}"],
    "state-repair": ["state", "repair", "--state-dir", "{offline}"],
}


class World:
    """A daemon with a running task (and its pending dependent), a completed workstream
    and a checkpoint of each; beside it, the state directory of a stopped daemon, its log
    ending in a torn write."""

    def __init__(self, live: Daemon, offline: Path) -> None:
        self.live, self.offline = live, offline
        self.worker = str(live.task("long")["worker_id"])
        self.seq = int(live.call("status")["last_seq"])

    def argv(self, name: str) -> list[str]:
        fill = {"{worker}": self.worker, "{offline}": str(self.offline)}
        return [fill.get(a, a) for a in DESTRUCTIVE[name]]

    def fingerprint(self) -> tuple[list[dict[str, Any]], dict[str, str], str]:
        """What an operator's command could have changed: the log's records after the
        world was set up that are not the daemon's own doing (an agent's hello, a health
        verdict under load), every task's state, and a digest of the offline directory."""
        mine = []
        for line in (self.live.state_dir / "transitions.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec["seq"] > self.seq and rec["cause"] not in ("auto", "health"):
                mine.append(rec)
        states = {t["id"]: t["state"] for t in self.live.call("tasks")}
        h = hashlib.sha256()
        for p in sorted(self.offline.rglob("*")):
            if p.is_file() and p.name != "lock":
                h.update(p.name.encode() + p.read_bytes())
        return mine, states, h.hexdigest()


def _set_up(live: Daemon) -> None:
    live.submit(LIVE, "live.toml")
    live.submit(DONE, "done.toml")
    live.wait_task("long", "running")
    live.wait_ws("ws-done", "completed")
    for ws in ("ws-live", "ws-done"):
        live.wait_for(lambda w=ws: bool(live.call("ws_checkpoints", workstream=w)), 10, "a cp")
    # The running task's pid is recorded lazily: wait until it is, so the seq stands still.
    live.wait_for(lambda: bool(live.task("long")["attempts"][-1].get("pid")), 10, "its pid")


def _offline_dir(tmp: Path) -> Path:
    d = Daemon(tmp).start()
    try:
        d.submit(DONE)
        d.wait_ws("ws-done", "completed")
    finally:
        assert d.stop() == 0
    with (d.state_dir / "transitions.jsonl").open("ab") as log:
        log.write(b'{"seq":999,"ts":1.0,"entity":"ta')  # a torn write, for repair to cut
    return d.state_dir


def _rerun(live: Daemon, task_id: str, attempt: int) -> None:
    """Wait until `task_id` runs its attempt number `attempt` (its pid known)."""

    def running() -> bool:
        t = live.task(task_id)
        last = t["attempts"][-1]
        return t["state"] == "running" and last["number"] == attempt and bool(last.get("pid"))

    live.wait_for(running, 15, f"{task_id} to run attempt {attempt}")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One World for the tests that must change nothing (so they can share it)."""
    offline = _offline_dir(tmp_path_factory.mktemp("offline"))
    live = Daemon(tmp_path_factory.mktemp("live")).start()
    try:
        _set_up(live)
        yield World(live, offline)
    finally:
        live.stop()
        assert_no_leftovers()


def ctl(socket: str, argv: list[str], *, stdin: str) -> subprocess.CompletedProcess[str]:
    """Run the real orchctl with its stdin `closed` (fd 0 shut), `devnull`, or a pty on
    which `stdin` is typed (anything else)."""
    cmd = [sys.executable, "-m", "ctl", "--socket", socket, *argv]
    if stdin == "closed":
        return subprocess.run(
            ["sh", "-c", 'exec "$@" 0<&-', "sh", *cmd],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
    if stdin == "devnull":
        return subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, cwd=ROOT
        )
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(
            cmd, stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
        )
        os.close(slave)
        slave = -1
        os.write(master, stdin.encode())  # held by the terminal until orchctl reads it
        out, err = proc.communicate(timeout=60)
    finally:
        if slave != -1:
            os.close(slave)
        os.close(master)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("stdin", ["closed", "devnull"])
@pytest.mark.parametrize("name", sorted(DESTRUCTIVE))
def test_no_terminal_and_no_yes_exits_2_and_changes_nothing(
    world: World, name: str, stdin: str
) -> None:
    """Without a terminal and without --yes: exit 2 at once, a message naming --yes and
    what would have been done; no record in the log since but the daemon's own, no task
    changed, the offline files unchanged."""
    before = world.fingerprint()
    r = ctl(world.live.socket, world.argv(name), stdin=stdin)
    assert r.returncode == 2, r.stderr
    assert "--yes" in r.stderr and "nothing was changed" in r.stderr and " will:" in r.stderr
    assert world.fingerprint() == before


@pytest.mark.parametrize("answer", ["n\n", "\x04"], ids=["n", "eof"])
@pytest.mark.parametrize("name", sorted(DESTRUCTIVE))
def test_answering_no_on_a_terminal_changes_nothing(world: World, name: str, answer: str) -> None:
    """On a terminal the plan is shown and asked about; `n` (or end of input) exits 1 with
    `not done`, the state unchanged."""
    before = world.fingerprint()
    r = ctl(world.live.socket, world.argv(name), stdin=answer)
    assert r.returncode == 1, r.stderr
    assert "[y/N]" in r.stderr and "not done; nothing was changed" in r.stderr
    assert world.fingerprint() == before


def test_the_plans_name_what_is_killed_and_what_changes(world: World) -> None:
    """The plans shown say which attempt is killed and which tasks change state."""
    plans = {n: ctl(world.live.socket, world.argv(n), stdin="devnull").stderr for n in DESTRUCTIVE}
    kill = f"kill attempt 1 of task ws-live/long (on {world.worker})"
    assert kill in plans["cancel-running"]
    assert "task ws-live/long: stop it (cancel)" in plans["cancel-running"]
    assert kill in plans["ws-rollback"] and kill in plans["worker-shutdown-force"]
    assert "task ws-live/after: pending -> completed" in plans["skip"]
    for n in ("ws-retry", "ws-resume"):
        for t in ("d1", "d2"):
            assert f"task ws-done/{t}: completed -> pending" in plans[n]
    assert "rebuild current.json by replaying" in plans["state-restore"]
    assert "the present current.json is kept as backups/" in plans["state-restore"]
    assert "cut the torn tail of transitions.jsonl" in plans["state-repair"]


def test_preview_records_nothing(world: World) -> None:
    """A dry_run request answers with the plan and its result without a seq, and neither
    the log nor interventions.log grows."""
    before = world.fingerprint()
    interventions = world.live.state_dir / "interventions.log"
    size = interventions.stat().st_size if interventions.exists() else 0
    plan = world.live.call("cancel", task_id="long", dry_run=True)
    assert plan["dry_run"] and plan["result"]["seq"] is None
    assert plan["kills"] == [{"task_id": "ws-live/long", "attempt": 1, "worker_id": world.worker}]
    assert world.fingerprint() == before
    assert (interventions.stat().st_size if interventions.exists() else 0) == size


def test_a_confirmed_request_is_done_only_as_planned(world: World) -> None:
    """A request sent with the digest of another plan (the state changed after the plan
    was shown) is refused, wrong_state, and nothing is done; the plan's own digest is
    stable from one step to the next."""
    before = world.fingerprint()
    plan = world.live.call("ws_retry", workstream="ws-done", dry_run=True)
    again = world.live.call("ws_retry", workstream="ws-done", dry_run=True)
    assert plan["digest"] == again["digest"]
    other = world.live.call("ws_resume", workstream="ws-done", from_task="d2", dry_run=True)
    assert other["digest"] != plan["digest"]
    with pytest.raises(RemoteError) as refused:
        world.live.call("ws_retry", workstream="ws-done", expect=other["digest"])
    assert refused.value.code == "wrong_state" and "nothing was done" in refused.value.message
    assert world.fingerprint() == before
