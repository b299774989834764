"""The control socket's streams: a request that is answered for as long as the client
listens. `events -f` (each new event), `logs -f` (each new line of a task's log, read in
worker threads) and `ws_follow` (`submit --wait`: a workstream's changes once durable,
until its verdict). Each ends when the client closes its end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import SocketStream
from anyio.streams.memory import MemoryObjectReceiveStream

from supervisor.control import protocol as p
from supervisor.control.actions import HANDLERS, SEVERITIES, log_target
from supervisor.core.errors import OperatorError
from supervisor.core.model import Transition
from supervisor.engine.effects import FOLLOWER_BACKLOG
from supervisor.engine.loop import Engine

# How often a followed log file is looked at for new output.
FOLLOW_POLL_S = 0.2


async def follow_events(
    engine: Engine, stream: SocketStream, req_id: int, params: p.EventsParams
) -> None:
    """`events -f`: each new event at or above the severity, until the client goes
    or the engine drops this follower for falling behind."""
    floor = SEVERITIES.index(params.severity) if params.severity in SEVERITIES else 0
    recv = engine.follow_events()
    async with recv:
        async for ev in recv:
            if SEVERITIES.index(ev.severity) >= floor:
                await stream.send(
                    p.encode_response(
                        p.Response(id=req_id, ok=True, result=msgspec.to_builtins(ev))
                    )
                )
    # The engine closed the stream: this follower fell too far behind.
    await stream.send(
        p.encode_response(
            p.error_response(
                req_id,
                "unavailable",
                f"this follower fell {FOLLOWER_BACKLOG} events behind and was dropped; "
                "events since are in `orchctl events`; follow again with `orchctl events -f`",
            )
        )
    )


async def follow_ws(
    engine: Engine, stream: SocketStream, req_id: int, params: p.WsFollowParams
) -> None:
    """`submit --wait`: where the workstream stands, then each change of state of it
    and of its tasks, once durable, until it is finished (then the stream ends)."""

    async def send(result: dict[str, Any]) -> None:
        await stream.send(p.encode_response(p.Response(id=req_id, ok=True, result=result)))

    # Following starts before the look, so that no record falls between the two.
    recv = engine.follow_records()
    try:
        await _stream_ws(engine, stream, req_id, params, recv, send)
    except* (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError):
        pass  # the client went away mid-send: nothing more to do for it


async def _stream_ws(
    engine: Engine,
    stream: SocketStream,
    req_id: int,
    params: p.WsFollowParams,
    recv: MemoryObjectReceiveStream[list[Transition]],
    send: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    """What happened since `after_seq` (while the engine still holds it), the
    snapshot, then the workstream's changes; ends on its verdict, when the client
    closes (`_until_closed`) or when the engine drops a follower that fell behind."""
    async with recv, anyio.create_task_group() as tg:
        tg.start_soon(_until_closed, stream, tg.cancel_scope)
        try:
            first = await engine.call(HANDLERS["ws_follow"], params)
        except OperatorError as exc:
            await stream.send(p.encode_response(p.error_response(req_id, exc.code, str(exc))))
            tg.cancel_scope.cancel()
            return
        ws_id, seen = first["workstream_id"], first["seq"]
        members = set(first["tasks"])
        if params.after_seq is not None:
            # Every record up to `seen` is durable once the call has returned.
            for rec in engine.recent_records(params.after_seq, seen) or []:
                if (item := _ws_change(rec, ws_id, members)) is not None:
                    await send(item)
        await send({"kind": "snapshot"} | first)
        if first["state"] in FINISHED_WORKSTREAM_STATES:
            tg.cancel_scope.cancel()
            return
        async for records in recv:
            for rec in records:
                if rec.seq <= seen or (item := _ws_change(rec, ws_id, members)) is None:
                    continue
                await send(item)
                if item["kind"] == "workstream" and rec.to in FINISHED_WORKSTREAM_STATES:
                    tg.cancel_scope.cancel()
                    return
        # The engine closed the stream: this follower fell too far behind.
        await stream.send(
            p.encode_response(
                p.error_response(req_id, "unavailable", "this follower fell behind; follow again")
            )
        )
        tg.cancel_scope.cancel()


async def follow_log(
    engine: Engine,
    stream: SocketStream,
    req_id: int,
    params: p.LogsParams,
    readers: anyio.CapacityLimiter,
) -> None:
    """`logs -f`: the last lines, then every new complete line until the client goes
    (the file read in worker threads under `readers`, never on the loop)."""
    try:
        first = await engine.call(log_target, params)
    except OperatorError as exc:
        await stream.send(p.encode_response(p.error_response(req_id, exc.code, str(exc))))
        return
    path = Path(first["path"])
    lines, offset = await anyio.to_thread.run_sync(_tail_at, path, params.lines)
    await stream.send(
        p.encode_response(
            p.Response(id=req_id, ok=True, result={"path": str(path), "lines": lines})
        )
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(_until_closed, stream, tg.cancel_scope)
        while True:
            await anyio.sleep(FOLLOW_POLL_S)
            new, offset = await anyio.to_thread.run_sync(_read_new, path, offset, limiter=readers)
            if new:
                await stream.send(
                    p.encode_response(p.Response(id=req_id, ok=True, result={"lines": new}))
                )


# A followed workstream in one of these states is done: its verdict ends the stream.
FINISHED_WORKSTREAM_STATES = frozenset({"completed", "failed", "cancelled", "merged"})


def _ws_change(rec: Transition, ws_id: str, members: set[str]) -> dict[str, Any] | None:
    """A change of state of the workstream or of one of its tasks, as `ws_follow` sends
    it; None for any other record (and for a field update that changes no state)."""
    if rec.to == rec.from_:
        return None
    if rec.entity == "workstream" and rec.id == ws_id:
        return {"kind": "workstream", "id": ws_id, "seq": rec.seq, "ts": rec.ts} | {
            "from": rec.from_,
            "to": rec.to,
            "cause": rec.cause,
        }
    if rec.entity != "task" or rec.id not in members:
        return None
    out: dict[str, Any] = {
        "kind": "task",
        "id": rec.id,
        "seq": rec.seq,
        "ts": rec.ts,
        "from": rec.from_,
        "to": rec.to,
        "cause": rec.cause,
    }
    for key in ("worker_id", "failure_kind", "retry_count", "skipped"):
        if key in rec.changes:
            out[key] = rec.changes[key]
    return out


async def _until_closed(stream: SocketStream, scope: anyio.CancelScope) -> None:
    """Cancel `scope` when the client goes: it sends nothing more, so EOF (or an error)
    means it has closed its end."""
    with contextlib.suppress(Exception):
        while await stream.receive():
            pass
    scope.cancel()


def _tail_at(path: Path, lines: int) -> tuple[list[str], int]:
    """The last `lines` lines of `path` and the offset just after them (0 when absent)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return [], 0
    start = max(0, size - 1024 * 1024)  # enough for any sensible -n
    text = _read_range(path, start, size)
    end = text.rfind(b"\n") + 1  # a partial last line is sent once it is complete
    got = text[:end].decode("utf-8", errors="replace").splitlines()
    if start > 0 and got:
        got = got[1:]  # the block began mid-line
    return (got[-lines:] if lines > 0 else []), start + end


def _read_new(path: Path, offset: int) -> tuple[list[str], int]:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return [], 0
    if size < offset:  # truncated or replaced: start again from its beginning
        offset = 0
    if size == offset:
        return [], offset
    data = _read_range(path, offset, size)
    end = data.rfind(b"\n") + 1
    if end == 0:
        return [], offset
    return data[:end].decode("utf-8", errors="replace").splitlines(), offset + end


def _read_range(path: Path, start: int, stop: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(stop - start)
    except FileNotFoundError:
        return b""
