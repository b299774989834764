"""How another task asks the engine for something: a Call, run inside a step and answered
once its records are durable; and the refusal every change gets while the log refuses
writes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio

from supervisor.core.errors import OperatorError


class ReadOnly(OperatorError):
    """Raised to a request that would change state while the log refuses writes."""

    def __init__(self, why: str) -> None:
        super().__init__(
            "unavailable",
            f"nothing was changed: the state log refuses writes ({why}); orchd is read-only "
            "until it takes writes again (it retries by itself: free space, then run the "
            "command again)",
        )


class Call:
    """A request to the engine from another task: `fn(machine, *args)` run inside a step,
    answered once its records are durable. A `query` (a request that changes nothing)
    that recorded nothing is answered at the end of its step, without waiting for the
    sync of records other inputs made meanwhile: it may show a change whose record is
    written and not yet durable (one fdatasync behind at most); every effect of that
    change still waits for it."""

    __slots__ = ("_done", "args", "error", "fn", "query", "result")

    def __init__(self, fn: Callable[..., Any], *args: Any, query: bool = False) -> None:
        self.fn, self.args, self.query = fn, args, query
        self.result: Any = None
        self.error: BaseException | None = None
        self._done = anyio.Event()

    def finish(self) -> None:
        self._done.set()

    async def wait(self) -> Any:
        await self._done.wait()
        if self.error is not None:
            raise self.error
        return self.result
