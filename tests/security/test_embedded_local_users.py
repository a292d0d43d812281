"""Another local account cannot use the development Postgres; the psql line `pgpush serve` prints still works.

0.3.0's embedded Postgres trusted every connection to 127.0.0.1, so any local account logged in as the
superuser and ran programs as the database's OS user (`COPY … TO PROGRAM`). Here a throwaway system account
tries exactly that against a real `pgpush serve` in development mode, with the welcome's own psql line too.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from pgpush.embedded import EmbeddedPostgres, find_postgres_bindir

from tests.serve_process import ServerProcess
from tests.sse_client import open_stream

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("useradd") is None,
    reason="needs root and useradd, to create the throwaway local account that attacks the database",
)


def psql_program() -> str:
    bundled = find_postgres_bindir() / "psql"
    found = str(bundled) if bundled.is_file() else shutil.which("psql")
    if found is None:
        pytest.skip("no psql program to run the printed line with")
    return found


@pytest.fixture
def intruder() -> Iterator[pwd.struct_passwd]:
    """A local account of its own, as any other user of the machine has."""
    name = f"pgpush-x{secrets.token_hex(4)}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """The development data folder, in a folder every account may enter (like a project in a home folder).
    Not under pytest's tmp_path, whose base folder each pytest session resets to mode 0700."""
    with tempfile.TemporaryDirectory(prefix="pgpush-embedded-") as tmp:
        Path(tmp).chmod(0o755)
        yield Path(tmp) / "data"


def run_as(user: pwd.struct_passwd | None, command: str) -> subprocess.CompletedProcess[str]:
    """A shell command line, as this user (None: as ourselves); psql never prompts for a password."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PGCONNECT_TIMEOUT": "10", "HOME": "/"}
    return subprocess.run(
        ["/bin/sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env=env,
        user=user.pw_uid if user else None,
        group=user.pw_gid if user else None,
        extra_groups=[] if user else None,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.timeout(180)
async def test_another_local_user_cannot_connect_and_the_printed_psql_line_works(
    intruder: pwd.struct_passwd, data_dir: Path
) -> None:
    psql = psql_program()
    server = ServerProcess(None, data_dir=data_dir)
    try:
        await server.ready(within=120)
        banner = server.output
        line = re.search(r"then insert a row:\s+(.+)$", banner, re.MULTILINE)
        port = re.search(r"postgresql://postgres@127\.0\.0\.1:(\d+)/postgres", banner)
        token = re.search(r"#token=(\S+)", banner)
        assert line and port and token, banner
        printed = line.group(1).replace("psql ", f"{shlex.quote(psql)} ", 1)
        drop = data_dir.parent / "drop"  # where any account, the database's among them, may write
        drop.mkdir(mode=0o1777)
        drop.chmod(0o1777)
        marker = drop / "written-by-the-database-for-the-intruder"

        # The intruder, as any local account: the superuser without a password, then the printed line.
        attacks = [
            f"{shlex.quote(psql)} -w 'postgresql://postgres@127.0.0.1:{port.group(1)}/postgres' "
            f"-c \"COPY (SELECT 1) TO PROGRAM 'touch {marker}'\"",
            f"{shlex.quote(psql)} -w -h 127.0.0.1 -p {port.group(1)} -U postgres -d postgres -c 'SELECT 1'",
            printed,
        ]
        for attack in attacks:
            result = run_as(intruder, attack)
            assert result.returncode != 0, f"the intruder got in:\n{attack}\n{result.stdout}"
            assert "password" in result.stderr or "Permission denied" in result.stderr, result.stderr
        assert not marker.exists()
        passfile = re.search(r"PGPASSFILE=(\S+)", line.group(1))
        assert passfile, line.group(1)
        assert run_as(intruder, f"cat {passfile.group(1)}").returncode != 0, "the password file is readable"

        # The person who ran `pgpush serve` pastes the printed line: the row reaches the demo's stream.
        async with await open_stream(server.url, token.group(1)) as stream:
            result = run_as(None, printed)
            assert result.returncode == 0, result.stderr
            [event] = await stream.messages(1)
        assert event.type == "lead"
    finally:
        assert await server.stop() == 0


@pytest.mark.timeout(120)
async def test_the_embedded_url_needs_its_password(data_dir: Path) -> None:
    cluster = EmbeddedPostgres(data_dir / "pgdata", durable=False)
    try:
        url = cluster.start()
        assert await fetch_user(url) == "postgres"
        with pytest.raises(asyncpg.InvalidPasswordError):
            await fetch_user(cluster.url_without_password)
        assert (cluster.passfile.stat().st_mode & 0o777) == 0o600
        assert (cluster.data_dir.stat().st_mode & 0o777) == 0o700
    finally:
        cluster.stop("immediate")


async def fetch_user(url: str) -> str:
    conn = await asyncpg.connect(url, timeout=10, passfile="/nonexistent")
    try:
        return str(await conn.fetchval("SELECT current_user"))
    finally:
        await conn.close()
