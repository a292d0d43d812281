"""The command line: serve, migrate, token, openapi (DESIGN §6)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import re
import secrets
import shlex
import signal
import sys
from pathlib import Path
from types import FrameType

import uvicorn
from fastapi import FastAPI
from pydantic import SecretStr, ValidationError

from .auth import mint_token
from .config import Settings
from .http_protocol import guarded_protocol
from .logs import configure_logging
from .migrate import migrate

log = logging.getLogger("pgpush")

DEMO_USER = "demo"
DEMO_TOKEN_TTL = 7 * 24 * 3600
# Longer than any stream's drain: every stream gets its retry frame and closes almost at once.
GRACEFUL_SHUTDOWN_SECONDS = 10
_TTL = re.compile(r"^(\d+)([smhd]?)$")
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> int:
    """Seconds from `3600`, `90s`, `15m`, `1h` or `7d`."""
    match = _TTL.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"invalid TTL {text!r}: use seconds or a number with s, m, h or d")
    return int(match.group(1)) * _TTL_UNITS[match.group(2)]


def dev_secret(data_dir: Path) -> str:
    """The development JWT secret, made once and kept in the data folder."""
    path = data_dir / "jwt-secret"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(48))
    return path.read_text().strip()


def load_settings() -> Settings:
    try:
        settings = Settings()
    except ValidationError as exc:
        sys.exit(f"pgpush: invalid settings:\n{exc}")
    has_key = settings.jwt_secret or settings.jwt_public_key or settings.jwt_jwks_url
    if settings.embedded and not has_key:
        settings = settings.model_copy(update={"jwt_secret": SecretStr(dev_secret(settings.data_dir))})
    return settings


def signing_secret(settings: Settings) -> str:
    if settings.jwt_secret is None:
        sys.exit("pgpush: minting tokens needs PGPUSH_JWT_SECRET (a public key can only verify)")
    return settings.jwt_secret.get_secret_value()


class DrainingServer(uvicorn.Server):
    """uvicorn, but on SIGTERM every stream first gets a jittered `retry:` and is closed (DESIGN §3)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        hub = getattr(self._app.state, "hub", None)
        if hub is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(hub.shutdown)
        super().handle_exit(sig, frame)


def build_server(app: FastAPI, settings: Settings) -> DrainingServer:
    """The uvicorn server `serve` runs: guarded request heads, draining on SIGTERM (the tests use it too)."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        proxy_headers=True,
        server_header=False,
        http=guarded_protocol(settings.header_timeout_seconds),
    )
    return DrainingServer(config, app)


def _print_welcome(settings: Settings) -> None:
    secret = signing_secret(settings)
    token = mint_token(secret, DEMO_USER, ttl_seconds=DEMO_TOKEN_TTL)
    base = f"http://{settings.host}:{settings.port}"
    insert = (
        "INSERT INTO messages (recipient, event, data) VALUES ('demo', 'lead', '{\"company\": \"ACME\"}')"
    )
    psql = f"psql {shlex.quote(settings.database_url or '')} -c {shlex.quote(insert)}"
    print(
        f"\npgpush is listening on {base}\n"
        f"  token for user {DEMO_USER!r}:  {token}\n"
        f"  open the live inbox:     {base}/#token={token}\n"
        f"  then insert a row:       {psql}\n",
        file=sys.stderr,
        flush=True,
    )


# Young-generation collections every 10,000 allocations instead of 700, and full ones rarely: each stream
# is a few dozen long-lived objects, and the default thresholds re-scanned all of them while thousands of
# streams opened (open 4,000 streams: 3.3-4.2 s -> 1.9-2.4 s; python -m bench run idle --quick).
GC_THRESHOLDS = (10_000, 50, 1_000)


def _tune_garbage_collector() -> None:
    gc.collect()
    gc.freeze()  # what startup built (modules, the app) lives forever: keep it out of every collection
    gc.set_threshold(*GC_THRESHOLDS)


def cmd_serve(_args: argparse.Namespace) -> int:
    from .app import create_app
    from .embedded import EmbeddedPostgres

    settings = load_settings()
    configure_logging(settings.log_level)
    embedded: EmbeddedPostgres | None = None
    if settings.embedded:
        embedded = EmbeddedPostgres(settings.data_dir.resolve() / "pgdata")
        url = embedded.start()
        log.info("embedded Postgres running", extra={"data_dir": str(settings.data_dir.resolve() / "pgdata")})
        migrate(url)
        settings = settings.model_copy(update={"database_url": url})
    elif settings.migrate_on_start:
        migrate(settings.database_url or "")
    settings = settings.model_copy(update={"migrate_on_start": False})
    app = create_app(settings)
    server = build_server(app, settings)
    if settings.embedded or embedded is not None:
        _print_welcome(settings)
    # uvicorn re-raises the signal it caught once it has shut down; a no-op handler turns that into a
    # normal return, so a drained SIGTERM exits 0 as DESIGN §3 asks.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _s, _f: None)
    _tune_garbage_collector()
    try:
        server.run()
    finally:
        if embedded is not None and embedded.started_here:
            embedded.stop()
    return 0 if server.started else 1


def cmd_migrate(_args: argparse.Namespace) -> int:
    settings = load_settings()
    configure_logging(settings.log_level)
    if settings.database_url is None:
        from .embedded import EmbeddedPostgres

        with EmbeddedPostgres(settings.data_dir.resolve() / "pgdata") as pg:
            migrate(pg.url)
    else:
        migrate(settings.database_url)
    print("migrations applied", file=sys.stderr)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    settings = load_settings()
    scopes = tuple(s for scope in args.scope for s in scope.split())
    print(mint_token(signing_secret(settings), args.sub, ttl_seconds=args.ttl, scopes=scopes))
    return 0


def cmd_openapi(_args: argparse.Namespace) -> int:
    from .openapi import build_spec

    print(json.dumps(build_spec(), indent=2, ensure_ascii=False))
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from .publish import PublishOptions, run

    # Through the API no local settings are needed (nor may they be complete on the publishing machine).
    settings = None if args.url else load_settings()
    configure_logging(settings.log_level if settings else "info")
    options = PublishOptions(
        recipients=args.to,
        event=args.event,
        data=args.data,
        key=args.key,
        follow=args.follow,
        url=args.url,
        token=args.token or os.environ.get("PGPUSH_TOKEN"),
    )
    return run(options, settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgpush", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "serve", help="run the service (an embedded Postgres when DATABASE_URL is unset)"
    ).set_defaults(func=cmd_serve)
    sub.add_parser("migrate", help="apply the database migrations").set_defaults(func=cmd_migrate)
    token = sub.add_parser("token", help="print a JWT signed with the configured secret")
    token.add_argument("--sub", required=True, help="the user (JWT subject)")
    token.add_argument("--scope", action="append", default=[], help="a scope, e.g. messages:publish")
    token.add_argument("--ttl", type=parse_ttl, default=3600, help="lifetime: seconds, or 15m, 1h, 7d")
    token.set_defaults(func=cmd_token)
    sub.add_parser("openapi", help="print the OpenAPI document").set_defaults(func=cmd_openapi)
    publish = sub.add_parser(
        "publish", help="publish a message (into the table, or through the API with --url and --token)"
    )
    publish.add_argument("data", nargs="?", help="the message's data: a JSON value, e.g. '{\"n\": 1}'")
    publish.add_argument("--to", action="append", required=True, help="a recipient (repeat for several)")
    publish.add_argument("--event", default="message", help="the SSE event type (default: message)")
    publish.add_argument("--key", help="an idempotency key: publishing it again creates nothing")
    publish.add_argument(
        "--follow", type=Path, metavar="FILE", help="send each line appended to FILE, like tail -F"
    )
    publish.add_argument("--url", help="publish through this pgpush server's API instead of DATABASE_URL")
    publish.add_argument("--token", help="a publisher token for --url (default: $PGPUSH_TOKEN)")
    publish.set_defaults(func=cmd_publish)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
