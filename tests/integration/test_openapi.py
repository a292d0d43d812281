"""The committed OpenAPI document is the one the service serves, it is valid, and the API keeps to it."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from openapi_spec_validator import validate
from pgpush.openapi import build_spec

from tests.conftest import RunningServer, make_token
from tests.serve_process import cli_environment

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "openapi" / "openapi.json"
REGENERATE = "pgpush openapi > openapi/openapi.json"


def committed_spec() -> dict[str, object]:
    return dict(json.loads(COMMITTED.read_text()))


def test_the_committed_spec_is_what_the_code_generates() -> None:
    assert committed_spec() == build_spec(), f"the API changed: run `{REGENERATE}` and commit it"


async def test_the_served_spec_is_the_committed_one(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        served = (await client.get("/openapi.json")).json()
    assert served == committed_spec()


def test_the_spec_is_valid_openapi() -> None:
    validate(committed_spec())


def test_the_spec_describes_every_endpoint_the_contract_names() -> None:
    paths = committed_spec()["paths"]
    assert isinstance(paths, dict)
    expected = {
        ("/events", "get"),
        ("/events/ticket", "post"),
        ("/messages", "post"),
        ("/me/messages", "get"),
        ("/me/messages/read", "post"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    }
    assert expected <= {(path, method) for path, ops in paths.items() for method in ops}
    assert "text/event-stream" in paths["/events"]["get"]["responses"]["200"]["content"]


# Who calls: a publisher (POST /messages) and a user (their inbox, tickets); each is refused the other's.
IDENTITIES = {
    "publisher": {"sub": "backend", "scope": "messages:publish"},
    "user": {"sub": "alice"},
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("identity", IDENTITIES)
async def test_schemathesis_with_every_check_finds_nothing(server: RunningServer, identity: str) -> None:
    """Every schemathesis check (`--checks all`): no 5xx, responses as documented, and every request the
    spec admits is accepted (positive_data_acceptance) while those it rules out are refused."""
    claims = dict(IDENTITIES[identity])
    token = make_token(claims.pop("sub"), **claims)
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{server.url}/openapi.json",
        "--header",
        f"Authorization: Bearer {token}",
        "--exclude-path",
        "/events",  # an endless stream: its behaviour is covered by the stream tests
        "--checks",
        "all",
        "--max-examples",
        "20",
        "--seed",
        "1",
        "--request-timeout",
        "30",
        "--workers",
        "1",
    ]
    env = {**cli_environment(None), "NO_COLOR": "1", "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks"}
    result = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=280, env=env, check=False, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    # Every generated case passed every check (a user's POST /messages is a 403, as documented: a warning).
    assert re.search(r"(\d+) generated, \1 passed", result.stdout), result.stdout[-3000:]
