"""Test fixtures: one throwaway Postgres per session, a fresh database per test, real uvicorn servers.

TEST_DATABASE_URL, when set, names a server the session may create databases on; otherwise the session
starts its own Postgres (the embedded mechanism) and removes it afterwards. Every test gets a database
cloned from a template migrated once, and never touches one it did not create.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import jwt
import pytest
from fastapi import FastAPI
from pgpush.app import create_app
from pgpush.cli import build_server
from pgpush.config import Settings
from pgpush.embedded import EmbeddedPostgres
from pgpush.migrate import migrate
from pydantic import SecretStr

from tests.polling import WITHIN, wait_until

JWT_SECRET = "test-secret-that-is-long-enough-for-hs256!"
# The GRANTs the README tells operators to run, applied to every test database as they are.
ROLES_SQL = Path(__file__).parent.parent / "deploy" / "roles.sql"


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def make_token(
    sub: str = "alice",
    *,
    ttl: float = 3600,
    secret: str = JWT_SECRET,
    algorithm: str = "HS256",
    **claims: Any,
) -> str:
    """A token as an identity provider would issue it; extra claims override the defaults."""
    now = time.time()
    payload: dict[str, Any] = {"sub": sub, "iat": int(now), "exp": int(now + ttl), **claims}
    return jwt.encode(payload, secret, algorithm=algorithm)


async def insert_rows(db: asyncpg.Connection, recipient: str, count: int, event: str = "lead") -> list[int]:
    """`count` rows for `recipient` in one statement, data {"n": 1…count}; their seqs."""
    records = await db.fetch(
        "INSERT INTO messages (recipient, event, data) "
        "SELECT $1, $2, jsonb_build_object('n', n) FROM generate_series(1, $3) AS n RETURNING seq",
        recipient,
        event,
        count,
    )
    return sorted(r["seq"] for r in records)


def _admin(url: str, *statements: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(url)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A libpq URL of a Postgres server this session may create databases on."""
    configured = os.environ.get("TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    with tempfile.TemporaryDirectory(prefix="pgpush-tests-") as tmp:
        cluster = EmbeddedPostgres(Path(tmp) / "pgdata", durable=False)
        url = cluster.start()
        try:
            yield url
        finally:
            cluster.stop("immediate")


def as_role(url: str, role: str, password: str) -> str:
    """The same server and database, logged in as another role."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{quote(role, safe='')}:{quote(password, safe='')}@{host}"))


@dataclass(frozen=True)
class Roles:
    """The service and writer roles of deploy/roles.sql, named for this session (roles are cluster-wide)."""

    service: str
    writer: str
    password: str

    def grants(self) -> str:
        sql = ROLES_SQL.read_text()
        return sql.replace("pgpush_service", self.service).replace("pgpush_writer", self.writer)

    def service_url(self, database_url: str) -> str:
        return as_role(database_url, self.service, self.password)

    def writer_url(self, database_url: str) -> str:
        return as_role(database_url, self.writer, self.password)


@pytest.fixture(scope="session")
def roles(pg_url: str) -> Iterator[Roles]:
    """Login roles with nothing but what deploy/roles.sql grants them in each test database."""
    suffix = uuid.uuid4().hex[:8]
    made = Roles(f"pgpush_service_{suffix}", f"pgpush_writer_{suffix}", uuid.uuid4().hex)
    _admin(
        pg_url,
        *(f"CREATE ROLE {role} LOGIN PASSWORD '{made.password}'" for role in (made.service, made.writer)),
    )
    yield made
    for role in (made.service, made.writer):
        # A database a test left behind may still hold grants to it.
        with contextlib.suppress(asyncpg.PostgresError):
            _admin(pg_url, f"DROP ROLE IF EXISTS {role}")


@pytest.fixture(scope="session")
def template_database(pg_url: str, roles: Roles) -> Iterator[str]:
    """A database migrated once, with the roles' grants; each test clones it (CREATE DATABASE … TEMPLATE)."""
    name = f"pgpush_template_{uuid.uuid4().hex[:8]}"
    _admin(pg_url, f'CREATE DATABASE "{name}"')
    migrate(with_database(pg_url, name))
    _admin(with_database(pg_url, name), roles.grants())
    try:
        yield name
    finally:
        _admin(pg_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_tmp() -> Iterator[Path]:
    """A temporary folder a Postgres started by the test can live in.

    Not under tmp_path: another pytest session starting meanwhile chmods /tmp/pytest-of-<user> back to 0700,
    and the server user (we may be root) could then no longer reach the data folder.
    """
    with tempfile.TemporaryDirectory(prefix="pgpush-test-") as tmp:
        yield Path(tmp)


@pytest.fixture
async def own_cluster(postgres_tmp: Path) -> AsyncIterator[tuple[EmbeddedPostgres, str]]:
    """A Postgres of this test alone, for tests that stop it: the cluster and a migrated database's URL."""
    cluster = EmbeddedPostgres(postgres_tmp / "pg", durable=False)
    url = await asyncio.to_thread(cluster.start)
    try:
        conn = await asyncpg.connect(url)
        await conn.execute("CREATE DATABASE own")
        await conn.close()
        database_url = with_database(url, "own")
        await asyncio.to_thread(migrate, database_url)
        yield cluster, database_url
    finally:
        await asyncio.to_thread(cluster.stop, "immediate")


@contextlib.asynccontextmanager
async def scratch_database(pg_url: str, options: str = "", prefix: str = "pgpush_test") -> AsyncIterator[str]:
    """A database of the test's own (`options` follow CREATE DATABASE), dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" {options}')
    finally:
        await conn.close()
    try:
        yield with_database(pg_url, name)
    finally:
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


@pytest.fixture
async def database_url(pg_url: str, template_database: str) -> AsyncIterator[str]:
    async with scratch_database(pg_url, f'TEMPLATE "{template_database}"') as url:
        yield url


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the test's database, as a product backend would have."""
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


def settings_for(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "jwt_secret": SecretStr(JWT_SECRET),
        "listener_probe_seconds": 1,
        "listener_probe_timeout_seconds": 2,
        "reconnect_backoff_max_seconds": 0.5,
        "port": 0,  # a free one
        **overrides,
    }
    return Settings.model_validate(values)


class RunningServer:
    """The server `pgpush serve` runs (build_server: guarded request heads, draining on SIGTERM), serving
    create_app(settings) on a free port, in a thread with its own event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app: FastAPI = create_app(settings)
        self.server = build_server(self.app, settings)
        self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def start(self) -> RunningServer:
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def drain(self) -> None:
        """What SIGTERM does to `pgpush serve`: streams get their retry and close, the process winds down."""
        self.server.handle_exit(signal.SIGTERM, None)

    def stop(self) -> None:
        if self._thread.is_alive():  # a test may have drained it already
            with contextlib.suppress(RuntimeError):  # its loop closed meanwhile: it is stopping anyway
                self.drain()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the test server did not stop"

    @property
    def stream_count(self) -> int:
        return int(self.app.state.hub.stream_count)

    @property
    def listener_connected(self) -> bool:
        return bool(self.app.state.listener.connected)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = WITHIN) -> None:
        """tests.polling.wait_until, for the tests that hold a server (tests/browser)."""
        await wait_until(predicate, within=timeout)

    def metric(self, name: str, **labels: str) -> float:
        """One sample of what /metrics exposes, read through the registry's public API (0 when unset)."""
        value = self.app.state.metrics.registry.get_sample_value(name, labels)
        return float(value or 0.0)


ServerFactory = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def start_server(database_url: str, roles: Roles) -> AsyncIterator[ServerFactory]:
    """Start a server on the test's database with some settings overridden; all are stopped at the end.

    It connects as the service role, with only the privileges deploy/roles.sql grants.
    """
    servers: list[RunningServer] = []
    service_url = roles.service_url(database_url)

    async def start(**overrides: Any) -> RunningServer:
        settings = settings_for(service_url, **overrides)
        running = await asyncio.to_thread(RunningServer(settings).start)
        servers.append(running)
        await wait_until(lambda: running.listener_connected)
        return running

    yield start
    for running in servers:
        await asyncio.to_thread(running.stop)


@pytest.fixture
async def server(start_server: ServerFactory) -> RunningServer:
    return await start_server()
