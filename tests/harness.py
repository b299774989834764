"""Runs the real orchd as a process for integration tests, and talks to it as orchctl does.

Timings are scaled down through the config; waits poll on state or events with a deadline
instead of sleeping; teardown checks that no daemon, agent or task process is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from ctl.client import Client, RemoteError

ROOT = Path(__file__).resolve().parent.parent
# Marks every process started by this test run's daemons (inherited by agents and tasks).
RUN_TAG = f"{os.getpid()}-{time.time_ns()}"
# Every state directory a Daemon of this run used: a daemon that was SIGKILLed and never
# started again leaves its (empty) cgroups behind, removed at the end of the session.
STATE_DIRS: set[Path] = set()

FAST = {
    "workers": {"count": 2},
    "health": {
        "heartbeat_interval_s": 0.1,
        "health_check_interval_s": 0.1,
        "unresponsive_after_s": 0.5,
        "shutdown_after_s": 2.0,
        "restart_backoff_base_s": 0.2,
        "restart_backoff_max_s": 2.0,
    },
    "tasks": {
        "timeout_s": 30.0,
        "max_retries": 3,
        "kill_grace_s": 0.3,
        "backoff_base_s": 0.2,
        "backoff_max_s": 5.0,
        "resource_wait_alert_s": 0.5,
    },
    "store": {"snapshot_interval_s": 1.0, "checkpoint_interval_s": 0.2, "metrics_interval_s": 0.5},
    "shutdown_grace_s": 5.0,
    "resources": {"git_repo_write": {"max_holders": 1}},
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_toml(cfg: dict[str, Any]) -> str:
    """A small TOML writer for test configs (scalars, nested tables, arrays of tables)."""
    lines: list[str] = []

    def scalar(v: Any) -> str:
        return json.dumps(v) if not isinstance(v, bool) else ("true" if v else "false")

    def tables(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)

    def section(prefix: str, d: dict[str, Any], array: bool = False) -> None:
        simple = {k: v for k, v in d.items() if not isinstance(v, dict) and not tables(v)}
        if prefix:
            lines.append(f"[[{prefix}]]" if array else f"[{prefix}]")
        lines.extend(f"{k} = {scalar(v)}" for k, v in simple.items())
        for k, v in d.items():
            name = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                section(name, v)
            elif tables(v):  # a list of tables: [[workers.hosts]]
                for item in v:
                    section(name, item, array=True)

    section("", cfg)
    return "\n".join(lines) + "\n"


def event_matches(event: dict[str, Any], match: dict[str, Any]) -> bool:
    """Every field of `match` is the event's; a `task_id` may be given bare (`slow` for
    the event of `ws-1/slow`), as tests whose task ids are unique do."""
    for key, want in match.items():
        got = event.get(key)
        if got != want and not (
            key == "task_id" and isinstance(got, str) and got.rpartition("/")[2] == want
        ):
            return False
    return True


# ORCHD_TEST_REMOTE=env|ssh: every daemon whose config names no [[workers.hosts]] runs half
# its workers (when it has two or more) as remote workers, so that tests written for local
# workers run again, unchanged, against remote ones: "env" through the local transport
# (no sshd needed), "ssh" on the second host of tests/remote_host.py (root, sshd).
REMOTE_MODE = os.environ.get("ORCHD_TEST_REMOTE", "")
FAKE_HOST_TRANSPORT = ["env", "ORCHD_FAKE_HOST={host}", "--"]


def remote_half(cfg: dict[str, Any], mode: str = REMOTE_MODE) -> dict[str, Any]:
    """`cfg` with half its workers on one remote host under ORCHD_TEST_REMOTE (see above),
    and an agent lease that fits its shutdown_after_s; `cfg` itself when unset."""
    workers = cfg.get("workers", {})
    count = int(workers.get("count", 0))
    health = cfg["health"]
    room = health["shutdown_after_s"] - cfg["tasks"]["kill_grace_s"]
    # A config whose kill grace leaves no lease before shutdown_after_s is refused with
    # remote hosts (a remote attempt must be fenced before its task is reassigned).
    if not mode or workers.get("hosts") or count < 2 or room < 0.5:
        return cfg
    if mode == "env":
        host: dict[str, Any] = {
            "host": "fake-2",
            "transport": FAKE_HOST_TRANSPORT,
            "python": sys.executable,
        }
    elif mode == "ssh":
        from tests import remote_host

        host = remote_host.shared().host_config()
    else:
        raise ValueError(f"ORCHD_TEST_REMOTE={mode!r}: use env or ssh")
    host["count"] = count // 2
    lease = health.get("agent_lease_s") or min(2.0, 0.6 * room)
    return _merge(
        cfg,
        {
            "workers": {"count": count - count // 2, "hosts": [host]},
            "health": {"agent_lease_s": lease},
        },
    )


class DaemonExited(AssertionError):
    """Raised while waiting for a daemon that has already exited."""


class Daemon:
    """One orchd process on a temporary state directory; `failpoint` is its
    ORCHD_FAILPOINT (supervisor/failpoints.py). Its output goes through a pipe into
    orchd.out, so a file-size limit put on the daemon never applies to its own log."""

    def __init__(
        self, tmp: Path, overrides: dict[str, Any] | None = None, failpoint: str | None = None
    ) -> None:
        self.tmp = tmp
        self.failpoint = failpoint
        self._pump: threading.Thread | None = None
        self.state_dir = tmp / "state"
        STATE_DIRS.add(self.state_dir)
        self.socket = str(tmp / "orchd.sock")
        self.cfg = remote_half(
            _merge(
                FAST,
                {"state_dir": str(self.state_dir), "socket_path": self.socket} | (overrides or {}),
            )
        )
        self.config_path = tmp / "orchd.toml"
        self.config_path.write_text(to_toml(self.cfg))
        self.proc: subprocess.Popen[bytes] | None = None
        self.output = tmp / "orchd.out"

    # --- process -----------------------------------------------------------------------

    def start(
        self,
        timeout: float = 20.0,
        env_extra: dict[str, str] | None = None,
        *,
        prefix: list[str] | None = None,
    ) -> Daemon:
        """Start it and wait until it answers; `env_extra` (e.g. NOTIFY_SOCKET) is added to
        the environment after the inherited systemd variables are taken out, and `prefix`
        goes before its command line (a wrapper that execs it, keeping the pid)."""
        env = (
            {
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("NOTIFY_SOCKET", "WATCHDOG_", "ORCHD_FAILPOINT"))
            }
            | {"ORCHD_TEST_RUN": RUN_TAG}
            | (env_extra or {})
        )
        if self.failpoint:
            env["ORCHD_FAILPOINT"] = self.failpoint
        self.proc = subprocess.Popen(
            [
                *(prefix or []),
                sys.executable,
                "-m",
                "supervisor",
                "--config",
                str(self.config_path),
                "--log-format",
                "json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.tmp,
            env=env,
            start_new_session=True,
        )
        self._pump = threading.Thread(target=self._copy_output, daemon=True)
        self._pump.start()
        try:
            self.wait_for(self._answers, timeout, "the daemon to answer on its socket")
        except BaseException:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            raise
        return self

    def _copy_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with self.proc.stdout as pipe, self.output.open("ab", buffering=0) as out:
            for line in pipe:
                out.write(line)

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise DaemonExited(
                f"orchd exited {self.proc.returncode}:\n{self.output.read_text()[-4000:]}"
            )
        try:
            with Client(self.socket, timeout_s=5) as c:
                c.call("status")
            return True
        except Exception:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"orchd did not stop within {timeout}s") from None
        finally:
            self._drain_output()
        return code

    def _drain_output(self) -> None:
        """Wait until the daemon's last lines are in orchd.out."""
        if self._pump is not None:
            self._pump.join(5)

    def kill(self) -> None:
        """SIGKILL the daemon (a crash); its agents notice EOF and kill their tasks."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self._drain_output()

    # --- talking to it -----------------------------------------------------------------

    def call(self, method: str, **params: Any) -> Any:
        with Client(self.socket, timeout_s=30) as c:
            return c.call(method, **params)

    def ctl(self, *args: str, input_: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run the real orchctl command line."""
        return subprocess.run(
            [sys.executable, "-m", "ctl", "--socket", self.socket, *args],
            capture_output=True,
            text=True,
            input=input_,
            timeout=60,
            cwd=ROOT,
        )

    def ctl_json(self, *args: str) -> Any:
        r = self.ctl("--json", *args)
        assert r.returncode == 0, f"orchctl {' '.join(args)} exited {r.returncode}: {r.stderr}"
        return json.loads(r.stdout)

    def submit(self, toml_text: str, name: str = "ws.toml") -> dict[str, Any]:
        path = self.tmp / name
        path.write_text(toml_text)
        out: dict[str, Any] = self.ctl_json("submit", str(path))
        return out

    def task(self, task_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self.call("show", task_id=task_id)
        return out

    def wait_task(
        self, task_id: str, states: str | tuple[str, ...], timeout: float = 30.0
    ) -> dict[str, Any]:
        want = (states,) if isinstance(states, str) else states
        found: dict[str, Any] = {}

        def check() -> bool:
            # Replaced whole each time: a field the view omits when it is back at its
            # default (revalidate=False) must not keep an earlier poll's value.
            found.clear()
            found.update(self.task(task_id))
            return found["state"] in want

        self.wait_for(check, timeout, f"task {task_id} to be {'/'.join(want)}")
        self.settle()
        return found

    def wait_ws(self, ws_id: str, state: str, timeout: float = 30.0) -> dict[str, Any]:
        found: dict[str, Any] = {}

        def check() -> bool:
            found.clear()
            found.update(self.call("ws_show", workstream=ws_id))
            return found["state"] == state

        self.wait_for(check, timeout, f"workstream {ws_id} to be {state}")
        self.settle()
        return found

    def settle(self) -> None:
        """Wait until what the daemon recorded so far is durable and its effects done: a
        read is answered at the end of its step, before that step's events are written,
        so a test that saw a state and then reads events.jsonl waits here first. (A tree
        from before the `settle` request has nothing to wait for.)"""
        try:
            self.call("settle")
        except RemoteError as exc:
            if "unknown method" not in exc.message:
                raise

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every event on disk, across events.jsonl's rotated files (oldest first)."""
        evs = []
        for path in event_files(self.state_dir):
            with contextlib.suppress(FileNotFoundError):  # rotated away meanwhile
                lines = path.read_text().splitlines()
                evs += [json.loads(line) for line in lines if line.strip()]
        return [e for e in evs if name is None or e["event"] == name]

    def wait_event(self, name: str, timeout: float = 30.0, **match: Any) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def check() -> bool:
            found[:] = [e for e in self.events(name) if event_matches(e, match)]
            return bool(found)

        self.wait_for(check, timeout, f"event {name} {match}")
        return found[0]

    def workers(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self.call("workers")
        return out

    def log(self, task_id: str) -> str:
        """A task's log (full name, or a bare id the daemon resolves)."""
        return Path(self.task(task_id)["log_path"]).read_text()

    @staticmethod
    def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if pred():
                    return
            except RemoteError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.02)


def event_files(state_dir: Path) -> list[Path]:
    """events.jsonl's rotated files, oldest (highest number) first, then events.jsonl."""
    rotated = [p for p in state_dir.glob("events.jsonl.*") if p.suffix[1:].isdigit()]
    rotated.sort(key=lambda p: -int(p.suffix[1:]))
    return [*rotated, state_dir / "events.jsonl"]


def orchd_processes() -> list[psutil.Process]:
    """Every live agent or task process that a daemon of this test run started (they
    inherit RUN_TAG through the environment, so concurrent runs do not see each other)."""
    out = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
                continue
            if proc.environ().get("ORCHD_TEST_RUN") == RUN_TAG:
                out.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def marker_processes(prefix: str) -> list[psutil.Process]:
    """Live processes of this run whose attempt marker (ORCHD_ATTEMPT_ID, which begins with
    the task's full name written WS:TASK) starts with `prefix`, or whose part after the
    workstream does (`slow.` for ws-1/slow's attempts): a task's whole tree, escapees
    included."""
    out = []
    for proc in orchd_processes():
        with contextlib.suppress(psutil.NoSuchProcess):
            marker = proc.environ().get("ORCHD_ATTEMPT_ID", "")
            if marker.startswith(prefix) or marker.rpartition(":")[2].startswith(prefix):
                out.append(proc)
    return out


def assert_no_leftovers(timeout: float = 5.0) -> None:
    """Fail (after killing them) if agents or task processes outlive their daemon."""
    deadline = time.monotonic() + timeout
    left = orchd_processes()
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = orchd_processes()
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    assert not left, f"processes left behind: {[(p.pid, p.info.get('cmdline')) for p in left]}"


def remove_dead_cgroups() -> list[str]:
    """Remove the cgroups (containment "cgroup", as root) of this run's daemons that are
    no longer running: a live daemon is always in its own, so only empty ones go."""
    from supervisor.workers import cgroup

    home = cgroup.own_cgroup()
    removed = []
    for state_dir in STATE_DIRS:
        base = os.path.join(home or "/nonexistent", cgroup.base_name(state_dir))
        if os.path.isdir(base) and not cgroup.populated(base) and cgroup.remove_tree(base):
            removed.append(base)
    return removed
