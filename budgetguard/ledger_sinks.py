"""Where ledger records are stored: SQLite (default), JSONL, or memory.

A sink is anything with ``write(records)`` and ``close()`` (:class:`Sink`). The
:class:`~budgetguard.ledger.Ledger` calls ``write`` from its background writer thread only,
with batches of records. Sinks that also have ``read(since, until)`` can be queried.

SQLite schema (``PRAGMA application_id = 0x42474C47``, ``PRAGMA user_version = 1``)::

    CREATE TABLE calls (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,            -- unix seconds, call start
        day TEXT NOT NULL,           -- UTC date of ts, 'YYYY-MM-DD'
        run_id TEXT NOT NULL, root_run_id TEXT, parent_run_id TEXT,
        scope TEXT NOT NULL,         -- JSON object, e.g. {"user_id": "alice"}
        scope_key TEXT NOT NULL,     -- 'user_id=alice' (keys sorted, ',' joined; '' if none)
        tags TEXT NOT NULL,          -- JSON array
        metadata TEXT NOT NULL,      -- JSON object
        model_requested TEXT, model_used TEXT, policy TEXT, outcome TEXT NOT NULL,
        estimated_input_tokens INTEGER NOT NULL, estimated_output_tokens INTEGER NOT NULL,
        input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
        cached_input_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
        cost_usd REAL, reserved_usd REAL, latency_s REAL,
        budgets TEXT NOT NULL,       -- JSON array
        error TEXT, prompt TEXT, completion TEXT
    );
    -- indexes: ts, model_used, COALESCE(root_run_id, run_id)

The file runs in WAL mode with a busy timeout; each batch is one ``BEGIN IMMEDIATE``
transaction, so several processes can append to one file. ``synchronous=NORMAL``: a
committed batch survives a crash of the process, not necessarily a power loss.
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

from budgetguard.ledger import LedgerError, LedgerRecord, _utc_day, default_ledger_path

__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "JSONLSink", "MemorySink", "SQLiteSink", "Sink"]

logger = logging.getLogger("budgetguard.ledger")

APPLICATION_ID = 0x42474C47  # "BGLG"
SCHEMA_VERSION = 1
_JSON_FIELDS = ("scope", "tags", "metadata", "budgets")
_FIELDS = tuple(LedgerRecord.__dataclass_fields__)
_COLUMNS = ("ts", "day", *_FIELDS[1:5], "scope_key", *_FIELDS[5:])
_TYPES = {"ts": "REAL NOT NULL", "run_id": "TEXT NOT NULL", "outcome": "TEXT NOT NULL", "day": "TEXT NOT NULL"}
_TYPES.update({n: "REAL" for n in ("cost_usd", "reserved_usd", "latency_s")})
_TYPES.update({n: "INTEGER NOT NULL" for n in _FIELDS if n.endswith("_tokens")})
_TYPES.update({n: "TEXT NOT NULL" for n in (*_JSON_FIELDS, "scope_key")})
_SCHEMA = (
    "CREATE TABLE calls (id INTEGER PRIMARY KEY, " + ", ".join(f"{c} {_TYPES.get(c, 'TEXT')}" for c in _COLUMNS) + ")",
    "CREATE INDEX calls_ts ON calls(ts)",
    "CREATE INDEX calls_model_used ON calls(model_used)",
    "CREATE INDEX calls_run ON calls(COALESCE(root_run_id, run_id))",
    f"PRAGMA application_id = {APPLICATION_ID}",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)
_INSERT = f"INSERT INTO calls ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_SELECT = f"SELECT {', '.join(_FIELDS)} FROM calls"
_SQLITE_MAGIC = b"SQLite format 3\x00"
_JSONL_SUFFIXES = (".jsonl", ".ndjson")


@runtime_checkable
class Sink(Protocol):
    """What the ledger writes to. ``write`` is called from one background thread."""

    def write(self, records: Sequence[LedgerRecord]) -> None:
        """Persist ``records``; raise to have the ledger keep and retry them."""
        ...

    def close(self) -> None:
        """Release files and connections; called once, after the last ``write``."""
        ...


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _in_range(ts: float, lo: float | None, hi: float | None) -> bool:
    return (lo is None or ts >= lo) and (hi is None or ts < hi)


class MemorySink:
    """Keeps records in a list (:attr:`records`); for tests. Still readable after close."""

    def __init__(self) -> None:
        self.records: list[LedgerRecord] = []
        self._lock = threading.Lock()

    def write(self, records: Sequence[LedgerRecord]) -> None:
        """Append normalised copies (as they would read back from a file)."""
        copies = [LedgerRecord.from_dict(r.to_dict()) for r in records]
        with self._lock:
            self.records.extend(copies)

    def read(self, since: float | None = None, until: float | None = None) -> Iterator[LedgerRecord]:
        """Records with ``since <= ts < until``, oldest first."""
        with self._lock:
            found = [r for r in self.records if _in_range(r.ts, since, until)]
        return iter(sorted(found, key=lambda r: r.ts))

    def close(self) -> None:
        """Nothing to release."""

    def __repr__(self) -> str:
        return f"MemorySink({len(self.records)} records)"


class JSONLSink:
    """Appends one JSON object per line (:meth:`LedgerRecord.to_dict` plus ``"v": 1``).

    Each batch is one ``write(2)`` on a file opened with ``O_APPEND``; the file is
    fsync'ed on close. Prefer :class:`SQLiteSink` when several processes share a file.

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
        data = "".join(_dumps({**r.to_dict(), "v": 1}) + "\n" for r in records).encode()
        with self._lock:
            if self._fd is None or self._pid != os.getpid():
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                self._pid = os.getpid()
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]

    def read(self, since: float | None = None, until: float | None = None) -> Iterator[LedgerRecord]:
        """Records with ``since <= ts < until``, oldest first.

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
                rec = LedgerRecord.from_dict(json.loads(line))
            except (ValueError, LedgerError) as exc:
                if number == len(lines):  # no newline after it: a torn final write
                    logger.warning("ledger %s: skipping an incomplete last line", self.path)
                    continue
                msg = f"ledger {self.path} line {number} is not a budgetguard record ({exc}); the file is corrupt"
                raise LedgerError(msg) from exc
            if _in_range(rec.ts, since, until):
                found.append(rec)
        return iter(sorted(found, key=lambda r: r.ts))

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
    """The default sink: one SQLite file, table ``calls`` (schema in the module docstring).

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
        """Check the file is a ledger of a known version; initialise an empty one."""
        try:
            app_id, version, tables = self._header(conn)
            if app_id == 0 and not tables and create:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    app_id, version, tables = self._header(conn)  # another process may have won
                    if app_id == 0 and not tables:
                        for statement in _SCHEMA:
                            conn.execute(statement)
                        app_id, version, tables = APPLICATION_ID, SCHEMA_VERSION, ["calls"]
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
        """Insert ``records`` in one ``BEGIN IMMEDIATE`` transaction.

        Raises:
            LedgerError: The database is locked past the timeout, full, or damaged.
        """
        rows = [_to_row(r) for r in records]
        with self._lock:
            conn = self._writer()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany(_INSERT, rows)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise self._error("cannot write to", exc) from exc

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
        sql = _SELECT + " WHERE ts >= ? AND ts < ? ORDER BY ts, id"
        params = (since if since is not None else -1e300, until if until is not None else 1e300)
        if self._memory:
            return (_from_row(row) for row in self.execute_read(sql, params))
        return self._stream(sql, params)

    def _stream(self, sql: str, params: Sequence[Any]) -> Iterator[LedgerRecord]:
        conn = self._connect()  # its own connection: a consistent snapshot, writers not blocked
        try:
            cursor = conn.execute(sql, params)
            while rows := cursor.fetchmany(1000):
                yield from map(_from_row, rows)
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


def _to_row(rec: LedgerRecord) -> tuple[Any, ...]:
    data = rec.to_dict()
    for name in _JSON_FIELDS:
        data[name] = _dumps(data[name])
    data["day"] = _utc_day(data["ts"])
    data["scope_key"] = rec.scope_key
    return tuple(data[c] for c in _COLUMNS)


def _from_row(row: Sequence[Any]) -> LedgerRecord:
    data = dict(zip(_FIELDS, row))
    try:
        for name in _JSON_FIELDS:
            data[name] = json.loads(data[name])
    except (TypeError, ValueError) as exc:
        msg = f"ledger row of run {data.get('run_id')!r} holds malformed JSON: {exc}"
        raise LedgerError(msg) from exc
    return LedgerRecord.from_dict(data)


def scratch_sqlite(records: Sequence[LedgerRecord]) -> SQLiteSink:
    """An in-memory SQLite ledger holding ``records`` (how other sinks are queried)."""
    sink = SQLiteSink(":memory:")
    sink.write(records)
    return sink


def sink_for(spec: Any) -> Any:
    """Turn the ``sink`` argument of :class:`~budgetguard.ledger.Ledger` into a sink."""
    if spec is None:
        spec = default_ledger_path()
    if isinstance(spec, str) and spec == ":memory:":
        return MemorySink()
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        return JSONLSink(path) if path.suffix.lower() in _JSONL_SUFFIXES else SQLiteSink(path)
    if callable(getattr(spec, "write", None)) and callable(getattr(spec, "close", None)):
        return spec
    msg = f"a ledger sink must be a path or have write(records) and close(), got {spec!r}"
    raise LedgerError(msg)


def open_existing(path: Path) -> Any:
    """Open an existing ledger file for reading, telling SQLite from JSONL by its content."""
    path = path.expanduser()
    if not path.exists():
        msg = f"no ledger at {path}; nothing was recorded there yet (choose one with --ledger or BUDGETGUARD_LEDGER)"
        raise LedgerError(msg)
    if not path.is_file():
        msg = f"{path} is not a file; point --ledger at a ledger file"
        raise LedgerError(msg)
    try:
        with path.open("rb") as fh:
            head = fh.read(len(_SQLITE_MAGIC))
    except OSError as exc:
        msg = f"cannot read ledger {path}: {exc}"
        raise LedgerError(msg) from exc
    if head == _SQLITE_MAGIC:
        return SQLiteSink(path, create=False)
    if path.suffix.lower() in _JSONL_SUFFIXES or head.lstrip()[:1] == b"{":
        return JSONLSink(path, create=False)
    what = "is empty" if not head else "is neither a SQLite nor a JSONL file"
    msg = f"{path} {what}, so it is not a budgetguard ledger; point --ledger / BUDGETGUARD_LEDGER elsewhere"
    raise LedgerError(msg)


def read_records(sink: Any, since: float | None, until: float | None) -> Iterator[LedgerRecord]:
    """The records of any readable sink."""
    if not callable(getattr(sink, "read", None)):
        msg = f"ledger sink {sink!r} cannot be read back; use SQLiteSink, JSONLSink or MemorySink"
        raise LedgerError(msg)
    return iter(sink.read(since, until))
