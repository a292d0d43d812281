"""The command line as a person uses it: help texts, plain one-line errors, serve's flags, a busy port.

Every test runs the real `python -m pgpush` with the caller's PGPUSH_* variables stripped, as a fresh shell
would have them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import JWT_SECRET
from tests.serve_process import HOST, free_port


def clean_env(**settings: str) -> dict[str, str]:
    """The caller's environment without pgpush settings, plus these (names as in the environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGPUSH_") and k != "DATABASE_URL"}
    return env | settings


async def pgpush(*args: str, env: dict[str, str], within: float = 120) -> tuple[int, str, str]:
    """Run `pgpush …` to completion: (exit status, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pgpush",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=within)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def plain_lines(text: str) -> list[str]:
    """The non-empty lines of a command's stderr, each checked to be prose rather than a JSON log record."""
    lines = [line for line in text.splitlines() if line.strip()]
    for line in lines:
        assert not line.lstrip().startswith("{"), f"a JSON log record on a command line: {line}"
        assert "Traceback" not in line, text
    return lines


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A development data folder. Not under pytest's tmp_path: as root the embedded Postgres runs as another
    user, and each pytest session (other checkouts' too) resets its base folder to mode 0700."""
    with tempfile.TemporaryDirectory(prefix="pgpush-cli-") as tmp:
        yield Path(tmp) / "data"


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port some other program is listening on."""
    with socket.socket() as squatter:
        squatter.bind((HOST, 0))
        squatter.listen()
        yield int(squatter.getsockname()[1])


async def test_help_names_every_command_and_the_serve_flags_and_cites_no_private_document() -> None:
    status, out, _ = await pgpush("--help", env=clean_env())
    assert status == 0
    for command in ("serve", "migrate", "token", "publish", "openapi"):
        assert re.search(rf"^\s+{command}\s", out, re.MULTILINE), out
    assert "docs/protocol.md" in out
    status, serve_help, _ = await pgpush("serve", "--help", env=clean_env())
    assert status == 0 and "--host" in serve_help and "--port" in serve_help
    for text in (out, serve_help):
        # 0.3.0 cited sections of a design record users never get ("… §6"); only the repository's own files.
        assert "§" not in text and "shared/" not in text


async def test_serve_on_a_busy_port_fails_at_once_with_one_line_and_no_welcome(
    busy_port: int, data_dir: Path
) -> None:
    # Development mode, where the welcome (a token and a link) used to be printed before the bind failed.
    status, out, err = await pgpush(
        "serve", "--port", str(busy_port), env=clean_env(PGPUSH_DATA_DIR=str(data_dir))
    )
    assert status == 1
    [line] = plain_lines(err)
    assert line.startswith(f"pgpush serve: cannot listen on {HOST}:{busy_port}") and "--port" in line
    assert "listening on" not in out + err and "token" not in out + err
    assert not (data_dir / "pgdata").exists(), "Postgres was started for a server that cannot run"


async def test_serve_flags_override_the_environment(busy_port: int, database_url: str) -> None:
    port = free_port()
    env = clean_env(
        DATABASE_URL=database_url,
        PGPUSH_JWT_SECRET=JWT_SECRET,
        PGPUSH_PORT=str(busy_port),  # the flag wins over the variable
        PGPUSH_HOST="192.0.2.1",  # not an address of this machine: binding it would fail
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pgpush",
        "serve",
        "--host",
        HOST,
        "--port",
        str(port),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=5) as client:

            async def answering() -> bool:
                assert process.returncode is None, "pgpush serve exited"
                try:
                    return (await client.get("/healthz")).status_code == 200
                except httpx.TransportError:
                    return False

            deadline = asyncio.get_running_loop().time() + 60
            while not await answering():
                assert asyncio.get_running_loop().time() < deadline, "serve --port never answered"
                await asyncio.sleep(0.1)
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0


async def test_migrate_prints_one_plain_line_and_no_migration_chatter(database_url: str) -> None:
    env = clean_env(DATABASE_URL=database_url, PGPUSH_JWT_SECRET=JWT_SECRET)
    status, out, err = await pgpush("migrate", env=env)
    assert status == 0, err
    [line] = plain_lines(err)
    assert re.fullmatch(r"pgpush migrate: the database is at revision \w+", line), line
    assert "Running upgrade" not in err and "Context impl" not in err
    assert out == ""


async def test_command_errors_are_one_plain_line_and_exit_1() -> None:
    unreachable = f"postgresql://nobody:secret@{HOST}:{free_port()}/nothing"
    env = clean_env(DATABASE_URL=unreachable, PGPUSH_JWT_SECRET=JWT_SECRET)
    cases = [
        (("migrate",), env, "pgpush migrate: "),
        (("publish", "--to", "alice", "{not json"), env, "pgpush publish: "),
        (("publish", "--to", "alice", "1"), env, "pgpush publish: "),  # the database is unreachable
        (("token", "--sub", "a"), clean_env(DATABASE_URL=unreachable), "pgpush token: invalid settings: "),
        (
            ("token", "--sub", "a"),
            clean_env(PGPUSH_PORT="eighty"),
            "pgpush token: invalid settings: PGPUSH_PORT",
        ),
    ]
    for args, case_env, prefix in cases:
        status, _out, err = await pgpush(*args, env=case_env, within=60)
        assert status == 1, (args, err)
        [line] = plain_lines(err)
        assert line.startswith(prefix), (args, line)
        assert "secret@" not in line


async def test_the_publish_hint_for_a_token_works_as_printed(database_url: str) -> None:
    env = clean_env(DATABASE_URL=database_url, PGPUSH_JWT_SECRET=JWT_SECRET)
    status, _out, err = await pgpush("publish", "--url", "http://127.0.0.1:9", "--to", "alice", "1", env=env)
    assert status == 1
    [line] = plain_lines(err)
    hint = re.search(r"pgpush token [^)]*", line)
    assert hint, line
    status, token, err = await pgpush(*hint.group(0).split()[1:], env=env)
    assert status == 0, err
    assert token.strip().count(".") == 2  # a JWT


@pytest.mark.timeout(180)
async def test_publish_into_the_development_database_prints_only_the_result(data_dir: Path) -> None:
    env = clean_env(PGPUSH_DATA_DIR=str(data_dir))
    # The first run creates, starts and migrates the embedded Postgres: no progress lines for any of it.
    status, out, err = await pgpush(
        "publish", "--to", "demo", "--event", "lead", '{"company": "ACME"}', env=env
    )
    assert status == 0, err
    assert err == ""
    [row] = json.loads(out)["messages"]
    assert row["recipient"] == "demo"
