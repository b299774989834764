"""A throwaway systemd for tests that need the real service manager: systemd as PID 1 of
its own pid, mount, cgroup, uts and ipc namespaces, in a cgroup of its own. What it or a
test writes to /etc, /var, /opt, /usr/local or /root lands in overlay layers under the
test's directory; /tmp, /var/tmp and /run are tmpfs; the kernel's settings are read-only
(tests/systemd_box.sh sets this up before systemd starts). Stopping it kills every
process in it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

SCRIPT = Path(__file__).with_name("systemd_box.sh")
SYSTEMD = Path("/lib/systemd/systemd")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def missing() -> str | None:
    """Why a box cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (namespaces, mounts, cgroups)"
    if not SYSTEMD.exists():
        return f"systemd is not installed ({SYSTEMD} missing)"
    for tool in ("unshare", "nsenter", "runuser"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if cgroup2_root() is None:
        return "no cgroup2 hierarchy mounted"
    return None


def cgroup2_root() -> Path | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] == "cgroup2":
                return Path(left.split()[4])
    return None


class SystemdBox:
    """One systemd in namespaces; `run` executes a command inside it as root."""

    def __init__(self, root: Path) -> None:
        self.root = root  # /mnt inside; the overlay layers go to root/ovl
        self.log = root.with_name(root.name + ".log")
        self.cgroup: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0  # systemd's pid as this side sees it

    def start(self, timeout: float = 60.0) -> SystemdBox:
        base = cgroup2_root()
        assert base is not None
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        self.cgroup = base / f"orchd-test-box-{os.getpid()}-{time.monotonic_ns()}"
        self.cgroup.mkdir()
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    "sh",
                    "-c",
                    'echo $$ > "$1/cgroup.procs" && exec unshare --fork --pid --mount --cgroup'
                    ' --uts --ipc --mount-proc --propagation private bash "$2" "$3"',
                    "sh",
                    str(self.cgroup),
                    str(SCRIPT),
                    str(self.root),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_booted(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_booted(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the box did not boot:\n{self.log.read_text()[-4000:]}")
            if not self.pid:
                kids = psutil.Process(self.proc.pid).children()
                if kids and kids[0].name() == "systemd":
                    self.pid = kids[0].pid
            if self.pid:
                r = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=30)
                if r.stdout.strip() in ("running", "degraded"):
                    return
            time.sleep(0.2)
        raise AssertionError(f"the box's systemd did not finish booting in {timeout}s")

    def run(
        self,
        *argv: str,
        user: str | None = None,
        check: bool = True,
        timeout: float = 300.0,
    ) -> subprocess.CompletedProcess[str]:
        """ARGV inside the box, with a clean root environment (or as USER, with its groups),
        no terminal, from /."""
        assert self.pid
        cmd = ["nsenter", "-t", str(self.pid), "-a", "--wd=/"]
        cmd += ["env", "-i", f"PATH={PATH}", "HOME=/root", "LANG=C.UTF-8"]
        if user is not None:
            cmd += ["runuser", "-u", user, "--"]
        r = subprocess.run(
            [*cmd, *argv],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
            )
        return r

    def exists(self, path: str) -> bool:
        """Whether PATH exists inside the box."""
        return self.run("test", "-e", path, check=False).returncode == 0

    def stop(self) -> None:
        """Kill systemd (the kernel then kills everything else in its pid namespace) and
        whatever may be left in its cgroup, then remove the cgroup and the layers."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        if self.proc is not None:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.cgroup is not None and self.cgroup.exists():
            kill = self.cgroup / "cgroup.kill"
            if kill.exists():
                kill.write_text("1")
            deadline = time.monotonic() + 10
            while "populated 1" in (self.cgroup / "cgroup.events").read_text():
                assert time.monotonic() < deadline, f"processes left in {self.cgroup}"
                time.sleep(0.05)
            for d in sorted(self.cgroup.rglob("*"), key=lambda p: -len(p.parts)):
                if d.is_dir():
                    d.rmdir()
            self.cgroup.rmdir()
        shutil.rmtree(self.root, ignore_errors=True)


# What a copy of the checkout into a box leaves out.
LEAVE_OUT = shutil.ignore_patterns(
    ".git", ".venv", ".state", "*.egg-info", "build", "dist", "__pycache__", ".*_cache"
)


@contextlib.contextmanager
def booted(checkout: Path, root: Path) -> Iterator[SystemdBox]:
    """A booted throwaway systemd under `root` with a copy of `checkout` at /mnt/src,
    stopped on the way out."""
    shutil.copytree(checkout, root / "src", ignore=LEAVE_OUT)
    b = SystemdBox(root)
    b.start()
    try:
        yield b
    finally:
        b.stop()
