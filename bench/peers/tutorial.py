"""The tutorial design: FastAPI + sse-starlette, every stream polls the table once a second.

Run: DATABASE_URL=… uvicorn bench.peers.tutorial:app; streams are GET /events?user=NAME.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from fastapi import FastAPI, Request
from sse_starlette.sse import EventSourceResponse

LAST_SEQ = "SELECT coalesce(max(last_seq), 0) FROM message_counters WHERE recipient = $1"
NEW_ROWS = "SELECT seq, event, data::text FROM messages WHERE recipient = $1 AND seq > $2 ORDER BY seq"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=1, max_size=10)
    yield
    await app.state.pool.close()


app = FastAPI(lifespan=lifespan)


@app.get("/events")
async def events(request: Request, user: str) -> EventSourceResponse:
    pool: asyncpg.Pool = request.app.state.pool

    async def poll() -> AsyncIterator[dict[str, object]]:
        last = await pool.fetchval(LAST_SEQ, user)
        while True:
            for seq, event, data in await pool.fetch(NEW_ROWS, user, last):
                yield {"id": str(seq), "event": event, "data": data}
                last = seq
            await asyncio.sleep(1)

    return EventSourceResponse(poll(), ping=15)
