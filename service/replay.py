"""Filling a new stream from the table: the unread rows after its cursor, up to the hub's snapshot.

Mercure's order: the stream is registered first (live rows are held back), the snapshot is the hub's cursor
at that moment, the table is read in pages up to it, then the held live rows follow, skipping duplicates.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

from .db import UNAVAILABLE_ERRORS, Database, Row
from .hub import Hub, Stream, encode_row
from .sse import control_frame

log = logging.getLogger("pgpush.replay")
T = TypeVar("T")

REPLAY_PAGE = 500


async def _until_answered(stream: Stream, query: Callable[[], Awaitable[T]], backoff_max: float) -> T | None:
    """Run a read until Postgres answers it; None when the stream closes first."""
    backoff = 0.05
    while stream.close_reason is None:
        try:
            return await query()
        except UNAVAILABLE_ERRORS as exc:
            log.info("replay read failed, retrying in %.2fs: %r", backoff, exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, backoff_max)
    return None


def _push(stream: Stream, rows: list[Row], on_replayed: Callable[[int], None] | None) -> None:
    stream.push_replay([encode_row(row) for row in rows])
    if on_replayed is not None:
        on_replayed(len(rows))


async def fill_stream(
    hub: Hub,
    db: Database,
    stream: Stream,
    cursor: int | None,
    *,
    replay_limit: int,
    backoff_max: float = 2.0,
    on_replayed: Callable[[int], None] | None = None,
) -> None:
    """Replay what the client has not seen (protocol §3's table), then switch the stream to live rows."""
    start = await hub.start_point(stream)
    snapshot = start.seq
    recipient = stream.recipient
    after = cursor
    if cursor is not None and cursor > snapshot:
        # The client knows rows this database never had: it was reset. Start over like a fresh load.
        stream.push_control(control_frame("reset", {"reason": "cursor_ahead"}))
        after = None
        reset_sent = True
    else:
        reset_sent = False
    if after is not None and start.unread is not None:
        # The hub read every unread row up to the snapshot along with it (the usual case): no query.
        _push(stream, [row for row in start.unread if row.seq > after], on_replayed)
        stream.go_live()
        return
    if after is None:
        # A fresh connect usually has few unread rows: the hub read them all along with the snapshot.
        newest = start.unread
        if newest is not None:
            if len(newest) > replay_limit and not reset_sent:
                stream.push_control(control_frame("reset", {"reason": "too_many_unread"}))
            _push(stream, newest[-replay_limit:], on_replayed)
            stream.go_live()
            return
        # Otherwise the newest REPLAY_LIMIT unread rows are read forward from their boundary, a page at a
        # time like any replay (reading them newest first in one query held up to 500 rows at once).
        boundary = await _until_answered(
            stream, partial(db.unread_boundary, recipient, snapshot, replay_limit), backoff_max
        )
        if stream.close_reason is not None:
            return
        if boundary is not None and not reset_sent:
            stream.push_control(control_frame("reset", {"reason": "too_many_unread"}))
        after = boundary or 0
    while stream.close_reason is None:
        # Pages of at most one stream buffer, each sent before the next is read: a replay holds no more
        # than a live stream may, whatever the size of the rows.
        page = await _until_answered(
            stream,
            partial(db.unread_page, recipient, after, snapshot, REPLAY_PAGE, stream.buffer_bytes),
            backoff_max,
        )
        if page is None:
            return
        rows, more = page
        _push(stream, rows, on_replayed)
        if not more:
            break
        after = rows[-1].seq
        await stream.wait_drained()
    stream.go_live()
