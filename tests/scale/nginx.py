"""nginx in front of several pgpush replicas, configured like the Ingress in deploy/base/ingress.yaml.

The proxy settings are read from the Ingress's ingress-nginx annotations and rendered into the directives
ingress-nginx itself would emit, so the test runs the proxy the manifests describe and follows them when they
change. What ingress-nginx adds on its own (round-robin over the Service's endpoints, HTTP/1.1 keepalive to
them, a failed connection retried on the next endpoint) is written out here.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import yaml

from tests.serve_process import HOST

DAEMON_OFF = "daemon off;"  # the master stays our child, so the test can signal and reap it
INGRESS = Path(__file__).resolve().parents[2] / "deploy" / "base" / "ingress.yaml"
PREFIX = "nginx.ingress.kubernetes.io/"

# ingress-nginx annotation → the directive it becomes, and how its value is written.
DIRECTIVES: dict[str, tuple[str, str]] = {
    "proxy-buffering": ("proxy_buffering", "{}"),
    "proxy-request-buffering": ("proxy_request_buffering", "{}"),
    "proxy-read-timeout": ("proxy_read_timeout", "{}s"),
    "proxy-send-timeout": ("proxy_send_timeout", "{}s"),
    "proxy-http-version": ("proxy_http_version", "{}"),
    "proxy-body-size": ("client_max_body_size", "{}"),
}
# Modules whose temp folder nginx creates at start-up; each is moved into the prefix when compiled in.
TEMP_PATHS = {
    "client_body": "client_body_temp_path",
    "proxy": "proxy_temp_path",
    "fastcgi": "fastcgi_temp_path",
    "uwsgi": "uwsgi_temp_path",
    "scgi": "scgi_temp_path",
}


def find_nginx() -> str | None:
    """The nginx binary (Debian installs it in /usr/sbin, often outside a non-root PATH), or None."""
    return shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin")


def ingress_directives(ingress: Path = INGRESS) -> list[str]:
    """The proxy directives the Ingress's annotations stand for; an annotation this file cannot render fails,
    so the test never silently runs a proxy unlike the deployed one."""
    annotations: dict[str, str] = yaml.safe_load(ingress.read_text())["metadata"]["annotations"]
    directives = []
    for name, value in sorted(annotations.items()):
        if not name.startswith(PREFIX):
            continue
        key = name.removeprefix(PREFIX)
        if key not in DIRECTIVES:
            raise ValueError(f"{ingress}: no nginx equivalent for {name}; add it to tests/scale/nginx.py")
        directive, template = DIRECTIVES[key]
        directives.append(f"{directive} {template.format(value)};")
    return directives


def _temp_paths(nginx: str, prefix: Path) -> list[str]:
    built = subprocess.run([nginx, "-V"], capture_output=True, text=True, check=True).stderr
    return [
        f"{directive} {prefix / name};"
        for name, directive in TEMP_PATHS.items()
        if f"--without-http_{name}_module" not in built
    ]


def render_conf(nginx: str, prefix: Path, port: int, upstreams: list[int]) -> str:
    """The whole nginx.conf: one worker (so round-robin is exact), everything inside `prefix`."""
    servers = "\n".join(
        # max_fails=0, ingress-nginx's default (upstream-max-fails): nginx clears a replica's failure count
        # only when a request to it *ends*, so after one refused connection a replica whose first new
        # request is an hour-long stream would get one request per fail_timeout for that hour. A dead or
        # draining replica is skipped by proxy_next_upstream below instead, per request.
        f"        server {HOST}:{p} max_fails=0;"
        for p in upstreams
    )
    user = "user root;" if os.geteuid() == 0 else ""  # workers need no other account for a test
    paths = "\n    ".join(_temp_paths(nginx, prefix))
    proxy = "\n            ".join(ingress_directives())
    return f"""{user}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    {paths}
    upstream pgpush {{
{servers}
        keepalive 16;  # ingress-nginx keeps upstream connections alive (upstream-keepalive-connections)
    }}
    server {{
        listen {HOST}:{port};
        location / {{
            proxy_pass http://pgpush;
            {proxy}
            # HTTP/1.1 keepalive to the replicas needs the client's Connection header dropped.
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_connect_timeout 2s;
            # A refused connection or a draining replica's 503 moves the request on to the next replica. In
            # Kubernetes the draining pod has left the Service's endpoints already (the preStop sleep), so
            # the ingress would not have picked it in the first place.
            proxy_next_upstream error timeout http_502 http_503;
            proxy_next_upstream_tries 3;
        }}
    }}
}}
"""


class Nginx:
    """An nginx master started by the test in the foreground, with its own prefix, pid and logs."""

    def __init__(self, binary: str, prefix: Path, port: int, upstreams: list[int]) -> None:
        self.prefix = prefix
        self.port = port
        self.url = f"http://{HOST}:{port}"
        conf = prefix / "nginx.conf"
        conf.write_text(render_conf(binary, prefix, port, upstreams))
        self.process = subprocess.Popen(
            [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"), "-g", DAEMON_OFF],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    @property
    def errors(self) -> str:
        log = self.prefix / "error.log"
        return log.read_text() if log.exists() else ""

    async def ready(self, within: float = 10) -> None:
        """Until nginx answers (any status: the replicas may not be up yet); fails if nginx exits."""
        async with asyncio.timeout(within), httpx.AsyncClient(base_url=self.url) as client:
            while True:
                if self.process.poll() is not None:
                    raise AssertionError(f"nginx exited with {self.process.returncode}: {self.errors}")
                try:
                    await client.get("/healthz")
                    return
                except httpx.TransportError:
                    await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Fast shutdown (SIGTERM closes every connection at once) and wait."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.process.wait, 10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait, 5)
