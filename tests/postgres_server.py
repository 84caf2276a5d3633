"""A private PostgreSQL server for tests and benchmarks, and the ``postgres_server`` fixture.

``initdb`` creates a cluster in a temporary directory; ``postgres`` serves it on a free
port on 127.0.0.1 and on a unix socket in that same directory, with ``fsync`` on (the
ledger's durability is what the tests are about). It never touches a PostgreSQL already
running on this machine (5432) or any data the tests did not create.

PostgreSQL refuses to run as root; when the tests run as root, the server runs as the
``postgres`` user (or ``nobody``) and the directory is handed to that user.

Use it directly::

    with PostgresServer() as server:
        ledger = Ledger(server.url)

or through the ``postgres_server`` fixture (session scope). Without the binaries the
fixture skips with the reason, except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis_server import _die_with_parent, free_port

__all__ = ["PostgresServer", "find_postgres_bin", "postgres_server", "require_postgres"]

def find_postgres_bin() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``: ``$POSTGRES_BIN``, Debian's
    ``/usr/lib/postgresql/<version>/bin`` (newest first), or ``PATH``; ``None`` if none."""
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    for candidate in (os.environ.get("POSTGRES_BIN"), *debian, os.path.dirname(shutil.which("initdb") or "")):
        if candidate and all(os.access(Path(candidate) / name, os.X_OK) for name in ("initdb", "postgres")):
            return Path(candidate)
    return None


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged user to run the server as when we are root; ``None`` otherwise."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    msg = "running as root and no 'postgres' or 'nobody' user to run PostgreSQL as"
    raise RuntimeError(msg)


def _preexec(user: pwd.struct_passwd | None) -> Callable[[], None]:
    def drop() -> None:
        _die_with_parent()
        if user is not None:
            os.setgid(user.pw_gid)
            os.setgroups([])
            os.setuid(user.pw_uid)

    return drop


class PostgresServer:
    """One ``postgres`` process serving a fresh cluster, started and stopped by the test.

    Args:
        bindir: Where ``initdb`` and ``postgres`` are (default: :func:`find_postgres_bin`).
        port: The TCP port (default: a free one).
        startup_timeout: Seconds to wait for the server to accept connections.
    """

    def __init__(self, bindir: Path | None = None, *, port: int | None = None, startup_timeout: float = 30.0) -> None:
        found = bindir or find_postgres_bin()
        if found is None:
            msg = "no PostgreSQL binaries found (apt-get install postgresql, or set POSTGRES_BIN)"
            raise FileNotFoundError(msg)
        self.bindir = found
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self.user = _run_as()
        self.dir = Path(tempfile.mkdtemp(prefix="budgetguard-pg-"))
        self.data = self.dir / "data"
        self.process: subprocess.Popen[bytes] | None = None
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)

    @property
    def role(self) -> str:
        """The superuser role ``initdb`` created."""
        return "budgetguard"

    @property
    def url(self) -> str:
        """A ``postgresql://`` URL to the ``postgres`` database over TCP."""
        return f"postgresql://{self.role}@127.0.0.1:{self.port}/postgres"

    @property
    def socket_url(self) -> str:
        """The same database over the unix socket in the server's directory."""
        return f"postgresql://{self.role}@/postgres?host={self.dir}&port={self.port}"

    def database_url(self, name: str) -> str:
        """A URL to database ``name`` (see :meth:`create_database`)."""
        return f"postgresql://{self.role}@127.0.0.1:{self.port}/{name}"

    def create_database(self, name: str) -> str:
        """Create an empty database and return its URL (tests each get their own)."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.database_url(name)

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def _check(self, args: list[str]) -> None:
        done = subprocess.run(  # noqa: S603 - our own arguments
            args, capture_output=True, text=True, preexec_fn=_preexec(self.user), timeout=120, check=False
        )
        if done.returncode != 0:
            msg = f"{args[0]} failed ({done.returncode}): {done.stderr[-2000:]}"
            raise RuntimeError(msg)

    def start(self) -> PostgresServer:
        """Create the cluster (first time) and start the server; wait until it accepts connections."""
        if self.running:
            return self
        if not (self.data / "PG_VERSION").exists():
            initdb = [str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.role, "-A", "trust"]
            self._check([*initdb, "-E", "UTF8", "--no-sync", "--locale=C"])
        log = self.dir / "postgres.log"
        args = [
            str(self.bindir / "postgres"),
            "-D", str(self.data),
            "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1",
            "-c", f"unix_socket_directories={self.dir}",
            "-c", "max_connections=100",
            "-c", "shared_buffers=32MB",
        ]  # fmt: skip
        with log.open("ab") as out:
            self.process = subprocess.Popen(  # noqa: S603 - our own arguments
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_preexec(self.user),  # noqa: PLW1509 - tests start servers from the main thread
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                text = log.read_text(errors="replace") if log.exists() else ""
                msg = f"postgres on port {self.port} exited with {self.process.returncode}: {text[-2000:]}"
                raise RuntimeError(msg)
            if self._ready():
                return self
            time.sleep(0.05)
        self.kill()
        msg = f"postgres on port {self.port} did not accept connections within {self.startup_timeout} s"
        raise RuntimeError(msg)

    def _ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url, connect_timeout=1):
                return True
        except psycopg.OperationalError:
            return False

    def stop(self, timeout: float = 20.0) -> None:
        """Fast shutdown (SIGINT) and wait; SIGKILL if it does not exit in ``timeout``."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL and wait."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self.process = None

    def close(self) -> None:
        """Stop the server at once (SIGQUIT: its data is thrown away) and remove its directory."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI must run the PostgreSQL tests", pytrace=False)
    pytest.skip(reason)


def require_postgres() -> Path:
    """The PostgreSQL bin directory and psycopg; otherwise skip the test (fail it under ``CI=true``)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _missing("psycopg is not installed (pip install -e '.[test]')")
    bindir = find_postgres_bin()
    if bindir is None:
        _missing("PostgreSQL's initdb/postgres not found (apt-get install postgresql, or set POSTGRES_BIN)")
    assert bindir is not None
    return bindir


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A private PostgreSQL for the whole test session (skip if none; fail on CI)."""
    server = PostgresServer(require_postgres())
    try:
        server.start()
    except RuntimeError as exc:
        server.close()
        _missing(f"postgres would not start: {exc}")
    try:
        yield server
    finally:
        server.close()
