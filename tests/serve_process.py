"""`pgpush serve` as a child process for the tests: its stderr, memory, metrics and signals."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import JWT_SECRET

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def cli_environment(database_url: str | None, **settings: object) -> dict[str, str]:
    """The environment for a `python -m pgpush …` child: the caller's, minus every PGPUSH_* variable and
    DATABASE_URL (a developer's own settings must not leak into a test), plus the test's database and
    settings (PGPUSH_* names without the prefix, lowercase)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGPUSH_") and k != "DATABASE_URL"}
    if database_url is not None:
        env |= {"DATABASE_URL": database_url, "PGPUSH_JWT_SECRET": JWT_SECRET}
    return env | {f"PGPUSH_{name.upper()}": str(value) for name, value in settings.items()}


class ServerProcess:
    """One `python -m pgpush serve`; settings are PGPUSH_* names without the prefix, lowercase.

    With no database URL the process runs in development mode: its own embedded Postgres and JWT secret.
    `open_files` sets the process's open-files limit (soft and hard), as `ulimit -n` would.
    """

    def __init__(
        self,
        database_url: str | None,
        port: int | None = None,
        open_files: int | None = None,
        **settings: object,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.lines: list[str] = []
        env = cli_environment(database_url, **{"port": self.port, **settings})

        def limit_open_files() -> None:
            if open_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

        self.process = subprocess.Popen(
            [sys.executable, "-m", "pgpush", "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=limit_open_files if open_files is not None else None,
        )
        # Drained all along, so a chatty server never blocks on a full pipe.
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def output(self) -> str:
        """Everything the process wrote to stderr so far (its JSON log lines)."""
        return "".join(self.lines)

    async def ready(self, within: float = 60) -> None:
        """Until /readyz?strict=true answers 200 (Postgres and the listener are up); fails at once if the
        process exits."""
        async with asyncio.timeout(within), httpx.AsyncClient(base_url=self.url) as client:
            while True:
                if self.process.poll() is not None:
                    self._drain.join(5)
                    raise AssertionError(f"pgpush serve exited with {self.process.returncode}: {self.output}")
                try:
                    if (await client.get("/readyz?strict=true")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)

    def rss_bytes(self) -> int:
        """The process's resident set size now (VmRSS)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line")

    async def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics (0 when the series does not exist yet)."""
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as client:
            text = (await client.get("/metrics")).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0

    def terminate(self) -> None:
        """SIGTERM, as Kubernetes sends it; does not wait."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    async def wait(self, within: float = 30) -> int:
        code = await asyncio.to_thread(self.process.wait, within)
        await asyncio.to_thread(self._drain.join, 5)
        if self.process.stderr is not None and not self._drain.is_alive():
            self.process.stderr.close()
        return code

    async def stop(self) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time (the test then fails on the code)."""
        self.terminate()
        try:
            return await self.wait()
        except subprocess.TimeoutExpired:
            self.process.kill()
            await self.wait()
            return -9
