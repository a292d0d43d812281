"""Retention: old read rows and unread rows past a per-user cap are deleted in small batches.

One replica at a time does it (a session advisory lock); every statement is short, so inserts never wait
on it, and a run that is cut off simply resumes next time.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from .background import BackgroundTask
from .db import UNAVAILABLE_ERRORS, Database

log = logging.getLogger("pgpush.retention")

RETENTION_LOCK_KEY = 0x70677075736802
RECIPIENTS_PER_PAGE = 500


@dataclass
class RetentionResult:
    """What one run deleted."""

    old_read: int = 0
    over_cap: int = 0


class Retention(BackgroundTask):
    """Runs `run_once` every interval, starting after a random fraction of it (replicas do not align)."""

    task_name = "pgpush-retention"

    def __init__(
        self,
        db: Database,
        *,
        days: float,
        max_unread_per_user: int,
        interval: float,
        batch_rows: int,
    ) -> None:
        self._db = db
        self._days = days
        self._cap = max_unread_per_user
        self._interval = interval
        self._batch = batch_rows

    async def _run(self) -> None:
        await asyncio.sleep(self._interval * random.uniform(0.1, 1.0))
        while True:
            try:
                result = await self.run_once()
                if result is not None and (result.old_read or result.over_cap):
                    log.info(
                        "retention deleted rows",
                        extra={"old_read": result.old_read, "over_cap": result.over_cap},
                    )
            except UNAVAILABLE_ERRORS as exc:
                log.warning("retention skipped, Postgres unavailable: %r", exc)
            except Exception:
                log.exception("retention run failed")
            await asyncio.sleep(self._interval)

    async def run_once(self) -> RetentionResult | None:
        """One full pass, if no other replica is doing one."""
        async with self._db.exclusive(RETENTION_LOCK_KEY) as held:
            if not held:
                return None
            result = RetentionResult()
            result.old_read = await self._delete_old_read()
            result.over_cap = await self._delete_over_cap()
            return result

    async def _delete_old_read(self) -> int:
        cutoff = datetime.now(UTC) - timedelta(days=self._days)
        deleted, after = 0, 0
        while True:
            step = await self._db.delete_old_read(after, cutoff, self._batch)
            deleted += step.deleted
            if step.last_id is None or step.oldest is None or step.oldest >= cutoff:
                return deleted
            after = step.last_id
            await asyncio.sleep(0)  # let streams run between batches

    async def _delete_over_cap(self) -> int:
        deleted, after = 0, ""
        while True:
            last = await self._db.last_counter_recipient(after, RECIPIENTS_PER_PAGE)
            if last is None:
                return deleted
            for recipient, seq in await self._db.unread_over_cap(after, RECIPIENTS_PER_PAGE, self._cap):
                while (n := await self._db.delete_unread_through(recipient, seq, self._batch)) > 0:
                    deleted += n
            after = last
