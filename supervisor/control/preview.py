"""The preview of an operator request (`dry_run`): what it would record and which attempts
it would kill, decided by the request's own handler and then taken back whole.

The handler runs inside a step of the engine exactly as for the real request; its records
and effects are read off the open step, then undone through the same savepoint that takes
back a refused request. Nothing is written, no effect is released, and the plan cannot
differ from what the request does on the same state. A confirmed request carries the
plan's digest and is done only if it would still do exactly that (`confirmed`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from supervisor.core import wire
from supervisor.core.effects import KillTree, Retire, Send
from supervisor.core.errors import OperatorError
from supervisor.core.machine import Machine

Handler = Callable[[Machine, Any], Any]


def _killed_attempt(effect: object) -> tuple[str, str] | None:
    """(worker, attempt) that `effect` kills, or None when it kills no attempt."""
    match effect:
        case Send(worker_id=wid, msg=wire.Kill(attempt_id=aid)):
            return wid, aid
        case KillTree(worker_id=wid, attempt_id=aid):
            return wid, aid
        case Retire(worker_id=wid, attempt_id=str() as aid):
            return wid, aid
    return None


def rehearse(s: Machine, handler: Handler, params: Any) -> dict[str, Any]:
    """Run `handler` on `params`, take all of it back, and say what it would have done:
    `changes` (one per record: entity, id, from, to, changed fields), `kills` (the
    attempts it stops: task, attempt number, worker) and `result` (its reply)."""
    sp = s.savepoint()
    try:
        result = handler(s, params)
        records = list(s.txn.records[sp[0][0] :])
        effects = list(s.effects[sp[2] :])
    finally:
        s.undo_to(sp)
    attempts = {
        a.attempt_id: (t.id, a.number) for t in s.state.data.tasks.values() for a in t.attempts[-1:]
    }
    kills = []
    for effect in effects:
        hit = _killed_attempt(effect)
        if hit is not None and hit[1] in attempts:
            task_id, number = attempts[hit[1]]
            kills.append({"task_id": task_id, "attempt": number, "worker_id": hit[0]})
    changes = [
        {
            "entity": r.entity,
            "id": r.id,
            "from": r.from_,
            "to": r.to,
            "changes": r.changes,
        }
        for r in records
    ]
    if isinstance(result, dict) and "seq" in result:
        result = result | {"seq": None}  # nothing was recorded
    plan = {"dry_run": True, "changes": changes, "kills": kills, "result": result}
    return plan | {"digest": digest(plan)}


def digest(plan: dict[str, Any]) -> str:
    """What a plan does, in short: which entities go from which state to which, and which
    attempts are killed (not the times or the fields, which differ from step to step)."""
    moves = [(c["entity"], c["id"], c["from"], c["to"]) for c in plan["changes"]]
    kills = [(k["task_id"], k["attempt"], k["worker_id"]) for k in plan["kills"]]
    text = json.dumps([moves, kills], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rehearsal(handler: Handler) -> Handler:
    """`handler` as a preview: same decision, nothing kept."""

    def preview(s: Machine, params: Any) -> dict[str, Any]:
        return rehearse(s, handler, params)

    return preview


def confirmed(handler: Handler, expect: str) -> Handler:
    """`handler`, done only when its plan is still the one confirmed (`expect`, a digest):
    rehearsed and done in one step, so nothing can change in between."""

    def run(s: Machine, params: Any) -> Any:
        if rehearse(s, handler, params)["digest"] != expect:
            raise OperatorError(
                "wrong_state",
                "the state changed since the plan was shown, and the command would now do "
                "something else; nothing was done: run it again to see the new plan",
            )
        return handler(s, params)

    return run
