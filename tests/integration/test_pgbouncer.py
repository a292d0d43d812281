"""pgpush behind PgBouncer in transaction mode, with PGPUSH_LISTEN_DATABASE_URL as its LISTEN session.

The query pool goes through a real PgBouncer (Debian's `pgbouncer`, started here on a free port as an
unprivileged user, with only two server connections per database so that pgpush's connections share
them): replay, live rows, the inbox and idempotent publishing work, and a burst of concurrent requests
finds no lost prepared statement. LISTEN pointed at the pooler by mistake makes `pgpush serve` exit with a
clear error instead of starting and never hearing a notification; a session-mode pool is fine for LISTEN.
Without a pgbouncer binary the module is skipped, unless PGPUSH_REQUIRE_PGBOUNCER=1 (CI) makes it fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from pgpush.db import Database
from pgpush.embedded import EmbeddedPostgres
from pgpush.migrate import migrate

from tests.conftest import RunningServer, make_token, settings_for, with_database
from tests.polling import wait_until
from tests.serve_process import HOST, ServerProcess, free_port
from tests.sse_client import open_stream

INSTALL = "apt-get install -y pgbouncer"
PUBLISHER = {"Authorization": f"Bearer {make_token('backend', scope='messages:publish')}"}
ALICE = {"Authorization": f"Bearer {make_token('alice')}"}


@pytest.fixture(scope="module")
def pgbouncer_binary() -> str:
    binary = shutil.which("pgbouncer") or next(
        (path for path in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if Path(path).exists()), None
    )
    if binary is None:
        if os.environ.get("PGPUSH_REQUIRE_PGBOUNCER") == "1":
            pytest.fail(f"PGPUSH_REQUIRE_PGBOUNCER is set but there is no pgbouncer binary ({INSTALL})")
        pytest.skip(
            f"no pgbouncer binary ({INSTALL}; PGPUSH_REQUIRE_PGBOUNCER=1 turns this skip into a failure)"
        )
    return binary


def _unprivileged_user() -> str | None:
    """PgBouncer refuses to run as root: the account to run it as (None when we are not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "pgpush", "nobody"):
        try:
            return pwd.getpwnam(name).pw_name
        except KeyError:
            pass
    raise RuntimeError("running as root and no unprivileged account to run pgbouncer as")


class PgBouncer:
    """One pgbouncer process in front of the Postgres of `server_url`, every database passed through."""

    def __init__(self, binary: str, server_url: str, folder: Path, pool_mode: str) -> None:
        server = urlsplit(server_url)
        self.port = free_port()
        folder.chmod(0o755)  # the unprivileged account reads the configuration
        users = folder / "users.txt"
        role, password = server.username or "postgres", server.password or ""
        users.write_text(f'"{role}" "{password}"\n')
        config = folder / "pgbouncer.ini"
        # trust: the client is not asked for a password; pgbouncer logs in to Postgres with the one in
        # auth_file. default_pool_size 2 and server_round_robin (idle server connections used in turn):
        # pgpush's ten pool connections share two server connections, each transaction on the other, so a
        # statement prepared on one is missing on the next transaction unless the cache is off.
        config.write_text(
            f"""[databases]
* = host={server.hostname} port={server.port or 5432}

[pgbouncer]
listen_addr = {HOST}
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {users}
pool_mode = {pool_mode}
default_pool_size = 2
max_client_conn = 200
server_login_retry = 1
server_round_robin = 1
"""
        )
        for path in (users, config):
            path.chmod(0o644)
        user = _unprivileged_user()
        self.log = folder / "pgbouncer.log"
        with self.log.open("w") as log:
            # No logfile setting: pgbouncer logs to stderr, which we write to a file it need not open.
            self.process = subprocess.Popen(
                [binary, *(["-u", user] if user else []), str(config)], stdout=log, stderr=log
            )

    def url(self, database_url: str) -> str:
        """`database_url` (a database on the same server) reached through pgbouncer instead."""
        parts = urlsplit(database_url)
        auth = parts.netloc.rpartition("@")[0]  # the same role and password: pgbouncer passes them on
        return urlunsplit(parts._replace(netloc=f"{auth}@{HOST}:{self.port}"))

    async def ready(self, database_url: str) -> None:
        async def answers() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"pgbouncer exited: {self.log.read_text()}")
            try:
                conn = await asyncpg.connect(self.url(database_url), timeout=2, statement_cache_size=0)
            except (OSError, asyncpg.PostgresError):
                return False
            await conn.close()
            return True

        await wait_until(answers, within=20, what="pgbouncer accepts connections")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


StartBouncer = Callable[[str], Awaitable[PgBouncer]]


@pytest.fixture
def pgbouncer(pgbouncer_binary: str, pg_url: str, database_url: str) -> Iterator[StartBouncer]:
    """Start pgbouncers (pool mode as argument) in front of the test cluster; all stopped at the end."""
    started: list[PgBouncer] = []
    with tempfile.TemporaryDirectory(prefix="pgpush-pgbouncer-") as tmp:

        async def start(pool_mode: str) -> PgBouncer:
            folder = Path(tmp) / f"{pool_mode}-{len(started)}"
            folder.mkdir()
            bouncer = PgBouncer(pgbouncer_binary, pg_url, folder, pool_mode)
            started.append(bouncer)
            await bouncer.ready(database_url)
            return bouncer

        try:
            yield start
        finally:
            for bouncer in started:
                bouncer.stop()


@pytest.fixture
async def behind_pgbouncer(pgbouncer: StartBouncer, database_url: str) -> AsyncIterator[ServerProcess]:
    """`pgpush serve` whose queries go through a transaction-mode PgBouncer and whose LISTEN goes direct."""
    bouncer = await pgbouncer("transaction")
    server = ServerProcess(bouncer.url(database_url), listen_database_url=database_url)
    try:
        await server.ready()
        yield server
    finally:
        await server.stop()


@pytest.mark.timeout(120)
async def test_replay_live_rows_inbox_and_idempotent_publish_through_pgbouncer(
    behind_pgbouncer: ServerProcess, db: asyncpg.Connection
) -> None:
    server = behind_pgbouncer
    await db.execute("INSERT INTO messages (recipient, data) VALUES ('alice', '1'), ('alice', '2')")
    stream = await open_stream(server.url, make_token("alice"))
    try:
        assert [e.data for e in await stream.messages(2)] == ["1", "2"], "replay"
        await db.execute("INSERT INTO messages (recipient, data) VALUES ('alice', '3')")
        assert [e.data for e in await stream.messages(1)] == ["3"], "a live row"

        async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
            body = {"recipients": ["alice", "bob"], "event": "lead", "data": {"n": 4}, "key": "lead-4"}
            first = await client.post("/messages", json=body, headers=PUBLISHER)
            assert first.status_code == 201, first.text
            again = await client.post("/messages", json=body, headers=PUBLISHER)
            assert again.status_code == 200, again.text
            assert again.json() == first.json(), "the same key returns the rows it created"
            conflict = await client.post("/messages", json={**body, "data": {"n": 5}}, headers=PUBLISHER)
            assert conflict.status_code == 409, conflict.text
            assert [e.data for e in await stream.messages(1)] == ['{"n":4}'], "the published row, once"

            inbox = await client.get("/me/messages", params={"order": "asc"}, headers=ALICE)
            assert inbox.status_code == 200, inbox.text
            assert [m["data"] for m in inbox.json()["messages"]] == [1, 2, 3, {"n": 4}]
            read = await client.post("/me/messages/read", json={"through": 2}, headers=ALICE)
            assert read.json() == {"updated": 2}
            unread = await client.get("/me/messages", params={"unread": "true"}, headers=ALICE)
            assert [m["data"] for m in unread.json()["messages"]] == [{"n": 4}, 3]

            # Many requests at once: pgpush's connections take turns on PgBouncer's two server
            # connections, where a cached (named) prepared statement would be missing.
            requests = [client.get("/me/messages", headers=ALICE) for _ in range(40)]
            requests += [
                client.post("/messages", json={"recipients": ["carol"], "data": n}, headers=PUBLISHER)
                for n in range(40)
            ]
            statuses = [response.status_code for response in await asyncio.gather(*requests)]
            assert statuses == [200] * 40 + [201] * 40
        assert await db.fetchval("SELECT count(*) FROM messages WHERE recipient = 'carol'") == 40
        ready = await server_readiness(server)
        assert ready == {"status": "ready", "database": "up", "listener": "connected"}
    finally:
        await stream.close()
    assert "through a connection pooler" in server.output, "the pooler was noticed"


async def server_readiness(server: ServerProcess) -> object:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        return (await client.get("/readyz", params={"strict": "true"})).json()


@pytest.mark.timeout(60)
async def test_listen_through_a_transaction_mode_pgbouncer_stops_serve_with_a_clear_error(
    pgbouncer: StartBouncer, database_url: str
) -> None:
    bouncer = await pgbouncer("transaction")
    server = ServerProcess(bouncer.url(database_url))  # no PGPUSH_LISTEN_DATABASE_URL: LISTEN goes there too
    try:
        code = await server.wait(within=30)
    except subprocess.TimeoutExpired:
        await server.stop()
        pytest.fail(f"pgpush serve kept running with LISTEN behind a transaction pooler:\n{server.output}")
    assert code != 0
    assert "LISTEN connection reaches Postgres through a connection pooler" in server.output, server.output
    assert "PGPUSH_LISTEN_DATABASE_URL" in server.output


@pytest.mark.timeout(120)
async def test_listen_through_pgbouncer_noticed_after_an_outage_at_startup_shows_in_readiness(
    pgbouncer_binary: str,
) -> None:
    """Postgres is down when serve starts (so startup goes on); once it is up, the listener finds the pooler,
    gives up, and /readyz says `misconfigured` (strict: 503) while the process still accepts streams."""
    async with contextlib.AsyncExitStack() as cleanup:
        tmp = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="pgpush-late-pooler-")))
        cluster = EmbeddedPostgres(tmp / "pg", durable=False)
        admin = await asyncio.to_thread(cluster.start)
        cleanup.push_async_callback(asyncio.to_thread, cluster.stop, "immediate")
        conn = await asyncpg.connect(admin)
        await conn.execute("CREATE DATABASE late")
        await conn.close()
        direct = with_database(admin, "late")
        await asyncio.to_thread(migrate, direct)
        await asyncio.to_thread(cluster.stop, "fast")
        (tmp / "bouncer").mkdir()
        bouncer = PgBouncer(pgbouncer_binary, admin, tmp / "bouncer", "transaction")
        cleanup.callback(bouncer.stop)
        settings = settings_for(direct, listen_database_url=bouncer.url(direct))
        server = await asyncio.to_thread(RunningServer(settings).start)
        cleanup.push_async_callback(asyncio.to_thread, server.stop)
        await asyncio.to_thread(cluster.start)
        client = await cleanup.enter_async_context(httpx.AsyncClient(base_url=server.url, timeout=10))

        async def listener_gave_up() -> bool:
            return bool((await client.get("/readyz")).json()["listener"] == "misconfigured")

        await wait_until(listener_gave_up, within=60, what="the listener found the pooler")
        plain = await client.get("/readyz")
        assert plain.status_code == 200, plain.text
        assert plain.json() == {"status": "degraded", "database": "up", "listener": "misconfigured"}
        strict = await client.get("/readyz", params={"strict": "true"})
        assert strict.status_code == 503, strict.text
        assert strict.json()["detail"] == "not ready: the listener is misconfigured"
        assert "PGPUSH_LISTEN_DATABASE_URL" in (server.app.state.listener.failure or "")


LOCK_KEY = 7_707_707
HELD = """
SELECT count(*) FROM pg_locks
WHERE locktype = 'advisory' AND objid = $1
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


@pytest.mark.timeout(60)
async def test_the_one_replica_lock_through_pgbouncer_is_released_and_exclusive(
    pgbouncer: StartBouncer, database_url: str, db: asyncpg.Connection
) -> None:
    """Retention runs on one replica at a time under Database.exclusive; through a transaction pooler a
    session advisory lock would stay on one server connection while the unlock ran on the other."""
    bouncer = await pgbouncer("transaction")
    database = await Database.connect(bouncer.url(database_url))
    try:
        # Both server connections exist and are in the pooler's rotation.
        await asyncio.gather(*(database.pool.execute("SELECT pg_sleep(0.1)") for _ in range(2)))
        async with database.exclusive(LOCK_KEY) as held:
            assert held
            await database.pool.fetchval("SELECT 1")  # the sweep's own statements meanwhile
            assert not await db.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY), "held: others wait"
        assert await db.fetchval(HELD, LOCK_KEY) == 0, "released: no lock left behind in the pooler"
        async with database.exclusive(LOCK_KEY) as held_again:
            assert held_again, "the next run takes it again"
        assert await db.fetchval(HELD, LOCK_KEY) == 0
    finally:
        await database.close()


@pytest.mark.timeout(60)
async def test_listen_through_a_session_mode_pgbouncer_is_fine(
    pgbouncer: StartBouncer, database_url: str, db: asyncpg.Connection
) -> None:
    """A session-mode pool gives LISTEN a server connection of its own: no false alarm."""
    bouncer = await pgbouncer("session")
    server = ServerProcess(bouncer.url(database_url))
    try:
        await server.ready()
        stream = await open_stream(server.url, make_token("alice"))
        await db.execute("INSERT INTO messages (recipient, data) VALUES ('alice', '1')")
        assert [e.data for e in await stream.messages(1)] == ["1"]
        await stream.close()
    finally:
        await server.stop()
