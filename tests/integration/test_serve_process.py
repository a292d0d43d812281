"""`pgpush serve` as a real process: zero-configuration start, and a drained SIGTERM that exits 0."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.conftest import JWT_SECRET, make_token
from tests.sse_client import open_stream


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    def __init__(self, env: dict[str, str], port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.stderr: list[str] = []
        full_env = {
            k: v for k, v in os.environ.items() if not k.startswith("PGPUSH_") and k != "DATABASE_URL"
        }
        full_env |= {"PGPUSH_PORT": str(port), **env}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"],
            env=full_env,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        # Drained all along, so a chatty server never blocks on a full pipe.
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr.append(line)

    @property
    def output(self) -> str:
        return "".join(self.stderr)

    async def ready(self, timeout: float = 60) -> None:
        async with asyncio.timeout(timeout), httpx.AsyncClient(base_url=self.url) as client:
            while True:
                if self.process.poll() is not None:
                    self._drain.join(5)
                    raise AssertionError(f"pgpush serve exited: {self.output}")
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=30)
        self._drain.join(5)
        return code


@pytest.fixture
async def serve(database_url: str) -> AsyncIterator[ServeProcess]:
    proc = ServeProcess(
        {"DATABASE_URL": database_url, "PGPUSH_JWT_SECRET": JWT_SECRET, "PGPUSH_SHUTDOWN_JITTER_MS": "2000"},
        free_port(),
    )
    await proc.ready()
    yield proc
    await asyncio.to_thread(proc.stop)


async def test_sigterm_sends_every_stream_a_jittered_retry_closes_it_and_exits_0(
    serve: ServeProcess, db: asyncpg.Connection
) -> None:
    streams = [await open_stream(serve.url, make_token(f"user{i}")) for i in range(20)]
    await db.execute(
        "INSERT INTO messages (recipient, data) SELECT 'user' || n, '1' FROM generate_series(0, 19) n"
    )
    for s in streams:
        await s.messages(1)
    code = await asyncio.to_thread(serve.stop)
    assert code == 0
    retries = []
    for s in streams:
        await asyncio.wait_for(s.closed.wait(), 5)
        assert s.parser.retries[0] == 3000  # the first frame
        retries.append(s.parser.retries[-1])
        await s.close()
    assert all(0 <= r <= 2000 for r in retries)
    assert len(set(retries)) > 1, "the retry values are spread, so clients do not return in one wave"
    assert JWT_SECRET not in serve.output


async def test_after_a_restart_clients_resume_from_their_last_event_id(
    serve: ServeProcess, db: asyncpg.Connection, database_url: str
) -> None:
    token = make_token("alice")
    async with await open_stream(serve.url, token) as stream:
        await db.execute("INSERT INTO messages (recipient, data) VALUES ('alice', '1')")
        [first] = await stream.messages(1)
        assert await asyncio.to_thread(serve.stop) == 0
        await asyncio.wait_for(stream.closed.wait(), 5)
    await db.execute("INSERT INTO messages (recipient, data) VALUES ('alice', '2'), ('alice', '3')")
    port = int(serve.url.rsplit(":", 1)[1])
    again = ServeProcess({"DATABASE_URL": database_url, "PGPUSH_JWT_SECRET": JWT_SECRET}, port)
    try:
        await again.ready()
        async with await open_stream(again.url, token, last_event_id=first.last_event_id) as resumed:
            assert [e.data for e in await resumed.messages(2)] == ["2", "3"]
    finally:
        assert await asyncio.to_thread(again.stop) == 0


async def test_zero_configuration_serve_starts_postgres_prints_a_token_and_delivers(tmp_path: Path) -> None:
    port = free_port()
    proc = ServeProcess({"PGPUSH_DATA_DIR": str(tmp_path / "data")}, port)
    try:
        await proc.ready(timeout=120)
        banner = proc.output
        token = re.search(r"#token=(\S+)", banner)
        database = re.search(r"psql '?(postgresql://\S+?)'? -c", banner)
        assert token and database, banner
        assert (tmp_path / "data" / "jwt-secret").exists()
        async with await open_stream(proc.url, token.group(1)) as stream:
            conn = await asyncpg.connect(database.group(1))
            try:
                await conn.execute(
                    "INSERT INTO messages (recipient, event, data) "
                    "VALUES ('demo', 'lead', '{\"company\": \"ACME\"}')"
                )
            finally:
                await conn.close()
            [event] = await stream.messages(1)
        assert event.type == "lead"
        async with httpx.AsyncClient(base_url=proc.url) as client:
            page = await client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    finally:
        assert await asyncio.to_thread(proc.stop) == 0
