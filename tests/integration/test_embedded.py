"""Real-server tests of pgpush.embedded, the zero-configuration Postgres used when no database URL is set."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pgpush.embedded import PORT_RANGE, EmbeddedPostgres, find_postgres_bindir

MakePostgres = Callable[..., EmbeddedPostgres]


@pytest.fixture
def make_postgres(tmp_path: Path) -> Iterator[MakePostgres]:
    """Build EmbeddedPostgres instances under tmp_path; all are stopped afterwards, even on failure."""
    made: list[EmbeddedPostgres] = []

    def make(name: str = "pg", **kwargs: Any) -> EmbeddedPostgres:
        kwargs.setdefault("durable", False)
        pg = EmbeddedPostgres(tmp_path / name, **kwargs)
        made.append(pg)
        return pg

    yield make
    for pg in made:
        with contextlib.suppress(Exception):  # one failed stop must not leave the other servers running
            pg.stop("immediate")


def fetchval(url: str, sql: str) -> Any:
    """Run one statement on a fresh asyncpg connection and return the first value."""

    async def run() -> Any:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


def test_start_connect_stop(make_postgres: MakePostgres) -> None:
    pg = make_postgres()
    url = pg.start()

    assert url == pg.url
    assert pg.url_without_password == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
    assert pg.port in PORT_RANGE  # never 5432, nor a port the kernel may hand to a client socket
    assert fetchval(url, "select current_user") == "postgres"
    assert fetchval(url, "show listen_addresses") == "127.0.0.1"
    assert fetchval(url, "show fsync") == "off"
    assert fetchval(url, "show max_connections") == "200"
    assert pg.start() == url  # idempotent

    pg.stop()
    pg.stop()  # stopping a stopped server is fine
    with pytest.raises(OSError):
        fetchval(url, "select 1")


def test_durable_by_default(make_postgres: MakePostgres) -> None:
    with make_postgres(durable=True) as pg:
        assert fetchval(pg.url, "show fsync") == "on"
        assert fetchval(pg.url, "show synchronous_commit") == "on"
    with pytest.raises(OSError):
        fetchval(pg.url, "select 1")


def test_restart_keeps_data_and_port(make_postgres: MakePostgres) -> None:
    pg = make_postgres()
    url = pg.start()
    fetchval(url, "create table kept as select 42 as answer")

    pg.restart()
    assert pg.url == url
    assert fetchval(url, "select answer from kept") == 42

    # A later run (a new object, as on the next `pgpush serve`) reuses the remembered port.
    pg.stop()
    assert make_postgres().start() == url
    assert fetchval(url, "select answer from kept") == 42


def test_taken_port(make_postgres: MakePostgres) -> None:
    pg = make_postgres()
    pg.start()
    pg.stop()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", pg.port))
        squatter.listen()

        # The remembered port is taken: a new free one is picked.
        again = make_postgres()
        assert again.start() != pg.url
        assert fetchval(again.url, "select 1") == 1
        again.stop()

        # An explicitly requested port is not negotiable: the error carries the server log.
        with pytest.raises(RuntimeError, match="Address already in use"):
            make_postgres("explicit", port=pg.port).start()


def test_two_instances_side_by_side(make_postgres: MakePostgres) -> None:
    with make_postgres("a") as a, make_postgres("b") as b:
        assert a.port != b.port
        fetchval(a.url, "create table only_in_a (x int)")
        assert fetchval(a.url, "select to_regclass('only_in_a') is not null") is True
        assert fetchval(b.url, "select to_regclass('only_in_a') is not null") is False


def test_start_after_postmaster_was_killed(make_postgres: MakePostgres) -> None:
    pg = make_postgres(durable=True)
    url = pg.start()
    fetchval(url, "create table survivor as select 'yes' as alive")
    pid_file = pg.data_dir / "postmaster.pid"
    pid = int(pid_file.read_text().split()[0])

    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid_file.exists()  # stale, as after a crash

    assert pg.start() == url
    assert fetchval(url, "select alive from survivor") == "yes"


def test_concurrent_starts_share_one_cluster(make_postgres: MakePostgres) -> None:
    first, second = make_postgres(), make_postgres()
    with ThreadPoolExecutor(2) as pool:
        urls = list(pool.map(EmbeddedPostgres.start, [first, second]))
    assert urls[0] == urls[1]
    assert fetchval(urls[0], "select 1") == 1


def test_refuses_a_foreign_folder(make_postgres: MakePostgres, tmp_path: Path) -> None:
    (tmp_path / "pg").mkdir()
    (tmp_path / "pg" / "notes.txt").write_text("not a database")
    with pytest.raises(RuntimeError, match="neither empty nor a Postgres data folder"):
        make_postgres().start()


def test_find_postgres_bindir(make_postgres: MakePostgres) -> None:
    bindir = find_postgres_bindir()
    assert all((bindir / name).is_file() for name in ("initdb", "pg_ctl", "postgres"))

    pg = make_postgres()
    pg.start()
    major = int((pg.data_dir / "PG_VERSION").read_text())
    assert find_postgres_bindir(major) == bindir
    with pytest.raises(RuntimeError, match="Tried"):
        find_postgres_bindir(1)
