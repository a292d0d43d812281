"""The built image run as Kubernetes runs it, through testcontainers, against the session's Postgres.

The settings come from the manifests themselves (deploy/base): the ConfigMap's data, and the Secret keys the
Deployment and the Job read, so a container here starts the way a pod does. The security context is the
pods' one: uid/gid 10001, a read-only root filesystem with /tmp as a tmpfs (the pods' emptyDir), every
capability dropped, no privilege escalation. The containers use the host's network, so they reach the test
Postgres on 127.0.0.1 and the tests reach them on a free local port.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest
import yaml

from tests.conftest import JWT_SECRET
from tests.serve_process import HOST, free_port

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "base"

# What deployment.yaml and migrate-job.yaml set (tests/deploy checks the manifests carry these values).
UID = 10001
TMP_SIZE = "size=64m"


def manifest(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((BASE / name).read_text())
    return document


def pod_container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = container
    return result


def config_map_settings() -> dict[str, str]:
    data: dict[str, str] = manifest("configmap.yaml")["data"]
    return {key: str(value) for key, value in data.items()}


def secret_settings(container: dict[str, Any], database_url: str) -> dict[str, str]:
    """Values for the Secret keys a pod's container reads: the test database and the test JWT key."""
    values = {}
    for variable in container.get("env", []):
        ref = variable.get("valueFrom", {}).get("secretKeyRef")
        if ref is None:
            continue
        if ref.get("optional"):
            continue  # a key the Secret may leave out: the test leaves it out too
        if ref["key"].endswith("DATABASE_URL"):
            values[variable["name"]] = database_url
        elif ref["key"] == "PGPUSH_JWT_SECRET":
            values[variable["name"]] = JWT_SECRET
        else:
            pytest.fail(f"the manifest reads the Secret key {ref['key']}: give it a test value in {__file__}")
    return values


def require_docker() -> bool:
    return os.environ.get("PGPUSH_REQUIRE_DOCKER", "") not in ("", "0", "false", "no")


def unavailable(reason: str) -> NoReturn:
    if require_docker():
        pytest.fail(f"{reason} (PGPUSH_REQUIRE_DOCKER is set, so this is a failure)")
    pytest.skip(f"{reason}; PGPUSH_REQUIRE_DOCKER=1 turns this skip into a failure")


class Pod:
    """One container of the image with a pod's security context; stopped and removed by `remove()`."""

    def __init__(self, image: str, args: list[str], env: dict[str, str]) -> None:
        from testcontainers.core.container import DockerContainer

        self.container = (
            DockerContainer(image)
            .with_command(args)
            .with_envs(**env)
            .with_tmpfs_mount("/tmp", TMP_SIZE)
            .with_kwargs(
                network_mode="host",
                user=f"{UID}:{UID}",
                read_only=True,
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
            )
        )

    def start(self) -> Pod:
        self.container.start()
        return self

    @property
    def logs(self) -> str:
        stdout, stderr = self.container.get_logs()
        return (stdout + stderr).decode(errors="replace")

    def state(self) -> dict[str, Any]:
        wrapped = self.container.get_wrapped_container()
        wrapped.reload()
        state: dict[str, Any] = wrapped.attrs["State"]
        return state

    def signal(self, name: str) -> None:
        self.container.get_wrapped_container().kill(signal=name)

    async def exit_code(self, within: float) -> int:
        """Wait for the container to exit; fail the test (with its output) if it still runs after `within`."""
        try:
            async with asyncio.timeout(within):
                while self.state()["Running"]:
                    await asyncio.sleep(0.2)
        except TimeoutError:
            pytest.fail(f"the container still runs {within} s later; its output:\n{self.logs}")
        return int(self.state()["ExitCode"])

    def remove(self) -> None:
        """Remove the container (killing it if it runs); also when `start()` failed after creating it."""
        self.container.stop()


class ServingPod(Pod):
    """`serve`, configured like the Deployment's container, on a free port of the host."""

    def __init__(self, image: str, database_url: str, **settings: str) -> None:
        deployment = manifest("deployment.yaml")
        container = pod_container(deployment)
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        env = config_map_settings() | secret_settings(container, database_url)
        # Host networking: bind the loopback only, on a port nothing else uses.
        env |= {"PGPUSH_HOST": HOST, "PGPUSH_PORT": str(self.port)} | settings
        super().__init__(image, container["args"], env)
        self.grace_seconds = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        # Kubernetes sends SIGTERM after the preStop hook; the grace period counts from the hook's start.
        self.after_sigterm_seconds = self.grace_seconds - int(pre_stop[-1])

    async def ready(self, within: float = 90) -> None:
        """Until /readyz answers 200, as the readiness probe asks; fails at once if the container exits."""
        async with httpx.AsyncClient(base_url=self.url, timeout=5) as client:
            try:
                async with asyncio.timeout(within):
                    while True:
                        if not self.state()["Running"]:
                            pytest.fail(f"the container exited: {self.state()}\n{self.logs}")
                        try:
                            if (await client.get("/readyz")).status_code == 200:
                                return
                        except httpx.TransportError:
                            pass
                        await asyncio.sleep(0.2)
            except TimeoutError:
                pytest.fail(f"no 200 from /readyz within {within} s; the container wrote:\n{self.logs}")


class MigratingPod(Pod):
    """The migration Job's container: its args and its Secret keys, from migrate-job.yaml."""

    def __init__(self, image: str, database_url: str) -> None:
        container = pod_container(manifest("migrate-job.yaml"))
        env = config_map_settings() | secret_settings(container, database_url)
        super().__init__(image, container["args"], env)
