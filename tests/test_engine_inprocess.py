"""The real engine loop (engine/loop.py, commit.py, effects.py) in-process on the fakes:
the in-memory store and the fake pool plug into the same ports as the real ones, so the
loop's own behaviour (group commit, effects after the sync, read-only mode) is tested in
milliseconds, without processes or disk."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisor.control import actions
from supervisor.control import protocol as p
from supervisor.core import wire
from supervisor.core.model import State
from supervisor.engine.loop import Engine, ReadOnly
from tests.fakes import FakePool, MemoryStore
from tests.rig import config, workstream_toml

pytestmark = pytest.mark.timeout(30)


class Running:
    """An Engine running in a task group on a MemoryStore and a FakePool whose agents
    finish every Run at once (the test can hold them with `hold`)."""

    def __init__(self, engine: Engine, store: MemoryStore, pool: FakePool) -> None:
        self.engine, self.store, self.pool = engine, store, pool
        self.held = False
        # For each Run: was its task's running record durable when the Run went out?
        self.durable_at_send: list[bool] = []

    def on_run(self, wid: str, run: wire.Run) -> None:
        seq = next(
            r.seq
            for r in reversed(self.store.records)
            if r.entity == "task" and r.id == run.task_id and r.to == "running"
        )
        self.durable_at_send.append(seq <= self.store.synced_seq)
        if not self.held:
            self.pool.finish(wid)

    async def until(self, what: Callable[[], bool], timeout: float = 5.0) -> None:
        with anyio.fail_after(timeout):
            while not what():
                await anyio.sleep(0.005)

    def ws_state(self, ws_id: str) -> str:
        return str(self.engine.state.data.workstreams[ws_id].state)


@contextlib.asynccontextmanager
async def running_engine(root: Path) -> AsyncIterator[Running]:
    """The engine, started; drained and stopped on the way out (within the same task: a
    task group must be left by the task that entered it)."""
    (root / "logs" / "workers").mkdir(parents=True)
    send, recv = anyio.create_memory_object_stream[Any](10_000)
    store = MemoryStore(root)
    pool = FakePool(send)
    engine = Engine(config(workers=2), store, State(), pool, recv, send)
    r = Running(engine, store, pool)
    pool.on_run = r.on_run
    async with send, recv, anyio.create_task_group() as tg:
        await tg.start(engine.run)
        yield r
        await engine.drain()
        tg.cancel_scope.cancel()


def chain(ws_id: str, n: int) -> str:
    return workstream_toml(
        ws_id,
        [
            {"id": f"{ws_id}-{i}", "command": "true"}
            | ({"depends_on": [f"{ws_id}-{i - 1}"]} if i else {})
            for i in range(n)
        ],
    )


async def test_a_chain_completes_and_every_run_follows_its_sync(tmp_path: Path) -> None:
    """A chain of 20 tasks completes on the real loop; every Run went out only after the
    record that started its attempt was durable (the write-ahead rule)."""
    async with running_engine(tmp_path) as running:
        await running.engine.call(actions.submit, p.SubmitParams(text=chain("ws-c", 20)))
        await running.until(lambda: running.ws_state("ws-c") == "completed")
        assert len(running.durable_at_send) == 20 and all(running.durable_at_send)
        assert running.store.replay().data == running.engine.state.data


async def test_a_refused_write_makes_the_loop_read_only_until_writes_succeed(
    tmp_path: Path,
) -> None:
    """While the store refuses writes a change is refused with "nothing was changed" and
    status says read-only; once writes succeed the held work goes on by itself."""
    async with running_engine(tmp_path) as running:
        engine, store = running.engine, running.store
        running.held = True
        await engine.call(actions.submit, p.SubmitParams(text=chain("ws-r", 2)))
        await running.until(lambda: bool(running.pool.current))
        seq = store.written_seq
        store.fail_writes = True
        running.pool.finish(next(iter(running.pool.current)))  # its step is refused
        await running.until(lambda: engine.read_only is not None)
        with pytest.raises(ReadOnly, match="nothing was changed"):
            await engine.call(actions.submit, p.SubmitParams(text=chain("ws-x", 1)))
        status = await engine.call(actions.status, p.StatusParams())
        assert status["read_only"] and store.written_seq == seq
        running.held = False
        store.fail_writes = False
        await running.until(lambda: running.ws_state("ws-r") == "completed", timeout=5.0)
        assert engine.read_only is None
        assert [e.event for e in store.events].count("store_read_only") == 1
        assert store.replay().data == engine.state.data


async def test_the_loop_idles_once_the_retry_time_has_passed(tmp_path: Path) -> None:
    """Read-only with nothing left to retry, the loop sleeps until something is due rather
    than turning without pause (a regression: it spun once the retry time had passed)."""
    async with running_engine(tmp_path) as running:
        engine, store = running.engine, running.store
        running.held = True
        await engine.call(actions.submit, p.SubmitParams(text=chain("ws-i", 1)))
        await running.until(lambda: bool(running.pool.current))
        store.fail_writes = True
        running.pool.finish(next(iter(running.pool.current)))
        await running.until(lambda: engine.read_only is not None)
        store.fail_writes = False
        await running.until(lambda: engine.read_only is None, timeout=5.0)  # retried, written
        store.fail_writes = True
        await engine.call(actions.status, p.StatusParams())  # no record: nothing to refuse
        # A change refused: read-only again, and then nothing more to do.
        with pytest.raises(ReadOnly):
            await engine.call(actions.submit, p.SubmitParams(text=chain("ws-j", 1)))
        store.fail_writes = False
        await anyio.sleep(1.2)  # past the retry time
        before = engine.steps
        await anyio.sleep(0.5)
        assert engine.steps - before < 20, engine.steps - before


async def test_recovery_kills_the_old_life_at_once_and_holds_a_task_with_survivors(
    tmp_path: Path,
) -> None:
    """After a crash the next engine hands the pool every old agent (pid + start ticks)
    and every interrupted attempt's tree in one call, tells systemd to extend its start
    timeout meanwhile, and holds back the task whose kill left a survivor (recorded, with
    an event naming the pid) while the other runs again."""
    (tmp_path / "logs" / "workers").mkdir(parents=True)
    send, recv = anyio.create_memory_object_stream[Any](10_000)
    store = MemoryStore(tmp_path)
    pool = FakePool(send)
    engine = Engine(config(workers=2), store, State(), pool, recv, send)
    r = Running(engine, store, pool)
    r.held = True
    pool.on_run = r.on_run
    async with send, recv, anyio.create_task_group() as tg:
        await tg.start(engine.run)
        await engine.call(actions.submit, p.SubmitParams(text=chain("ws-a", 1)))
        await engine.call(actions.submit, p.SubmitParams(text=chain("ws-b", 1)))
        for wid in ("worker-001", "worker-002"):
            await r.until(lambda w=wid: w in pool.current)  # type: ignore[misc]
            pool.start(wid)
        await r.until(lambda: all(t.pid for t in engine.state.data.tasks.values()))
        await engine.commit.settle()
        tg.cancel_scope.cancel()  # a crash: no drain, nothing more recorded
    state = store.replay()
    stuck = state.data.tasks["ws-a/ws-a-0"].attempts[-1].attempt_id
    send, recv = anyio.create_memory_object_stream[Any](10_000)
    pool2 = FakePool(send)
    pool2.survivors[stuck] = ((4343, 77),)
    pool2.stuck.add((4343, 77))
    said: list[str] = []
    engine2 = Engine(config(workers=2), store, state, pool2, recv, send, notify=said.append)
    r2 = Running(engine2, store, pool2)
    pool2.on_run = r2.on_run
    async with send, recv, anyio.create_task_group() as tg:
        await tg.start(engine2.run)
        assert sorted(a.worker_id for a in pool2.killed_old_agents) == ["worker-001", "worker-002"]
        assert all(a.start_ticks and a.attempt_id for a in pool2.killed_old_agents)
        assert {t.marker for t in pool2.killed_trees} == {
            stuck,
            state.data.tasks["ws-b/ws-b-0"].attempts[-1].attempt_id,
        }
        assert any(s.startswith("EXTEND_TIMEOUT_USEC=") for s in said)
        held = engine2.state.data.tasks["ws-a/ws-a-0"]
        assert held.state == "pending" and held.survivors == [[4343, 77]]
        assert [e.data["pids"] for e in store.events if e.event == "task_tree_survivors"] == [
            [4343]
        ]
        await r2.until(lambda: r2.ws_state("ws-b") == "completed")
        assert len(engine2.state.data.tasks["ws-a/ws-a-0"].attempts) == 1
        pool2.stuck.clear()
        await r2.until(lambda: r2.ws_state("ws-a") == "completed")
        assert any(e.event == "task_released" for e in store.events)
        await engine2.drain()
        tg.cancel_scope.cancel()


async def test_record_followers_get_durable_steps_and_late_ones_the_recent_past(
    tmp_path: Path,
) -> None:
    """A follower of records gets each step's records once they are synced, never a
    refused one; `recent_records` gives what came after a seq while the engine holds it
    (a follower that starts late, as `submit --wait` does, misses nothing)."""
    async with running_engine(tmp_path) as running:
        engine, store = running.engine, running.store
        out = await engine.call(actions.submit, p.SubmitParams(text=chain("ws-f", 3)))
        follower = engine.follow_records()
        got: list[int] = []
        async with follower:
            await running.until(lambda: running.ws_state("ws-f") == "completed")
            await engine.call(actions.status, p.StatusParams())  # one more sync round
            while True:
                try:
                    batch = follower.receive_nowait()
                except anyio.WouldBlock:
                    break
                assert all(r.seq <= store.synced_seq for r in batch)
                got.extend(r.seq for r in batch)
        assert got == sorted(got) and got[-1] == store.synced_seq
        since = engine.recent_records(out["seq"], store.synced_seq)
        assert since is not None
        assert [r.seq for r in since] == list(range(out["seq"] + 1, store.synced_seq + 1))
        assert engine.recent_records(out["seq"], out["seq"]) == []
        assert engine.recent_records(-5, store.synced_seq) is None  # older than it holds
        # A follower that has gone is let go at the next step with records.
        await engine.call(actions.submit, p.SubmitParams(text=chain("ws-g", 1)))
        await running.until(lambda: not engine.fx.record_followers)
