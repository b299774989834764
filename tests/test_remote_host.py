"""The second host itself: sshd in a network namespace runs the agent over ssh, and only it."""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import psutil
import pytest

from supervisor.core import wire
from supervisor.workers import proctree
from tests.remote_host import RemoteHost, needs_remote_host

pytestmark = needs_remote_host
M = TypeVar("M", bound=wire.FromAgent)


@pytest.fixture
def host() -> Iterator[RemoteHost]:
    """A started second host, removed afterwards."""
    with RemoteHost() as h:
        yield h


class RawAgent:
    """An agent started over ssh with a bare transport, spoken to frame by frame."""

    def __init__(self, host: RemoteHost, worker_id: str = "w-raw", *extra: str) -> None:
        argv = host.ssh(
            *host.host_config()["python"].split(),
            "-m", "supervisor.workers.agent",
            "--worker-id", worker_id, "--heartbeat-s", "0.1", "--kill-grace-s", "0.3",
            *extra,
        )  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self._buf = b""
        self._stderr: str | None = None

    def send(self, msg: wire.ToAgent) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(wire.frame(msg))
        self.proc.stdin.flush()

    def _read(self, n: int, deadline: float) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while len(self._buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"no frame within the deadline (have {self._buf!r})")
            data = self.proc.stdout.read1(65536)
            if not data:
                raise AssertionError(f"the stream ended: {self.stderr()}")
            self._buf += data
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def recv(self, timeout: float = 10.0) -> wire.FromAgent:
        deadline = time.monotonic() + timeout
        n = wire.frame_length(self._read(4, deadline))
        msg: wire.FromAgent = wire.from_agent_decoder.decode(self._read(n, deadline))
        return msg

    def expect(self, kind: type[M], timeout: float = 10.0) -> M:
        """The next message of `kind`, skipping heartbeats and output."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.0, deadline - time.monotonic()))
            if isinstance(msg, kind):
                return msg
            assert isinstance(msg, wire.Heartbeat | wire.Output), f"expected {kind}, got {msg}"

    def stderr(self) -> str:
        """The transport's stderr, once it has exited."""
        if self.proc.poll() is None:
            return "(still running)"
        if self._stderr is None:
            assert self.proc.stderr is not None
            self._stderr = self.proc.stderr.read().decode(errors="replace")[-2000:]
        return self._stderr

    def close(self) -> int:
        """Close the daemon's end and wait for the transport to exit; its exit code."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self.stderr()
            self.proc.stdout.close()
            assert self.proc.stderr is not None
            self.proc.stderr.close()
        return code


def test_agent_over_ssh_says_hello_and_exits_on_eof(host: RemoteHost) -> None:
    """The agent started through the restricted key says Hello and heartbeats over ssh, and
    it (with the ssh session) exits 0 when the daemon's end closes its stdin."""
    agent = RawAgent(host)
    try:
        hello = agent.recv()
        assert isinstance(hello, wire.Hello) and hello.worker_id == "w-raw"
        assert hello.pid in host.pids()
        assert isinstance(agent.recv(), wire.Heartbeat)
    finally:
        code = agent.close()
    assert code == 0, agent.stderr()
    deadline = time.monotonic() + 5
    while hello.pid in host.pids() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert hello.pid not in host.pids()


def test_the_restricted_key_runs_nothing_but_the_agent(host: RemoteHost) -> None:
    """Through the key the daemon uses, any command but the agent is refused with a message
    and runs nothing (here: it would have made a file)."""
    target = host.dir / "made"
    done = subprocess.run(
        host.ssh("touch", str(target)), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 126
    assert "runs the agent only" in done.stderr
    assert not target.exists()


def test_a_partition_ends_the_client_within_the_server_alive_window(host: RemoteHost) -> None:
    """With the link down the ssh client gives up (exit 255) after ServerAliveInterval times
    ServerAliveCountMax, while the far side's agent lives on, unaware; heal() makes the
    host reachable again."""
    agent = RawAgent(host)
    try:
        hello = agent.recv()
        host.partition()
        start = time.monotonic()
        code = agent.proc.wait(15)
        gave_up_after = time.monotonic() - start
        assert code == 255
        assert 2.0 < gave_up_after < 8.0
        assert hello.pid in host.pids()
        host.heal()
        again = RawAgent(host, "w-raw-2")
        try:
            assert isinstance(again.recv(), wire.Hello)
        finally:
            assert again.close() == 0
    finally:
        agent.close()
        host.heal()


def _marked(attempt_id: str) -> list[psutil.Process]:
    """Live processes (anywhere on this machine) carrying the attempt's marker."""
    return [p for p in proctree.find_marked(attempt_id) if proctree.alive(p)]


def test_a_partitioned_attempt_is_fenced_and_the_next_agent_reports_it(
    host: RemoteHost, tmp_path: Path
) -> None:
    """Over real ssh, with a lease: a partition leaves the attempt's shim without lease
    bytes, and it kills the tree within lease + grace; after the heal a new agent's sweep
    kills nothing (and not the marked process of this machine outside the host), then
    reports the fenced attempt as a late Finished(fenced=True)."""
    attempt = f"ci:fence.1.{uuid.uuid4().hex[:6]}"
    bystander = subprocess.Popen(
        ["sleep", "60"], env=os.environ | {proctree.MARKER_ENV: "ci:bystander.1.x"}
    )
    agent = RawAgent(host, "w-fence", "--lease-s", "2")
    try:
        assert isinstance(agent.recv(), wire.Hello)
        agent.send(wire.Sweep(live=[]))
        agent.expect(wire.Swept)
        agent.send(
            wire.Run(
                attempt_id=attempt,
                task_id="ci/fence",
                number=1,
                command="sleep 300 & sleep 300",
                log_path=str(tmp_path / "fence.log"),
                stream_output=True,
            )
        )
        agent.expect(wire.Started)
        deadline = time.monotonic() + 5
        while len(_marked(attempt)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(_marked(attempt)) >= 2
        cut = time.monotonic()
        host.partition()
        while _marked(attempt) and time.monotonic() - cut < 10:
            time.sleep(0.02)
        fenced_after = time.monotonic() - cut
        assert not _marked(attempt)
        assert fenced_after <= 2.0 + 0.3 + 1.5, fenced_after
        # The client gives up (ServerAlive 1 s x 3): nothing the old agent sends now arrives.
        assert agent.proc.wait(10) == 255
        host.heal()
        again = RawAgent(host, "w-fence-2", "--lease-s", "2")
        try:
            assert isinstance(again.recv(), wire.Hello)
            again.send(wire.Sweep(live=[]))
            swept = again.expect(wire.Swept)
            assert swept.killed == [] and swept.pids == []
            late = again.expect(wire.Finished)
            assert late.attempt_id == attempt and late.fenced
        finally:
            assert again.close() == 0
        assert bystander.poll() is None
    finally:
        agent.close()
        host.heal()
        bystander.kill()
        bystander.wait()
