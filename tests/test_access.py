"""Operator access that cannot be locked out: a cap per peer uid, connections kept for root,
the daemon's user and the admins, and peers with no rights turned away as they connect."""

from __future__ import annotations

import json
import os
import pwd
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.control.admission import Admission, RefusalLog
from supervisor.core.config import ControlConfig, parse_config
from supervisor.core.errors import ConfigError
from tests.harness import ROOT, Daemon, assert_no_leftovers

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to run peers as other uids)")

# A peer process of another uid. The test's interpreter may live where other users cannot
# reach it (/root/.pyenv), so the process starts as root, loads what it needs, then drops
# to the uid (gid the same, supplementary group 0: the socket is 0660 root:root) before it
# connects: SO_PEERCRED sees only that uid.
_DROP = """
import os, sys
uid = int(os.environ["PEER_UID"])
os.setgroups([0])
os.setgid(uid)
os.setuid(uid)
"""

# orchctl itself, run as PEER_UID.
# (Its arguments are parsed once first, so what argparse imports lazily is loaded while
# the stdlib is still in reach.)
_ORCHCTL_AS = (
    "import sys, ctl.cli\nctl.cli._parser().parse_args(sys.argv[1:])\n"
    + _DROP
    + "sys.exit(ctl.cli.main(sys.argv[1:]))\n"
)

# Opens COUNT connections and sends nothing. The daemon answers a refused one at once with
# an error frame and closes it; to tell the others (accepted) from refusals still on their
# way, once the refusals expected have come it sends `status` on each one left: the first
# frame back is either a refusal or the answer. It prints its report, then holds the
# accepted connections open until its stdin closes.
_FLOOD = (
    "import json, select, socket, struct, time\n"
    + _DROP
    + """
path, count, expect_open = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = []
for _ in range(count):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    socks.append(s)

def frame(s):
    (n,) = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL))
    return json.loads(s.recv(n, socket.MSG_WAITALL))

refused, left = [], list(socks)
deadline = time.monotonic() + 15
while len(refused) < count - expect_open and time.monotonic() < deadline:
    ready, _, _ = select.select(left, [], [], 0.2)
    for s in ready:
        refused.append(frame(s)["error"])
        left.remove(s)
answered = []
for s in left:
    body = b'{"id": 7, "method": "status", "params": {}}'
    s.sendall(struct.pack(">I", len(body)) + body)
    resp = frame(s)
    if resp["ok"]:
        answered.append(s)
    else:
        refused.append(resp["error"])
print(json.dumps({"open": len(answered), "refused": refused}), flush=True)
sys.stdin.read()
"""
)


def _free_uids(n: int) -> list[int]:
    """Uids no account has (a peer needs no passwd entry; access lists take numbers)."""
    out = []
    for uid in range(64990, 60000, -1):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            out.append(uid)
            if len(out) == n:
                return out
    raise AssertionError("no free uid")


def _env(uid: int) -> dict[str, str]:
    return os.environ | {"PEER_UID": str(uid), "PYTHONPATH": str(ROOT)}


def orchctl_as(uid: int, d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    """The real orchctl, run as `uid`."""
    return subprocess.run(
        [sys.executable, "-c", _ORCHCTL_AS, "--socket", d.socket, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=_env(uid),
    )


class Flood:
    """A process of `uid` holding as many of `count` idle connections as it was let have."""

    def __init__(self, d: Daemon, uid: int, count: int, expect_open: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _FLOOD, d.socket, str(count), str(expect_open)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=_env(uid),
        )
        try:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()
            assert line, f"the flood of uid {uid} exited {self.proc.wait(10)}"
            report = json.loads(line)
        except BaseException:
            self.proc.kill()
            self.close()
            raise
        self.open: int = report["open"]
        self.refused: list[dict[str, str]] = report["refused"]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def shared_sock_dir(sock_dir: Path) -> Iterator[Path]:
    """The socket directory made searchable, so peers of other uids reach the socket."""
    os.chmod(sock_dir, 0o711)
    yield sock_dir


def _refusal_lines(d: Daemon, uid: int) -> list[dict[str, object]]:
    out = []
    for line in d.output.read_text().splitlines():
        if '"control_connection_refused"' in line:
            rec = json.loads(line)
            if rec.get("uid") == uid:
                out.append(rec)
    return out


@needs_root
def test_idle_flood_from_one_uid_leaves_root_and_admins_in(shared_sock_dir: Path) -> None:
    """200 idle connections from an unprivileged uid: it holds 16 (the cap per uid) and is
    told why for the rest; root's and an admin's `orchctl status` still answer; its own
    next orchctl is refused by the cap until it lets go; the refusals make one log line,
    not 184."""
    nobody = pwd.getpwnam("nobody").pw_uid
    (admin,) = _free_uids(1)
    d = Daemon(
        shared_sock_dir, {"control": {"read_users": [str(nobody)], "admin_users": [str(admin)]}}
    ).start()
    flood = None
    try:
        flood = Flood(d, nobody, 200, expect_open=16)
        assert flood.open == 16
        assert len(flood.refused) == 184
        assert {r["code"] for r in flood.refused} == {"unavailable"}
        assert f"too many connections from uid {nobody} (limit 16" in flood.refused[0]["message"]
        # While it holds them: root and the admin are answered, by the real orchctl.
        r = d.ctl("status")
        assert r.returncode == 0 and "last seq" in r.stdout, r.stderr
        r = orchctl_as(admin, d, "status")
        assert r.returncode == 0 and "last seq" in r.stdout, r.stderr
        # The flooding uid's own orchctl is capped, with the reason and exit 1.
        r = orchctl_as(nobody, d, "status")
        assert r.returncode == 1
        assert f"too many connections from uid {nobody} (limit 16" in r.stderr
        Daemon.wait_for(lambda: bool(_refusal_lines(d, nobody)), 10, "the refusal logged")
        lines = _refusal_lines(d, nobody)
        assert len(lines) <= 2, lines  # at most once in 10 s per uid (slow machines: twice)
        assert lines[0]["reason"] == "too_many_connections" and lines[0]["open_by_uid"] == 16
        # Its slots come back as it goes: the same uid is answered again.
        flood.close()
        Daemon.wait_for(
            lambda: orchctl_as(nobody, d, "status").returncode == 0, 10, "the slots back"
        )
    finally:
        if flood is not None:
            flood.close()
        d.stop()
        assert_no_leftovers()


@needs_root
def test_reserve_keeps_room_for_root_and_admins_when_shared_slots_are_full(
    shared_sock_dir: Path,
) -> None:
    """Two ordinary uids fill every connection open to all (8 of 12): a third ordinary
    uid is refused with the reason, while root, an admin by uid and an admin by group
    still get in through the 4 reserved."""
    a, b, c, admin, by_group = _free_uids(5)
    cfg = {
        "read_users": [str(a), str(b), str(c)],
        "admin_users": [str(admin)],
        # A peer's groups are its primary gid and /etc/group's lists: gid == uid here.
        "admin_groups": [str(by_group)],
        "max_connections": 12,
        "max_connections_per_uid": 6,
        "reserved_connections": 4,
    }
    d = Daemon(shared_sock_dir, {"control": cfg}).start()
    floods: list[Flood] = []
    try:
        floods.append(Flood(d, a, 10, expect_open=6))
        floods.append(Flood(d, b, 10, expect_open=2))
        assert [f.open for f in floods] == [6, 2]
        assert "the 8 open to every user are in use" in floods[1].refused[-1]["message"]
        r = orchctl_as(c, d, "status")
        assert r.returncode == 1 and "the other 4 are kept for root" in r.stderr, r.stderr
        assert d.ctl("status").returncode == 0
        for uid in (admin, by_group):
            r = orchctl_as(uid, d, "status")
            assert r.returncode == 0, r.stderr
    finally:
        for f in floods:
            f.close()
        d.stop()
        assert_no_leftovers()


@needs_root
def test_peer_with_no_rights_is_refused_at_connect_and_takes_no_slot(
    shared_sock_dir: Path,
) -> None:
    """A uid in no access list opening 200 connections gets "permission denied" on each at
    once and holds none of them, so a reader with a cap of 16 still gets its 16."""
    stranger, reader = _free_uids(2)
    d = Daemon(
        shared_sock_dir, {"control": {"read_users": [str(reader)], "max_connections": 20}}
    ).start()
    floods: list[Flood] = []
    try:
        floods.append(Flood(d, stranger, 200, expect_open=0))
        assert floods[0].open == 0 and len(floods[0].refused) == 200
        assert {r["code"] for r in floods[0].refused} == {"permission_denied"}
        assert f"uid {stranger} may not use this socket" in floods[0].refused[0]["message"]
        r = orchctl_as(stranger, d, "status")
        assert r.returncode == 4 and "may not use this socket" in r.stderr
        # 20 in all, 8 reserved: the shared 12 are all still there for the reader.
        floods.append(Flood(d, reader, 16, expect_open=12))
        assert floods[1].open == 12
        Daemon.wait_for(lambda: bool(_refusal_lines(d, stranger)), 10, "the refusal logged")
        assert 1 <= len(_refusal_lines(d, stranger)) <= 2
        assert _refusal_lines(d, stranger)[0]["reason"] == "no_rights"
    finally:
        for f in floods:
            f.close()
        d.stop()
        assert_no_leftovers()


def test_client_stalling_mid_request_is_cut_off_and_the_socket_stays_open(
    sock_dir: Path,
) -> None:
    """A client that sends a frame's header and stalls gets an error after
    request_timeout_s and is closed; the socket keeps serving everyone else (it used to
    close for good)."""
    d = Daemon(sock_dir, {"control": {"request_timeout_s": 0.3}}).start()
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(d.socket)
            s.sendall(struct.pack(">I", 100) + b'{"id": 1')
            (n,) = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL))
            err = json.loads(s.recv(n, socket.MSG_WAITALL))["error"]
            assert "not complete within 0.3s" in err["message"]
            assert s.recv(1) == b""  # closed
        assert d.ctl("status").returncode == 0
    finally:
        d.stop()
        assert_no_leftovers()


def _cfg(**kw: int) -> ControlConfig:
    return ControlConfig(**kw)


def test_admission_caps_each_uid_and_keeps_the_reserve() -> None:
    """Ordinary uids share max - reserved slots, each uid at most its cap; privileged peers
    may use the reserve but not exceed the cap or the total; a slot given back is reusable."""
    cfg = _cfg(max_connections=5, max_connections_per_uid=2, reserved_connections=2)
    adm = Admission()
    assert adm.enter(1, False, cfg) is None
    assert adm.enter(1, False, cfg) is None
    assert "from uid 1 (limit 2" in (adm.enter(1, False, cfg) or "")
    assert adm.enter(2, False, cfg) is None
    assert "the 3 open to every user" in (adm.enter(3, False, cfg) or "")
    assert adm.enter(0, True, cfg) is None
    assert adm.enter(0, True, cfg) is None
    assert "all 5 are in use" in (adm.enter(4, True, cfg) or "")
    adm.leave(0)
    adm.leave(1)
    assert adm.by_uid[1] == 1 and adm.total == 3
    assert "the 3 open to every user" in (adm.enter(3, False, cfg) or "")
    adm.leave(2)
    assert adm.enter(3, False, cfg) is None
    for uid in (0, 1, 3):
        adm.leave(uid)
    assert adm.total == 0 and not adm.by_uid


def test_refusals_are_logged_once_per_interval_with_the_count_left_out() -> None:
    """The first refusal of a kind for a uid is logged, the next ones within the interval
    are not, and the next one logged says how many were left out."""
    log = RefusalLog(interval_s=10.0)
    assert log.should_log("too_many_connections", 5, now=100.0) == 0
    assert all(log.should_log("too_many_connections", 5, now=100.0 + i) is None for i in range(9))
    assert log.should_log("no_rights", 5, now=101.0) == 0
    assert log.should_log("too_many_connections", 6, now=101.0) == 0
    assert log.should_log("too_many_connections", 5, now=110.0) == 9


def test_reserve_must_leave_room_for_everyone() -> None:
    """A reserve as large as max_connections (or a cap of 0 per uid) is refused by name."""
    with pytest.raises(ConfigError, match="reserved_connections"):
        parse_config("[control]\nmax_connections = 4\nreserved_connections = 4\n")
    with pytest.raises(ConfigError, match="max_connections_per_uid"):
        parse_config("[control]\nmax_connections_per_uid = 0\n")
