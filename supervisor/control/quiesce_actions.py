"""`ws pause` / `ws unpause` and `drain` / `undrain`: the operator's requests, each run
inside one step of the engine; the decisions are core/quiesce.py's.
"""

from __future__ import annotations

from typing import Any

from supervisor.control import protocol as p
from supervisor.control.lookup import get_ws
from supervisor.core import quiesce
from supervisor.core.errors import OperatorError
from supervisor.core.machine import Machine


def ws_pause(s: Machine, params: p.WsPauseParams) -> dict[str, Any]:
    ws = get_ws(s, params.workstream)
    if ws.state == "merged":
        raise OperatorError("wrong_state", f"workstream {ws.id} is merged; nothing in it runs")
    rec = quiesce.pause(s, ws.id, params.reason)
    running = s.state.graph.ws_counts.get(ws.id, {}).get("running", 0)
    return {
        "workstream": ws.id,
        "paused": True,
        "running": running,
        "seq": None if rec is None else rec.seq,
    }


def ws_unpause(s: Machine, params: p.WsUnpauseParams) -> dict[str, Any]:
    ws = get_ws(s, params.workstream)
    rec = quiesce.unpause(s, ws.id, params.reason)
    return {"workstream": ws.id, "paused": False, "seq": None if rec is None else rec.seq}


def drain(s: Machine, params: p.DrainParams) -> dict[str, Any]:
    rec = quiesce.drain(s, params.reason)
    return {
        "draining": True,
        "running": quiesce.running_count(s),
        "seq": None if rec is None else rec.seq,
    }


def undrain(s: Machine, params: p.UndrainParams) -> dict[str, Any]:
    rec = quiesce.undrain(s, params.reason)
    return {"draining": False, "seq": None if rec is None else rec.seq}
