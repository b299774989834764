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
    answered once its records are durable."""

    __slots__ = ("_done", "args", "error", "fn", "result")

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn, self.args = fn, args
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
