"""Where ledger records are stored: SQLite (default), JSONL, or memory.

A sink is anything with ``write(records)`` and ``close()`` (:class:`Sink`). The
:class:`~budgetguard.ledger.Ledger` calls ``write`` with one or more records, one call at a
time, and returns to its caller once ``write`` does: a sink's ``write`` must leave the
records stored (a PostgreSQL ledger lives in :mod:`budgetguard.ledger_postgres`). Sinks that
also have ``read(since, until)`` can be queried.

The SQLite file holds table ``calls`` (:mod:`budgetguard.ledger_sql`; ``PRAGMA
application_id = 0x42474C47``, ``PRAGMA user_version`` = the schema version). It runs in WAL
mode with a busy timeout; each write is one ``BEGIN IMMEDIATE`` transaction, so several
processes can write to one file. ``synchronous=NORMAL``: a committed write survives a crash
of the process (what the ledger promises), not necessarily a power loss. A file of an
earlier schema is migrated in place by the first process that opens it.

Every sink keeps one record per run id, by the rule of :mod:`budgetguard.ledger_sql`: the
SQLite and memory sinks when writing, the JSONL sink (append-only) when reading.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from budgetguard import ledger_sql as _sql
from budgetguard.ledger_records import (
    JSONL_SUFFIXES,
    LedgerError,
    LedgerRecord,
    default_ledger_location,
    is_ledger_url,
    ledger_file_kind,
)

__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "JSONLSink", "MemorySink", "SQLiteSink", "Sink"]

logger = logging.getLogger("budgetguard.ledger")

APPLICATION_ID = 0x42474C47  # "BGLG"
SCHEMA_VERSION = _sql.SCHEMA_VERSION
_MIGRATIONS = _sql.SQLITE.migrations()
_UPSERT = _sql.SQLITE.upsert()


@runtime_checkable
class Sink(Protocol):
    """What the ledger writes to. ``write`` is called by one thread at a time."""

    def write(self, records: Sequence[LedgerRecord]) -> None:
        """Store ``records`` durably before returning (one per run id, see
        :mod:`budgetguard.ledger_sql`); raise to have the ledger keep and retry them."""
        ...

    def close(self) -> None:
        """Release files and connections; called once, after the last ``write``."""
        ...




class JSONLSink:
    """Appends one JSON object per line (:meth:`LedgerRecord.to_dict` plus ``"v": 1``).

    Each write is one ``write(2)`` on a file opened with ``O_APPEND`` (in the kernel's hands
    when it returns: it survives the process); the file is fsync'ed on close. Lines are
    never rewritten: a run's ``expired`` record is appended, and reading applies the
    one-record-per-run rule. Prefer :class:`SQLiteSink` when several processes share a file.

    Args:
        path: The file; parent directories are created.
        create: ``False`` to require an existing file (for reading).
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = Path(path).expanduser()
        if not create and not self.path.is_file():
            msg = f"no ledger at {self.path}"
            raise LedgerError(msg)
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def write(self, records: Sequence[LedgerRecord]) -> None:
        """Append ``records``, one line each, in a single write."""
        data = "".join(_sql.compact_json({**r.to_dict(), "v": 1}) + "\n" for r in records).encode()
        with self._lock:
            if self._fd is None or self._pid != os.getpid():
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                self._pid = os.getpid()
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]

    def read(self, since: float | None = None, until: float | None = None) -> Iterator[LedgerRecord]:
        """Records with ``since <= ts < until``, oldest first, one per run.

        A torn last line (a crash mid-write) is skipped with a warning.

        Raises:
            LedgerError: The file is unreadable or a line is not a ledger record.
        """
        try:
            text = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
        except (OSError, UnicodeDecodeError) as exc:
            msg = f"cannot read ledger {self.path}: {exc}"
            raise LedgerError(msg) from exc
        lines = text.split("\n")
        found = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                found.append(LedgerRecord.from_dict(json.loads(line)))
            except (ValueError, LedgerError) as exc:
                if number == len(lines):  # no newline after it: a torn final write
                    logger.warning("ledger %s: skipping an incomplete last line", self.path)
                    continue
                msg = f"ledger {self.path} line {number} is not a budgetguard record ({exc}); the file is corrupt"
                raise LedgerError(msg) from exc
        # Lines are appended as they come; the one-record-per-run rule applies on reading.
        scratch = scratch_sqlite(found)
        try:
            return iter(list(scratch.read(since, until)))
        finally:
            scratch.close()

    def close(self) -> None:
        """Fsync and close the file."""
        with self._lock:
            if self._fd is not None and self._pid == os.getpid():
                try:
                    os.fsync(self._fd)
                finally:
                    os.close(self._fd)
            self._fd = None

    def __repr__(self) -> str:
        return f"JSONLSink({str(self.path)!r})"


class SQLiteSink:
    """The default sink: one SQLite file, table ``calls`` (:mod:`budgetguard.ledger_sql`).

    Args:
        path: The database file (parent directories are created), or ``":memory:"``.
        create: ``False`` to require an existing ledger (for reading).
        timeout: Seconds to wait for another process's write lock before failing.

    Raises:
        LedgerError: The file is missing (``create=False``), is not a SQLite database,
            is a database of something else, or comes from a newer budgetguard.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True, timeout: float = 10.0) -> None:
        self._memory = str(path) == ":memory:"
        self.path = Path(path).expanduser() if not self._memory else Path(":memory:")
        self._timeout = timeout
        self._lock = threading.Lock()
        self._closed = False
        if not self._memory:
            if not create and not self.path.is_file():
                msg = f"no ledger at {self.path}"
                raise LedgerError(msg)
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = self._connect("rwc" if create else "rw")
        try:
            self._prepare(self._conn, create)
        except BaseException:
            self._conn.close()
            raise
        self._pid = os.getpid()

    def _connect(self, mode: str = "rw") -> sqlite3.Connection:
        try:
            if self._memory:
                conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            else:
                uri = f"{self.path.absolute().as_uri()}?mode={mode}"
                conn = sqlite3.connect(
                    uri, uri=True, timeout=self._timeout, isolation_level=None, check_same_thread=False
                )
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            raise self._error("cannot open", exc) from exc
        return conn

    def _error(self, action: str, exc: BaseException) -> LedgerError:
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            return LedgerError(
                f"{self.path} is not a budgetguard ledger or is corrupt ({exc}); move it aside "
                "or point --ledger / BUDGETGUARD_LEDGER at another file"
            )
        return LedgerError(f"{action} ledger {self.path}: {exc}")

    def _prepare(self, conn: sqlite3.Connection, create: bool) -> None:
        """Check the file is a ledger of a known version; initialise an empty one, migrate an old one."""
        try:
            app_id, version, tables = self._header(conn)
            fresh = app_id == 0 and not tables
            if (fresh and create) or (app_id == APPLICATION_ID and version < SCHEMA_VERSION):
                conn.execute("BEGIN IMMEDIATE")
                try:
                    app_id, version, tables = self._migrate(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            if not self._memory and app_id == APPLICATION_ID:
                conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.Error as exc:
            raise self._error("cannot open", exc) from exc
        if app_id != APPLICATION_ID:
            what = f"a SQLite database with tables {', '.join(tables)}" if tables else "an empty SQLite database"
            msg = f"{self.path} is {what}, not a budgetguard ledger; point --ledger / BUDGETGUARD_LEDGER elsewhere"
            raise LedgerError(msg)
        if version > SCHEMA_VERSION:
            msg = f"{self.path} was written by a newer budgetguard (schema {version}); upgrade budgetguard to read it"
            raise LedgerError(msg)
        if "calls" not in tables:
            msg = f"{self.path} is a damaged budgetguard ledger (no 'calls' table); move it aside"
            raise LedgerError(msg)

    def _migrate(self, conn: sqlite3.Connection) -> tuple[int, int, list[str]]:
        """In the caller's write transaction: create the schema, or bring it up to date."""
        app_id, version, tables = self._header(conn)  # another process may have done it already
        if app_id == 0 and not tables:
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            app_id = APPLICATION_ID
        if app_id != APPLICATION_ID or version >= SCHEMA_VERSION:
            return app_id, version, tables
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[step]:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        return self._header(conn)

    @staticmethod
    def _header(conn: sqlite3.Connection) -> tuple[int, int, list[str]]:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return app_id, version, tables

    def _writer(self) -> sqlite3.Connection:
        if self._closed:
            msg = f"ledger {self.path} is closed"
            raise LedgerError(msg)
        if self._pid != os.getpid():  # forked: never share a connection across processes
            self._conn = self._connect()
            self._pid = os.getpid()
        return self._conn

    def write(self, records: Sequence[LedgerRecord]) -> None:
        """Store ``records`` in one ``BEGIN IMMEDIATE`` transaction, one row per run.

        Raises:
            LedgerError: The database is locked past the timeout, full, or damaged.
        """
        rows = [_sql.to_row(r) for r in records]
        with self._lock:
            conn = self._writer()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany(_UPSERT, rows)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise self._error("cannot write to", exc) from exc

    dialect = _sql.SQLITE
    """How the ledger's queries are written for this sink."""

    def execute_read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one read-only query and return all rows (used by the ledger's queries)."""
        with self._lock:
            conn = self._writer()
            try:
                return conn.execute(sql, tuple(params)).fetchall()
            except sqlite3.Error as exc:
                raise self._error("cannot read", exc) from exc

    def read(self, since: float | None = None, until: float | None = None) -> Iterator[LedgerRecord]:
        """Records with ``since <= ts < until``, oldest first, streamed in chunks.

        Raises:
            LedgerError: The file is unreadable or damaged (raised while iterating).
        """
        sql = _sql.SELECT + " WHERE ts >= ? AND ts < ? ORDER BY ts, id"
        params = (since if since is not None else -1e300, until if until is not None else 1e300)
        if self._memory:
            return (_sql.from_row(row) for row in self.execute_read(sql, params))
        return self._stream(sql, params)

    def _stream(self, sql: str, params: Sequence[Any]) -> Iterator[LedgerRecord]:
        conn = self._connect()  # its own connection: a consistent snapshot, writers not blocked
        try:
            cursor = conn.execute(sql, params)
            while rows := cursor.fetchmany(1000):
                yield from map(_sql.from_row, rows)
        except sqlite3.Error as exc:
            raise self._error("cannot read", exc) from exc
        finally:
            conn.close()

    def close(self) -> None:
        """Close the connection. Writing afterwards raises :class:`LedgerError`."""
        with self._lock:
            if not self._closed and self._pid == os.getpid():
                self._conn.close()
            self._closed = True

    def __repr__(self) -> str:
        return f"SQLiteSink({str(self.path)!r})"


class MemorySink(SQLiteSink):
    """A ledger in memory (an in-memory SQLite database), for tests; readable after close."""

    def __init__(self) -> None:
        super().__init__(":memory:")

    @property
    def records(self) -> list[LedgerRecord]:
        """Every record, oldest first."""
        return list(self.read())

    def close(self) -> None:
        """Nothing to release: the records stay readable."""

    def __repr__(self) -> str:
        return f"MemorySink({self.execute_read('SELECT COUNT(*) FROM calls')[0][0]} records)"


def scratch_sqlite(records: Sequence[LedgerRecord]) -> SQLiteSink:
    """An in-memory SQLite ledger holding ``records`` (how other sinks are queried)."""
    sink = SQLiteSink(":memory:")
    sink.write(records)
    return sink


def sink_for(spec: Any) -> Any:
    """Turn the ``sink`` argument of :class:`~budgetguard.ledger.Ledger` into a sink."""
    if spec is None:
        spec = default_ledger_location()
    if isinstance(spec, str) and spec == ":memory:":
        return MemorySink()
    if is_ledger_url(spec):
        from budgetguard.ledger_postgres import PostgresSink

        return PostgresSink(spec)
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        return JSONLSink(path) if path.suffix.lower() in JSONL_SUFFIXES else SQLiteSink(path)
    if callable(getattr(spec, "write", None)) and callable(getattr(spec, "close", None)):
        return spec
    msg = f"a ledger sink must be a path, a postgresql:// URL or have write(records) and close(), got {spec!r}"
    raise LedgerError(msg)


def open_existing(spec: str | os.PathLike[str]) -> Any:
    """Open an existing ledger for reading: a ``postgresql://`` URL, or a file (SQLite or
    JSONL, told by its content)."""
    if is_ledger_url(spec):
        from budgetguard.ledger_postgres import PostgresSink

        return PostgresSink(str(spec), create=False)
    path = Path(spec).expanduser()
    if not path.exists():
        msg = f"no ledger at {path}; nothing was recorded there yet (choose one with --ledger or BUDGETGUARD_LEDGER)"
        raise LedgerError(msg)
    if not path.is_file():
        msg = f"{path} is not a file; point --ledger at a ledger file"
        raise LedgerError(msg)
    try:
        kind = ledger_file_kind(path)
    except OSError as exc:
        msg = f"cannot read ledger {path}: {exc}"
        raise LedgerError(msg) from exc
    if kind == "sqlite":
        return SQLiteSink(path, create=False)
    if path.suffix.lower() in JSONL_SUFFIXES or kind == "json":
        return JSONLSink(path, create=False)
    what = "is empty" if kind == "empty" else "is neither a SQLite nor a JSONL file"
    msg = f"{path} {what}, so it is not a budgetguard ledger; point --ledger / BUDGETGUARD_LEDGER elsewhere"
    raise LedgerError(msg)


def read_records(sink: Any, since: float | None, until: float | None) -> Iterator[LedgerRecord]:
    """The records of any readable sink."""
    if not callable(getattr(sink, "read", None)):
        msg = f"ledger sink {sink!r} cannot be read back; use SQLiteSink, PostgresSink, JSONLSink or MemorySink"
        raise LedgerError(msg)
    return iter(sink.read(since, until))
