"""A rolling upgrade from 0.3.0: a 0.3.0 replica and this release side by side while rows flow.

Migration 0004 moves the notifications to a private channel. The 0.3.0 replica still listens on the
public `pgpush`, which then carries nothing: its safety-net resync delivers instead (a delay, no loss).
The downgrade brings the public channel back while rows keep flowing; this release's replica notices the
change at its next safety-net tick and listens there again, for names only.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from alembic import command
from pgpush.migrate import alembic_config, migrate

from tests.conftest import JWT_SECRET, Roles, _admin, make_token, with_database
from tests.polling import wait_until
from tests.serve_process import ServerProcess, free_port
from tests.sse_client import SSEStream, open_stream

RELEASE_0_3_0 = "e9903e1"
REPO = Path(__file__).resolve().parents[2]
SAFETY_NET = 2  # seconds: how late the 0.3.0 replica may be while it hears nothing


@pytest.fixture
def release_0_3_0() -> Iterator[Path]:
    """0.3.0's `service` package (and migrations), extracted from git into a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="pgpush-0.3.0-") as tmp:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", RELEASE_0_3_0, "service", "migrations"],
            capture_output=True,
            check=False,
        )
        if archive.returncode != 0:
            pytest.skip(f"0.3.0 ({RELEASE_0_3_0}) is not in this checkout's git history: {archive.stderr!r}")
        archive_path = Path(tmp) / "release.tar"
        archive_path.write_bytes(archive.stdout)
        with tarfile.open(archive_path) as tar:
            tar.extractall(tmp, filter="data")
        yield Path(tmp)


class OldReplica:
    """`python -m service serve` of 0.3.0, in the current environment."""

    def __init__(self, code: Path, database_url: str) -> None:
        self.url = f"http://127.0.0.1:{(port := free_port())}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGPUSH_") and k != "DATABASE_URL"}
        env |= {
            "PYTHONPATH": str(code),
            "DATABASE_URL": database_url,
            "PGPUSH_JWT_SECRET": JWT_SECRET,
            "PGPUSH_PORT": str(port),
            "PGPUSH_SAFETY_NET_SECONDS": str(SAFETY_NET),
        }
        # Run from the extracted folder, so `service` is 0.3.0's package and not this checkout's folder.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"],
            cwd=code,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def ready(self) -> None:
        async def answers() -> bool:
            assert self.process.poll() is None, "the 0.3.0 replica exited"
            try:
                async with httpx.AsyncClient(base_url=self.url) as client:
                    return (await client.get("/readyz")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_until(answers, within=60, what="the 0.3.0 replica is ready")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
async def database_at_0003(pg_url: str) -> AsyncIterator[str]:
    name = f"pgpush_upgrade_{os.urandom(5).hex()}"
    await asyncio.to_thread(_admin, pg_url, f'CREATE DATABASE "{name}"')
    url = with_database(pg_url, name)
    await asyncio.to_thread(migrate, url, "0003")
    yield url
    await asyncio.to_thread(_admin, pg_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Writer:
    """Inserts alice's rows 1, 2, 3 … one statement at a time until stopped."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.written = 0
        self.stop = asyncio.Event()

    async def run(self) -> None:
        while not self.stop.is_set():
            await self.conn.execute(
                "INSERT INTO messages (recipient, event, data) VALUES ('alice', 'lead', $1::jsonb)",
                str(self.written + 1),
            )
            self.written += 1
            await asyncio.sleep(0.02)  # pacing only: a steady flow across each step of the upgrade

    async def until(self, rows: int) -> None:
        await wait_until(lambda: self.written >= rows, within=60, what=f"{rows} rows written")


async def every_row(stream: SSEStream, count: int) -> list[str]:
    return [event.data for event in await stream.messages(count, timeout=60)]


async def test_a_0_3_0_replica_and_this_release_side_by_side_lose_nothing_through_upgrade_and_downgrade(
    release_0_3_0: Path, database_at_0003: str, roles: Roles
) -> None:
    old = OldReplica(release_0_3_0, database_at_0003)
    new: ServerProcess | None = None
    conn = await asyncpg.connect(database_at_0003)
    writer = Writer(conn)
    writing = asyncio.create_task(writer.run())
    try:
        await old.ready()
        token = make_token("alice")
        on_old = await open_stream(old.url, token)
        await writer.until(10)

        await asyncio.to_thread(migrate, database_at_0003)  # 0004, while rows flow
        await asyncio.to_thread(_admin, database_at_0003, roles.grants())  # the writer uses `conn`
        await writer.until(writer.written + 10)
        new = ServerProcess(
            roles.service_url(database_at_0003), safety_net_seconds=SAFETY_NET, listener_probe_seconds=1
        )
        await new.ready()
        on_new = await open_stream(new.url, token)
        await writer.until(writer.written + 20)

        # Rollback: 0004's downgrade while rows flow; both replicas keep delivering.
        await asyncio.to_thread(command.downgrade, alembic_config(database_at_0003), "0003")
        await writer.until(writer.written + 20)
        writer.stop.set()
        await writing
        expected = [str(n) for n in range(1, writer.written + 1)]
        assert await every_row(on_old, len(expected)) == expected
        assert await every_row(on_new, len(expected)) == expected
        await on_old.close()
        await on_new.close()
    finally:
        writer.stop.set()
        await asyncio.gather(writing, return_exceptions=True)
        await conn.close()
        old.stop()
        if new is not None:
            await new.stop()
