"""Stalled clients cost at most a small multiple of PGPUSH_STREAM_BUFFER_BYTES, whatever the writes.

Three stalled streams of alice (raw sockets with a 16 KiB receive buffer that never read), one healthy
stream of alice and one of bob, against `pgpush serve`. 0.3.0 handed a stream everything one hub read
brought (up to 20,000 rows: 40 MB of 8 KB rows) and its writer passed everything pending to one send, so
the transport buffered it whole; the healthy sibling was cut along with the stalled ones. Now a hub read
brings at most what the emptiest stream can take, the writer sends 64 KiB at a time and waits for the
transport to drain, and a stream its client stopped reading is cut while the healthy ones go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from tests.conftest import make_token
from tests.faults.ledger import Ledger
from tests.polling import wait_until
from tests.serve_process import HOST, ServerProcess
from tests.sse_client import SSEStream

MiB = 1024 * 1024
BUFFER_BYTES = 256 * 1024
STALLED = 3
# pgpush's own growth while 3 stalled and 2 healthy streams pass tens of MB: the streams' bound (3 x 256 KiB
# buffers plus 128 KiB each in the transport) and one hub read, with room for the allocator's slack.
RSS_GROWTH_BOUND = 24 * MiB


@pytest.fixture
async def serve(database_url: str) -> AsyncIterator[ServerProcess]:
    server = ServerProcess(database_url, log_level="warning", stream_buffer_bytes=BUFFER_BYTES)
    await server.ready()
    yield server
    await server.stop()


class StalledClient:
    """GET /events on a socket whose receive buffer is 16 KiB, read only after the test says so."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, token: str, last_event_id: int | None = None) -> StalledClient:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1024 * 1024)
        writer.write(
            f"GET /events HTTP/1.1\r\nHost: pgpush\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200"), head
        return cls(reader, writer)

    async def read_to_end(self) -> int:
        """Everything the server sent before it closed the stream; fails if it is still open."""
        total = 0
        async with asyncio.timeout(30):
            while chunk := await self.reader.read(1024 * 1024):
                total += len(chunk)
        self.writer.close()
        return total


async def sample_rss(server: ServerProcess, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set() and server.process.poll() is None:
        peak[0] = max(peak[0], server.rss_bytes())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.02)


async def single_row_writers(db: asyncpg.Connection, database_url: str) -> int:
    """Four writers committing one 16 KiB row per statement (too big to ride in the notification)."""
    rows = 400

    async def writer() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            for n in range(rows):
                await conn.execute(
                    "INSERT INTO messages (recipient, data) "
                    "VALUES ('alice', jsonb_build_object('n', $1::int, 'pad', repeat('s', 16384)))",
                    n,
                )
        finally:
            await conn.close()

    await asyncio.gather(*(writer() for _ in range(4)))
    return 4 * rows


async def one_big_statement(db: asyncpg.Connection, database_url: str) -> int:
    """100,000 small rows in one INSERT … SELECT."""
    await db.execute(
        "INSERT INTO messages (recipient, data) "
        "SELECT 'alice', jsonb_build_object('n', n, 'h', md5(n::text)) FROM generate_series(1, 100000) n"
    )
    return 100_000


async def rows_of_64_kib(db: asyncpg.Connection, database_url: str) -> int:
    """Five statements of 200 rows of 64 KiB (the API's largest data): 64 MB in all."""
    for _ in range(5):
        await db.execute(
            "INSERT INTO messages (recipient, data) SELECT 'alice', jsonb_build_object('n', n, 'pad', "
            "repeat(md5(n::text), 2047)) FROM generate_series(1, 200) n"
        )
    return 1_000


Writes = Callable[[asyncpg.Connection, str], Awaitable[int]]


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "writes", [single_row_writers, one_big_statement, rows_of_64_kib], ids=lambda w: w.__name__
)
async def test_stalled_streams_stay_within_their_bound_and_are_cut_while_healthy_ones_get_every_row(
    serve: ServerProcess, db: asyncpg.Connection, database_url: str, writes: Writes
) -> None:
    ledger = Ledger()
    # Warm every code path once, so the baseline is the server's steady size.
    warm = await SSEStream.open(HOST, serve.port, make_token("warm"))
    await db.execute("INSERT INTO messages (recipient, data) VALUES ('warm', '1')")
    await wait_until(lambda: warm.seqs != [], within=10)
    await warm.close()

    stalled = [await StalledClient.open(serve.port, make_token("alice")) for _ in range(STALLED)]
    healthy = await SSEStream.open(
        HOST, serve.port, make_token("alice"), seqs=ledger.client("a", "alice").seqs
    )
    bob = await SSEStream.open(HOST, serve.port, make_token("bob"), seqs=ledger.client("b", "bob").seqs)
    await wait_until(lambda: _streams(serve, STALLED + 2), within=10, what="every stream open")
    baseline = serve.rss_bytes()
    peak = [baseline]
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(serve, peak, stop))

    async def bob_meanwhile() -> None:
        # Bob is another user: his single rows keep arriving while alice's streams are flooded.
        for _ in range(20):
            seq = await db.fetchval(
                "INSERT INTO messages (recipient, data) VALUES ('bob', '1') RETURNING seq"
            )
            ledger.record_sent("bob", seq)
            await asyncio.sleep(0.1)

    conn = await asyncpg.connect(database_url)
    try:
        sent, _ = await asyncio.gather(writes(conn, database_url), bob_meanwhile())
    finally:
        await conn.close()
    for seq in await db.fetch("SELECT seq FROM messages WHERE recipient = 'alice' ORDER BY seq"):
        ledger.record_sent("alice", seq["seq"])

    await wait_until(
        lambda: len(healthy.seqs) >= sent or healthy.closed.is_set(),
        within=150,
        what="the healthy stream got every row",
    )
    assert not healthy.closed.is_set(), f"alice's healthy stream was cut after {len(healthy.seqs)} rows"
    await wait_until(lambda: len(bob.seqs) >= 20, within=10, what="bob got his rows")

    async def stalled_cut() -> bool:
        return await serve.metric("pgpush_streams_closed_total", reason="overflow") >= STALLED

    await wait_until(stalled_cut, within=30, what="the stalled streams were cut")
    stop.set()
    await sampler
    handed = [await client.read_to_end() for client in stalled]
    assert not healthy.closed.is_set() and not bob.closed.is_set(), "a healthy stream was cut"
    tally = ledger.assert_exact()
    growth = peak[0] - baseline
    print(
        f"\n{writes.__name__}: {sent} rows; RSS before {baseline / MiB:.1f} MiB, "
        f"peak {peak[0] / MiB:.1f} MiB "
        f"(+{growth / MiB:.1f}), after {serve.rss_bytes() / MiB:.1f} MiB; stalled clients got "
        f"{[round(h / 1024) for h in handed]} KiB; {tally}"
    )
    assert growth < RSS_GROWTH_BOUND, f"the server grew by {growth / MiB:.0f} MiB"
    await healthy.close()
    await bob.close()


async def _streams(serve: ServerProcess, count: int) -> bool:
    return await serve.metric("pgpush_streams") == count


@pytest.mark.timeout(120)
async def test_stalled_clients_resuming_from_a_cursor_hold_one_buffer_of_their_replay(
    serve: ServerProcess, db: asyncpg.Connection
) -> None:
    """Clients that resume after a cut get their unread rows from the table in pages of one stream buffer,
    each sent before the next is read (0.3.0 read 500 rows a page: 32 MB of 64 KiB rows, held per stream)."""
    await rows_of_64_kib(db, "")  # 1,000 unread rows of 64 KiB for alice
    warm = await SSEStream.open(HOST, serve.port, make_token("warm"))
    await db.execute("INSERT INTO messages (recipient, data) VALUES ('warm', '1')")
    await wait_until(lambda: warm.seqs != [], within=10)
    await warm.close()
    baseline = serve.rss_bytes()
    peak = [baseline]
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(serve, peak, stop))
    stalled = [
        await StalledClient.open(serve.port, make_token("alice"), last_event_id=0) for _ in range(STALLED)
    ]
    healthy = await SSEStream.open(HOST, serve.port, make_token("alice"), last_event_id=0)
    await wait_until(lambda: len(healthy.seqs) == 1_000, within=90, what="the healthy replay got every row")
    stop.set()
    await sampler
    growth = peak[0] - baseline
    print(
        f"\nreplay of 1,000 rows of 64 KiB to {STALLED} stalled clients and a healthy one: RSS before "
        f"{baseline / MiB:.1f} MiB, peak {peak[0] / MiB:.1f} MiB (+{growth / MiB:.1f}), "
        f"after {serve.rss_bytes() / MiB:.1f} MiB"
    )
    assert growth < RSS_GROWTH_BOUND, f"the server grew by {growth / MiB:.0f} MiB"
    for client in stalled:
        client.writer.close()
    await healthy.close()
