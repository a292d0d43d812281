"""Postgres stopped and restarted under live streams: they stay open, catch up, /readyz tells the truth.

During the outage the process still accepts streams, so `/readyz` (what Kubernetes probes) stays 200 and
says what is down; `/readyz?strict=true` (what monitors watch) is 503 until Postgres and the listener are
back.
"""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
from pgpush.embedded import EmbeddedPostgres

from tests.conftest import RunningServer, make_token, settings_for
from tests.polling import wait_until
from tests.sse_client import open_stream


async def strict_readyz(client: httpx.AsyncClient, expected: int) -> bool:
    return (await client.get("/readyz", params={"strict": "true"})).status_code == expected


async def test_streams_survive_a_postgres_restart_and_catch_up(
    own_cluster: tuple[EmbeddedPostgres, str],
) -> None:
    cluster, database_url = own_cluster
    server = await asyncio.to_thread(RunningServer(settings_for(database_url, heartbeat_seconds=0.5)).start)
    try:
        await wait_until(lambda: server.listener_connected)
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            before = await open_stream(server.url, make_token("alice"))
            conn = await asyncpg.connect(database_url)
            await conn.execute("INSERT INTO messages (recipient, data) VALUES ('alice', '1')")
            await conn.close()
            assert [e.data for e in await before.messages(1)] == ["1"]

            await asyncio.to_thread(cluster.stop, "fast")
            await wait_until(lambda: not server.listener_connected)
            strict = await client.get("/readyz", params={"strict": "true"})
            assert strict.status_code == 503, strict.text
            assert strict.json() == {
                "error": "not_ready",
                "detail": "not ready: Postgres does not answer and the listener is disconnected",
                "database": "down",
                "listener": "disconnected",
            }
            plain = await client.get("/readyz")  # the pod still accepts streams: it stays in the Service
            assert plain.status_code == 200, plain.text
            assert plain.json() == {"status": "degraded", "database": "down", "listener": "disconnected"}
            assert (await client.get("/healthz")).status_code == 200
            alice = {"Authorization": f"Bearer {make_token('alice')}"}
            for refused in (
                await client.get("/me/messages", headers=alice),
                await client.post("/me/messages/read", json={"through": 1}, headers=alice),
                await client.post(
                    "/messages",
                    json={"recipients": ["alice"], "data": 1},
                    headers={"Authorization": f"Bearer {make_token('backend', scope='messages:publish')}"},
                ),
            ):
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"] == "database_unavailable"
                assert refused.headers["retry-after"] == "1"
            during = await open_stream(server.url, make_token("alice"))  # accepted: tokens need no database
            pings = before.comments.count("ping")
            await wait_until(  # heartbeats go on during the outage
                lambda: before.comments.count("ping") > pings and during.comments != [],
                what="pings on both streams while Postgres is away",
            )
            assert not before.closed.is_set() and not during.closed.is_set()

            await asyncio.to_thread(cluster.start)
            conn = await asyncpg.connect(database_url)
            await conn.execute("INSERT INTO messages (recipient, data) VALUES ('alice', '2'), ('alice', '3')")
            await conn.close()
            assert [e.data for e in await before.messages(2, timeout=30)] == ["2", "3"]
            assert [e.data for e in await during.messages(3, timeout=30)] == ["1", "2", "3"]
            await wait_until(
                lambda: strict_readyz(client, 200), interval=0.1, what="strict /readyz is 200 again"
            )
            ready = await client.get("/readyz")
            assert ready.json() == {"status": "ready", "database": "up", "listener": "connected"}
            await before.close()
            await during.close()
    finally:
        await asyncio.to_thread(server.stop)
