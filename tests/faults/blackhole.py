"""A TCP proxy the test controls: it forwards until told to freeze, then its connections go silent.

Frozen connections stay open at both ends and nothing is closed or reset: the proxy just stops reading
and writing, as a NAT entry that expired, a dead peer or a black-holing firewall look from each side.
Connections opened after the freeze are forwarded normally, so a client that reconnects gets through.
Needs no privileges (an iptables rule would need a network namespace and CAP_NET_ADMIN).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from tests.serve_process import HOST

CHUNK = 64 * 1024


@dataclass(eq=False)
class _Link:
    """One client connection and its upstream; `frozen` stops both directions at the next chunk."""

    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    frozen: asyncio.Event = field(default_factory=asyncio.Event)
    ended: bool = False  # one side closed: nothing left to freeze


class BlackholeProxy:
    """127.0.0.1:port → upstream; `freeze()` silences every connection open at that moment."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0
        self.accepted = 0
        self.frozen_links = 0

    async def start(self) -> BlackholeProxy:
        self._server = await asyncio.start_server(self._accept, HOST, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def freeze(self) -> int:
        """Silence the connections open now (without closing them); returns how many."""
        live = [link for link in self._links if not link.ended and not link.frozen.is_set()]
        for link in live:
            link.frozen.set()
        self.frozen_links += len(live)
        return len(live)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in self._links:
            for writer in link.writers:
                writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            client_writer.close()
            return
        link = _Link([client_writer, upstream_writer])
        self._links.add(link)
        for reader, writer in ((client_reader, upstream_writer), (upstream_reader, client_writer)):
            task = asyncio.create_task(self._pump(link, reader, writer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while not link.frozen.is_set():
                read = asyncio.ensure_future(reader.read(CHUNK))
                frozen = asyncio.ensure_future(link.frozen.wait())
                await asyncio.wait({read, frozen}, return_when=asyncio.FIRST_COMPLETED)
                frozen.cancel()
                if link.frozen.is_set():
                    read.cancel()  # whatever it brings is dropped: the packet never arrives
                    break
                data = read.result()
                if not data:  # an orderly close is passed on while not frozen
                    link.ended = True
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()
            await asyncio.Event().wait()  # frozen: hold both sockets open and silent until close()
        except (ConnectionError, OSError):
            link.ended = True
            writer.close()
