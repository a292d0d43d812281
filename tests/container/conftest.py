"""The image under test: built beforehand by deploy/build-image.sh (CI does it), found by its tag.

No Docker engine, no testcontainers or no image: the container tests skip with the reason, unless
PGPUSH_REQUIRE_DOCKER=1 (set by .ci/run after it started an engine and built the image) makes that a failure.
"""

from __future__ import annotations

import os

import pgpush
import pytest

from tests.container.pod import unavailable

IMAGE = os.environ.get("PGPUSH_IMAGE", f"ghcr.io/example/pgpush:{pgpush.__version__}")


@pytest.fixture(scope="session")
def image() -> str:
    try:
        import docker
        from testcontainers.core.config import testcontainers_config
    except ImportError:
        unavailable("testcontainers is not installed (pip install -e '.[test]')")
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        unavailable(f"no Docker engine answers ({exc}); start dockerd")
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        unavailable(f"the image {IMAGE} is not built: run deploy/build-image.sh (or set PGPUSH_IMAGE)")
    finally:
        client.close()
    # testcontainers' reaper is an image of its own, pulled from Docker Hub, which may be out of reach; every
    # container here is removed by the test that started it.
    testcontainers_config.ryuk_disabled = True
    return IMAGE
