"""A second host for the remote-worker tests: Debian's sshd in a network namespace.

`RemoteHost` (root only; needs `ip`, `/usr/sbin/sshd`, `ssh` and `ssh-keygen`, which
.ci/run installs) makes a network namespace joined to the test's one by a veth pair on a
private /30, and runs sshd inside it on that address with a config of its own: a host key
made into a temporary directory, root allowed by key only, the authorized key restricted
to the agent (`restrict,command="…"`, the line the README shows). The client side is an
ssh_config file with a pinned known_hosts, `BatchMode`, `StrictHostKeyChecking=yes` and
`ServerAliveInterval=1`, `ServerAliveCountMax=3`, which the daemon's transport uses with `ssh -F`.

The host has a pid namespace of its own too (with a small init that reaps orphans), as
another host would: an agent's sweep of "every marked process of this user" sees the
host's processes only, never the test's local workers or other test runs on the machine.
It shares the file system with the test, so the agent runs the checkout's own interpreter
over ssh, and the test sees its processes with psutil (by their host pids; `pids()` maps
them to the ids the agent reports). Its spool (XDG_RUNTIME_DIR) is its own.
`partition()` / `heal()` take the link down and up;
`stop_sshd()` / `start_sshd()` stop and start the listener (sessions that exist live on);
`close()` kills every process in the namespace and removes the namespace, the veth pair
and the temporary directory, whatever state the test left them in.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ROOT, RUN_TAG

SSHD = "/usr/sbin/sshd"
# The /30 blocks are taken from this range; one is chosen at random among those no
# interface of the test's namespace uses, under a lock, so parallel runs do not clash.
POOL = ipaddress.ip_network("10.213.0.0/16")
_LOCK = Path(tempfile.gettempdir()) / "orchd-remote-host.lock"
# The agent the restricted key may run: the checkout's interpreter and module.
AGENT = f"{sys.executable} -m supervisor.workers.agent"


def missing() -> str | None:
    """Why a RemoteHost cannot be made here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (a network namespace and sshd)"
    for tool in ("ip", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (apt-get install openssh-client iproute2)"
    if not os.access(SSHD, os.X_OK):
        return f"needs {SSHD} (apt-get install openssh-server)"
    return None


needs_remote_host = pytest.mark.skipif(missing() is not None, reason=str(missing()))

# pid 1 of the host's pid namespace: reaps every orphan, exits on SIGTERM.
_INIT = """
import os, signal, time
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.1)
"""


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def restricted_key_line(public_key: str, agent: str = AGENT) -> str:
    """The authorized_keys line that lets the key run the agent and nothing else: no pty,
    no forwarding, no rc; the command the client asked for runs only when it is the agent
    (split into words, never given to a shell), else the session fails with a message."""
    forced = (
        "set -f; case $SSH_ORIGINAL_COMMAND in "
        f"'{agent} '*) exec $SSH_ORIGINAL_COMMAND;; esac; "
        "echo 'orchd: this key runs the agent only' >&2; exit 126"
    )
    return f'restrict,command="{forced}" {public_key.strip()}\n'


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


def _keygen(path: Path, comment: str) -> str:
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path))
    return path.with_suffix(".pub").read_text().strip()


class RemoteHost:
    """sshd in a network namespace on a veth pair; see the module docstring."""

    def __init__(self, name: str = "build-2", python: str = sys.executable) -> None:
        self.name = name
        # The interpreter the host's agent runs with (the `python` of its [[workers.hosts]]);
        # the restricted key runs `<python> -m supervisor.workers.agent …` and nothing else.
        self.python = python
        self.agent = f"{python} -m supervisor.workers.agent"
        token = secrets.token_hex(3)
        self.ns = f"orchd-{token}"
        # Interface names are limited to 15 bytes.
        self.veth_here, self.veth_there = f"oc{token}h", f"oc{token}r"
        self.dir = Path(tempfile.mkdtemp(prefix=f"orchd-host-{token}-", dir="/tmp"))
        self.ssh_config = self.dir / "ssh_config"
        self.sshd_config = self.dir / "sshd_config"
        self.known_hosts = self.dir / "known_hosts"
        self.authorized_keys = self.dir / "authorized_keys"
        self.client_key = self.dir / "client_key"
        self.host_key = self.dir / "ssh_host_ed25519_key"
        self.sshd_log = self.dir / "sshd.log"
        self.address_here = self.address = ""
        self.runtime_dir = self.dir / "run"
        self._sshd: subprocess.Popen[bytes] | None = None
        self._init: subprocess.Popen[bytes] | None = None
        self.init_pid = 0
        self._made_ns = False

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> RemoteHost:
        """Make the namespace, the link, the keys and the configs, and start sshd."""
        why = missing()
        if why is not None:
            raise RuntimeError(f"RemoteHost {why}")
        try:
            self._make_link()
            self._make_keys()
            self._write_configs()
            self._start_init()
            self.start_sshd()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Remove everything, whatever state it is in: processes, sshd, link, namespace."""
        self.kill_processes()
        self.stop_sshd()
        self._stop_init()
        if self._made_ns:
            _run("ip", "link", "del", self.veth_here, check=False)
            _run("ip", "netns", "del", self.ns, check=False)
            self._made_ns = False
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RemoteHost:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _make_link(self) -> None:
        with _LOCK.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            block = self._free_block()
            here, there = list(block.hosts())
            self.address_here, self.address = str(here), str(there)
            _run("ip", "netns", "add", self.ns)
            self._made_ns = True
            _run(
                "ip", "link", "add", self.veth_here, "type", "veth",
                "peer", "name", self.veth_there, "netns", self.ns,
            )  # fmt: skip
            _run("ip", "addr", "add", f"{here}/30", "dev", self.veth_here)
            _run("ip", "link", "set", self.veth_here, "up")
        _run("ip", "-n", self.ns, "addr", "add", f"{there}/30", "dev", self.veth_there)
        _run("ip", "-n", self.ns, "link", "set", self.veth_there, "up")
        _run("ip", "-n", self.ns, "link", "set", "lo", "up")

    @staticmethod
    def _free_block() -> ipaddress.IPv4Network:
        used = []
        for line in _run("ip", "-o", "-4", "addr").stdout.splitlines():
            words = line.split()
            if "inet" in words:
                used.append(ipaddress.ip_interface(words[words.index("inet") + 1]).network)
        blocks = list(POOL.subnets(new_prefix=30))
        for block in random.sample(blocks, 64):
            if not any(block.overlaps(net) for net in used):
                assert isinstance(block, ipaddress.IPv4Network)
                return block
        raise RuntimeError(f"no free /30 in {POOL}")

    def _make_keys(self) -> None:
        host_public = _keygen(self.host_key, f"orchd-test-host-{self.name}")
        self.client_public = _keygen(self.client_key, "orchd-test-client")
        self.host_public = host_public
        self.known_hosts.write_text(f"{self.address} {host_public}\n")
        self.authorized_keys.write_text(restricted_key_line(self.client_public, self.agent))

    def _write_configs(self) -> None:
        self.sshd_config.write_text(
            f"ListenAddress {self.address}:22\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {self.dir}/sshd.pid\n"
            f"AuthorizedKeysFile {self.authorized_keys}\n"
            "PermitRootLogin prohibit-password\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            # The key file is in a directory under the world-writable /tmp, which the
            # ownership checks of StrictModes refuse; a real host keeps ~/.ssh and leaves it on.
            "StrictModes no\n"
            # The harness's run tag (how it finds this run's processes), the checkout's
            # import path and the host's own spool place reach the agent; nothing else of
            # the client's environment does.
            "AcceptEnv ORCHD_TEST_RUN PYTHONPATH XDG_RUNTIME_DIR\n"
            "LogLevel VERBOSE\n"
        )
        python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        self.ssh_config.write_text(
            f"Host {self.name}\n"
            f"    HostName {self.address}\n"
            "    User root\n"
            f"    IdentityFile {self.client_key}\n"
            "    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {self.known_hosts}\n"
            "    GlobalKnownHostsFile /dev/null\n"
            "    StrictHostKeyChecking yes\n"
            "    CheckHostIP no\n"
            "    BatchMode yes\n"
            "    ServerAliveInterval 1\n"
            "    ServerAliveCountMax 3\n"
            "    ConnectTimeout 3\n"
            f"    SetEnv ORCHD_TEST_RUN={RUN_TAG} PYTHONPATH={python_path}"
            f" XDG_RUNTIME_DIR={self.runtime_dir}\n"
            "    LogLevel ERROR\n"
        )

    # --- what tests do to it ----------------------------------------------------------------

    def start_sshd(self, timeout: float = 10.0) -> None:
        """Start the listener and wait until it accepts connections over the link."""
        if self._sshd is not None and self._sshd.poll() is None:
            return
        # Debian's sshd needs its privilege separation directory (made at boot by its unit).
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        with self.sshd_log.open("ab") as out:
            self._sshd = subprocess.Popen(
                [*self.enter(), SSHD, "-D", "-e", "-f", str(self.sshd_config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not self._accepts():
            if self._sshd.poll() is not None:
                raise RuntimeError(
                    f"sshd exited {self._sshd.returncode}: {self.sshd_log.read_text()[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not listen on {self.address}:22 in {timeout}s")
            time.sleep(0.02)

    def _accepts(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection((self.address, 22), 0.5):
            return True
        return False

    def stop_sshd(self) -> None:
        """Stop the listener (new connections are refused; open sessions live on)."""
        proc, self._sshd = self._sshd, None
        if proc is None or proc.poll() is not None:
            return
        # nsenter waits for sshd, its child in the host's pid namespace: signal sshd.
        for child in _children(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            for child in _children(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            proc.kill()
            proc.wait()

    def _start_init(self) -> None:
        """The host's pid namespace, held by a small init (pid 1 there) that reaps orphans."""
        self.runtime_dir.mkdir(mode=0o700)
        with self.sshd_log.open("ab") as out:
            self._init = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, "unshare", "--pid", "--fork", "--mount-proc",
                 "--kill-child", sys.executable, "-c", _INIT],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 10
        while not (kids := _children(self._init.pid)):
            if self._init.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the host's init did not start ({self._init.returncode})")
            time.sleep(0.01)
        self.init_pid = kids[0]

    def _stop_init(self) -> None:
        proc, self._init = self._init, None
        if proc is None:
            return
        # Killing pid 1 of a pid namespace kills every process in it.
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.init_pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)

    def enter(self) -> list[str]:
        """The argv prefix that runs a command on the host (its net, mount, pid namespaces)."""
        return ["nsenter", "-t", str(self.init_pid), "-n", "-m", "-p", "--"]

    def partition(self) -> None:
        """Take the link down: nothing passes either way until heal()."""
        _run("ip", "link", "set", self.veth_here, "down")

    def heal(self) -> None:
        """Bring the link back up (its addresses and route come back with it)."""
        _run("ip", "link", "set", self.veth_here, "up")
        _run("ip", "-n", self.ns, "link", "set", self.veth_there, "up")

    def pin_wrong_host_key(self) -> None:
        """Pin another host key for the address: the client refuses the real one."""
        other = _keygen(self.dir / "other_host_key", "orchd-test-impostor")
        self.known_hosts.write_text(f"{self.address} {other}\n")

    def refuse_client_key(self) -> None:
        """Authorize another key only: the client's key is refused."""
        other = _keygen(self.dir / "other_client_key", "orchd-test-other")
        self.authorized_keys.write_text(restricted_key_line(other, self.agent))

    def restore_keys(self) -> None:
        """The right host key pinned and the client's key authorized again."""
        self.known_hosts.write_text(f"{self.address} {self.host_public}\n")
        self.authorized_keys.write_text(restricted_key_line(self.client_public, self.agent))

    # --- looking at it ------------------------------------------------------------------------

    def host_pids(self) -> dict[int, int]:
        """Every process living on the host (sshd, its sessions, agents, tasks; not its
        init): its pid as the host sees it (what agents report) -> its pid here."""
        if not self.init_pid:
            return {}
        try:
            ns = os.readlink(f"/proc/{self.init_pid}/ns/pid")
        except OSError:
            return {}
        out: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self.init_pid:
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") != ns:
                    continue
                with open(f"/proc/{entry}/status") as f:
                    nspid = next(line for line in f if line.startswith("NSpid:"))
            except (OSError, StopIteration):
                continue
            out[int(nspid.split()[-1])] = int(entry)
        return out

    def pids(self) -> set[int]:
        """The pids of the host's processes as the host sees them (as its agents report)."""
        return set(self.host_pids())

    def here(self, pid: int) -> int:
        """The pid here of the host's process `pid` (for os.kill and psutil)."""
        found = self.host_pids().get(pid)
        if found is None:
            raise ProcessLookupError(f"no process {pid} on {self.name}")
        return found

    def kill_processes(self) -> None:
        """SIGKILL everything on the host but its init and the listener."""
        listener = set(_children(self._sshd.pid)) if self._sshd is not None else set()
        for _ in range(20):
            left = [p for p in self.host_pids().values() if p not in listener]
            if not left:
                return
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)

    @property
    def transport(self) -> list[str]:
        """The transport argv template for `[[workers.hosts]]`: ssh with this config."""
        return ["ssh", "-F", str(self.ssh_config), "-T", "{host}", "--"]

    def ssh(self, *remote: str) -> list[str]:
        """The ssh argv that runs `remote` on this host (as the daemon's transport does)."""
        return [*(a.replace("{host}", self.name) for a in self.transport), *remote]

    def host_config(self, count: int = 1, **more: Any) -> dict[str, Any]:
        """A `[[workers.hosts]]` table for this host, run with the checkout's interpreter."""
        return {
            "host": self.name,
            "count": count,
            "transport": self.transport,
            "python": self.python,
        } | more


@contextlib.contextmanager
def remote_host(name: str = "build-2", python: str = sys.executable) -> Iterator[RemoteHost]:
    """A started RemoteHost, closed afterwards."""
    with RemoteHost(name, python) as host:
        yield host


_SHARED: list[RemoteHost] = []


def shared() -> RemoteHost:
    """The one second host of this test run (ORCHD_TEST_REMOTE=ssh), made on first use and
    removed when the run ends; the test is skipped where no RemoteHost can be made."""
    if not _SHARED:
        why = missing()
        if why is not None:
            pytest.skip(f"ORCHD_TEST_REMOTE=ssh {why}")
        host = RemoteHost("build-2").start()
        atexit.register(host.close)
        _SHARED.append(host)
    return _SHARED[0]
