"""Feeds nchan from Postgres: nchan has no Postgres integration, so this relay is part of its cost.

It LISTENs on 'pgpush' and reads new rows exactly as the straightforward peers do (bench/peers/feed.py),
then POSTs each row's data to nchan's publisher location `/pub/<recipient>`, pipelined over a few
keep-alive connections. Run: DATABASE_URL=… python -m bench.peers.relay <nchan port>.
"""

from __future__ import annotations

import asyncio
import os
import sys

import asyncpg
import uvloop

from bench.peers.feed import Feed, hinted_recipients

CONNECTIONS = 4


class Publisher:
    """A pipelined HTTP/1.1 client of nchan's publisher: requests go out at once, replies are counted."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.next = 0
        self.pending: list[int] = []
        self.errors = 0
        self.drainers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        for _ in range(CONNECTIONS):
            self.conns.append(await asyncio.open_connection("127.0.0.1", self.port))
        self.pending = [0] * CONNECTIONS
        for i in range(CONNECTIONS):
            self.drainers.append(asyncio.create_task(self._drain(i)))

    def publish(self, channel: str, body: bytes) -> None:
        i = self.next = (self.next + 1) % CONNECTIONS
        _, writer = self.conns[i]
        writer.write(
            b"POST /pub/%s HTTP/1.1\r\nHost: nchan\r\nContent-Length: %d\r\n\r\n%s"
            % (channel.encode(), len(body), body)
        )
        self.pending[i] += 1

    async def _drain(self, i: int) -> None:
        reader, _ = self.conns[i]
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith((b"HTTP/1.1 201", b"HTTP/1.1 202")):
                self.errors += 1
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await reader.readexactly(length)
            self.pending[i] -= 1


async def main(port: int) -> None:
    publisher = Publisher(port)
    await publisher.start()
    everyone: set[str] = set()

    def on_rows(rows: list[asyncpg.Record]) -> None:
        for recipient, _seq, _event, data in rows:
            publisher.publish(recipient, data.encode())

    # nchan does not tell the relay who is subscribed: it forwards every recipient it hears about.
    feed = Feed(os.environ["DATABASE_URL"], on_rows, lambda: everyone)
    original = feed._hint

    def hint(conn: object, pid: int, channel: str, payload: str) -> None:
        for name in hinted_recipients(payload) or []:
            if name not in everyone:
                everyone.add(name)
                feed.cursors.setdefault(name, 0)
        original(conn, pid, channel, payload)

    await feed.start()
    assert feed.listen_conn is not None
    await feed.listen_conn.remove_listener(feed.channel, original)
    await feed.listen_conn.add_listener(feed.channel, hint)
    print("relay ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
