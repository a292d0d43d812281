"""`pgpush publish`, run as a real subprocess: into the table, through the API, and following a file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import RunningServer, make_token
from tests.polling import wait_until
from tests.serve_process import cli_environment
from tests.sse_client import open_stream


def cli_env(database_url: str) -> dict[str, str]:
    return cli_environment(database_url, log_level="info")


async def pgpush(database_url: str, *args: str) -> tuple[int, str, str]:
    """Run `pgpush publish …` to completion: (exit status, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pgpush",
        "publish",
        *args,
        env=cli_env(database_url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


@contextlib.asynccontextmanager
async def following(database_url: str, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """`pgpush publish --follow …` running in the background, once it has started following."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pgpush",
        "publish",
        *args,
        env=cli_env(database_url),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    seen: list[bytes] = []
    try:
        async with asyncio.timeout(20):
            while not any(b"following" in line for line in seen):
                line = await process.stderr.readline()
                if not line:
                    raise AssertionError(f"the follower exited: {b''.join(seen).decode()}")
                seen.append(line)
        yield process
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), timeout=10)


async def wait_for_rows(db: asyncpg.Connection, recipient: str, count: int) -> list[str]:
    """The recipient's rows' data (JSON strings decoded), once there are `count` of them."""
    rows: list[str] = []

    async def enough() -> bool:
        found = await db.fetch("SELECT data::text FROM messages WHERE recipient = $1 ORDER BY seq", recipient)
        rows[:] = [json.loads(r["data"]) for r in found]
        return len(rows) >= count

    await wait_until(enough, interval=0.05, what=f"{count} rows for {recipient}")
    return rows


def append(path: Path, text: str) -> None:
    with path.open("a") as file:
        file.write(text)


async def test_publish_writes_into_the_table_and_the_stream_delivers_it(
    server: RunningServer, database_url: str, db: asyncpg.Connection
) -> None:
    async with await open_stream(server.url, make_token("bob")) as stream:
        status, out, err = await pgpush(
            database_url, "--to", "alice", "--to", "bob", "--event", "lead", '{"company": "ACME"}'
        )
        assert status == 0, err
        [event] = await stream.messages(1)
    messages = json.loads(out)["messages"]
    assert [m["recipient"] for m in messages] == ["alice", "bob"]
    assert (event.type, event.data, event.seq) == ("lead", '{"company":"ACME"}', messages[1]["seq"])
    rows = await db.fetch("SELECT recipient, event, data::text FROM messages ORDER BY recipient")
    assert [tuple(r) for r in rows] == [
        ("alice", "lead", '{"company": "ACME"}'),
        ("bob", "lead", '{"company": "ACME"}'),
    ]


async def test_publish_with_a_key_twice_writes_once_and_bad_data_writes_nothing(
    database_url: str, db: asyncpg.Connection
) -> None:
    first = await pgpush(database_url, "--to", "alice", "--key", "k1", '"hello"')
    again = await pgpush(database_url, "--to", "alice", "--key", "k1", '"hello"')
    assert (first[0], again[0]) == (0, 0) and first[1] == again[1]
    refused = await asyncio.gather(
        pgpush(database_url, "--to", "alice", "--key", "k1", '"changed"'),
        pgpush(database_url, "--to", "alice", "{not json"),
        pgpush(database_url, "--to", "alice", "--event", "two words", "1"),
    )
    for status, _out, err in refused:
        assert status == 1 and "pgpush publish" in err
    assert await db.fetchval("SELECT count(*) FROM messages") == 1


async def test_publish_through_the_api_with_a_publisher_token(
    server: RunningServer, database_url: str, db: asyncpg.Connection
) -> None:
    token = make_token("backend", scope="messages:publish")
    status, out, err = await pgpush(
        database_url,
        "--url",
        server.url,
        "--token",
        token,
        "--to",
        "alice",
        "--to",
        "carol",
        "--event",
        "x",
        "[1]",
    )
    assert status == 0, err
    assert [m["recipient"] for m in json.loads(out)["messages"]] == ["alice", "carol"]
    assert await db.fetchval("SELECT count(*) FROM messages WHERE event = 'x' AND data = '[1]'") == 2
    weak = make_token("backend")
    status, _out, err = await pgpush(database_url, "--url", server.url, "--token", weak, "--to", "alice", "1")
    assert status == 1 and "403" in err and "messages:publish" in err
    assert weak not in err and token not in err


async def test_follow_sends_appended_lines_through_rotation_and_truncation(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    log = tmp_path / "app.log"
    log.write_text("written before following: not sent\n")
    async with following(database_url, "--follow", str(log), "--to", "ops", "--to", "dev", "--event", "log"):
        append(log, "one\ntwo\nthree\n")
        assert await wait_for_rows(db, "ops", 3) == ["one", "two", "three"]
        append(log, "four, wait")
        await asyncio.sleep(0.5)  # a line is sent only once it is complete
        append(log, "ed for\r\n")
        assert (await wait_for_rows(db, "ops", 4))[3:] == ["four, waited for"]

        append(log, "five\n")
        log.rename(tmp_path / "app.log.1")  # rotation: the name now points at a new file
        append(tmp_path / "app.log.1", "six, late in the old file\n")
        log.write_text("seven, in the new file\n")
        assert (await wait_for_rows(db, "ops", 7))[4:] == [
            "five",
            "six, late in the old file",
            "seven, in the new file",
        ]

        append(log, "eight: a longer line so that truncation makes the file shorter\n")
        await wait_for_rows(db, "ops", 8)
        log.write_text("9\n")  # truncated in place (copytruncate), then written again
        append(log, 'ten: "quoted" \\ and \x00 nul\n')
        rows = await wait_for_rows(db, "ops", 10)
    assert rows[8:] == ["9", 'ten: "quoted" \\ and \ufffd nul']
    assert await wait_for_rows(db, "dev", 10) == rows
    assert await db.fetchval("SELECT count(DISTINCT event) FROM messages") == 1


async def test_lines_that_arrive_together_are_one_statement(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    log = tmp_path / "burst.log"
    log.touch()
    async with following(database_url, "--follow", str(log), "--to", "ops"):
        append(log, "".join(f"line {n}\n" for n in range(50)))
        assert await wait_for_rows(db, "ops", 50) == [f"line {n}" for n in range(50)]
    # now() is the transaction's start: one value for all fifty rows means one statement wrote them.
    assert await db.fetchval("SELECT count(DISTINCT created_at) FROM messages") == 1


@pytest.mark.timeout(60)
async def test_follow_through_the_api(
    server: RunningServer, database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    log = tmp_path / "api.log"
    token = make_token("backend", scope="messages:publish")
    async with following(
        database_url, "--url", server.url, "--token", token, "--follow", str(log), "--to", "ops"
    ):
        log.write_text("first\nsecond\n")  # the file appears after the follower started
        assert await wait_for_rows(db, "ops", 2) == ["first", "second"]
