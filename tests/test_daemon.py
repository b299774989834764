"""The daemon as an operator meets it: start-up on damaged state, the lock, the control
socket's refusals, reloads, derived files, systemd notification and operator actions."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ROOT, Daemon, assert_no_leftovers, marker_processes, to_toml


def orchd(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def orchctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ctl", *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


ONE_TASK = 'id = "ws-one"\n[[tasks]]\nid = "one"\ncommand = "echo hello"\n'


def test_corrupt_record_stops_startup_with_exit_65(tmp_path: Path) -> None:
    """A damaged record followed by good ones: orchd exits 65 naming the file, the line and
    the orchctl command to run; `orchctl state validate` reports the same line."""
    d = Daemon(tmp_path).start()
    d.submit(ONE_TASK)
    d.wait_task("one", "completed")
    assert d.stop() == 0
    log = d.state_dir / "transitions.jsonl"
    lines = log.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b'"cause":"', b'"cause":"X', 1)
    log.write_bytes(b"\n".join(lines))
    r = orchd("--config", str(d.config_path), cwd=tmp_path)
    assert r.returncode == 65, r.stderr
    assert "transitions.jsonl" in r.stderr and "line 2" in r.stderr and "orchctl state" in r.stderr
    v = orchctl("state", "validate", "--state-dir", str(d.state_dir))
    assert v.returncode == 65 and "line 2" in v.stdout + v.stderr


def test_torn_tail_is_cut_and_reported(tmp_path: Path) -> None:
    """A torn final record is cut at start-up, the damaged file kept aside, and an event
    says what was repaired; the daemon runs on."""
    d = Daemon(tmp_path).start()
    d.submit(ONE_TASK)
    d.wait_task("one", "completed")
    assert d.stop() == 0
    log = d.state_dir / "transitions.jsonl"
    whole = log.read_bytes()
    with log.open("ab") as f:
        f.write(b'{"seq":999,"ts":1.0,"entity":"ta')
    d2 = Daemon(tmp_path, d.cfg).start()
    try:
        ev = d2.wait_event("state_repaired")
        assert ev["severity"] == "warning"
        assert list(d2.state_dir.glob("transitions.jsonl.broken.*"))
        assert log.read_bytes().startswith(whole)
        assert d2.task("one")["state"] == "completed"
    finally:
        d2.stop()


def test_second_daemon_on_same_state_is_refused(daemon: Daemon) -> None:
    """Only one daemon per state directory: a second one exits at once with a clear error."""
    other = daemon.tmp / "other.toml"
    other.write_text(to_toml(daemon.cfg | {"socket_path": str(daemon.tmp / "other.sock")}))
    r = orchd("--config", str(other), cwd=daemon.tmp)
    assert r.returncode == 75
    assert "lock" in r.stderr.lower() or "in use" in r.stderr.lower()
    assert daemon.call("status")["last_seq"] >= 1


def test_orchctl_without_daemon_exits_7(tmp_path: Path) -> None:
    """orchctl says the daemon is not running and exits 7 when nothing listens."""
    r = orchctl("--socket", str(tmp_path / "none.sock"), "status")
    assert r.returncode == 7 and "not running" in r.stderr


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    """orchd refuses a config with an unknown key, naming the key and the file."""
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[tasks]\ntimeout_seconds = 5\n")
    r = orchd("--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 78
    assert "timeout_seconds" in r.stderr and "bad.toml" in r.stderr


def _raw(sock_path: str, payload: bytes) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(sock_path)
        s.sendall(payload)
        head = s.recv(4, socket.MSG_WAITALL)
        (n,) = struct.unpack(">I", head)
        body = b""
        while len(body) < n:
            body += s.recv(n - len(body))
    out: dict[str, object] = json.loads(body)
    return out


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def test_bad_requests_get_clear_errors_and_do_not_disturb(daemon: Daemon) -> None:
    """Malformed, oversized, unknown and ill-typed requests are answered with an error code
    and message; the daemon keeps serving."""
    cases = [
        (_frame(b"not json"), "invalid"),
        (_frame(b'{"id": 1, "method": "launch_missiles", "params": {}}'), "invalid"),
        (_frame(b'{"id": 2, "method": "show", "params": {"task_id": 5}}'), "invalid"),
        (_frame(b'{"id": 3, "method": "status", "params": {"verbose": true}}'), "invalid"),
        (struct.pack(">I", 64 * 1024 * 1024), "too_large"),
    ]
    for payload, code in cases:
        resp = _raw(daemon.socket, payload)
        assert resp["ok"] is False
        err = resp["error"]
        assert isinstance(err, dict) and err["code"] == code and err["message"]
    missing = daemon.ctl("show", "no-such-task")
    assert missing.returncode == 3 and "no-such-task" in missing.stderr
    assert daemon.call("status")["draining"] is False


def test_socket_is_not_world_accessible(daemon: Daemon) -> None:
    """The control socket is created 0660."""
    assert os.stat(daemon.socket).st_mode & 0o777 == 0o660


def test_sighup_reload_refuses_bad_config_and_applies_good_one(daemon: Daemon) -> None:
    """SIGHUP re-reads the config: an invalid one is refused (event) and the old kept; a
    valid change of a resource limit is applied."""
    assert daemon.proc is not None
    good = daemon.config_path.read_text()
    daemon.config_path.write_text(good + "\n[bogus]\nx = 1\n")
    daemon.proc.send_signal(signal.SIGHUP)
    ev = daemon.wait_event("config_rejected")
    assert "bogus" in ev["message"]
    cfg = dict(daemon.cfg)
    cfg["resources"] = {"git_repo_write": {"max_holders": 3}}
    daemon.config_path.write_text(to_toml(cfg))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_event("config_reloaded")
    res = daemon.ctl_json("resources")
    assert res == [{"id": "git_repo_write", "max_holders": 3, "holders": [], "waiting": []}]


def test_checkpoints_metrics_and_interventions_are_written(daemon: Daemon) -> None:
    """Task transitions produce a workstream checkpoint with the guide's lists, metrics.json
    is refreshed, and every changing request is in interventions.log with the peer's uid."""
    daemon.submit(ONE_TASK)
    daemon.wait_task("one", "completed")
    cp = daemon.state_dir / "checkpoints" / "ws-one_latest.json"

    def checkpoint_done() -> bool:
        if not cp.exists():
            return False
        return json.loads(cp.read_bytes().rsplit(b',"crc"', 1)[0] + b"}")["completed_tasks"] == [
            "ws-one/one"
        ]

    Daemon.wait_for(checkpoint_done, 5, "a checkpoint listing the completed task")
    data = json.loads(cp.read_bytes().rsplit(b',"crc"', 1)[0] + b"}")
    assert (
        data["workstream_id"] == "ws-one"
        and data["failed_tasks"] == []
        and "resources_held" in data
    )
    metrics = daemon.state_dir / "metrics.json"
    Daemon.wait_for(
        lambda: metrics.exists() and json.loads(metrics.read_text())["completed"] >= 1,
        5,
        "metrics with the completed task",
    )
    m = json.loads(metrics.read_text())
    assert m["tasks_by_state"] == {"completed": 1} and m["queue_wait_s"]["samples"] >= 1
    entries = [
        json.loads(x) for x in (daemon.state_dir / "interventions.log").read_text().splitlines()
    ]
    assert any(e["method"] == "submit" and e["uid"] == os.getuid() and e["ok"] for e in entries)


def test_queue_timeout_is_reported(tmp_path: Path) -> None:
    """A task waiting for a worker longer than its queue_timeout_s raises an event."""
    d = Daemon(tmp_path, {"workers": {"count": 1}}).start()
    try:
        d.submit("""
id = "ws-q"
[[tasks]]
id = "hog"
command = "sleep 1"
[[tasks]]
id = "waiter"
command = "true"
queue_timeout_s = 0.2
""")
        ev = d.wait_event("task_queue_timeout", task_id="ws-q/waiter")
        assert ev["severity"] == "warning"
        d.wait_task("waiter", "completed")
    finally:
        d.stop()
        assert_no_leftovers()


def test_operator_retry_skip_cancel(daemon: Daemon) -> None:
    """retry --timeout reruns a failed task with the new limit; skip needs confirmation
    without a TTY and then marks it completed; cancel kills a running task."""
    daemon.submit("""
id = "ws-ops"
[[tasks]]
id = "needs-time"
command = "sleep 0.6"
timeout_s = 0.2
max_retries = 1
critical = false
[[tasks]]
id = "hopeless"
command = "exit 1"
max_retries = 1
critical = false
[[tasks]]
id = "forever"
command = "sleep 300"
critical = false
""")
    daemon.wait_task("needs-time", "failed")
    r = daemon.ctl("retry", "needs-time", "--timeout", "5")
    assert r.returncode == 0 and "seq" in r.stdout
    t = daemon.wait_task("needs-time", "completed")
    assert t["timeout_s"] == 5 and t["retry_count"] == 0
    daemon.wait_task("hopeless", "failed")
    refused = daemon.ctl("skip", "hopeless", "--reason", "not needed")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    ok = daemon.ctl("--yes", "skip", "hopeless", "--reason", "not needed")
    assert ok.returncode == 0
    skipped = daemon.task("hopeless")
    assert (
        skipped["state"] == "completed"
        and skipped["skipped"]
        and skipped["skip_reason"] == "not needed"
    )
    again = daemon.ctl("--yes", "skip", "hopeless", "--reason", "twice")
    assert again.returncode == 5
    daemon.wait_task("forever", "running")
    assert daemon.ctl("--yes", "cancel", "forever").returncode == 0
    daemon.wait_task("forever", "cancelled")
    daemon.wait_ws("ws-ops", "completed")


def test_ready_notification_and_clean_task_environment(tmp_path: Path) -> None:
    """Under systemd the daemon sends READY=1 once it serves and then STATUS= lines, and
    tasks inherit neither NOTIFY_SOCKET nor WATCHDOG_* nor LISTEN_*."""
    notify_path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
        ns.bind(notify_path)
        ns.settimeout(20)
        d = Daemon(tmp_path)
        env_before = dict(os.environ)
        os.environ.update({"NOTIFY_SOCKET": notify_path, "LISTEN_FDS": "0", "WATCHDOG_USEC": "0"})
        try:
            # The harness strips NOTIFY_SOCKET/WATCHDOG_*; start by hand with them set.
            out = (tmp_path / "orchd.out").open("ab")
            d.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "supervisor",
                    "--config",
                    str(d.config_path),
                    "--log-format",
                    "json",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
                env=dict(os.environ)
                | {"ORCHD_TEST_RUN": __import__("tests.harness").harness.RUN_TAG},
                start_new_session=True,
            )
            out.close()
        finally:
            os.environ.clear()
            os.environ.update(env_before)
        try:
            msgs = []
            while not any("READY=1" in m for m in msgs):
                msgs.append(ns.recv(4096).decode())
            d.wait_for(d._answers, 10, "the socket")
            d.submit('id = "ws-env"\n[[tasks]]\nid = "env"\ncommand = "env"\n')
            d.wait_task("env", "completed")
            out_env = d.log("env")
            assert "ORCHD_ATTEMPT_ID=" in out_env
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_FDS"):
                assert f"\n{name}=" not in out_env
            # Then a STATUS= line for `systemctl status` with the live figures.
            while not any(m.startswith("STATUS=") and "workers 2/2 up" in m for m in msgs):
                msgs.append(ns.recv(4096).decode())
        finally:
            d.stop()
            assert_no_leftovers()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs to fill up (needs root, as CI has)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def _fill(path: Path) -> None:
    with path.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def test_full_disk_refuses_changes_then_recovers(tmp_path: Path, small_disk: Path) -> None:
    """With the state disk full a submit is refused with a clear error and nothing is half
    stored; a task that finishes meanwhile is recorded once space is back; nothing is lost."""
    d = Daemon(tmp_path, {"state_dir": str(small_disk / "state")})
    d.state_dir = small_disk / "state"
    d.start()
    try:
        d.submit('id = "ws-before"\n[[tasks]]\nid = "before"\ncommand = "sleep 1.5"\n')
        d.wait_task("before", "running")
        # Its command has started (the log header is written) before the disk fills up.
        Daemon.wait_for(lambda: d.task("before").get("pid") is not None, 10, "its pid")
        filler = small_disk / "filler"
        _fill(filler)
        path = tmp_path / "late.toml"
        # Large enough that its record needs fresh pages, not the slack of the log's last one.
        tasks = "".join(f'[[tasks]]\nid = "late-{i}"\ncommand = "true"\n' for i in range(200))
        path.write_text('id = "ws-late"\n' + tasks)
        r = d.ctl("submit", str(path))
        assert r.returncode == 1 and "space" in r.stderr.lower(), r.stderr
        assert [w["id"] for w in d.call("ws_list")] == ["ws-before"]
        # "before" ends while the disk is full: its result is either recorded in the slack of
        # the log's last page or has to wait for space (store_write_failed); wait for either.
        Daemon.wait_for(
            lambda: (
                not marker_processes("before.")
                and (
                    "store_write_failed" in d.output.read_text()
                    or d.task("before")["state"] == "completed"
                )
            ),
            10,
            "the task to end while the disk is full",
        )
        filler.unlink()
        assert d.wait_task("before", "completed")["retry_count"] == 0
        assert d.ctl("submit", str(path)).returncode == 0
        d.wait_ws("ws-late", "completed")
    finally:
        d.stop()
        assert_no_leftovers()
    d2 = Daemon(tmp_path, {"state_dir": str(small_disk / "state")})
    d2.state_dir = small_disk / "state"
    d2.start()
    try:
        states = {t["id"]: t["state"] for t in d2.call("tasks")}
        assert len(states) == 201 and set(states.values()) == {"completed"}
    finally:
        d2.stop()


def test_socket_of_a_live_daemon_is_never_taken(daemon: Daemon, tmp_path: Path) -> None:
    """A second daemon (own state) pointed at a live daemon's socket refuses to start and
    leaves the first one serving."""
    other_dir = tmp_path / "second"
    other_dir.mkdir()
    cfg = dict(daemon.cfg) | {"state_dir": str(other_dir / "state")}
    path = other_dir / "orchd.toml"
    path.write_text(to_toml(cfg))
    r = orchd("--config", str(path), cwd=other_dir)
    assert r.returncode == 1 and "another process listens" in r.stderr
    assert daemon.call("status")["draining"] is False


# A client of its own for a peer that is not root: the system Python, since the test's
# interpreter may live where other users cannot reach it.
_STATUS_AS_PEER = """
import json, socket, struct, sys
with socket.socket(socket.AF_UNIX) as s:
    s.settimeout(10)
    s.connect(sys.argv[1])
    body = b'{"id": 1, "method": "status", "params": {}}'
    try:
        s.sendall(struct.pack(">I", len(body)) + body)
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused before it asked: the refusal frame is still there to read
    (n,) = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL))
    print(json.loads(s.recv(n, socket.MSG_WAITALL))["ok"])
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"),
    reason="needs root (to run a peer as nobody) and /usr/bin/python3",
)
def test_control_users_added_by_reload_are_let_in(sock_dir: Path) -> None:
    """A user added to [control] read_users while the daemon runs may use the socket once
    the config is reloaded, with no restart."""
    os.chmod(sock_dir, 0o711)
    d = Daemon(sock_dir).start()

    def peer_allowed() -> bool:
        r = subprocess.run(
            ["/usr/bin/python3", "-c", _STATUS_AS_PEER, d.socket],
            capture_output=True,
            text=True,
            timeout=30,
            cwd="/",
            user=65534,
            group=65534,
            extra_groups=[0],  # the socket is 0660 root:root
        )
        assert r.returncode == 0, r.stderr
        return r.stdout.strip() == "True"

    try:
        assert d.proc is not None
        assert not peer_allowed()
        d.cfg["control"] = d.cfg.get("control", {}) | {"read_users": ["65534"]}
        d.config_path.write_text(to_toml(d.cfg))
        d.proc.send_signal(signal.SIGHUP)
        d.wait_event("config_reloaded")
        assert peer_allowed()
    finally:
        d.stop()
        assert_no_leftovers()
