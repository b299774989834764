"""The engine's timers (core/queue.py): deadlines come due in order, and what was disarmed
does not stay in memory for as long as its deadline would have lasted."""

from __future__ import annotations

import random

from supervisor.core.queue import Timers

# Stale entries the heap may hold beyond twice the armed ones before it is rebuilt.
SLACK = 1024


def heap_length(timers: Timers) -> int:
    """Entries in the timers' heap, stale ones included (what the fix bounds)."""
    return len(timers._heap)


def test_disarmed_deadlines_behind_a_long_one_do_not_pile_up() -> None:
    """100,000 tasks whose timeouts are disarmed while an hour-long timeout is armed leave a
    heap of at most twice the armed deadlines plus the slack, not 100,000 entries."""
    timers = Timers()
    timers.arm("timeout", "build", 3600.0)
    for i in range(100_000):
        timers.arm("timeout", f"t{i}", 600.0 + i * 0.01)
        timers.disarm("timeout", f"t{i}")
    assert heap_length(timers) <= 2 * 1 + SLACK + 1
    assert timers.next_due() == 3600.0
    assert timers.pop_due(3600.0) == [("timeout", "build")]


def test_compacted_timers_fire_what_is_armed_in_deadline_order() -> None:
    """Through many rebuilds, pop_due returns exactly the armed deadlines, earliest first,
    each once, as a plain dict of deadlines says."""
    rng = random.Random(8)
    timers, model = Timers(), {}
    for step in range(60_000):
        key = f"k{rng.randrange(3000)}"
        kind = rng.choice(("timeout", "backoff"))
        if rng.random() < 0.6:
            when = rng.uniform(0, 1000)
            timers.arm(kind, key, when)
            model[(kind, key)] = when
        else:
            timers.disarm(kind, key)
            model.pop((kind, key), None)
        if step % 10_000 == 9_999:
            assert timers.next_due() == (min(model.values()) if model else None)
    fired = timers.pop_due(500.0)
    due = sorted((w, k) for k, w in model.items() if w <= 500.0)
    assert fired == [k for _, k in due]
    assert timers.pop_due(1000.0) == [
        k for w, k in sorted((w, k) for k, w in model.items()) if w > 500.0
    ]
    assert timers.next_due() is None
