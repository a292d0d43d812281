"""Findings 2 and 3: a writer needs INSERT on messages and nothing else, and cannot reach what orders rows.

Before 0004 the triggers ran as the inserting role: a writer with only INSERT failed, and once granted
what the triggers touch it could `UPDATE message_counters SET last_seq = 9e18` and hide every later row of
a recipient from live delivery. The service itself runs with exactly the grants of deploy/roles.sql.
"""

from __future__ import annotations

import asyncpg
import pytest

from tests.conftest import Roles, make_token
from tests.serve_process import ServerProcess
from tests.sse_client import open_stream

# What the triggers use, and what only the owner and the service may know: each refused to a writer.
OUT_OF_REACH = [
    "UPDATE message_counters SET last_seq = 9000000000000000000",
    "SELECT nextval('messages_seq_seq')",
    "INSERT INTO message_changes (recipients) VALUES ('alice')",
    "SELECT pgpush_announce()",
    "SELECT pgpush_announcer_awake(true)",
    "SELECT setval('pgpush_announcer_awake', 1)",
    "SELECT name FROM pgpush_channel",
]


async def test_a_writer_with_only_insert_is_delivered_live_and_reaches_nothing_else(
    service: ServerProcess, writer: asyncpg.Connection, db: asyncpg.Connection
) -> None:
    async with await open_stream(service.url, make_token("alice")) as alice:
        await writer.execute("INSERT INTO messages (recipient, event, data) VALUES ('alice', 'lead', '1')")
        await writer.execute(
            "INSERT INTO messages (recipient, event, data) SELECT 'alice', 'lead', to_jsonb(n) "
            "FROM generate_series(2, 40) AS n"  # too many to carry: the service reads them
        )
        rows = await alice.messages(40, timeout=30)
        assert [row.data for row in rows] == [str(n) for n in range(1, 41)]
        for statement in OUT_OF_REACH:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await writer.execute(statement)
        await writer.execute("INSERT INTO messages (recipient, event, data) VALUES ('alice', 'lead', '41')")
        [last] = await alice.messages(1, timeout=30)
        assert last.data == "41"
    assert await db.fetchval("SELECT last_seq FROM message_counters WHERE recipient = 'alice'") == int(
        last.last_event_id
    )


async def test_a_temporary_table_cannot_stand_in_for_the_counters(
    service: ServerProcess, writer: asyncpg.Connection, db: asyncpg.Connection
) -> None:
    """Every role may create temporary tables, and pg_temp comes first in a default search_path: a trigger
    without a fixed one would advance the writer's own `message_counters` instead of the real one."""
    await writer.execute("CREATE TEMP TABLE message_counters (recipient text PRIMARY KEY, last_seq bigint)")
    async with await open_stream(service.url, make_token("alice")) as alice:
        await writer.execute("INSERT INTO messages (recipient, event, data) VALUES ('alice', 'lead', '1')")
        [row] = await alice.messages(1, timeout=30)
    assert await writer.fetchval("SELECT count(*) FROM message_counters") == 0  # the writer's temp table
    assert await db.fetchval("SELECT last_seq FROM message_counters WHERE recipient = 'alice'") == int(
        row.last_event_id
    )


async def test_the_service_runs_as_the_service_role(
    service: ServerProcess, roles: Roles, db: asyncpg.Connection
) -> None:
    async with await open_stream(service.url, make_token("alice")) as alice:
        await db.execute("INSERT INTO messages (recipient, event, data) VALUES ('alice', 'lead', '1')")
        await alice.messages(1, timeout=30)
        users = await db.fetch(
            "SELECT DISTINCT usename FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name IN ('pgpush', 'pgpush-listener')"
        )
    assert [u["usename"] for u in users] == [roles.service]
