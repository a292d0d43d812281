"""The straightforward design: FastAPI + sse-starlette, one LISTEN, one unbounded asyncio.Queue per stream.

Run: DATABASE_URL=… uvicorn bench.peers.straightforward:app. Streams are opened as GET /events?user=NAME
(no auth: the peers measure delivery, not token checks).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from fastapi import FastAPI
from sse_starlette.sse import EventSourceResponse

from bench.peers.feed import Feed

queues: dict[str, set[asyncio.Queue[dict[str, object]]]] = {}


def on_rows(rows: list[asyncpg.Record]) -> None:
    for recipient, seq, event, data in rows:
        for queue in queues.get(recipient, ()):
            queue.put_nowait({"id": str(seq), "event": event, "data": data})


feed = Feed(os.environ["DATABASE_URL"], on_rows, lambda: set(queues))


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    await feed.start()
    yield
    await feed.stop()


app = FastAPI(lifespan=lifespan)


@app.get("/events")
async def events(user: str) -> EventSourceResponse:
    queue: asyncio.Queue[dict[str, object]] = asyncio.Queue()
    queues.setdefault(user, set()).add(queue)
    await feed.subscribe(user)

    async def stream() -> AsyncIterator[dict[str, object]]:
        try:
            while True:
                yield await queue.get()
        finally:
            mine = queues.get(user)
            if mine is not None:
                mine.discard(queue)
                if not mine:
                    del queues[user]

    return EventSourceResponse(stream(), ping=15)
