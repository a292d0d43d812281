"""Fixtures of the hostile-input tests: a bystander whose stream must keep working through every attack."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
import pytest

from tests.conftest import RunningServer, make_token
from tests.polling import wait_until
from tests.sse_client import SSEStream


@dataclass
class Bystander:
    """Bob, an ordinary user with an open stream; `assert_served` proves the server still delivers to him."""

    stream: SSEStream
    db: asyncpg.Connection
    delivered: int = 0

    async def assert_served(self, within: float = 30.0) -> float:
        """Insert a row for bob and wait for it on his stream; returns the delivery time in seconds."""
        started = time.monotonic()
        await self.db.execute("INSERT INTO messages (recipient, event, data) VALUES ('bob', 'ping', '1')")
        self.delivered += 1
        await wait_until(
            lambda: len(self.stream.seqs) >= self.delivered, within=within, what="bob got his row"
        )
        assert not self.stream.closed.is_set()
        return time.monotonic() - started

    async def keep_checking(self, stop: asyncio.Event, every: float = 0.5) -> list[float]:
        """assert_served over and over until `stop`: the delivery times seen during an attack."""
        times: list[float] = []
        while not stop.is_set():
            times.append(await self.assert_served())
            await asyncio.sleep(every)
        return times


def port_of(server: RunningServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


@asynccontextmanager
async def watching(port: int, db: asyncpg.Connection) -> AsyncIterator[Bystander]:
    """Bob's stream on the server at `port`, proven to work before and after the block."""
    stream = await SSEStream.open("127.0.0.1", port, make_token("bob"))
    assert stream.status == 200
    watcher = Bystander(stream, db)
    await watcher.assert_served()
    yield watcher
    await watcher.assert_served()  # and still after the attack
    await stream.close()


@pytest.fixture
async def bystander(server: RunningServer, db: asyncpg.Connection) -> AsyncIterator[Bystander]:
    async with watching(port_of(server), db) as watcher:
        yield watcher
