"""The straightforward design (one LISTEN, one unbounded queue per stream) as a bare ASGI app.

No framework: what the framework layer of `straightforward.py` costs is the difference between the two.
Run: DATABASE_URL=… uvicorn bench.peers.raw_asgi:app; streams are GET /events?user=NAME.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any
from urllib.parse import parse_qs

import asyncpg

from bench.peers.feed import Feed

HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
PING = b": ping\n\n"
queues: dict[str, set[asyncio.Queue[bytes | None]]] = {}


def on_rows(rows: list[asyncpg.Record]) -> None:
    for recipient, seq, event, data in rows:
        mine = queues.get(recipient)
        if mine:
            frame = b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, event.encode(), data.encode())
            for queue in mine:
                queue.put_nowait(frame)


feed = Feed(os.environ["DATABASE_URL"], on_rows, lambda: set(queues))


async def lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await feed.start()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await feed.stop()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    users = parse_qs(scope["query_string"].decode()).get("user")
    if scope["path"] != "/events" or not users:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    user = users[0]
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()
    queues.setdefault(user, set()).add(queue)

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        queue.put_nowait(None)

    watcher = asyncio.create_task(watch())
    try:
        await feed.subscribe(user)
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        while True:
            try:
                frame = await asyncio.wait_for(queue.get(), 15)
            except TimeoutError:
                frame = PING
            if frame is None:
                return
            await send({"type": "http.response.body", "body": frame, "more_body": True})
    except OSError:
        return
    finally:
        watcher.cancel()
        mine = queues.get(user)
        if mine is not None:
            mine.discard(queue)
            if not mine:
                del queues[user]
