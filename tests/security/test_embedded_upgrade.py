"""A development cluster made by pgpush 0.3.0 (which trusted every local connection) is locked on restart."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from pgpush.embedded import EmbeddedPostgres


@pytest.fixture
def cluster() -> Iterator[EmbeddedPostgres]:
    # Not under pytest's tmp_path: as root the server runs as another user, and every pytest session resets
    # that base folder to mode 0700.
    with tempfile.TemporaryDirectory(prefix="pgpush-upgrade-") as tmp:
        made = EmbeddedPostgres(Path(tmp) / "pgdata", durable=False)
        try:
            yield made
        finally:
            made.stop("immediate")


async def current_user(url: str) -> str:
    conn = await asyncpg.connect(url, timeout=10, passfile="/nonexistent")
    try:
        return str(await conn.fetchval("SELECT current_user"))
    finally:
        await conn.close()


@pytest.mark.timeout(120)
async def test_a_trusting_cluster_gets_a_password_on_its_next_start(cluster: EmbeddedPostgres) -> None:
    cluster.start()
    cluster.stop()
    # What 0.3.0 left behind: no password file, and a pg_hba.conf that lets anyone in as anyone.
    cluster.passfile.unlink()
    (cluster.data_dir / "pg_hba.conf").write_text("host all all 127.0.0.1/32 trust\n")
    url = cluster.start()
    assert cluster.passfile.exists() and "trust" not in (cluster.data_dir / "pg_hba.conf").read_text()
    assert await current_user(url) == "postgres"
    with pytest.raises(asyncpg.InvalidPasswordError):
        await current_user(cluster.url_without_password)


@pytest.mark.timeout(120)
async def test_joining_a_running_cluster_replaces_a_trusting_pg_hba(cluster: EmbeddedPostgres) -> None:
    cluster.start()
    # Someone (or an old release) loosened the running server's pg_hba.conf and reloaded it.
    (cluster.data_dir / "pg_hba.conf").write_text("host all all 127.0.0.1/32 trust\n")
    cluster._run(cluster._bindir() / "pg_ctl", "reload", "-D", cluster.data_dir)
    assert await current_user(cluster.url_without_password) == "postgres"

    joined = EmbeddedPostgres(cluster.data_dir)
    assert joined.start() == cluster.url and not joined.started_here
    with pytest.raises(asyncpg.InvalidPasswordError):
        await current_user(cluster.url_without_password)
