"""The load generator: a process of its own holding many SSE streams and timing every event it receives.

Run by the harness as `python -m bench.loadgen <config.json>`; it takes one JSON command per line on
stdin and answers one JSON line on stdout. Built to stay out of the way of the server under test: uvloop,
raw asyncio Protocols (no HTTP library), one `time.time()` per socket read, and a regex that pulls the
`t` (the row's insert time in epoch ms, put in `data` by the writers) out of every event in the read.
"""

from __future__ import annotations

import array
import asyncio
import base64
import json
import re
import resource
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import uvloop

# Every bench row's data is {"t": <epoch ms>}; jsonb prints it with a space, pgpush compacts it.
_T = re.compile(rb'"t":\s*([0-9]+(?:\.[0-9]+)?)')
_CHUNK_SIZE_LINE = re.compile(rb"([0-9a-fA-F]+)[^\r\n]*\r\n")
# Linux: bind() a source address without picking the port; connect() picks it per destination. A plain
# bind((host, 0)) searches the port range for a port free on that address, which made opening 10,000
# streams 4-12x slower than letting connect() choose.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


@dataclass
class Totals:
    """What every stream of this process received since the last `mark`."""

    events: int = 0
    first_receipt: float = 0.0
    last_receipt: float = 0.0
    latencies: array.array[float] = field(default_factory=lambda: array.array("f"))
    opened: int = 0
    reads: int = 0  # socket reads once the body began (while idle: one per heartbeat)
    closed: int = 0
    failed: int = 0
    statuses: dict[str, int] = field(default_factory=dict)


class SSEProtocol(asyncio.Protocol):
    """One GET whose response is an endless text/event-stream (chunked or not)."""

    def __init__(self, request: bytes, totals: Totals, opened: asyncio.Future[bool]) -> None:
        self.request = request
        self.totals = totals
        self.opened = opened
        self.head = b""
        self.in_body = False
        self.chunked = False
        self.chunk_left = 0  # bytes of the current chunk's payload still to come (chunked only)
        self.chunk_raw = b""  # undecoded chunk framing kept across reads
        self.events = b""  # SSE text not yet ending with a blank line
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4 :]
            self.head = b""
            status = head.split(b" ", 2)[1].decode()
            self.totals.statuses[status] = self.totals.statuses.get(status, 0) + 1
            if status != "200":
                if not self.opened.done():
                    self.opened.set_result(False)
                if self.transport:
                    self.transport.close()
                return
            self.chunked = b"transfer-encoding: chunked" in head.lower()
            self.in_body = True
            if not self.opened.done():
                self.opened.set_result(True)
        self.totals.reads += 1
        if self.chunked:
            data = self._dechunk(data)
        self._events(data)

    def _dechunk(self, data: bytes) -> bytes:
        out: list[bytes] = []
        raw = self.chunk_raw + data if self.chunk_raw else data
        self.chunk_raw = b""
        pos, end = 0, len(raw)
        while pos < end:
            if self.chunk_left > 0:
                take = min(self.chunk_left, end - pos)
                out.append(raw[pos : pos + take])
                pos += take
                self.chunk_left -= take
                if self.chunk_left == 0:
                    self.chunk_left = -2  # the CRLF after the payload
                continue
            if self.chunk_left < 0:
                skip = min(-self.chunk_left, end - pos)
                pos += skip
                self.chunk_left += skip
                continue
            match = _CHUNK_SIZE_LINE.match(raw, pos)
            if match is None:
                self.chunk_raw = raw[pos:]
                break
            size = int(match.group(1), 16)
            pos = match.end()
            if size == 0:
                break  # the response ended; the server closes next
            self.chunk_left = size
        return b"".join(out)

    def _events(self, data: bytes) -> None:
        text = self.events + data if self.events else data
        # An event ends with a blank line: LF LF, or CR LF CR LF as sse-starlette writes it.
        end = max(text.rfind(b"\n\n") + 2, text.rfind(b"\n\r\n") + 3)
        if end < 3:
            self.events = text
            return
        complete, self.events = text[:end], text[end:]
        stamps = _T.findall(complete)
        if not stamps:
            return
        now = time.time()
        now_ms = now * 1000.0
        totals = self.totals
        if not totals.events:
            totals.first_receipt = now
        totals.events += len(stamps)
        totals.last_receipt = now
        totals.latencies.extend([now_ms - float(t) for t in stamps])

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_result(False)
        elif self.in_body:
            self.totals.closed += 1


@dataclass
class Config:
    host: str
    port: int
    requests: list[str]  # one raw HTTP request per stream
    open_concurrency: int = 200
    # Source addresses to spread the streams over (round robin), e.g. 127.0.0.2 …: one address has only
    # ~28,000 ephemeral ports towards one server port. Empty: the kernel picks (127.0.0.1).
    local_hosts: list[str] = field(default_factory=list)
    open_timeout: float = 60.0  # seconds a stream may take to answer its response head
    # Give up opening after this many failures (0: never): a server out of file descriptors leaves every
    # further connection waiting in its accept queue, each for `open_timeout`.
    max_failures: int = 0


class LoadGen:
    """The process's streams and its replies to the harness's commands."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.totals = Totals()
        self.cpu_at_mark = 0.0
        self.transports: list[asyncio.BaseTransport] = []

    async def open(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        gate = asyncio.Semaphore(self.config.open_concurrency)

        hosts = self.config.local_hosts
        max_failures = self.config.max_failures
        skipped = 0

        async def one(i: int, request: bytes) -> None:
            nonlocal skipped
            async with gate:
                if max_failures and self.totals.failed >= max_failures:
                    skipped += 1
                    return
                opened: asyncio.Future[bool] = loop.create_future()
                try:
                    if hosts:
                        sock = await self._connect_from(hosts[i % len(hosts)])
                        transport, _ = await loop.create_connection(
                            lambda: SSEProtocol(request, self.totals, opened), sock=sock
                        )
                    else:
                        transport, _ = await loop.create_connection(
                            lambda: SSEProtocol(request, self.totals, opened),
                            self.config.host,
                            self.config.port,
                        )
                except OSError:
                    self.totals.failed += 1
                    return
                self.transports.append(transport)
                try:
                    ok = await asyncio.wait_for(opened, self.config.open_timeout)
                except TimeoutError:
                    ok = False
                if ok:
                    self.totals.opened += 1
                else:
                    self.totals.failed += 1

        await asyncio.gather(*(one(i, r.encode()) for i, r in enumerate(self.config.requests)))
        return {
            "opened": self.totals.opened,
            "failed": self.totals.failed,
            "skipped": skipped,
            "seconds": time.perf_counter() - started,
            "statuses": self.totals.statuses,
        }

    async def _connect_from(self, host: str) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((host, 0))
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (self.config.host, self.config.port))
        except BaseException:
            sock.close()
            raise
        return sock

    def mark(self) -> dict[str, Any]:
        self.totals.events = 0
        self.totals.first_receipt = self.totals.last_receipt = 0.0
        self.totals.latencies = array.array("f")
        self.totals.reads = 0
        self.cpu_at_mark = self._cpu_seconds()
        return {"ok": True}

    @staticmethod
    def _cpu_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    async def wait_events(self, n: int, wait_s: float, quiet: float) -> dict[str, Any]:
        """Until n events arrived, nothing arrived for `quiet` seconds after the first, or wait_s passed."""
        deadline = time.time() + wait_s
        while self.totals.events < n and time.time() < deadline:
            last = self.totals.last_receipt
            if last and time.time() - last > quiet:
                break
            await asyncio.sleep(0.01)
        return {"events": self.totals.events}

    def collect(self) -> dict[str, Any]:
        """What arrived since the last `mark`; `cpu_seconds` is this process's CPU since then too."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "events": self.totals.events,
            "first_receipt": self.totals.first_receipt,
            "last_receipt": self.totals.last_receipt,
            "latencies": base64.b64encode(self.totals.latencies.tobytes()).decode(),
            "opened": self.totals.opened,
            "reads": self.totals.reads,
            "closed": self.totals.closed,
            "failed": self.totals.failed,
            "cpu_seconds": usage.ru_utime + usage.ru_stime - self.cpu_at_mark,
            "maxrss_kb": usage.ru_maxrss,
        }

    def close_all(self) -> dict[str, Any]:
        for transport in self.transports:
            transport.close()
        self.transports.clear()
        return {"ok": True}


async def serve(config: Config) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    gen = LoadGen(config)
    while line := await reader.readline():
        command = json.loads(line)
        name = command.pop("cmd")
        if name == "quit":
            gen.close_all()
            break
        if name == "open":
            reply = await gen.open()
        elif name == "wait_events":
            reply = await gen.wait_events(**command)
        else:
            reply = getattr(gen, name)()
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with open(sys.argv[1]) as f:
        config = Config(**json.load(f))
    uvloop.run(serve(config))


if __name__ == "__main__":
    main()
