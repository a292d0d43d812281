"""Oversized, malformed and non-ASCII request headers get a clear 4xx while bob's stream keeps flowing.

(Garbage, expired, alg-none and other refused JWTs are in tests/integration/test_auth_api.py; the common bad
Last-Event-ID values in tests/integration/test_stream_replay.py. These are the rest of protocol §3's hostile
inputs, sent as raw bytes so nothing on the client side cleans them up first.)
"""

from __future__ import annotations

from urllib.parse import quote

from tests.conftest import RunningServer, make_token
from tests.hostile.conftest import Bystander, port_of
from tests.hostile.raw import get_events, raw_request

KiB = 1024
OTHER_SECRET = "not-the-servers-secret-but-long-enough-for-hs256"


def forged_token(size: int) -> str:
    """A well-formed JWT of about `size` bytes, signed with a key the server does not have."""
    token = make_token("alice", secret=OTHER_SECRET, pad="x" * (size * 3 // 4))
    assert len(token) >= size
    return token


def bearer(token: str | bytes) -> bytes:
    return b"Authorization: Bearer " + (token.encode() if isinstance(token, str) else token)


async def test_a_16_kib_token_is_refused_with_401_in_every_place_it_can_be_sent(
    server: RunningServer, bystander: Bystander
) -> None:
    big = forged_token(16 * KiB)
    requests = {
        "header": get_events(bearer(big)),
        "access_token query": get_events(target=f"/events?access_token={big}".encode()),
        "ticket query": get_events(target=f"/events?ticket={big}".encode()),
        "cookie": get_events(f"Cookie: pgpush_token={big}".encode()),
    }
    for where, request in requests.items():
        response = await raw_request(port_of(server), request)
        assert response.status == 401, where
        assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"', where
        assert response.json()["error"] == "invalid_token", where
        await bystander.assert_served()


async def test_a_1_mib_header_is_answered_with_431_and_nothing_else_suffers(
    server: RunningServer, bystander: Bystander
) -> None:
    response = await raw_request(port_of(server), get_events(bearer(b"a" * (1024 * KiB))))
    assert response.status == 431
    assert response.json()["error"] == "headers_too_large"
    await bystander.assert_served()


async def test_cr_lf_and_nul_inside_headers_are_a_400_and_the_connection_is_closed(
    server: RunningServer, bystander: Bystander
) -> None:
    token = make_token("alice").encode()
    requests = {
        "NUL in the token": get_events(bearer(token + b"\x00")),
        "bare CR in the token": get_events(bearer(token + b"\rX-Injected: 1")),
        # A bare LF would start a new header line: a request smuggling an Authorization past a proxy.
        "bare LF before a header": get_events(b"X-Note: hi\n" + bearer(token)),
        "NUL in Last-Event-ID": get_events(bearer(token), b"Last-Event-ID: 1\x002"),
        "bare CR in Last-Event-ID": get_events(bearer(token), b"Last-Event-ID: 1\r2"),
        "obsolete line folding": get_events(b"Authorization: Bearer", b" " + token),
    }
    for case, request in requests.items():
        response = await raw_request(port_of(server), request, check_close=True)
        assert response.status == 400, case
        assert response.closed, f"{case}: the connection is not reused after a framing error"
        await bystander.assert_served()
    assert server.stream_count == 1, "none of them opened a stream (bob's is the only one)"


async def test_non_ascii_in_headers_is_a_clean_401_or_400_with_a_json_body(
    server: RunningServer, bystander: Bystander
) -> None:
    token = make_token("alice").encode()
    cases = {
        "UTF-8 in the token": (get_events(bearer("tökén".encode())), 401, "invalid_token"),
        "Latin-1 in the token": (get_events(bearer(b"t\xf6k\xe9n")), 401, "invalid_token"),
        "UTF-8 around a valid token": (get_events(bearer(token + "✓".encode())), 401, "invalid_token"),
        "UTF-8 in the cookie": (get_events("Cookie: pgpush_token=ünïcode".encode()), 401, "invalid_token"),
        "invalid UTF-8 in the cookie": (get_events(b"Cookie: pgpush_token=\xff\xfe"), 401, "invalid_token"),
        "fullwidth digits in Last-Event-ID": (
            get_events(bearer(token), "Last-Event-ID: \uff11\uff12".encode()),
            400,
            "invalid_last_event_id",
        ),
        "a superscript two in Last-Event-ID": (
            get_events(bearer(token), b"Last-Event-ID: \xb2"),
            400,
            "invalid_last_event_id",
        ),
    }
    for case, (request, status, error) in cases.items():
        response = await raw_request(port_of(server), request)
        assert response.status == status, case
        assert response.json()["error"] == error, case
        await bystander.assert_served()


async def test_more_unusable_cursors_are_a_400_by_header_and_by_query(
    server: RunningServer, bystander: Bystander
) -> None:
    token = make_token("alice").encode()
    values = ["9" * 10_000, "1" + "0" * 19, "+1", "1_000", "0x1f", "1e3", "\u0661", "\uff11", "1\u00a0"]
    for value in values:
        by_header = get_events(bearer(token), b"Last-Event-ID: " + value.encode())
        by_query = get_events(bearer(token), target=f"/events?lastEventId={quote(value)}".encode())
        for how, request in (("header", by_header), ("query", by_query)):
            response = await raw_request(port_of(server), request)
            assert response.status == 400, f"{value[:20]!r} by {how}"
            assert response.json()["error"] == "invalid_last_event_id"
    await bystander.assert_served()
    assert server.stream_count == 1
