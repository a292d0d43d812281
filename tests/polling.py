"""The tests' one way to wait: poll an observable condition, with a bound generous enough for a busy box."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

# A bound, not an expectation: a condition that holds at all holds within a second or two on a quiet machine.
WITHIN = 30.0


async def wait_until(
    check: Callable[[], bool | Awaitable[bool]],
    within: float = WITHIN,
    interval: float = 0.02,
    what: str = "",
) -> None:
    """Call `check()` (sync, or async when it has to ask someone) until it is true.

    TimeoutError, naming `what`, after `within` seconds.
    """
    deadline = time.monotonic() + within
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"not met within {within}s: {what or check}")
        await asyncio.sleep(interval)
