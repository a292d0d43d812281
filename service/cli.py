"""pgpush: push rows of a Postgres table to logged-in users over Server-Sent Events.

Commands: serve (the service), migrate (the database schema), token (a signed JWT), publish (a message from
the command line), openapi (the API description). Settings come from the environment (README, "Settings");
the wire contract is docs/protocol.md.
"""

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
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI
from pydantic import SecretStr, ValidationError

from .auth import mint_token
from .config import Settings
from .http_protocol import guarded_protocol
from .logs import configure_logging
from .migrate import migrate

if TYPE_CHECKING:
    from .embedded import EmbeddedPostgres

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


class CommandError(Exception):
    """A command cannot go on: printed as one plain line, exit status 1."""


def _env_name(field: str) -> str:
    alias = Settings.model_fields[field].validation_alias if field in Settings.model_fields else None
    return alias if isinstance(alias, str) else f"PGPUSH_{field.upper()}"


def _settings_problems(exc: ValidationError) -> str:
    """pydantic's report as one line: `PGPUSH_PORT: Input should be …; …`."""
    problems = []
    for error in exc.errors():
        message = str(error["msg"]).removeprefix("Value error, ")
        where = ".".join(_env_name(str(part)) for part in error["loc"])
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


def load_settings(**overrides: object) -> Settings:
    """The environment's settings (command-line flags override them); one plain line when invalid."""
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise CommandError(f"invalid settings: {_settings_problems(exc)}") from None
    has_key = settings.jwt_secret or settings.jwt_public_key or settings.jwt_jwks_url
    if settings.embedded and not has_key:
        settings = settings.model_copy(update={"jwt_secret": SecretStr(dev_secret(settings.data_dir))})
    return settings


def signing_secret(settings: Settings) -> str:
    if settings.jwt_secret is None:
        raise CommandError("minting tokens needs PGPUSH_JWT_SECRET (a public key can only verify)")
    return settings.jwt_secret.get_secret_value()


class DrainingServer(uvicorn.Server):
    """uvicorn, but on SIGTERM every stream first gets a jittered `retry:` and is closed (docs/protocol.md).

    `on_started` runs once the app has started and the socket accepts connections, never before.
    """

    def __init__(
        self, config: uvicorn.Config, app: FastAPI, on_started: Callable[[], None] | None = None
    ) -> None:
        super().__init__(config)
        self._app = app
        self._on_started = on_started
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self._on_started is not None:
            self._on_started()

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        hub = getattr(self._app.state, "hub", None)
        if hub is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(hub.shutdown)
        super().handle_exit(sig, frame)


def build_server(
    app: FastAPI, settings: Settings, on_started: Callable[[], None] | None = None
) -> DrainingServer:
    """The uvicorn server `serve` runs: guarded request heads and bodies, draining on SIGTERM.

    The tests build their servers with it too, so they exercise exactly what ships."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        proxy_headers=True,
        server_header=False,
        http=guarded_protocol(
            settings.header_timeout_seconds, settings.body_timeout_seconds, settings.max_body_bytes
        ),
    )
    return DrainingServer(config, app, on_started=on_started)


def _print_welcome(settings: Settings, embedded: EmbeddedPostgres, port: int) -> None:
    secret = signing_secret(settings)
    token = mint_token(secret, DEMO_USER, ttl_seconds=DEMO_TOKEN_TTL)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    base = f"http://{host}:{port}"
    insert = (
        "INSERT INTO messages (recipient, event, data) VALUES ('demo', 'lead', '{\"company\": \"ACME\"}')"
    )
    # The password stays in its 0600 file: neither the terminal nor other users' `ps` ever shows it.
    psql = (
        f"PGPASSFILE={shlex.quote(str(embedded.passfile))} "
        f"psql {shlex.quote(embedded.url_without_password)} -c {shlex.quote(insert)}"
    )
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


def _listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before anything else starts or is printed.

    uvicorn takes it over and listens again with its own backlog.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise CommandError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
            "pick another port with --port (or PGPUSH_PORT), e.g. pgpush serve --port 8001"
        ) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import create_app
    from .embedded import EmbeddedPostgres

    flags = {name: value for name in ("host", "port") if (value := getattr(args, name)) is not None}
    settings = load_settings(**flags)
    if problem := settings.missing_audience():
        raise CommandError(problem)
    configure_logging(settings.log_level)
    # Bound first: a busy port fails here, before Postgres starts or a welcome promises a server.
    listening = _listen(settings.host, settings.port)
    port = int(listening.getsockname()[1])
    embedded: EmbeddedPostgres | None = None
    try:
        if settings.embedded:
            embedded = EmbeddedPostgres(settings.data_dir.resolve() / "pgdata")
            url = embedded.start()
            log.info("embedded Postgres running", extra={"data_dir": str(embedded.data_dir)})
            migrate(url)
            settings = settings.model_copy(update={"database_url": url})
        elif settings.migrate_on_start:
            migrate(settings.database_url or "")
        settings = settings.model_copy(update={"migrate_on_start": False, "port": port})
        welcome = embedded

        def started() -> None:
            if welcome is not None:
                _print_welcome(settings, welcome, port)

        server = build_server(create_app(settings), settings, on_started=started)
        # uvicorn re-raises the signal it caught once it has shut down; a no-op handler turns that into a
        # normal return, so a drained SIGTERM exits 0 as the protocol asks.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda _s, _f: None)
        _tune_garbage_collector()
        server.run(sockets=[listening])
    finally:
        listening.close()
        if embedded is not None and embedded.started_here:
            embedded.stop()
    return 0 if server.started else 1


def cmd_migrate(_args: argparse.Namespace) -> int:
    database_url = os.environ.get("DATABASE_URL")
    if database_url:
        # The owner's one-off job needs no JWT key, and the migration Job is given none (SECURITY.md).
        configure_logging(os.environ.get("PGPUSH_LOG_LEVEL", "info"), plain=True)
        revision = migrate(database_url)
    else:
        settings = load_settings()
        configure_logging(settings.log_level, plain=True)
        if settings.database_url is None:
            from .embedded import EmbeddedPostgres

            with EmbeddedPostgres(settings.data_dir.resolve() / "pgdata") as pg:
                revision = migrate(pg.url)
        else:
            revision = migrate(settings.database_url)
    print(f"pgpush migrate: the database is at revision {revision}", file=sys.stderr)
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
    configure_logging(settings.log_level if settings else "info", plain=True)
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
    parser = argparse.ArgumentParser(
        prog="pgpush", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the service (an embedded Postgres when DATABASE_URL is unset)",
        description="Run the service. Without DATABASE_URL it starts (and migrates) its own Postgres "
        "under PGPUSH_DATA_DIR and prints a demo token, a link to the live inbox and a psql line.",
    )
    serve.add_argument("--host", help="the address to listen on (default: $PGPUSH_HOST, or 127.0.0.1)")
    serve.add_argument(
        "--port",
        type=int,
        help="the TCP port to listen on (default: $PGPUSH_PORT, or 8000; 0 picks a free one)",
    )
    serve.set_defaults(func=cmd_serve)
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


def _one_line(exc: BaseException) -> str:
    """An error as a person reads it: a database driver's message without the library's wrapping."""
    cause = getattr(exc, "orig", None) or exc  # SQLAlchemy (under alembic) wraps the driver's error
    text = str(cause).strip() or type(cause).__name__
    return text.splitlines()[0] if isinstance(cause, OSError) or cause is not exc else text


def main(argv: list[str] | None = None) -> int:
    """The `pgpush` command. Errors are one plain line on stderr and exit status 1 (argparse's own: 2)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except CommandError as exc:
        print(f"pgpush {args.command}: {exc}", file=sys.stderr)
    except Exception as exc:  # a traceback helps nobody at a terminal; `serve` logs its own failures
        log.debug("pgpush %s failed", args.command, exc_info=True)
        print(f"pgpush {args.command}: {_one_line(exc)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
