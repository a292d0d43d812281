"""The image (deploy/Dockerfile), run as the manifests run it: serve, stream, migrate, stop.

Every container has the pods' security context (uid 10001, read-only root filesystem, /tmp a tmpfs, no
capabilities) and the ConfigMap's settings; tests/container/pod.py says how they are read from deploy/base.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from alembic.script import ScriptDirectory
from pgpush.migrate import alembic_config

from tests.conftest import make_token, scratch_database
from tests.container.pod import UID, MigratingPod, ServingPod, config_map_settings
from tests.sse_client import open_stream

pytestmark = pytest.mark.timeout(300)

# What the memory rule assumes a pod uses without streams (tests/deploy/test_components.py, BASELINE_MIB).
BASELINE_MIB = 160
# The browser client package; the source tree links service/static/pgpush-client.js to it.
CLIENT_SOURCE = Path(__file__).parents[2] / "clients" / "js" / "src" / "index.js"


@pytest.fixture
async def pod(image: str, database_url: str) -> AsyncIterator[ServingPod]:
    serving = ServingPod(image, database_url)
    try:
        await asyncio.to_thread(serving.start)
        await serving.ready()
        yield serving
    finally:
        await asyncio.to_thread(serving.remove)


@pytest.fixture
async def empty_database(pg_url: str) -> AsyncIterator[str]:
    """A database with no schema at all, as a new installation's is before its first migration Job."""
    async with scratch_database(pg_url, prefix="pgpush_container") as url:
        yield url


def test_the_image_runs_pgpush_serve_as_uid_10001(image: str) -> None:
    import docker

    client = docker.from_env()
    try:
        config = client.images.get(image).attrs["Config"]
    finally:
        client.close()
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["pgpush"]
    assert config["Cmd"] == ["serve"]


async def test_a_pod_is_ready_and_streams_an_inserted_row(pod: ServingPod, db: asyncpg.Connection) -> None:
    async with await open_stream(pod.url, make_token("alice")) as stream:
        await db.execute(
            "INSERT INTO messages (recipient, event, data) VALUES ('alice', 'lead', $1)", '{"n": 1}'
        )
        [event] = await stream.messages(1, timeout=30)
    assert (event.type, json.loads(event.data)) == ("lead", {"n": 1})
    # The server process itself runs as the pods' user, on the read-only root filesystem.
    status = pod.container.exec(["cat", "/proc/1/status"]).output.decode()
    fields = {line.split(":")[0]: line.split()[1:] for line in status.splitlines()}
    assert fields["Uid"] == [str(UID)] * 4, status
    # The memory rule's baseline (deploy/README.md, "Memory"; tests/deploy/test_components.py applies it).
    assert int(fields["VmRSS"][0]) * 1024 <= BASELINE_MIB * 2**20, f"RSS with one stream: {fields['VmRSS']}"
    mounts = pod.container.exec(["cat", "/proc/1/mounts"]).output.decode().splitlines()
    options = {fields[1]: fields[3].split(",") for fields in (line.split() for line in mounts)}
    assert "ro" in options["/"] and "rw" in options["/tmp"], mounts
    # The page's client module is in the image as the file itself, not as a link left dangling.
    async with httpx.AsyncClient(base_url=pod.url, timeout=10) as client:
        served = await client.get("/static/pgpush-client.js")
    assert served.status_code == 200 and served.text == CLIENT_SOURCE.read_text()


async def test_sigterm_sends_every_stream_a_jittered_retry_and_exits_0_within_the_grace_period(
    pod: ServingPod, db: asyncpg.Connection
) -> None:
    jitter_ms = int(config_map_settings()["PGPUSH_SHUTDOWN_JITTER_MS"])
    streams = [await open_stream(pod.url, make_token(f"user{i}")) for i in range(12)]
    try:
        await db.execute(
            "INSERT INTO messages (recipient, data) SELECT 'user' || n, '1' FROM generate_series(0, 11) n"
        )
        for stream in streams:
            await stream.messages(1, timeout=30)
        pod.signal("SIGTERM")
        # Kubernetes kills the container when the grace period ends; the drain must be over long before.
        assert await pod.exit_code(within=pod.after_sigterm_seconds) == 0, pod.logs
        retries = []
        for stream in streams:
            await asyncio.wait_for(stream.closed.wait(), 10)
            retries.append(stream.retries[-1])
    finally:
        for stream in streams:
            await stream.close()
    assert all(0 <= retry <= jitter_ms for retry in retries), retries
    assert len(set(retries)) > 1, "the retries are spread, so the clients do not come back in one wave"


async def test_the_migration_job_container_migrates_an_empty_database_even_twice_at_once(
    image: str, empty_database: str
) -> None:
    """`pgpush migrate` as the Job runs it; two at once (a retried Job) serialise on the advisory lock."""
    jobs = [MigratingPod(image, empty_database) for _ in range(2)]
    try:
        await asyncio.gather(*(asyncio.to_thread(job.start) for job in jobs))
        codes = [await job.exit_code(within=180) for job in jobs]
        assert codes == [0, 0], "\n\n".join(job.logs for job in jobs)
    finally:
        for job in jobs:
            await asyncio.to_thread(job.remove)
    head = ScriptDirectory.from_config(alembic_config(empty_database)).get_current_head()
    conn = await asyncpg.connect(empty_database)
    try:
        assert await conn.fetchval("SELECT version_num FROM alembic_version") == head
        assert await conn.fetchval("SELECT to_regclass('messages') IS NOT NULL")
    finally:
        await conn.close()
