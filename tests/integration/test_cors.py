"""CORS (PGPUSH_CORS_ORIGINS): listed origins may call the API and read the stream with credentials;
nobody else, and never `*` (the cookie form would hand any site the user's stream)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from pgpush.config import Settings
from pydantic import ValidationError

from tests.conftest import RunningServer, ServerFactory, make_token

APP = "https://app.example"
EVIL = "https://evil.example"
CLIENT_OPTIONS: dict[str, Any] = {"timeout": 10, "verify": False}


async def preflight(
    server: RunningServer, path: str, origin: str, method: str, headers: str
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.url, **CLIENT_OPTIONS) as client:
        return await client.options(
            path,
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": method,
                "Access-Control-Request-Headers": headers,
            },
        )


def allowed_headers(response: httpx.Response) -> set[str]:
    return {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}


@pytest.fixture
async def cors_server(start_server: ServerFactory) -> RunningServer:
    return await start_server(cors_origins=(APP, "http://localhost:5173"))


async def test_a_listed_origin_may_preflight_the_stream_with_last_event_id_and_authorization(
    cors_server: RunningServer,
) -> None:
    response = await preflight(cors_server, "/events", APP, "GET", "last-event-id, authorization")
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == APP
    assert response.headers["access-control-allow-credentials"] == "true"
    assert {"last-event-id", "authorization"} <= allowed_headers(response)
    assert "Origin" in response.headers["vary"]


async def test_a_listed_origin_may_preflight_a_ticket_request(cors_server: RunningServer) -> None:
    response = await preflight(cors_server, "/events/ticket", APP, "POST", "Authorization, Content-Type")
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == APP
    assert "POST" in response.headers["access-control-allow-methods"]


async def test_an_unlisted_origin_is_refused(cors_server: RunningServer) -> None:
    response = await preflight(cors_server, "/events", EVIL, "GET", "authorization")
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers
    async with httpx.AsyncClient(base_url=cors_server.url, **CLIENT_OPTIONS) as client:
        simple = await client.post("/events/ticket", headers={"Origin": EVIL})
    assert "access-control-allow-origin" not in simple.headers


async def test_the_stream_and_its_errors_carry_cors_headers_for_a_listed_origin(
    cors_server: RunningServer,
) -> None:
    async with (
        httpx.AsyncClient(
            base_url=cors_server.url, cookies={"pgpush_token": make_token("alice")}, **CLIENT_OPTIONS
        ) as client,
        client.stream("GET", "/events", headers={"Origin": APP}) as stream,
    ):
        assert stream.status_code == 200
        assert stream.headers["access-control-allow-origin"] == APP
        assert stream.headers["access-control-allow-credentials"] == "true"
    async with httpx.AsyncClient(base_url=cors_server.url, **CLIENT_OPTIONS) as client:
        refused = await client.get("/events", headers={"Origin": "http://localhost:5173"})
    # The page's script can read why it was refused.
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == "http://localhost:5173"
    assert refused.json()["error"] == "unauthorized"


async def test_without_configured_origins_there_are_no_cors_headers(server: RunningServer) -> None:
    response = await preflight(server, "/events", APP, "GET", "authorization")
    assert "access-control-allow-origin" not in response.headers
    async with httpx.AsyncClient(base_url=server.url, **CLIENT_OPTIONS) as client:
        simple = await client.post("/events/ticket", headers={"Origin": APP})
    assert "access-control-allow-origin" not in simple.headers


@pytest.mark.parametrize("origins", ["*", f"{APP}, *", f"{APP} *"])
def test_a_wildcard_origin_is_refused_by_the_settings(origins: str) -> None:
    with pytest.raises(ValidationError, match=r"'\*' is refused"):
        Settings.model_validate({"cors_origins": origins})


def test_origins_are_read_as_a_comma_or_space_separated_list() -> None:
    settings = Settings.model_validate({"cors_origins": f"{APP}, http://localhost:5173"})
    assert settings.cors_origins == (APP, "http://localhost:5173")
