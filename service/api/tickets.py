"""POST /events/ticket: a short-lived credential a browser puts in the stream URL (docs/protocol.md §3).

Long-lived tokens in URLs end up in proxy logs; a ticket is only good for opening GET /events for
PGPUSH_TICKET_TTL_SECONDS (60), so EventSource's quick reconnects reuse it and a later client asks again.
Tickets are stateless (signed with a key derived from a secret every replica shares), so any replica
accepts them. With only a public key or JWKS there is no shared secret: the endpoint answers 501 until
PGPUSH_TICKET_SECRET is set.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from ..auth import AuthError, TokenVerifier
from .deps import CurrentUser
from .errors import ApiError

router = APIRouter()


class Ticket(BaseModel):
    """A stream ticket and when it stops opening streams."""

    ticket: str = Field(description="Pass as `GET /events?ticket=…`; good for nothing else")
    expires_at: int = Field(description="Epoch seconds; never later than the token it was issued for")


@router.post(
    "/events/ticket",
    operation_id="create_stream_ticket",
    summary="Get a short-lived ticket for the event stream URL",
    response_model=Ticket,
    responses={
        401: {"description": "No credentials, or a token that does not verify (a ticket is refused)"},
        501: {"description": "Tickets need PGPUSH_TICKET_SECRET when tokens are verified with a public key"},
    },
)
async def create_stream_ticket(request: Request, response: Response, user: CurrentUser) -> Ticket:
    verifier: TokenVerifier = request.app.state.verifier
    if verifier.tickets is None:
        raise ApiError(
            501,
            "tickets_unavailable",
            "stream tickets need a shared secret: set PGPUSH_TICKET_SECRET (tokens here are verified "
            "with a public key, which cannot sign)",
        )
    try:
        ticket, expires_at = verifier.tickets.issue(user)
    except AuthError as exc:
        raise ApiError(
            401, "invalid_token", exc.detail, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
        ) from None
    # A credential: no cache along the way may keep it.
    response.headers["Cache-Control"] = "no-store"
    return Ticket(ticket=ticket, expires_at=expires_at)
