"""The agent's frame reader against garbage: 10,000 random byte strings and frames never
crash it (a message, the end, or a clean ProtocolError); a real agent fed odd but valid
frames keeps serving, and fed garbage mid-attempt kills the attempt and exits 2."""

from __future__ import annotations

import os
import random
import struct
import tempfile
import uuid
from pathlib import Path

import anyio
import msgspec
import psutil
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from supervisor.core import wire
from supervisor.core.model import Rlimits
from supervisor.workers import proctree
from supervisor.workers.channel import FrameChannel, ProtocolError
from tests.test_agent import Driver, agent

MARK = f"test-agent-fuzz-{uuid.uuid4().hex[:8]}-"
TAGS = ["Run", "Kill", "Stop", "Lease", "Sweep", "Hello", "Finished", "", "x"]

# Values msgpack can carry, nested a little.
_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
_value = st.recursive(
    _leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
_fields = st.sampled_from(
    ["type", "attempt_id", "task_id", "number", "command", "log_path", "grace_s", "live", "env"]
)
# Real frames of every kind, for the mutations to start from.
_REAL = [
    wire.frame(m)
    for m in (
        wire.Run(attempt_id="a", task_id="t", number=1, command=["true"], log_path="/x/y"),
        wire.Run(
            attempt_id="a",
            task_id="t",
            number=1,
            command="exit 3",
            log_path="/x",
            env={"K": "V"},
            rlimits=Rlimits(memory_mb=5),
            stream_output=True,
        ),
        wire.Kill(attempt_id="a", grace_s=0.5, reason="r"),
        wire.Stop(grace_s=1.0),
        wire.Lease(),
        wire.Sweep(live=["a", "b"]),
    )
]
MUTANTS_PER_SEED = 50


@st.composite
def _tagged_body(draw: st.DrawFn) -> bytes:
    """A msgpack map shaped like a message: a tag, some known fields with any values."""
    body: dict[str, object] = {"type": draw(st.sampled_from(TAGS))}
    body.update(draw(st.dictionaries(_fields, _value, max_size=4)))
    return msgspec.msgpack.encode(body)


def _framed(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


_seed = st.one_of(
    st.sampled_from(_REAL),
    _tagged_body().map(_framed),
    _value.map(lambda v: _framed(msgspec.msgpack.encode(v))),
    st.binary(max_size=64),
)


def _mutants(seed: bytes, salt: int) -> list[bytes]:
    """MUTANTS_PER_SEED byte strings made from `seed`: bits flipped, cut short, bytes put
    in, a wrong length announced, frames run together, or noise."""
    rnd = random.Random(salt)
    out = []
    for _ in range(MUTANTS_PER_SEED):
        b = bytearray(seed)
        op = rnd.randrange(6)
        if op == 0 and b:
            for _ in range(rnd.randint(1, 8)):
                b[rnd.randrange(len(b))] ^= 1 << rnd.randrange(8)
        elif op == 1:
            del b[rnd.randrange(len(b) + 1) :]
        elif op == 2:
            at = rnd.randrange(len(b) + 1)
            b[at:at] = rnd.randbytes(rnd.randint(1, 16))
        elif op == 3:
            b[:4] = struct.pack(
                ">I",
                rnd.choice([0, 1, len(b), wire.MAX_FRAME + 1, 2**32 - 1, rnd.randrange(2**32)]),
            )
        elif op == 4:
            b += rnd.choice(_REAL) + seed[: rnd.randrange(len(seed) + 1)]
        else:
            b = bytearray(rnd.randbytes(rnd.randint(0, 64)))
        out.append(bytes(b))
    return out


def _read_all(data: bytes) -> list[wire.ToAgent]:
    """Every message the reader makes of `data`, until its end or a ProtocolError.

    All of `data` is in the pipe and its write end closed before reading, so the reader
    never needs to wait: each receive is driven to its end at once, with no event loop
    (which would cost more than the reading), and one that waits would fail the test."""
    r, w = os.pipe()
    out = os.open(os.devnull, os.O_WRONLY)
    try:
        os.write(w, data)
        os.close(w)
        channel = FrameChannel(r, out)
        messages: list[wire.ToAgent] = []
        while True:
            step = channel.receive()
            try:
                step.send(None)
            except StopIteration as end:
                if end.value is None:
                    return messages
                messages.append(end.value)
            except ProtocolError:
                return messages
            else:
                step.close()
                raise AssertionError("the reader waited on input that had ended")
    finally:
        os.close(r)
        os.close(out)


@settings(
    max_examples=10_000 // MUTANTS_PER_SEED,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(seed=_seed, salt=st.integers(0, 2**32 - 1))
def test_the_frame_reader_never_crashes_on_garbage(seed: bytes, salt: int) -> None:
    """Any byte string (10,000 in all: hypothesis's seeds, each mutated 50 ways) gives
    whole typed messages, then the end or a ProtocolError: never another exception,
    never a wait."""
    for data in [seed, *_mutants(seed, salt)]:
        for msg in _read_all(data):
            assert isinstance(msg, wire.Run | wire.Kill | wire.Stop | wire.Lease | wire.Sweep)


# --- a real agent ------------------------------------------------------------------------

_text = st.text(max_size=12)
_odd_run = st.builds(
    wire.Run,
    attempt_id=st.sampled_from(["", ".", "..", "a/b", "x\x00y"]) | _text.map(lambda t: MARK + t),
    task_id=_text,
    number=st.integers(-5, 5),
    command=st.sampled_from([[], "", ["true"], "exit 3", ["/nonexistent/x"], ["true", "\x00"]]),
    cwd=st.sampled_from([None, "/nonexistent", "", "/", "a\x00b"]),
    env=st.dictionaries(st.sampled_from(["A", "", "B=C", "D\x00"]), _text, max_size=2),
    validate=st.sampled_from([None, "exit 1", [], ["true"]]),
    rlimits=st.none() | st.builds(Rlimits, open_files=st.sampled_from([None, 0, 64, -1])),
    log_path=st.sampled_from(["", "/nonexistent-dir\x00/x", "/proc/x/y", "{tmp}/logs/odd.log"]),
)
_odd = st.one_of(
    _odd_run,
    st.builds(
        wire.Kill,
        attempt_id=_text,
        grace_s=st.floats(allow_nan=True, allow_infinity=True),
        reason=_text,
    ),
    st.just(wire.Lease()),
    st.builds(wire.Sweep, live=st.lists(_text.map(lambda t: MARK + t), max_size=3)),
)


@pytest.mark.usefixtures("no_leftover_processes")
@pytest.mark.parametrize("lease", [False, True], ids=["local", "leased"])
@settings(
    max_examples=2,
    # Each example is a real agent and dozens of frames: shrinking one would take minutes,
    # and the failing frames are printed whole anyway.
    phases=[Phase.generate],
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(frames=st.lists(_odd, min_size=40, max_size=40))
def test_odd_but_valid_frames_never_crash_the_agent(
    tmp_path: Path, lease: bool, frames: list[wire.ToAgent]
) -> None:
    """A real agent fed odd frames (empty commands, NUL bytes, bad attempt ids, NaN graces,
    unknown kills, sweeps) answers each Run and still runs a task after."""
    where = Path(tempfile.mkdtemp(dir=tmp_path))
    # Always a spool of the test's own: a sweep is scoped to it, and must never reach the
    # processes of anyone else on the host.
    args = ("--spool", str(where / "spool"), *(("--lease-s", "2") if lease else ()))

    async def feed() -> None:
        async with agent(where, args=args) as a:
            for i, msg in enumerate(frames):
                if isinstance(msg, wire.Run):
                    msg.log_path = msg.log_path.replace("{tmp}", str(where))
                    msg.attempt_id += f"-{i}"
                await a.send(msg)
                if isinstance(msg, wire.Run):
                    await _finished(a, msg.attempt_id)
            assert a.process.returncode is None
            after = a.run("after", ["true"])
            await a.send(after)
            done = await _finished(a, after.attempt_id)
            assert done.phase == "done"

    anyio.run(feed)


async def _finished(a: Driver, attempt_id: str) -> wire.Finished:
    with anyio.fail_after(20):
        while True:
            msg = await a.recv(timeout_s=20)
            if isinstance(msg, wire.Finished) and msg.attempt_id == attempt_id:
                return msg
            assert isinstance(msg, wire.Heartbeat | wire.Started | wire.Swept | wire.Finished)


@pytest.mark.usefixtures("no_leftover_processes")
@pytest.mark.parametrize("lease", [False, True], ids=["local", "leased"])
async def test_garbage_mid_attempt_kills_it_and_exits_2(tmp_path: Path, lease: bool) -> None:
    """An undecodable frame while an attempt runs: its tree is killed, the agent exits 2."""
    args = ("--lease-s", "30", "--spool", str(tmp_path / "spool")) if lease else ()
    async with agent(tmp_path, args=args) as a:
        run = a.run("g", "sleep 300 & sleep 300")
        run.attempt_id = MARK + "g"
        await a.send(run)
        await a.expect(wire.Started)
        await _until_marked_here("g", 2)
        await a.send_raw(_framed(b"\xc1garbage"))
        done = await a.expect(wire.Finished, timeout_s=5)
        assert done.killed
        with anyio.fail_after(5):
            assert await a.process.wait() == 2
        assert _alive_marked_here("g") == []


def _alive_marked_here(name: str) -> list[psutil.Process]:
    return [p for p in proctree.find_marked(MARK + name) if proctree.alive(p)]


async def _until_marked_here(name: str, count: int) -> None:
    with anyio.fail_after(3):
        while len(_alive_marked_here(name)) < count:
            await anyio.sleep(0.01)
