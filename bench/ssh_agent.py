"""The agent over ssh against the agent over a pipe: start to Hello, start to the first
heartbeat, and a frame's round trip, measured in the same command.

Runs as root with sshd, ip and ssh installed (tests/remote_host.py: Debian's sshd in a
network namespace on a veth pair, the restricted agent-only key). Each round starts the
agent over a local pipe and over ssh and times its Hello and its first Heartbeat, then
sends N frames one after the other, each as soon as the previous answer came: with the
agent busy on a long attempt, a `Run` of another attempt, which it refuses at once with a
`Finished` (the frame's way through the transport and the agent's loop and back).

    python bench/ssh_agent.py          # 5 rounds, 200 round trips each
    python bench/ssh_agent.py 10 500
"""

from __future__ import annotations

import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supervisor.core import wire
from supervisor.workers.pool import agent_env
from tests.remote_host import RemoteHost, missing

AGENT_ARGS = ["-m", "supervisor.workers.agent", "--heartbeat-s", "0.1", "--kill-grace-s", "0.3"]


class Stream:
    """One agent process's frames."""

    def __init__(self, argv: list[str]) -> None:
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=agent_env(dict(os.environ)),
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self._rfd, self._w = self.proc.stdout.fileno(), self.proc.stdin
        self._buf = b""

    def _read(self, n: int, timeout: float) -> bytes | None:
        deadline = time.perf_counter() + timeout
        while len(self._buf) < n:
            left = deadline - time.perf_counter()
            if left <= 0 or not select.select([self._rfd], [], [], left)[0]:
                return None
            data = os.read(self._rfd, 65536)
            if not data:
                raise EOFError("the agent's stream ended")
            self._buf += data
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def recv(self, timeout: float = 10.0) -> wire.FromAgent | None:
        header = self._read(4, timeout)
        if header is None:
            return None
        body = self._read(wire.frame_length(header), timeout)
        assert body is not None
        msg: wire.FromAgent = wire.from_agent_decoder.decode(body)
        return msg

    def expect(self, kind: type, timeout: float = 10.0) -> wire.FromAgent | None:
        deadline = time.perf_counter() + timeout
        while (left := deadline - time.perf_counter()) > 0:
            msg = self.recv(left)
            if msg is None:
                return None
            if isinstance(msg, kind):
                return msg
        return None

    def send(self, msg: wire.ToAgent) -> None:
        self._w.write(wire.frame(msg))
        self._w.flush()

    def close(self) -> None:
        self._w.close()
        self.proc.wait(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def start_times(argv: list[str]) -> tuple[Stream, float, float]:
    """The stream, and ms from its start to Hello and to the first Heartbeat."""
    s = Stream(argv)
    assert isinstance(s.expect(wire.Hello), wire.Hello)
    hello = (time.perf_counter() - s.started) * 1000
    assert isinstance(s.expect(wire.Heartbeat), wire.Heartbeat)
    beat = (time.perf_counter() - s.started) * 1000
    return s, hello, beat


def round_trips(s: Stream, n: int, tmp: Path) -> float:
    """The median round trip in ms over n exchanges: with the agent busy on a long attempt,
    each Run of another attempt is answered at once by a Finished that refuses it (no
    spawn, no sweep: the frame through the transport and the agent's loop, both ways)."""
    s.send(
        wire.Run(
            attempt_id="bench:busy.1.x",
            task_id="bench/busy",
            number=1,
            command=["sleep", "300"],
            log_path=str(tmp / "busy.log"),
        )
    )
    assert s.expect(wire.Started) is not None
    times = []
    for i in range(n):
        msg = wire.Run(
            attempt_id=f"bench:t.{i}.x",
            task_id="bench/t",
            number=1,
            command=["true"],
            log_path=str(tmp / "t.log"),
        )
        t0 = time.perf_counter()
        s.send(msg)
        assert s.expect(wire.Finished) is not None
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    why = missing()
    if why is not None:
        print(f"ssh_agent: {why}", file=sys.stderr)
        return 2
    rows: dict[str, list[tuple[float, float, float]]] = {"pipe": [], "ssh": []}
    with RemoteHost() as host, tempfile.TemporaryDirectory(prefix="orchd-bench-") as tmp:
        for r in range(rounds):
            for name in ("pipe", "ssh"):
                args = [sys.executable, *AGENT_ARGS, "--worker-id", f"bench-{name}-{r}"]
                argv = args if name == "pipe" else host.ssh(*args)
                s, hello, beat = start_times(argv)
                rtt = round_trips(s, n, Path(tmp))
                s.close()
                rows[name].append((hello, beat, rtt))
                print(
                    f"round {r + 1} {name:4}: hello {hello:7.1f} ms, first heartbeat "
                    f"{beat:7.1f} ms, round trip {rtt:7.3f} ms"
                )
    print(f"round trip: a Run refused by a busy agent, median of {n}")
    med = {k: [statistics.median(col) for col in zip(*v, strict=True)] for k, v in rows.items()}
    for name in ("pipe", "ssh"):
        hello, beat, rtt = med[name]
        print(
            f"median {name:4}: hello {hello:7.1f} ms, first heartbeat {beat:7.1f} ms, "
            f"round trip {rtt:7.3f} ms"
        )
    p, s = med["pipe"], med["ssh"]
    print(
        f"ssh / pipe: hello x{s[0] / p[0]:.2f}, first heartbeat x{s[1] / p[1]:.2f}, "
        f"round trip x{s[2] / p[2]:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
