"""Finding 1 of the security review: the notification channel was open to every role that can connect.

An outsider (a login role with no grant at all) listened on `pgpush` and read carried rows whole, and
forged a row into alice's stream that injected an SSE `retry:` and jumped her cursor past every real row.
Each test performs the attack against a real `pgpush serve` running as the service role.
"""

from __future__ import annotations

import asyncio
import json
import time

import asyncpg
import pytest

from tests.conftest import Roles, make_token
from tests.serve_process import ServerProcess
from tests.sse_client import open_stream

LEGACY_CHANNEL = "pgpush"


async def insert(conn: asyncpg.Connection, recipient: str, data: str, event: str = "lead") -> None:
    await conn.execute(
        "INSERT INTO messages (recipient, event, data) VALUES ($1, $2, $3::jsonb)", recipient, event, data
    )


class Eavesdropper:
    """What a connection hears on the public channel, up to a marker sent after everything else.

    Notifications are delivered in commit order, so whatever the inserts before the marker sent comes first.
    """

    def __init__(self) -> None:
        self.heard: list[str] = []
        self.marker = asyncio.Event()

    def __call__(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        if payload == "marker":
            self.marker.set()
        else:
            self.heard.append(payload)

    async def everything(self, owner: asyncpg.Connection) -> list[str]:
        await owner.execute("SELECT pg_notify($1, 'marker')", LEGACY_CHANNEL)
        await asyncio.wait_for(self.marker.wait(), 10)
        return self.heard


async def test_an_outsider_can_neither_find_the_channel_nor_hear_a_row(
    service: ServerProcess, writer: asyncpg.Connection, outsider: asyncpg.Connection, db: asyncpg.Connection
) -> None:
    eavesdropper = Eavesdropper()
    await outsider.add_listener(LEGACY_CHANNEL, eavesdropper)
    async with await open_stream(service.url, make_token("bob")) as bob:
        await insert(writer, "bob", '{"otp": "493817"}')
        [row] = await bob.messages(1, timeout=30)  # the service heard it: a notification was sent
        assert row.data == '{"otp":"493817"}'
    assert await eavesdropper.everything(db) == []

    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await outsider.fetchval("SELECT name FROM pgpush_channel")
    channel = await db.fetchval("SELECT name FROM pgpush_channel")
    # Function sources are world-readable: the name must be in none of them.
    assert await outsider.fetchval("SELECT count(*) FROM pg_proc WHERE strpos(prosrc, $1) > 0", channel) == 0
    assert await outsider.fetchval("SELECT count(*) FROM pg_proc WHERE prosrc ~ 'pgpush_[0-9a-f]{32}'") == 0


def forged_payloads(recipient: str, previous_seq: int) -> list[str]:
    """The review's forgery (a bare CR that injects a 24-hour retry), and a row the table's rules admit;
    both at seq 9e18, past every real row."""
    events = ['lead\rdata: {"x":1}\r\rretry: 86400000', "lead"]
    rows = [
        [
            recipient,
            str(previous_seq),
            "9000000000000000000",
            event,
            f"{time.time():.2f}",
            '{"company": "FORGED"}',
        ]
        for event in events
    ]
    return [f"{recipient}\n" + "\t".join(row) for row in rows]


async def test_a_forged_notification_reaches_no_stream_and_delays_no_row(
    service: ServerProcess, writer: asyncpg.Connection, outsider: asyncpg.Connection
) -> None:
    async with await open_stream(service.url, make_token("alice")) as alice:
        await insert(writer, "alice", '{"company": "ACME"}')
        [first] = await alice.messages(1, timeout=30)
        for channel in (LEGACY_CHANNEL, "pgpush_probe", "pgpush_listener"):
            for payload in forged_payloads("alice", int(first.last_event_id)):
                await outsider.execute("SELECT pg_notify($1, $2)", channel, payload)
        await insert(writer, "alice", '{"company": "REAL"}')
        # The next thing on the wire is the real row, live (the safety net is minutes away).
        event = await alice.next(timeout=30)
        assert (event.type, event.data) == ("lead", '{"company":"REAL"}')
        assert int(event.last_event_id) > int(first.last_event_id)
        assert 86400000 not in alice.retries
        assert await alice.quiet(0.5) == []


@pytest.mark.parametrize(
    ("event", "data"),
    [
        ("lead\rretry: 86400000", '{"company": "FORGED"}'),  # a bare CR would start a new SSE field
        ("pause", '{"reconnect_at": 1}'),  # a control event with an id
        ("lead", '{"company": "FORGED"'),  # not JSON
        ("lead", '{"company": "FORGED\r"}'),  # a raw CR inside a JSON string
    ],
)
async def test_a_malformed_carried_row_on_the_private_channel_is_read_from_the_table_instead(
    service: ServerProcess, writer: asyncpg.Connection, db: asyncpg.Connection, event: str, data: str
) -> None:
    """Defence in depth: even on the private channel, a line the table would refuse is never shown."""
    channel = await db.fetchval("SELECT name FROM pgpush_channel")
    async with await open_stream(service.url, make_token("alice")) as alice:
        await insert(writer, "alice", '{"company": "ACME"}')
        [first] = await alice.messages(1, timeout=30)
        row = "\t".join(
            ["alice", first.last_event_id, "9000000000000000000", event, f"{time.time():.2f}", data]
        )
        await db.execute("SELECT pg_notify($1, $2)", channel, f"alice\n{row}")
        await insert(writer, "alice", '{"company": "REAL"}')
        received = await alice.next(timeout=30)
        assert (received.type, received.data) == ("lead", '{"company":"REAL"}')
        assert 86400000 not in alice.retries


async def test_a_cursor_a_notification_moved_past_the_table_is_restarted_from_the_table(
    database_url: str, roles: Roles, writer: asyncpg.Connection, db: asyncpg.Connection
) -> None:
    """Whoever holds the private channel (the owner, the service) is trusted to send committed rows; still,
    a row it claimed that the table does not have moves no cursor for longer than one safety-net period:
    the stream is restarted and resumes from the table, so the next real row is not lost behind it."""
    service = ServerProcess(roles.service_url(database_url), safety_net_seconds=1, listener_probe_seconds=1)
    try:
        await service.ready()
        channel = await db.fetchval("SELECT name FROM pgpush_channel")
        token = make_token("alice")
        async with await open_stream(service.url, token) as alice:
            await insert(writer, "alice", '{"company": "ACME"}')
            [first] = await alice.messages(1, timeout=30)
            row = ["alice", first.last_event_id, "9000000000000000000", "lead", f"{time.time():.2f}", "{}"]
            await db.execute("SELECT pg_notify($1, $2)", channel, "alice\n" + "\t".join(row))
            await insert(writer, "alice", '{"company": "REAL"}')
            await alice.rest(timeout=60)  # the server ends the stream at its next safety net
        assert alice.last_event_id == "9000000000000000000"  # the channel's holder is trusted
        async with await open_stream(service.url, token, last_event_id=alice.last_event_id) as again:
            reset, acme, real = await again.take(3, timeout=30)
        assert (reset.type, json.loads(reset.data)) == ("reset", {"reason": "cursor_ahead"})
        assert (acme.data, real.data) == ('{"company":"ACME"}', '{"company":"REAL"}')
    finally:
        await service.stop()
