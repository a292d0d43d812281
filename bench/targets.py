"""Starting and stopping the servers under test: pgpush and the peers in bench/peers/."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pgpush.auth import mint_token

from bench.system import CLIENT_CPU, SERVER_CPU, children, pinned

ALL_TARGETS = ("pgpush", "nchan", "tutorial", "straightforward", "raw")
JWT_SECRET = "bench-secret-bench-secret-bench-secret-0123"
PEERS = Path(__file__).parent / "peers"
PYTHON_PEERS = {
    "tutorial": "bench.peers.tutorial:app",
    "straightforward": "bench.peers.straightforward:app",
    "raw": "bench.peers.raw_asgi:app",
}
DESCRIPTIONS = {
    "pgpush": "pgpush serve (uvicorn, uvloop, httptools)",
    "nchan": "nginx 1 worker + libnginx-mod-nchan, fed by bench/peers/relay.py",
    "tutorial": "FastAPI + sse-starlette, each stream polls the table every second",
    "straightforward": "FastAPI + sse-starlette, one LISTEN, one unbounded asyncio.Queue per stream",
    "raw": "the straightforward design as a bare ASGI app",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _http_status(port: int, path: str) -> int | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
            return int(sock.recv(64).split(b" ", 2)[1])
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Target:
    """One server under test while it runs."""

    name: str
    port: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    tokens: dict[str, str] = field(default_factory=dict)
    workdir: Path | None = None

    def pids(self) -> list[int]:
        """The processes whose CPU and memory count as the server's (nginx: master, worker and relay)."""
        found = []
        for proc in self.procs:
            found.append(proc.pid)
            found += children(proc.pid)
        return found

    def request(self, user: str) -> str:
        """The raw HTTP request that opens one stream for `user`."""
        if self.name == "pgpush":
            token = self.tokens.get(user)
            if token is None:
                token = self.tokens[user] = mint_token(JWT_SECRET, user, ttl_seconds=24 * 3600)
            return (
                f"GET /events HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n"
                f"Authorization: Bearer {token}\r\n\r\n"
            )
        path = f"/sub/{user}" if self.name == "nchan" else f"/events?user={user}"
        return f"GET {path} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n"

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


async def _wait_ready(target: Target, path: str, ok: set[int], wait_s: float = 30) -> None:
    deadline = time.monotonic() + wait_s
    while _http_status(target.port, path) not in ok:
        for proc in target.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{target.name} exited with {proc.returncode} while starting")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{target.name} did not become ready on port {target.port}")
        await asyncio.sleep(0.1)


async def start(name: str, database_url: str, *, pin: bool = True) -> Target:
    """Start the named target against the bench database; return once it accepts streams."""
    port = free_port()
    target = Target(name, port)
    server_cpu = SERVER_CPU if pin else None

    def launch(command: list[str], env: dict[str, str], cpu: str | None) -> None:
        full = pinned(command, cpu) if cpu else command
        stdout = subprocess.DEVNULL
        target.procs.append(subprocess.Popen(full, env={**os.environ, **env}, stdout=stdout))

    base_env = {"DATABASE_URL": database_url}
    try:
        if name == "pgpush":
            env = {
                **base_env,
                "PGPUSH_JWT_SECRET": JWT_SECRET,
                "PGPUSH_PORT": str(port),
                "PGPUSH_MAX_STREAMS_PER_USER": "100000",
                "PGPUSH_MAX_STREAMS": "200000",
                "PGPUSH_LOG_LEVEL": "warning",
            }
            launch([sys.executable, "-m", "pgpush", "serve"], env, server_cpu)
            await _wait_ready(target, "/readyz", {200})
        elif name in PYTHON_PEERS:
            command = [sys.executable, "-m", "uvicorn", PYTHON_PEERS[name], "--host", "127.0.0.1"]
            command += ["--port", str(port), "--loop", "uvloop", "--http", "httptools", "--backlog", "4096"]
            command += ["--no-access-log", "--log-level", "warning"]
            launch(command, base_env, server_cpu)
            await _wait_ready(target, "/nothing-here", {404})
        elif name == "nchan":
            nginx = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
            if nginx is None:
                raise RuntimeError("no nginx: apt-get install -y nginx-light libnginx-mod-nchan")
            target.workdir = Path(tempfile.mkdtemp(prefix="pgpush-bench-nchan-"))
            (target.workdir / "tmp").mkdir()
            target.workdir.chmod(0o755)
            conf = (PEERS / "nchan.conf.template").read_text().format(dir=target.workdir, port=port)
            (target.workdir / "nginx.conf").write_text(conf)
            conf_path = str(target.workdir / "nginx.conf")
            launch([nginx, "-c", conf_path, "-p", str(target.workdir)], {}, server_cpu)
            await _wait_ready(target, "/nothing-here", {404})
            # The relay is nchan's way into Postgres, so it runs on the server's core and counts as nchan.
            launch([sys.executable, "-m", "bench.peers.relay", str(port)], base_env, server_cpu)
            await asyncio.sleep(1.0)
        else:
            raise ValueError(f"unknown target {name!r}; known: {', '.join(ALL_TARGETS)}")
    except BaseException:
        target.stop()
        raise
    return target


__all__ = ["ALL_TARGETS", "CLIENT_CPU", "DESCRIPTIONS", "Target", "start"]
