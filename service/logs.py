"""Logging: one JSON object per line, and no token or ticket in any of them (docs/protocol.md, §3)."""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from urllib.parse import unquote

import orjson

# Query values and header forms that carry credentials; anything JWT-shaped is caught as well.
_SECRET_PATTERNS = (
    re.compile(r"(?i)\b(access_token|ticket|token)=[^&\s\"']+"),
    re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+"),
    re.compile(r"()\beyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*"),
)
_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


def _redact(match: re.Match[str]) -> str:
    name = match.group(1)
    if not name:
        return "[redacted]"
    return f"{name} [redacted]" if name.lower() == "bearer" else f"{name}=[redacted]"


# A client percent-encodes a query once and the server decodes it once; a few more passes also unwrap a
# credential encoded several times over, at no cost for the lines that carry no "%".
_DECODE_PASSES = 4


def _scrub_plain(text: str) -> str:
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(_redact, text)
    return text


def _decoded(text: str) -> str:
    for _ in range(_DECODE_PASSES):
        if "%" not in text:
            break
        text = unquote(text)
    return text


def scrub(text: str) -> str:
    """The text with every credential replaced by a marker, even one hidden by percent-encoding.

    The server decodes a query before reading it, so `access%5Ftoken=%65%79…` is a working credential that
    the patterns cannot see in the raw text. When the decoded text shows a credential, the line is logged
    decoded and scrubbed; otherwise it keeps its original characters.
    """
    decoded = _decoded(text)
    cleaned = _scrub_plain(decoded)
    if cleaned != decoded:
        return cleaned
    return _scrub_plain(text)


class ScrubSecrets(logging.Filter):
    """Rewrites each record's message (uvicorn's access line included) before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub(record.getMessage())
        record.args = None
        return True


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "msg", …extra}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = scrub(self.formatException(record.exc_info))
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str = "info", *, plain: bool = False) -> None:
    """Route every logger (uvicorn's too) through one scrubbing handler on stderr.

    JSON lines for the service (`pgpush serve`, read by log collectors); with `plain`, the bare message for
    a person at a terminal (the other commands), without the migration tool's progress chatter.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s") if plain else JsonFormatter())
    handler.addFilter(ScrubSecrets())
    logging.getLogger("alembic").setLevel(logging.WARNING if plain else logging.NOTSET)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
