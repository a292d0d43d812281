"""A streaming SSE client over a real HTTP connection (httpx), for the tests."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Self

import httpx

from tests.sse_parser import Event, EventStreamParser


class SSEStream:
    """An open GET /events: read events one by one, with timeouts, and see comments and retries."""

    def __init__(self, response: httpx.Response, closer: contextlib.AsyncExitStack) -> None:
        self.response = response
        self.parser = EventStreamParser()
        self._closer = closer
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())
        self.closed = asyncio.Event()

    async def _read(self) -> None:
        try:
            async for text in self.response.aiter_text():
                for event in self.parser.feed(text):
                    self._events.put_nowait(event)
        except (httpx.HTTPError, asyncio.CancelledError):
            pass
        finally:
            self.closed.set()
            self._events.put_nowait(None)

    async def next(self, timeout: float = 5) -> Event:
        """The next event; raises TimeoutError, or EOFError when the server closed the stream."""
        event = await asyncio.wait_for(self._events.get(), timeout)
        if event is None:
            self._events.put_nowait(None)
            raise EOFError("the stream ended")
        return event

    async def take(self, count: int, timeout: float = 10) -> list[Event]:
        """Exactly `count` events (within `timeout` overall)."""
        async with asyncio.timeout(timeout):
            return [await self.next(timeout) for _ in range(count)]

    async def messages(self, count: int, timeout: float = 10) -> list[Event]:
        """The next `count` row events (those with an id), skipping control events."""
        found: list[Event] = []
        async with asyncio.timeout(timeout):
            while len(found) < count:
                event = await self.next(timeout)
                if event.last_event_id and event.type not in ("reset", "pause", "token_expired"):
                    found.append(event)
        return found

    async def rest(self, timeout: float = 10) -> list[Event]:
        """Every event until the server closes the stream."""
        found: list[Event] = []
        async with asyncio.timeout(timeout):
            while True:
                try:
                    found.append(await self.next(timeout))
                except EOFError:
                    return found

    async def quiet(self, seconds: float) -> list[Event]:
        """Whatever arrives within `seconds` (usually asserted to be nothing)."""
        found: list[Event] = []
        with contextlib.suppress(TimeoutError, EOFError):
            async with asyncio.timeout(seconds):
                while True:
                    found.append(await self.next(seconds))
        return found

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader
        await self._closer.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def open_stream(
    base_url: str,
    token: str | None = None,
    *,
    last_event_id: str | int | None = None,
    params: dict[str, str] | None = None,
    cookies: dict[str, str] | None = None,
    expect_status: int = 200,
) -> SSEStream:
    """GET /events with a Bearer token (or other credentials via params/cookies) and start reading."""
    headers = {"Accept": "text/event-stream"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    stack = contextlib.AsyncExitStack()
    client = await stack.enter_async_context(
        httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(10, read=None), cookies=cookies)
    )
    response = await stack.enter_async_context(
        client.stream("GET", "/events", headers=headers, params=params)
    )
    if response.status_code != expect_status:
        await response.aread()
        await stack.aclose()
        raise AssertionError(f"GET /events: {response.status_code} {response.text}")
    return SSEStream(response, stack)
