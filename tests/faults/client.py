"""Fault-test clients built on the one SSE client (tests/sse_client.py): an EventSource-like client that
resumes across connections, and streams that record into a ledger."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine

import h11

from tests.faults.ledger import Ledger
from tests.sse_client import SSEStream


class ResumingClient:
    """One logical client across connections, as EventSource behaves: when a stream ends it waits the last
    `retry:` it was sent (capped), then reconnects with its Last-Event-ID; refused or 5xx attempts retry too.

    Row seqs of every connection go to one `seqs` list, so a ledger can check the whole history.
    """

    def __init__(
        self,
        host: str,
        port: int,
        token: str,
        seqs: list[int],
        *,
        cursor: str | int | None = None,
        max_delay: float = 3.0,
        refused_delay: float = 0.05,
    ) -> None:
        self.host, self.port, self.token = host, port, token
        self.seqs = seqs
        self.cursor = None if cursor is None else str(cursor)
        self.max_delay = max_delay
        self.refused_delay = refused_delay
        self.connections: list[SSEStream] = []  # every answered attempt, in order
        self.refused = 0  # attempts that found no server listening
        self.statuses: list[int] = []

    @property
    def current(self) -> SSEStream | None:
        """The open stream, if the client is connected now."""
        last = self.connections[-1] if self.connections else None
        return last if last is not None and last.status == 200 and not last.closed.is_set() else None

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected until `stop`; then hang up."""
        while not stop.is_set():
            try:
                stream = await SSEStream.open(
                    self.host, self.port, self.token, last_event_id=self.cursor, seqs=self.seqs
                )
            except (OSError, TimeoutError, h11.RemoteProtocolError):
                self.refused += 1
                await _sleep_unless(stop, self.refused_delay)
                continue
            self.connections.append(stream)
            self.statuses.append(stream.status)
            if stream.status == 200:
                await _first(stream.closed.wait(), stop.wait())
                if stream.last_event_id:
                    self.cursor = stream.last_event_id
                if stop.is_set():
                    await stream.close()
                    return
            retry_ms = stream.retries[-1] if stream.retries else 1000
            await _sleep_unless(stop, min(retry_ms / 1000, self.max_delay))

    async def hang_up(self) -> None:
        """Drop the current connection (the run loop reconnects)."""
        stream = self.current
        if stream is not None:
            await stream.close()


async def _first(*waits: Coroutine[object, object, object]) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def open_ledger_streams(
    port: int, users: list[str], per_user: int, ledger: Ledger, token: Callable[[str], str]
) -> list[SSEStream]:
    """`per_user` streams for each user, each recording what it receives in the ledger."""
    return [
        await SSEStream.open("127.0.0.1", port, token(user), seqs=ledger.client(f"{user}/{s}", user).seqs)
        for user in users
        for s in range(per_user)
    ]
