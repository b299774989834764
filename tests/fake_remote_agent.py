"""A hostile agent for tests/test_remote_fuzz.py, run on the second host over ssh:

    fake_remote_agent.py DIR TOTAL PER_CONNECTION -m supervisor.workers.agent --worker-id W …

It says Hello as the worker, then sends PER_CONNECTION random frames (every agent message
type, with random and hostile field values) and one malformed frame, and lingers until
the daemon hangs up. DIR/sent counts the frames sent across connections; once TOTAL
were sent it exits at once (the worker then fails to start, with back-off).

Pids in its frames are never this machine's: they are 0, negative or above the kernel's
limit (4194304), so a daemon that wrongly signalled one could hurt nothing.
"""

from __future__ import annotations

import os
import random
import struct
import sys
import time
from pathlib import Path

from supervisor.core import wire

FOREIGN_PIDS = (0, -1, 2**31 - 1, 2**63 - 1)
BAD_FRAMES = (
    b"\x00\x00\x00\x03\xc1\xc1\xc1",  # bytes msgpack never uses
    struct.pack(">I", 2**31) + b"x",  # a length over the limit
    struct.pack(">I", 9) + b"\x81\xa4type\xa3Bad",  # an unknown message type
    b"\x00\x00\x00\x10short",  # the stream ends inside a frame
)


class Fuzz:
    """Random agent messages from one seed."""

    def __init__(self, seed: int, worker_id: str) -> None:
        self.rng = random.Random(seed)
        self.worker_id = worker_id

    def pid(self) -> int:
        return self.rng.choice([*FOREIGN_PIDS, self.rng.randrange(5_000_000, 2**40)])

    def num(self) -> float:
        return self.rng.choice([0.0, -1.0, 1e308, float("nan"), float("inf"), self.rng.random()])

    def text(self) -> str:
        return self.rng.choice(
            [
                "",
                "x" * self.rng.randrange(0, 300),
                "ws:t.1.abc",
                "pads:pad-1.1.zz",
                "../../etc/passwd",
                "\u00e9\u4e2d\U0001f600",
                "\x00\n",
                str(self.rng.random()),
            ]
        )

    def ticks(self) -> int | None:
        return self.rng.choice([None, 0, -5, 2**62, self.rng.randrange(0, 10**9)])

    def survivors(self) -> tuple[tuple[int, int], ...]:
        return tuple(
            (self.pid(), self.rng.randrange(0, 2**40)) for _ in range(self.rng.randrange(3))
        )

    def message(self) -> wire.FromAgent:
        r = self.rng
        match r.randrange(7):
            case 0:
                return wire.Heartbeat(
                    attempt_id=r.choice([None, self.text()]),
                    pid=r.choice([None, self.pid()]),
                    start_ticks=self.ticks(),
                    cpu_percent=r.choice([None, self.num()]),
                    rss_bytes=r.choice([None, -1, 2**63 - 1, 10**6]),
                )
            case 1:
                return wire.Started(
                    attempt_id=self.text(),
                    pid=self.pid(),
                    create_time=self.num(),
                    start_ticks=self.ticks(),
                )
            case 2:
                return wire.Finished(
                    attempt_id=self.text(),
                    phase=r.choice(["spawn", "command", "validate", "done", self.text()]),
                    exit_code=r.choice([None, 0, 1, -9, 255, 2**31]),
                    signal=r.choice([None, 0, 9, 15, 99]),
                    killed=r.random() < 0.5,
                    message=r.choice([None, self.text()]),
                    survivors=self.survivors(),
                    cpu_s=r.choice([None, self.num()]),
                    memory_peak_bytes=r.choice([None, -1, 2**62]),
                    fenced=r.random() < 0.5,
                )
            case 3:
                return wire.Swept(
                    killed=[self.text() for _ in range(r.randrange(3))],
                    pids=[self.pid() for _ in range(r.randrange(3))],
                    survivors=self.survivors(),
                )
            case 4:
                return wire.Output(attempt_id=self.text(), data=r.randbytes(r.randrange(0, 4096)))
            case 5:
                return wire.Hello(
                    worker_id=r.choice([self.worker_id, self.text()]), pid=os.getpid()
                )
            case _:
                return wire.Heartbeat()


def main(argv: list[str]) -> int:
    state_dir, total, per = argv[0], int(argv[1]), int(argv[2])
    counter = os.path.join(state_dir, "sent")
    sent = int(Path(counter).read_text()) if os.path.exists(counter) else 0
    if sent >= total:
        return 0
    worker_id = argv[argv.index("--worker-id") + 1]
    fuzz = Fuzz(sent, worker_id)
    out = sys.stdout.buffer
    out.write(wire.frame(wire.Hello(worker_id=worker_id, pid=os.getpid())))
    n = min(per, total - sent)
    for i in range(n):
        out.write(wire.frame(fuzz.message()))
        if i % 100 == 0:
            out.flush()
    # Replaced whole: the test reads it meanwhile.
    Path(counter + ".new").write_text(str(sent + n))
    os.replace(counter + ".new", counter)
    out.write(BAD_FRAMES[(sent // per) % len(BAD_FRAMES)])
    out.flush()
    time.sleep(3)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
