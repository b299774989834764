"""One step's records, applied to the state as they are made and taken back whole when
the log refuses them. Pure: no I/O.

A step (one batch of inputs) makes several records, and each decision may look at what
the previous ones did, so every record is applied to the state as soon as it is checked.
Before an entity is first touched, a copy of it is kept (its pre-image). When the step's
append fails, `rollback` puts every pre-image back, removes what the step created and
rebuilds the derived indexes: the state is again exactly what the log holds, and the
step's inputs can be handled again once the log takes writes. Savepoints let one input
of the step (an operator request that is refused) be taken back alone.
"""

from __future__ import annotations

from typing import Any

import msgspec

from supervisor.core.model import RETIRED, State, Task, Transition

_replace = msgspec.structs.replace
_ATTR = {
    "task": "tasks",
    "workstream": "workstreams",
    "worker": "workers",
    "resource": "resources",
    "daemon": "daemon",
}


def _copy(obj: Any) -> Any:
    """A copy deep enough for `apply`: it assigns fields, appends an attempt and updates
    the last one in place; nothing else is changed inside an entity."""
    if isinstance(obj, Task):
        # A list of its own (apply appends to it), with a copy of the last attempt.
        last = [_replace(obj.attempts[-1])] if obj.attempts else []
        return _replace(obj, attempts=[*obj.attempts[:-1], *last])
    return _replace(obj)


class Txn:
    """The open step: its records, and what takes them back."""

    __slots__ = ("_orders", "_pre", "_start_seq", "_touched", "records", "state")

    def __init__(self, state: State) -> None:
        self.state = state
        self.records: list[Transition] = []
        self._start_seq = state.last_seq
        # (entity, id, copy or None when the step created it), in the order first touched.
        self._pre: list[tuple[str, str, Any]] = []
        self._touched: set[tuple[str, str]] = set()
        # (index in _pre, the workstreams' and tasks' ids in order) before a retirement.
        self._orders: list[tuple[int, list[str], list[str]]] = []

    def record(self, rec: Transition) -> None:
        """Check `rec` (IllegalTransition changes nothing) and apply it."""
        state = self.state
        obj = state.check_entity(rec)
        key = (rec.entity, rec.id)
        if key not in self._touched:
            self._touched.add(key)
            self._pre.append((rec.entity, rec.id, None if obj is None else _copy(obj)))
        if rec.to == RETIRED and rec.entity == "workstream":
            # Its tasks leave the state with it: a rollback puts them back as they are
            # (nothing changes them once they are out).
            self._touched.add(key)
            data = state.data
            # Their places too: the dicts' order is the submission order (lookups and
            # listings rely on it), and a rollback must not move them to the end.
            self._orders.append((len(self._pre), list(data.workstreams), list(data.tasks)))
            self._pre.append(("workstream", rec.id, _copy(obj)))
            for tid in obj.task_ids:
                if (t := data.tasks.get(tid)) is not None:
                    self._pre.append(("task", tid, t))
        state.apply_checked(rec, obj)
        self.records.append(rec)

    def mark(self) -> tuple[int, int]:
        """A savepoint: what `rollback` can return to."""
        # Entities touched before the savepoint must be copied again if touched after it,
        # so that rolling back to it restores them as they were at the savepoint.
        self._touched = set()
        return len(self.records), len(self._pre)

    def rollback(self, mark: tuple[int, int] = (0, 0)) -> bool:
        """Undo every record made since `mark`; True when there was anything to undo."""
        n_records, n_pre = mark
        if len(self.records) == n_records:
            return False
        data = self.state.data
        for entity, id_, pre in reversed(self._pre[n_pre:]):
            table = getattr(data, _ATTR[entity])
            if pre is None:
                gone = table.pop(id_, None)
                if entity == "workstream" and gone is not None:
                    for tid in gone.task_ids:
                        data.tasks.pop(tid, None)
            elif (live := table.get(id_)) is None:
                table[id_] = pre  # it had left the state (a retirement)
            else:
                for field in pre.__struct_fields__:
                    setattr(live, field, getattr(pre, field))
        while self._orders and self._orders[-1][0] >= n_pre:
            _, ws_order, task_order = self._orders.pop()
            _reorder(data.workstreams, ws_order)
            _reorder(data.tasks, task_order)
        del self._pre[n_pre:]
        del self.records[n_records:]
        self._touched = set()
        data.last_seq = self._start_seq + n_records
        # The indexes are derived: rebuilt rather than unwound (a rollback is rare).
        self.state.graph.rebuild(data.tasks.values(), data.tasks)
        return True


def _reorder(table: dict[str, Any], order: list[str]) -> None:
    """Put `table`'s entries back in `order` (in place; entries not in it go last)."""
    items = [(k, table[k]) for k in order if k in table]
    placed = set(order)
    rest = [(k, v) for k, v in table.items() if k not in placed]
    table.clear()
    table.update(items)
    table.update(rest)
