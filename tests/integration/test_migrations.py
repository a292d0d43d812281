"""The alembic migrations: the schema they produce, and two runs at once that cannot collide."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from alembic import command
from pgpush import announcer
from pgpush.migrate import alembic_config, migrate

from tests.conftest import with_database
from tests.polling import wait_until
from tests.serve_process import cli_environment


@pytest.fixture
async def empty_database(pg_url: str) -> AsyncIterator[str]:
    name = f"pgpush_empty_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(pg_url)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    yield with_database(pg_url, name)
    conn = await asyncpg.connect(pg_url)
    await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    await conn.close()


def run_migrate(database_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgpush", "migrate"],
        env=cli_environment(database_url),
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_two_concurrent_migrate_runs_both_succeed_and_apply_once(empty_database: str) -> None:
    first, second = await asyncio.gather(
        asyncio.to_thread(run_migrate, empty_database), asyncio.to_thread(run_migrate, empty_database)
    )
    assert (first.returncode, second.returncode) == (0, 0), first.stderr + second.stderr
    conn = await asyncpg.connect(empty_database)
    try:
        assert await conn.fetchval("SELECT count(*) FROM alembic_version") == 1
        assert await conn.fetchval("SELECT to_regclass('messages') IS NOT NULL")
    finally:
        await conn.close()


async def test_the_schema_matches_the_public_contract(db: asyncpg.Connection) -> None:
    columns = {
        r["column_name"]: (r["data_type"], r["is_nullable"])
        for r in await db.fetch(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
            "WHERE table_name = 'messages'"
        )
    }
    assert columns == {
        "id": ("bigint", "NO"),
        "recipient": ("text", "NO"),
        "seq": ("bigint", "NO"),
        "event": ("text", "NO"),
        "data": ("jsonb", "NO"),
        "key": ("text", "YES"),
        "created_at": ("timestamp with time zone", "NO"),
        "read_at": ("timestamp with time zone", "YES"),
    }
    assert (
        await db.fetchval(
            "SELECT column_default FROM information_schema.columns "
            "WHERE table_name = 'messages' AND column_name = 'event'"
        )
        == "'message'::text"
    )


@pytest.mark.parametrize(
    ("recipient", "event", "key"),
    [
        ("", "lead", None),
        ("a" * 257, "lead", None),
        ("bad\nname", "lead", None),
        ("tab\tname", "lead", None),
        ("alice", "bad event", None),
        ("alice", "line\r\nbreak", None),
        ("alice", "x" * 65, None),
        ("alice", "", None),
        ("alice", "lead", "k" * 257),
    ],
)
async def test_check_constraints_refuse_what_could_break_the_wire(
    db: asyncpg.Connection, recipient: str, event: str, key: str | None
) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(
            "INSERT INTO messages (recipient, event, data, key) VALUES ($1, $2, '{}', $3)",
            recipient,
            event,
            key,
        )
    assert await db.fetchval("SELECT count(*) FROM messages") == 0


async def test_seq_increases_per_recipient_and_the_counter_keeps_the_last(db: asyncpg.Connection) -> None:
    rows = await db.fetch(
        "INSERT INTO messages (recipient, data) VALUES ('b', '1'), ('a', '1'), ('b', '2') "
        "RETURNING recipient, seq"
    )
    b_seqs = [r["seq"] for r in rows if r["recipient"] == "b"]
    assert b_seqs == sorted(b_seqs) and len(set(b_seqs)) == 2  # increasing, not necessarily dense
    await db.execute("INSERT INTO messages (recipient, data) SELECT 'b', '3' FROM generate_series(1, 100)")
    counters = dict(await db.fetch("SELECT recipient, last_seq FROM message_counters"))
    assert counters == dict(await db.fetch("SELECT recipient, max(seq) FROM messages GROUP BY recipient"))


async def test_keys_are_unique_per_recipient(db: asyncpg.Connection) -> None:
    await db.execute("INSERT INTO messages (recipient, data, key) VALUES ('a', '1', 'k'), ('b', '1', 'k')")
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute("INSERT INTO messages (recipient, data, key) VALUES ('a', '2', 'k')")


async def test_one_notification_per_statement_small_ones_carry_their_rows(db: asyncpg.Connection) -> None:
    received: list[str] = []
    channel = await db.fetchval("SELECT name FROM pgpush_channel")  # private since 0004
    await db.add_listener(channel, lambda *args: received.append(args[3]))
    await db.execute("INSERT INTO messages (recipient, data) VALUES ('bob', '{\"a\": \"tab\\there\"}')")
    await db.execute(
        "INSERT INTO messages (recipient, data) VALUES ('bob', '1'), ('alice', '[1, 2]'), ('bob', '3')"
    )
    await db.execute(
        "INSERT INTO messages (recipient, data) SELECT 'u' || n, '1' FROM generate_series(1, 17) n"
    )
    await db.execute(
        "INSERT INTO messages (recipient, data) "
        "SELECT repeat('u', 200) || n, '1' FROM generate_series(1, 100) n"
    )
    await db.execute(
        "INSERT INTO messages (recipient, data) VALUES ('carol', jsonb_build_array(repeat('x', 8000)))"
    )
    for _ in range(100):  # notifications arrive asynchronously; wait for all five
        if len(received) == 5:
            break
        await asyncio.sleep(0.05)
    assert len(received) == 5
    seqs = dict(await db.fetch("SELECT data::text, seq FROM messages WHERE recipient IN ('alice', 'bob')"))
    first, second = (hint.split("\n") for hint in received[:2])
    # The names come first, for releases that read only names; then the rows.
    assert (first[0], sorted(second[:2])) == ("bob", ["alice", "bob"])
    fields = [line.split("\t") for line in first[1:] + second[2:]]
    # recipient, last seq before the statement, seq, event, created_at, jsonb text
    assert [(f[0], f[1], f[2], f[3], f[5]) for f in fields] == [
        ("bob", "0", str(seqs['{"a": "tab\\there"}']), "message", '{"a": "tab\\there"}'),
        ("bob", str(seqs['{"a": "tab\\there"}']), str(seqs["1"]), "message", "1"),
        ("alice", "0", str(seqs["[1, 2]"]), "message", "[1, 2]"),
        ("bob", str(seqs['{"a": "tab\\there"}']), str(seqs["3"]), "message", "3"),
    ]
    assert sorted(received[2].split("\n")) == sorted(f"u{n}" for n in range(1, 18))  # too many to carry
    assert received[3] == "*"  # even the names exceed the 8000-byte limit
    assert received[4] == "carol"  # one row too large to carry


async def test_downgrading_0003_announces_what_was_handed_over_and_upgrading_again_works(
    empty_database: str,
) -> None:
    # 0003 notifies on the public channel that 0004 makes private.
    await asyncio.to_thread(migrate, empty_database, "0003")
    announcer_session, writer = await asyncpg.connect(empty_database), await asyncpg.connect(empty_database)
    received: list[str] = []
    try:
        await writer.add_listener("pgpush", lambda *args: received.append(args[3]))
        assert await announcer.wake(announcer_session)
        await writer.execute("INSERT INTO messages (recipient, data) VALUES ('alice', '1')")
        assert await writer.fetchval("SELECT count(*) FROM message_changes") == 1
        await announcer_session.close()  # as if the announcer died: nobody will announce 'alice'

        await asyncio.to_thread(command.downgrade, alembic_config(empty_database), "0002")
        assert await writer.fetchval("SELECT to_regclass('message_changes')") is None
        await writer.execute("INSERT INTO messages (recipient, data) VALUES ('bob', '2')")
        await wait_until(lambda: len(received) == 2)
        assert received[0] == "*"  # the handed-over statement, as "everyone, re-read"
        assert received[1].startswith("bob\nbob\t")  # 0002's notification, with its row

        await asyncio.to_thread(migrate, empty_database, "0003")
        await writer.execute("INSERT INTO messages (recipient, data) VALUES ('carol', '3')")
        await wait_until(lambda: len(received) == 3)
        assert received[2].startswith("carol\ncarol\t")
    finally:
        await writer.close()
        if not announcer_session.is_closed():
            await announcer_session.close()


def test_migrate_needs_no_jwt_key(empty_database: str) -> None:
    """The migration Job is given the owner's DSN and nothing else (SECURITY.md)."""
    result = subprocess.run(
        [sys.executable, "-m", "pgpush", "migrate"],
        env={"DATABASE_URL": empty_database, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
