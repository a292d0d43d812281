"""The one shape every long-running part of a process shares: a named asyncio task, started and stopped."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import ClassVar


class BackgroundTask(ABC):
    """Runs `_run` as one task from `start()` until `stop()` cancels it and waits for it to end."""

    task_name: ClassVar[str]  # so a task dump or asyncio debug output says which part it is
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.task_name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    @abstractmethod
    async def _run(self) -> None: ...
