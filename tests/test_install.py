"""systemd/install.sh and uninstall.sh on a clean host, under a real systemd (a throwaway
one in namespaces, see tests/systemd_box.py): install, an operator as the README adds one,
an upgrade that keeps the state, uninstall with and without --purge. Also the default
socket of orchctl."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ctl.cli import SERVICE_SOCKET, default_socket
from tests.harness import ROOT
from tests.systemd_box import SystemdBox, booted, missing

WORKSTREAM = 'id = "hello"\n[[tasks]]\nid = "greet"\ncommand = "echo hello from $(id -un)"\n'
# What a checkout or an unpacked release holds; caches and local state stay behind.


def test_default_socket_prefers_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """ORCHD_SOCKET wins; without it the service's socket is used only when it exists."""
    monkeypatch.setenv("ORCHD_SOCKET", "/somewhere/else.sock")
    assert default_socket() == "/somewhere/else.sock"
    monkeypatch.delenv("ORCHD_SOCKET")
    want = SERVICE_SOCKET if os.path.exists(SERVICE_SOCKET) else ".state/orchd.sock"
    assert default_socket() == want


@pytest.fixture
def box(tmp_path: Path) -> Iterator[SystemdBox]:
    """A booted throwaway systemd with a copy of this checkout at /mnt/src."""
    if (why := missing()) is not None:
        pytest.skip(why)
    with booted(ROOT, tmp_path / "box") as b:
        yield b


def _as_alice(box: SystemdBox, *args: str) -> object:
    r = box.run("orchctl", "--json", *args, user="alice")
    return json.loads(r.stdout)


def _wait(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_install_upgrade_and_uninstall_under_systemd(box: SystemdBox) -> None:
    """install.sh --enable brings up a verified, running service an operator can use
    without --socket; a second run upgrades and keeps the state; uninstall keeps the state
    unless --purge --yes."""
    src = box.root / "src"

    # Without Debian's python3-venv (no ensurepip) it stops at once and names the package.
    where = "import ensurepip, os; print(os.path.dirname(ensurepip.__file__))"
    ensurepip = box.run("/usr/bin/python3", "-c", where, check=False).stdout.strip()
    if ensurepip:
        box.run("mount", "-t", "tmpfs", "tmpfs", ensurepip)
        r = box.run("/mnt/src/systemd/install.sh", "--enable", check=False)
        box.run("umount", ensurepip)
        assert r.returncode == 1 and "apt-get install python3-venv" in r.stderr
        assert not box.exists("/opt/orchd")

    out = box.run("/mnt/src/systemd/install.sh", "--enable").stdout
    assert "wrote /etc/orchd/orchd.toml" in out
    assert box.run("systemctl", "is-active", "orchd").stdout.strip() == "active"
    assert box.run("systemctl", "is-enabled", "orchd").stdout.strip() == "enabled"
    verify = box.run("systemd-analyze", "verify", "orchd.service")
    assert verify.stdout == verify.stderr == ""
    assert box.run("readlink", "/usr/local/bin/orchctl").stdout.strip() == "/opt/orchd/bin/orchctl"

    # An operator, as the README adds one: the orchd group and [control] users.
    box.run("useradd", "alice")
    box.run("usermod", "-aG", "orchd", "alice")
    box.run("sed", "-i", 's/^users = \\[\\]/users = ["alice"]/', "/etc/orchd/orchd.toml")
    box.run("systemctl", "reload", "orchd")
    _wait(
        "alice to be let in",
        lambda: box.run("orchctl", "status", user="alice", check=False).returncode == 0,
    )
    (box.root / "ws.toml").write_text(WORKSTREAM)
    submitted = _as_alice(box, "submit", "/mnt/ws.toml")
    assert isinstance(submitted, dict) and submitted["workstream_id"] == "hello"

    def greet_done() -> bool:
        tasks = _as_alice(box, "tasks")
        assert isinstance(tasks, list)
        return [(t["id"], t["state"]) for t in tasks] == [("hello/greet", "completed")]

    _wait("the task to complete", greet_done)
    status = _as_alice(box, "status")
    assert isinstance(status, dict) and status["state_dir"] == "/var/lib/orchd"
    log = box.run("orchctl", "logs", "greet", user="alice").stdout
    assert "hello from orchd" in log
    journal = box.run(
        "journalctl", "-u", "orchd", "WORKSTREAM_ID=hello", "EVENT=workstream_completed"
    )
    assert "workstream_completed" in journal.stdout

    # A second run upgrades in place: new code, restarted because it ran, state kept.
    pid_before = box.run("systemctl", "show", "-P", "MainPID", "orchd").stdout.strip()
    pyproject = src / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('version = "0.1.0"', 'version = "0.1.1"'))
    out = box.run("/mnt/src/systemd/install.sh").stdout
    assert "restarting orchd" in out and "orchd 0.1.1 is in /opt/orchd" in out
    assert box.run("systemctl", "is-active", "orchd").stdout.strip() == "active"
    assert box.run("systemctl", "show", "-P", "MainPID", "orchd").stdout.strip() != pid_before
    assert 'users = ["alice"]' in box.run("cat", "/etc/orchd/orchd.toml").stdout
    assert box.exists("/etc/orchd/orchd.toml.new")
    assert greet_done(), "the task's state did not survive the upgrade"

    # uninstall.sh keeps the state and the config.
    box.run("/mnt/src/systemd/uninstall.sh")
    for gone in ("/opt/orchd", "/usr/local/bin/orchctl", "/etc/systemd/system/orchd.service"):
        assert not box.exists(gone), gone
    assert box.run("systemctl", "is-active", "orchd", check=False).stdout.strip() == "inactive"
    assert box.exists("/var/lib/orchd/transitions.jsonl")
    assert box.exists("/etc/orchd/orchd.toml")

    # --purge with no terminal and no --yes changes nothing; with --yes it removes both.
    r = box.run("/mnt/src/systemd/uninstall.sh", "--purge", check=False)
    assert r.returncode == 2 and "--yes" in r.stderr
    assert box.exists("/var/lib/orchd/transitions.jsonl")
    box.run("/mnt/src/systemd/uninstall.sh", "--purge", "--yes")
    assert not box.exists("/var/lib/orchd")
    assert not box.exists("/etc/orchd")
