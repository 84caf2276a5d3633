"""A shared ledger on PostgreSQL: one ledger for every machine of a deployment.

``Ledger("postgresql://user:password@host:5432/dbname")`` (or ``BUDGETGUARD_LEDGER`` set to
such a URL) writes to PostgreSQL instead of a local file; ``budgetguard report --ledger URL``
reads it. It needs psycopg 3: ``pip install 'budgetguard[postgres]'``.

Layout: a schema (``budgetguard`` unless told otherwise) holding the table ``calls`` of
:mod:`budgetguard.ledger_sql` and ``schema_version`` (one row: the version). The library
creates and migrates both: whoever opens the ledger takes a transaction-scoped advisory
lock, reads the version and applies the migrations it lacks in that same transaction
(PostgreSQL's DDL is transactional), so processes that open a new or old ledger at once
wait for the first and then find the work done.

Writes: one transaction per :meth:`PostgresSink.write` (the ledger's group commit), the
records pipelined in it; when the commit returns the records are as durable as the server
is configured to make them (``synchronous_commit``). Any number of processes and machines
write at once; records of one run meet on the ``run_key`` unique index, and the upsert's
rule decides (see :mod:`budgetguard.ledger_sql`).

One connection per sink and process, used under a lock, remade after a fork or an error;
:meth:`PostgresSink.read` streams through a connection of its own (a server-side cursor).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator, Sequence
from decimal import Decimal
from typing import Any

from budgetguard import ledger_sql as _sql
from budgetguard.ledger_records import LedgerError, LedgerRecord

__all__ = ["PostgresSink"]

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*@|(password=)[^&\s]*")
_MIGRATIONS = _sql.POSTGRES.migrations()
_UPSERT = _sql.POSTGRES.upsert()
_CHUNK = 1000


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        msg = "a PostgreSQL ledger needs psycopg 3: pip install 'budgetguard[postgres]'"
        raise LedgerError(msg) from exc
    return psycopg


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages and reprs)."""
    return _PASSWORD.sub(lambda m: f"{m.group(1)}***@" if m.group(1) else f"{m.group(2)}***", url)


def _plain(value: Any) -> Any:
    """PostgreSQL sums integers as ``numeric``: give queries the ``int`` SQLite gives."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


class PostgresSink:
    """A ledger in a PostgreSQL database, shared by any number of writers.

    Args:
        url: A ``postgresql://`` (or ``postgres://``) URL; any libpq parameter may be
            given in its query string (``?sslmode=require``, ``?host=/run/postgresql``).
        create: ``False`` to require an existing ledger (for reading).
        schema: The schema holding the ledger's tables (created if missing).
        connect_timeout: Seconds to wait for the server when connecting.

    Raises:
        LedgerError: psycopg is not installed, the server cannot be reached, there is
            no ledger (``create=False``), or it was written by a newer budgetguard.
    """

    dialect = _sql.POSTGRES
    """How the ledger's queries are written for this sink."""

    def __init__(
        self, url: str, *, create: bool = True, schema: str = "budgetguard", connect_timeout: float = 10.0
    ) -> None:
        if not _IDENTIFIER.match(schema):
            msg = f"ledger schema must be a lowercase SQL identifier (letters, digits, _), got {schema!r}"
            raise LedgerError(msg)
        self._psycopg = _psycopg()
        self.url = url
        self.schema = schema
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._closed = False
        self._conn: Any = None
        self._pid = os.getpid()
        with self._lock:
            conn = self._connection()
            try:
                self._prepare(conn, create)
            except BaseException:
                self._conn = None
                conn.close()
                raise

    # -- connections ---------------------------------------------------------------------

    def _connect(self) -> Any:
        psycopg = self._psycopg
        try:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, round(self._connect_timeout)))
            conn.execute("SELECT set_config('search_path', %s, false)", [self.schema])
        except psycopg.Error as exc:
            raise self._error("cannot connect to", exc) from exc
        return conn

    def _connection(self) -> Any:
        """The writer connection (the caller holds ``_lock``)."""
        if self._closed:
            msg = f"ledger {self!r} is closed"
            raise LedgerError(msg)
        if self._pid != os.getpid():  # forked: the parent's connection is the parent's
            self._inherited, self._conn, self._pid = self._conn, None, os.getpid()
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        return self._conn

    def _error(self, action: str, exc: BaseException) -> LedgerError:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return LedgerError(f"{action} ledger {redact(self.url)}: {redact(text)}")

    def _failed(self, conn: Any, action: str, exc: BaseException) -> LedgerError:
        """After an error: drop a connection that may be broken; the next call makes a new one."""
        if conn is self._conn:
            self._conn = None
        try:
            conn.close()
        except self._psycopg.Error:
            pass
        return self._error(action, exc)

    # -- schema --------------------------------------------------------------------------

    def _prepare(self, conn: Any, create: bool) -> None:
        """Create the ledger, or migrate an older one, in one locked transaction."""
        psycopg = self._psycopg
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"budgetguard ledger {self.schema}"])
                version = self._version(conn)
                if version is None and not create:
                    msg = (
                        f"no budgetguard ledger in {redact(self.url)} (schema {self.schema!r}); "
                        "nothing was recorded there yet (choose one with --ledger or BUDGETGUARD_LEDGER)"
                    )
                    raise LedgerError(msg)
                if version is not None and version > _sql.SCHEMA_VERSION:
                    msg = (
                        f"the ledger in {redact(self.url)} was written by a newer budgetguard "
                        f"(schema {version}); upgrade budgetguard to use it"
                    )
                    raise LedgerError(msg)
                if version is None:
                    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
                    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                    conn.execute("INSERT INTO schema_version VALUES (0)")
                    version = 0
                for step in range(version + 1, _sql.SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS[step]:
                        conn.execute(statement)
                if version < _sql.SCHEMA_VERSION:
                    conn.execute("UPDATE schema_version SET version = %s", [_sql.SCHEMA_VERSION])
        except psycopg.Error as exc:
            raise self._failed(conn, "cannot open", exc) from exc

    def _version(self, conn: Any) -> int | None:
        """The schema version, or ``None`` when there is no ledger in the schema."""
        tables = {
            row[0]
            for row in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", [self.schema]
            )
        }
        if "schema_version" not in tables:
            if "calls" in tables:
                msg = (
                    f"schema {self.schema!r} of {redact(self.url)} holds a 'calls' table that is not a "
                    "budgetguard ledger; pass another schema"
                )
                raise LedgerError(msg)
            return None
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        if row is None or ("calls" not in tables and row[0] > 0):
            msg = f"the budgetguard ledger in {redact(self.url)} is damaged (schema {self.schema!r}); move it aside"
            raise LedgerError(msg)
        return int(row[0])

    # -- the sink protocol ---------------------------------------------------------------

    def write(self, records: Sequence[LedgerRecord]) -> None:
        """Store ``records`` in one transaction, one row per run.

        Raises:
            LedgerError: The server is unreachable or refused the write.
        """
        rows = [_sql.to_row(r) for r in records]
        with self._lock:
            conn = self._connection()
            try:
                with conn.transaction(), conn.cursor() as cursor:
                    cursor.executemany(_UPSERT, rows)
            except self._psycopg.Error as exc:
                raise self._failed(conn, "cannot write to", exc) from exc

    def execute_read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one read-only query and return all rows (used by the ledger's queries)."""
        with self._lock:
            conn = self._connection()
            try:
                rows = conn.execute(sql, list(params)).fetchall()
            except self._psycopg.Error as exc:
                raise self._failed(conn, "cannot read", exc) from exc
        return [tuple(_plain(v) for v in row) for row in rows]

    def read(self, since: float | None = None, until: float | None = None) -> Iterator[LedgerRecord]:
        """Records with ``since <= ts < until``, oldest first, streamed in chunks.

        Raises:
            LedgerError: The server is unreachable (raised while iterating).
        """
        sql = _sql.SELECT + " WHERE ts >= %s AND ts < %s ORDER BY ts, id"
        return self._stream(sql, [since if since is not None else -1e300, until if until is not None else 1e300])

    def _stream(self, sql: str, params: list[Any]) -> Iterator[LedgerRecord]:
        conn = self._connect()  # its own connection: a consistent snapshot, writers not blocked
        try:
            with conn.transaction(), conn.cursor(name="budgetguard_records") as cursor:
                cursor.itersize = _CHUNK
                cursor.execute(sql, params)
                yield from map(_sql.from_row, cursor)
        except self._psycopg.Error as exc:
            raise self._error("cannot read", exc) from exc
        finally:
            conn.close()

    def close(self) -> None:
        """Close the connection. Writing afterwards raises :class:`LedgerError`."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None
            self._closed = True

    def __repr__(self) -> str:
        return f"PostgresSink({redact(self.url)!r})"
