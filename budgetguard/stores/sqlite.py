"""SQLite store: buckets and leases in one file, shared by the processes of one machine.

Every write is one ``BEGIN IMMEDIATE`` transaction that runs the pure functions of
:mod:`.base` on the rows it touches, so the arithmetic is the memory store's, and
processes take turns through SQLite's write lock (WAL mode: readers never wait).

Layout (``PRAGMA user_version`` holds the schema version, 5)::

    store(kind, key, level, updated_at, period_start, spent, expires_at, held, meta, bucket,
          holds, full_at)
        PRIMARY KEY (kind, key), WITHOUT ROWID; index store_full_at (full_at) WHERE full_at
        IS NOT NULL
    kind 0: the meta row ``next_expiry``: ``expires_at`` is a lower bound of every open
            lease's expiry (NULL: no lease is open), ``updated_at`` the store time, and
            ``holds`` how many entries the journal holds (NULL: none)
    kind 1: a bucket (``key`` = bucket key; level, updated_at, period_start, spent; holds:
            the open leases holding it; full_at: when it is full again, NULL while held or
            when it never fills by itself)
    kind 2: a lease (``key`` = reservation id; expires_at, held JSON, meta, and ``bucket``:
            its first charge's bucket key, so settle reads lease and bucket in one query)
    kind 3: a journal entry, a lease swept and not yet acknowledged (``key`` = reservation
            id; expires_at: when it was swept; held: the amounts charged, JSON; meta)

The journal (see :mod:`.base`): a sweep deletes each due lease and writes its journal
row in the transaction that charges it, and sets the meta row's count; reserve reads the
count with the meta row it reads anyway, so the journal costs a query only when it holds
something.

Forgetting: a bucket that is full and that no lease holds grants what a new one grants,
so each settle deletes up to 8 bucket rows whose ``full_at`` has passed (a sweep up to
1,000), and a bucket is made again, full, when next used; the file keeps the buckets in
use, not one per scope value ever seen. Every write of a bucket sets its ``full_at``
again, so a row past its ``full_at`` has not been written since and is full.

Why one table: a commit writes every B-tree page it changed to the WAL (about 5 us per
4 KiB page here), and a reservation's bucket row and lease row in one B-tree usually
share a page, so a reserve or a settle commits one page instead of three (bucket,
lease, expiry index). Why no expiry index: the sweep reads the ``next_expiry`` row
(part of the reserve's first query) and scans the leases only once that bound has
passed, then sets it to the earliest remaining expiry; a reserve lowers it when its
lease expires sooner. The bound is kept in the same transactions as the leases, so it
holds for every process sharing the file.

Every reserve and settle reads the rows it needs and runs the arithmetic of :mod:`.base`
in Python. An earlier one-bucket path repeated that arithmetic in SQL; it gained about
16-22% in pairs per second and was dropped, for one copy of the rules
(``benchmarks/RESULTS.md``, session 5).

``held`` keeps, per charge, the bucket specs (with their period rules) and amounts the
reservation took, so any process can settle or sweep it later. Schema 1 (tables
``buckets`` and ``leases`` with an index on ``expires_at``) is migrated in place on
first open; schema 2 differs only in its leases' specs (period bounds, not rules), and
a lease written by either is settled without a period (its excess lands in the
bucket's stored period). Schema 3 lacks ``holds`` and ``full_at`` (added in place:
its buckets are forgotten once written again). Schema 4 has no journal; it is refused
by version rather than shared, since a schema-4 process would sweep leases without
journaling them (and reset the count).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from json.encoder import encode_basestring_ascii
from typing import Any, TypeVar, cast

from budgetguard.clock import Clock, SystemClock
from budgetguard.errors import ConfigurationError, StoreUnavailable
from budgetguard.periods import PeriodRule
from budgetguard.stores._retry import RetryPolicy
from budgetguard.stores.base import (
    JOURNAL_REPORT,
    BucketSpec,
    BucketState,
    ExpiredLease,
    Held,
    ReserveRequest,
    ReserveResult,
    apply_reserve,
    apply_settle,
    bucket_keys,
    touched_specs,
    full_after,
    refresh,
)

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

T = TypeVar("T")

SCHEMA_VERSION = 5
"""Stored in ``PRAGMA user_version``; an older file is migrated, a newer one refused."""

_SCHEMA = (
    (
        "CREATE TABLE IF NOT EXISTS store ("
        " kind INTEGER NOT NULL, key TEXT NOT NULL,"
        " level REAL, updated_at REAL, period_start REAL, spent REAL,"
        " expires_at REAL, held TEXT, meta TEXT, bucket TEXT, holds INTEGER, full_at REAL,"
        " PRIMARY KEY (kind, key)) WITHOUT ROWID"
    ),
    "INSERT OR IGNORE INTO store (kind, key, expires_at) VALUES (0, 'next_expiry', NULL)",
)
# Schemas 2 and 3 have the table without the forgetting columns.
_ADD_COLUMNS = {"holds": "ALTER TABLE store ADD COLUMN holds INTEGER", "full_at": "ALTER TABLE store ADD COLUMN full_at REAL"}
_FULL_AT_INDEX = "CREATE INDEX IF NOT EXISTS store_full_at ON store (full_at) WHERE full_at IS NOT NULL"

_FROM_V1 = (
    (
        "INSERT INTO store (kind, key, level, updated_at, period_start, spent)"
        " SELECT 1, key, level, updated_at, period_start, spent FROM buckets"
    ),
    "INSERT INTO store (kind, key, expires_at, held, meta) SELECT 2, id, expires_at, held, meta FROM leases",
    "UPDATE store SET expires_at = (SELECT min(expires_at) FROM leases) WHERE kind = 0 AND key = 'next_expiry'",
    # Dropped, not kept: a process still running schema 1 must fail, not write to them.
    "DROP TABLE leases",
    "DROP TABLE buckets",
)

_BUCKET_COLUMNS = "level, updated_at, period_start, spent"
_SELECT_ONE = f"SELECT {_BUCKET_COLUMNS} FROM store WHERE kind = 1 AND key = ?"
_SELECT_IN = "SELECT key, " + _BUCKET_COLUMNS + " FROM store WHERE kind = 1 AND key IN ({marks})"
# The reserve's first query: the meta row (sweep bound, store time), and the buckets
# joined to it (one row with NULL bucket columns when none exists yet; no row at all if
# the meta row is missing).
_META_AND_BUCKETS = (
    "SELECT m.expires_at, m.updated_at, m.holds, b.key, b.level, b.updated_at, b.period_start, b.spent FROM store AS m"
    " LEFT JOIN store AS b ON b.kind = 1 AND b.key IN ({marks})"
    " WHERE m.kind = 0 AND m.key = 'next_expiry'"
)
_META = "SELECT expires_at, updated_at, holds FROM store WHERE kind = 0 AND key = 'next_expiry'"
# The sweep writes the whole meta row (it may be missing); a reserve only lowers the bound.
_COUNT_JOURNAL = "(SELECT count(*) FROM store WHERE kind = 3)"
_WRITE_META = (
    f"REPLACE INTO store (kind, key, expires_at, updated_at, holds) VALUES (0, 'next_expiry', ?, ?, {_COUNT_JOURNAL})"
)
_SET_BOUND = "UPDATE store SET expires_at = ?, updated_at = ? WHERE kind = 0 AND key = 'next_expiry'"
_STORE_TIME = "(SELECT updated_at FROM store WHERE kind = 0 AND key = 'next_expiry')"
_SET_STORE_TIME = "UPDATE store SET updated_at = ? WHERE kind = 0 AND key = 'next_expiry'"
_START_STORE_TIME = "UPDATE store SET updated_at = ? WHERE kind = 0 AND key = 'next_expiry' AND updated_at IS NULL"
# A bucket written by an operation that takes (?6 > 0) or gives back (?6 < 0) holds on it;
# ?7 is when it is full again, kept only once no lease holds it.
_SAVE = (
    "INSERT INTO store (kind, key, level, updated_at, period_start, spent, holds, full_at)"
    " VALUES (1, ?1, ?2, ?3, ?4, ?5, max(?6, 0), CASE WHEN ?6 > 0 THEN NULL ELSE ?7 END)"
    " ON CONFLICT (kind, key) DO UPDATE SET level = ?2, updated_at = ?3, period_start = ?4, spent = ?5,"
    " holds = max(coalesce(holds, 0) + ?6, 0), full_at = CASE WHEN coalesce(holds, 0) + ?6 > 0 THEN NULL ELSE ?7 END"
)
# Up to ?2 buckets whose full_at has passed (none of them held: see _SAVE).
_FORGET = "DELETE FROM store WHERE kind = 1 AND key IN (SELECT key FROM store WHERE full_at <= ?1 LIMIT ?2)"
_FORGET_PER_SETTLE = 8
_FORGET_PER_SWEEP = 1000
# The sweep's scans of the lease range (no index on expires_at: they run only once the
# bound has passed; SQLite filters the rows, Python sees only the due ones).
_DUE_LEASES = "SELECT key, held, meta FROM store WHERE kind = 2 AND expires_at <= ? ORDER BY expires_at, key"
_EARLIEST_LEASE = "SELECT min(expires_at) FROM store WHERE kind = 2"
_INSERT_LEASE = "INSERT INTO store (kind, key, expires_at, held, meta, bucket) VALUES (2, ?, ?, ?, ?, ?)"
# The journal (kind 3), oldest sweep first; its count is kept in the meta row's ``holds``.
_JOURNAL_ADD = "REPLACE INTO store (kind, key, expires_at, held, meta) VALUES (3, ?, ?, ?, ?)"
_JOURNAL = "SELECT key, held, meta FROM store WHERE kind = 3 ORDER BY expires_at, key LIMIT ?"
_JOURNAL_DROP = "DELETE FROM store WHERE kind = 3 AND key = ?"
_RECOUNT_JOURNAL = f"UPDATE store SET holds = {_COUNT_JOURNAL} WHERE kind = 0 AND key = 'next_expiry'"
# Settle's first query: the lease, and its first bucket joined to it (a schema-1 lease has
# no ``bucket``: its buckets are read by a second query).
_LEASE_AND_BUCKET = (
    f"SELECT l.held, l.bucket, b.level, b.updated_at, b.period_start, b.spent, {_STORE_TIME} FROM store AS l"
    " LEFT JOIN store AS b ON b.kind = 1 AND b.key = l.bucket WHERE l.kind = 2 AND l.key = ?"
)
_BUCKET_AND_TIME = f"SELECT {_BUCKET_COLUMNS}, {_STORE_TIME} FROM store WHERE kind = 1 AND key = ?"
_DELETE_LEASE = "DELETE FROM store WHERE kind = 2 AND key = ?"
_IS_OPEN = "SELECT 1 FROM store WHERE kind = 2 AND key = ?"
_COUNT_LEASES = "SELECT count(*) FROM store WHERE kind = 2"

_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")

Buckets = dict[str, "BucketState | None"]
_Holds = dict[str, tuple[int, BucketSpec]]
"""Per bucket key: holds an operation takes (+) or gives back (-), and the bucket's spec."""


def _count_holds(held: Sequence[Held], sign: int, into: _Holds) -> _Holds:
    """Add ``sign`` per charge of ``held`` to its bucket, and to its lender when it lent."""
    for spec in touched_specs(held):
        into[spec.key] = (into.get(spec.key, (0, spec))[0] + sign, spec)
    return into

_RESERVED = ReserveResult(True)
"""The common outcome (granted, nothing expired); frozen, so one instance serves all."""

_MEMO_SIZE = 4096
"""Leases whose decoded ``held`` a store remembers for their settle (oldest dropped first)."""


class _Contended(Exception):
    """SQLite refused a lock without waiting (e.g. WAL recovery): worth another attempt."""

    def __init__(self, cause: sqlite3.OperationalError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _is_busy(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


_dumps = json.dumps
_float_repr = float.__repr__


def _number(value: float | None) -> str:
    """``value`` as ``json.dumps`` writes it (floats with ``repr``: they read back bit for bit)."""
    if type(value) is float and value - value == 0.0:  # finite: inf - inf and nan - nan are nan
        return _float_repr(value)
    if value is None:
        return "null"
    return _dumps(value)  # ints, infinities, float subclasses


@functools.lru_cache(maxsize=1024)  # a process uses few specs; the key is hashed in C
def _spec_json(spec: BucketSpec) -> str:
    rule = spec.period
    period = "null" if rule is None else f"[{_dumps(rule.unit)},{','.join(map(_number, rule.offsets))}]"
    return f"[{encode_basestring_ascii(spec.key)},{_number(spec.capacity)},{_number(spec.refill_per_second)},{period}]"


def _spec_of(row: list[Any]) -> BucketSpec:
    if len(row) == 5:  # written by schema 1 or 2 (period bounds, not a rule): settled without a period
        return BucketSpec(row[0], row[1], row[2])
    key, capacity, refill, period = row
    return BucketSpec(key, capacity, refill, None if period is None else PeriodRule(period[0], tuple(period[1:])))


def _encode_held(held: Sequence[Held]) -> str:
    """The JSON text ``json.dumps(..., separators=(",", ":"))`` writes, built without its overhead.

    Per charge: ``[bucket spec, lender spec or null, took, lent, period, lender_period]``
    with a spec as ``[key, capacity, refill_per_second, period]`` and a period as ``null``
    or ``[unit, offsets...]`` (see :class:`~budgetguard.periods.PeriodRule`).
    """
    parts = [
        f"[{_spec_json(h.bucket)},{'null' if h.lender is None else _spec_json(h.lender)},{_number(h.took)},"
        f"{_number(h.lent)},{_number(h.period)},{_number(h.lender_period)}]"
        for h in held
    ]
    return f"[{','.join(parts)}]"


def _decode_held(text: str) -> list[Held]:
    out = []
    for bucket, lender, took, lent, period, lender_period in json.loads(text):
        out.append(
            Held(
                _spec_of(bucket),
                _spec_of(lender) if lender is not None else None,
                took,
                lent,
                period,
                lender_period,
            )
        )
    return out


class _Local(threading.local):
    conn: sqlite3.Connection | None = None
    cursor: sqlite3.Cursor | None = None  # reused by every write (saves a Cursor per statement)
    at_once: sqlite3.Cursor | None = None  # writes that must not wait (see SQLiteStore._at_once)


_WOULD_WAIT = object()
"""What :meth:`SQLiteStore._at_once` returns when a write could not start without waiting."""


class SQLiteStore:
    """Buckets and leases in a SQLite file that many processes of one machine share.

    Each thread gets its own connection (created on first use); a process-wide lock
    lets the threads of one process take turns for writes instead of spinning in
    SQLite's busy handler, and SQLite's write lock does the same between processes.
    Time comes from ``clock`` (the machine's clock is shared by its processes).

    Args:
        path: The database file (created with its tables if missing; the directory
            must exist). ``":memory:"`` is refused: use ``memory://`` for one process.
        clock: This process's time source (the guard passes its own; inject
            :class:`~budgetguard.clock.FakeClock` in tests). The store never uses a time
            past ``host_clock``, nor one before the latest time already used on the file.
        host_clock: The machine's clock, shared by every process on it (default: the
            system clock). Tests that drive time with a fake ``clock`` ahead of the real
            one pass the same fake here.
        busy_timeout: Seconds to wait for another process's write lock before raising
            :class:`~budgetguard.errors.StoreUnavailable`.
        synchronous: SQLite's ``synchronous`` setting. ``"NORMAL"`` (default) never
            corrupts the file and survives a crashed process; a power cut may undo the
            last few commits. ``"FULL"`` also survives that, at one fsync per write.
        retry: How transient lock refusals are retried.

    Raises:
        ConfigurationError: ``path`` is not a usable budget file (in-memory, not a
            SQLite database, or written by a newer schema).
        StoreUnavailable: The file cannot be opened or stays locked.

    Example:
        >>> store = SQLiteStore("/var/lib/myapp/budgets.db")  # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Clock | None = None,
        host_clock: Clock | None = None,
        busy_timeout: float = 30.0,
        synchronous: str = "NORMAL",
        retry: RetryPolicy | None = None,
    ) -> None:
        self.path = os.fspath(path)
        if self.path in ("", ":memory:") or self.path.startswith("file::memory:"):
            msg = (
                f"SQLiteStore needs a file path, got {self.path!r}; use memory:// (MemoryStore) for an in-process store"
            )
            raise ConfigurationError(msg)
        if not (busy_timeout >= 0):
            msg = f"busy_timeout must be >= 0 seconds, got {busy_timeout!r}"
            raise ConfigurationError(msg)
        if synchronous.upper() not in _SYNCHRONOUS:
            msg = f"synchronous must be one of {', '.join(_SYNCHRONOUS)}, got {synchronous!r}"
            raise ConfigurationError(msg)
        self.clock: Clock = clock or SystemClock()
        self.host_clock: Clock = host_clock or SystemClock()
        self.busy_timeout = float(busy_timeout)
        self.synchronous = synchronous.upper()
        self.retry = retry or RetryPolicy()
        self._local = _Local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._in_sql: dict[tuple[str, int], str] = {}
        # Reservation id -> (held JSON, decoded held) of leases this store wrote, used by
        # their settle only when the row read back has the very same text.
        self._memo: dict[str, tuple[str, list[Held]]] = {}
        _forget_connections_on_fork(self)
        # Open (and create) the file now so that a wrong path fails at start-up.
        self._run(lambda: self._connection() and None)

    # -- connections ----------------------------------------------------------------

    def _after_fork(self) -> None:
        # Connections must not cross fork(): the child opens its own (and must not
        # close the parent's, which would drop the parent's locks on some systems).
        self._local = _Local()
        self._conns = []
        self._conns_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._memo = {}

    def _connection(self) -> sqlite3.Connection:
        conn = self._local.conn
        if conn is None:
            conn = self._open()
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def _cursor(self) -> sqlite3.Cursor:
        cursor = self._local.cursor
        if cursor is None:
            cursor = self._local.cursor = self._connection().cursor()
        return cursor

    def _open(self, busy_timeout: float | None = None) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout if busy_timeout is None else busy_timeout,
            isolation_level=None,
            check_same_thread=False,
            cached_statements=64,
        )
        try:
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                self._migrate(conn, version)
        except sqlite3.DatabaseError as exc:
            conn.close()
            if not isinstance(exc, sqlite3.OperationalError) and "not a database" in str(exc):
                msg = (
                    f"SQLite store {self.path!r} is not a SQLite database; point sqlite:/// at a budgetguard store file"
                )
                raise ConfigurationError(msg) from exc
            raise
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection, version: int) -> None:
        """Create the tables in a new file, or bring a schema-1 file to this schema.

        Runs in one ``BEGIN IMMEDIATE`` transaction (the version is read again inside it:
        another process may have done the work first), so a crash leaves the old schema.
        """
        if version > SCHEMA_VERSION:
            msg = (
                f"SQLite store {self.path!r} has schema version {version}, newer than this budgetguard "
                f"understands ({SCHEMA_VERSION}); upgrade budgetguard or use another file"
            )
            raise ConfigurationError(msg)
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            if current < SCHEMA_VERSION:
                for statement in _SCHEMA:
                    conn.execute(statement)
                # The file's time starts at its creator's (a process whose clock lags can
                # then only lag behind it, never take the file's time back).
                conn.execute(_START_STORE_TIME, (self._clock_time(),))
                if current == 1:
                    for statement in _FROM_V1:
                        conn.execute(statement)
                columns = {row[1] for row in conn.execute("PRAGMA table_info(store)")}
                for column, statement in _ADD_COLUMNS.items():
                    if column not in columns:
                        conn.execute(statement)
                conn.execute(_FULL_AT_INDEX)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # -- running operations ---------------------------------------------------------

    def _describe(self, exc: BaseException) -> StoreUnavailable:
        cause = exc.cause if isinstance(exc, _Contended) else exc
        text = str(cause)
        where = f"SQLite store {self.path!r}"
        if _is_busy(cause):
            hint = (
                f"the file stayed locked by another connection for more than busy_timeout={self.busy_timeout:g} s; "
                "check for a process holding a long write transaction on it (an open sqlite3 shell, a backup "
                "tool) or raise busy_timeout"
            )
        elif "unable to open" in text:
            hint = "check that its directory exists and that this process may read and write there"
        elif "readonly" in text or "read-only" in text:
            hint = (
                "the file or its directory is read-only for this process; check permissions (WAL needs -wal/-shm files)"
            )
        elif "malformed" in text or "not a database" in text:
            hint = "the file is damaged; restore it from a backup or point the store at a new file"
        elif "disk" in text or "full" in text:
            hint = "check the disk (space, I/O errors) holding the file"
        else:
            hint = "check the file and the disk it is on"
        return StoreUnavailable(f"{where} cannot be used: {text}; {hint}")

    @staticmethod
    def _is_unavailable(exc: BaseException) -> bool:
        if isinstance(
            exc,
            (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError),
        ):
            return False
        return isinstance(exc, (sqlite3.DatabaseError, _Contended))

    @staticmethod
    def _is_transient(exc: BaseException) -> bool:
        return isinstance(exc, _Contended)

    def _run(self, fn: Callable[[], T]) -> T:
        return self.retry.call(
            fn,
            is_transient=self._is_transient,
            is_unavailable=self._is_unavailable,
            describe=self._describe,
        )

    def _write(self, body: Callable[..., T], *args: object) -> T:
        """Run ``body(cursor, now, *args)`` inside one ``BEGIN IMMEDIATE`` transaction.

        All of its statements run on the thread's one write cursor; the last one is
        always ``COMMIT`` or ``ROLLBACK``, so no read stays open between operations.
        """
        return self.retry.call(
            lambda: self._attempt(body, args),
            is_transient=self._is_transient,
            is_unavailable=self._is_unavailable,
            describe=self._describe,
        )

    def _attempt(self, body: Callable[..., T], args: tuple[object, ...]) -> T:
        lock = self._write_lock
        if not (lock.acquire(blocking=False) or (self.busy_timeout > 0 and lock.acquire(timeout=self.busy_timeout))):
            msg = "database is locked (another thread of this process held the write lock past busy_timeout)"
            raise sqlite3.OperationalError(msg)
        try:
            cursor = self._local.cursor
            if cursor is None:
                cursor = self._cursor()
            started = time.monotonic()
            try:
                cursor.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                # A refusal that came back without waiting is not another writer.
                if _is_busy(exc) and time.monotonic() - started < self.busy_timeout / 2:
                    raise _Contended(exc) from exc
                raise
            return self._committed(cursor, body, args)
        finally:
            lock.release()

    def _committed(self, cursor: sqlite3.Cursor, body: Callable[..., T], args: tuple[object, ...]) -> T:
        """Run ``body`` in the transaction just begun and commit it (rolled back on any failure)."""
        try:
            result = body(cursor, self._clock_time(), *args)  # time read while holding the lock
            cursor.execute("COMMIT")
        except BaseException:
            if cursor.connection.in_transaction:
                with contextlib.suppress(sqlite3.Error):  # the connection may be gone
                    cursor.execute("ROLLBACK")
            raise
        return result

    def _at_once(self, body: Callable[..., T], *args: object) -> T | object:
        """Run ``body`` like :meth:`_write`, on this thread, if it can start without waiting.

        For the async methods: a worker thread for every write makes the writes of a busy
        event loop queue for the GIL (the loop holds it for 5 ms at a time while the
        worker, which gives it up at every SQLite statement, needs it back a few times per
        write), so a thousand concurrent calls passed the store a few at a time. A write
        that can start at once (no other thread of this process is writing, SQLite's write
        lock is free) takes a few hundred microseconds of the loop instead, like the memory
        store's. Anything that would wait returns :data:`_WOULD_WAIT` (the caller then
        waits in a worker thread): this process's write lock held, SQLite's lock held by
        another process (this connection never waits for it), ``synchronous`` FULL or
        EXTRA (every commit waits for the disk), or an SQLite error (rolled back; the
        worker's attempt reports it). WAL mode does not sync a commit to disk (a
        checkpoint, every 1,000 pages or so, does).
        """
        if self.synchronous in ("FULL", "EXTRA"):
            return _WOULD_WAIT
        lock = self._write_lock
        if not lock.acquire(blocking=False):
            return _WOULD_WAIT
        try:
            cursor = self._local.at_once
            if cursor is None:
                conn = self._open(busy_timeout=0.0)
                with self._conns_lock:
                    self._conns.append(conn)
                cursor = self._local.at_once = conn.cursor()
            try:
                cursor.execute("BEGIN IMMEDIATE")
                return self._committed(cursor, body, args)
            except sqlite3.Error:  # busy, or an error the worker's attempt will report
                return _WOULD_WAIT
        finally:
            lock.release()

    def _clock_time(self) -> float:
        """This store's clock, but never past the host's (so a clock running ahead cannot
        refill, reset or expire anything early); see :func:`_store_time` for the floor."""
        return min(self.clock.now(), self.host_clock.now())

    # -- row helpers ----------------------------------------------------------------

    def _in_query(self, template: str, count: int) -> str:
        """``template`` with ``{marks}`` filled in for ``count`` keys (cached per count)."""
        sql = self._in_sql.get((template, count))
        if sql is None:
            sql = template.format(marks=", ".join("?" * count))
            self._in_sql[(template, count)] = sql
        return sql

    def _load(self, cursor: sqlite3.Cursor, keys: Iterable[str], buckets: Buckets) -> None:
        wanted = [k for k in keys if k not in buckets]
        if not wanted:
            return
        if len(wanted) == 1:
            row = cursor.execute(_SELECT_ONE, wanted).fetchone()
            buckets[wanted[0]] = BucketState(*row) if row is not None else None
            return
        for key in wanted:
            buckets[key] = None
        for key, level, updated_at, period_start, spent in cursor.execute(
            self._in_query(_SELECT_IN, len(wanted)), wanted
        ):
            buckets[key] = BucketState(level, updated_at, period_start, spent)

    def _load_with_meta(
        self, cursor: sqlite3.Cursor, keys: list[str], buckets: Buckets
    ) -> tuple[bool, float | None, float | None, int | None]:
        """Load ``keys`` into ``buckets`` and read the meta row, in one query.

        Returns:
            Whether the meta row exists, its ``next_expiry`` (``None``: no open lease),
            the store time (``None``: none recorded yet) and the journal's size (``None``
            or 0: empty).
        """
        rows = cursor.execute(self._in_query(_META_AND_BUCKETS, len(keys)), keys).fetchall()
        if not rows:  # no meta row: the caller sweeps, which writes it again
            self._load(cursor, keys, buckets)
            return False, None, None, None
        for key in keys:
            buckets[key] = None
        for _, _, _, key, level, updated_at, period_start, spent in rows:
            if key is not None:
                buckets[key] = BucketState(level, updated_at, period_start, spent)
        return True, rows[0][0], rows[0][1], rows[0][2]

    @staticmethod
    def _save(cursor: sqlite3.Cursor, now: float, touched: dict[str, BucketState], holds: _Holds) -> None:
        """Write the buckets an operation touched; ``holds``: per key, the holds it took
        (positive) or gave back (negative), and the spec (for when the bucket is full again)."""

        def row(key: str, s: BucketState) -> tuple[object, ...]:
            delta, spec = holds.get(key, (0, None))
            full_at = None
            if delta <= 0 and spec is not None:  # may be unheld now (_SAVE decides)
                wait = full_after(s, spec, now)
                full_at = None if wait is None else now + wait
            return (key, s.level, s.updated_at, s.period_start, s.spent, delta, full_at)

        if len(touched) == 1:
            for key, s in touched.items():
                cursor.execute(_SAVE, row(key, s))
        elif touched:
            cursor.executemany(_SAVE, [row(k, s) for k, s in touched.items()])

    @staticmethod
    def _getter(buckets: Buckets, touched: dict[str, BucketState], now: float) -> Callable[[BucketSpec], BucketState]:
        # Same contract as MemoryStore's: one refreshed object per key per phase.
        def get(spec: BucketSpec) -> BucketState:
            state = touched.get(spec.key)
            if state is None:
                state = refresh(buckets.get(spec.key), spec, now)
                touched[spec.key] = state
            return state

        return get

    def _sweep(self, cursor: sqlite3.Cursor, now: float, buckets: Buckets) -> tuple[float | None, int]:
        """Settle every due lease at its reserved amount into the journal; write the meta
        row (new bound, ``now``, the journal's size).

        Scans the leases (run only when the bound says one may be due).

        Returns:
            The new bound, and how many leases went into the journal.
        """
        due = cursor.execute(_DUE_LEASES, (now,)).fetchall()
        if due:
            leases = [(rid, _decode_held(held), meta) for rid, held, meta in due]
            expired = self._expire(cursor, now, leases, buckets)
            cursor.executemany(
                _JOURNAL_ADD, [(e.id, now, f"[{','.join(map(_number, e.amounts))}]", e.meta) for e in expired]
            )
        next_expiry = cursor.execute(_EARLIEST_LEASE).fetchone()[0]  # after the deletes: what is left
        cursor.execute(_WRITE_META, (next_expiry, now))
        return next_expiry, len(due)

    @staticmethod
    def _journal(cursor: sqlite3.Cursor) -> tuple[ExpiredLease, ...]:
        """The journal's oldest entries (at most ``JOURNAL_REPORT``)."""
        return tuple(
            ExpiredLease(rid, tuple(json.loads(amounts)), meta)
            for rid, amounts, meta in cursor.execute(_JOURNAL, (JOURNAL_REPORT,))
        )

    def _expire(
        self, cursor: sqlite3.Cursor, now: float, leases: list[tuple[str, list[Held], str]], buckets: Buckets
    ) -> tuple[ExpiredLease, ...]:
        """Charge ``leases`` at their reserved amounts and delete them."""
        self._load(cursor, {k: None for _, held, _ in leases for k in bucket_keys(held)}, buckets)
        touched: dict[str, BucketState] = {}
        get = self._getter(buckets, touched, now)
        expired = tuple(ExpiredLease(rid, apply_settle(get, held, None), meta) for rid, held, meta in leases)
        buckets.update(touched)
        holds: _Holds = {}
        for _, held, _ in leases:
            _count_holds(held, -1, holds)
        self._save(cursor, now, touched, holds)
        cursor.executemany(_DELETE_LEASE, [(rid,) for rid, _, _ in leases])
        for rid, _, _ in leases:
            self._memo.pop(rid, None)
        return expired

    # -- protocol -------------------------------------------------------------------

    def reserve(self, request: ReserveRequest) -> ReserveResult:
        """Reserve all charges or none in one transaction; also sweeps expired leases.

        Raises:
            ValueError: A reservation with this id is open.
            StoreUnavailable: The file cannot be used (see :class:`SQLiteStore`).
        """
        return self._write(self._reserve, request)

    def _reserve(self, cursor: sqlite3.Cursor, now: float, request: ReserveRequest) -> ReserveResult:
        buckets: Buckets = {}
        keys = bucket_keys(request.charges)
        has_meta, next_expiry, stored_time, journal = self._load_with_meta(cursor, keys, buckets)
        now, later = _store_time(now, stored_time)
        if not has_meta or (next_expiry is not None and next_expiry <= now):
            next_expiry, swept = self._sweep(cursor, now, buckets)  # writes the meta row
            later = False
            journal = (journal or 0) + swept if has_meta else 1  # a lost meta row lost the count: look
        expired = self._journal(cursor) if journal else ()
        touched: dict[str, BucketState] = {}
        outcome = apply_reserve(self._getter(buckets, touched, now), request.charges, now)
        if not isinstance(outcome, list):
            if cursor.execute(_IS_OPEN, (request.id,)).fetchone():
                _duplicate(request.id)
            if later:
                cursor.execute(_SET_STORE_TIME, (now,))
            return ReserveResult(False, outcome, expired)
        self._save(cursor, now, touched, _count_holds(outcome, 1, {}))
        expires_at = now + request.lease_seconds
        held = _encode_held(outcome)
        try:
            first_key = request.charges[0].bucket.key
            cursor.execute(_INSERT_LEASE, (request.id, expires_at, held, request.meta_text(), first_key))
        except sqlite3.IntegrityError:
            _duplicate(request.id)
        if next_expiry is None or expires_at < next_expiry:
            cursor.execute(_SET_BOUND, (expires_at, now))
        elif later:
            cursor.execute(_SET_STORE_TIME, (now,))
        self._remember(request.id, held, outcome)
        return ReserveResult(True, None, expired) if expired else _RESERVED

    def _remember(self, reservation_id: str, text: str, held: list[Held]) -> None:
        memo = self._memo
        if len(memo) >= _MEMO_SIZE:  # leases settled elsewhere or swept would pile up
            del memo[next(iter(memo))]
        memo[reservation_id] = (text, held)

    def settle(self, reservation_id: str, actuals: Sequence[float] | None) -> bool:
        """Settle once; later calls for the same id (or after expiry) return ``False``.

        Raises:
            ValueError: ``actuals`` has fewer amounts than the reservation has charges
                (nothing is changed).
        """
        return self._write(self._settle, reservation_id, actuals)

    def _settle(
        self,
        cursor: sqlite3.Cursor,
        now: float,
        reservation_id: str,
        actuals: Sequence[float] | None,
    ) -> bool:
        # The lease's held, remembered if this store wrote it: used only for that very text.
        known = self._memo.pop(reservation_id, None)
        row = cursor.execute(_LEASE_AND_BUCKET, (reservation_id,)).fetchone()
        if row is None:
            return False
        text, first_key, level, updated_at, period_start, spent, stored_time = row
        held = known[1] if known is not None and known[0] == text else _decode_held(text)
        if actuals is not None and len(actuals) < len(held):
            msg = f"settle({reservation_id!r}) got {len(actuals)} actual amounts for {len(held)} charges"
            raise ValueError(msg)  # nothing was changed
        now, later = _store_time(now, stored_time)
        if later:
            cursor.execute(_SET_STORE_TIME, (now,))
        cursor.execute(_DELETE_LEASE, (reservation_id,))
        buckets: Buckets = {}
        if first_key is not None:
            buckets[first_key] = None if level is None else BucketState(level, updated_at, period_start, spent)
        self._load(cursor, bucket_keys(held), buckets)
        touched: dict[str, BucketState] = {}
        apply_settle(self._getter(buckets, touched, now), held, actuals)
        self._save(cursor, now, touched, _count_holds(held, -1, {}))
        cursor.execute(_FORGET, (now, _FORGET_PER_SETTLE))
        return True

    def snapshot(self, spec: BucketSpec) -> BucketState:
        """Return the bucket as of now (full if never used); reads never wait for writers."""

        def read() -> BucketState:
            row = self._connection().execute(_BUCKET_AND_TIME, (spec.key,)).fetchone()
            if row is None:  # a bucket never used: the store time alone
                meta = self._connection().execute(_META).fetchone()
                row = (None, None, None, None, meta[1] if meta is not None else None)
            now = _store_time(self._clock_time(), row[4])[0]
            return refresh(BucketState(*row[:4]) if row[0] is not None else None, spec, now)

        return self._run(read)

    def sweep(self) -> tuple[ExpiredLease, ...]:
        """Settle expired leases at their reserved amounts into the journal and report it;
        forget up to 1,000 full buckets that no lease holds."""

        def body(cursor: sqlite3.Cursor, now: float) -> tuple[ExpiredLease, ...]:
            row = cursor.execute(_META).fetchone()
            if row is None:  # a lost meta row: the sweep writes it again; its count was lost: look
                self._sweep(cursor, now, {})
                journal = 1
            else:
                now = _store_time(now, row[1])[0]
                journal = row[2] or 0
                if row[0] is not None and row[0] <= now:  # the bound says a lease may be due
                    journal += self._sweep(cursor, now, {})[1]
            cursor.execute(_FORGET, (now, _FORGET_PER_SWEEP))
            return self._journal(cursor) if journal else ()

        return self._write(body)

    def acknowledge(self, ids: Sequence[str]) -> None:
        """Drop these entries from the journal (their records are stored); one transaction."""
        if ids:
            self._write(self._acknowledge, ids)

    @staticmethod
    def _acknowledge(cursor: sqlite3.Cursor, now: float, ids: Sequence[str]) -> None:
        cursor.executemany(_JOURNAL_DROP, [(rid,) for rid in ids])
        if cursor.rowcount:  # else another process acknowledged them first
            cursor.execute(_RECOUNT_JOURNAL)

    def open_reservations(self) -> int:
        """How many reservations are reserved and not yet settled or swept."""
        return self._run(lambda: int(self._connection().execute(_COUNT_LEASES).fetchone()[0]))

    def close(self) -> None:
        """Close every connection this store opened (it reopens them if used again)."""
        with self._conns_lock:
            conns, self._conns = self._conns, []
        self._local = _Local()
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # The async twins write on the loop's thread when that needs no waiting (_at_once),
    # else in a worker thread (one connection each); reads go to a worker thread.

    async def areserve(self, request: ReserveRequest) -> ReserveResult:
        """Async :meth:`reserve`: at once if no other writer is busy, else in a worker thread."""
        result = self._at_once(self._reserve, request)
        if result is _WOULD_WAIT:
            return await asyncio.to_thread(self.reserve, request)
        return cast(ReserveResult, result)

    async def asettle(self, reservation_id: str, actuals: Sequence[float] | None) -> bool:
        """Async :meth:`settle`: at once if no other writer is busy, else in a worker thread."""
        result = self._at_once(self._settle, reservation_id, actuals)
        if result is _WOULD_WAIT:
            return await asyncio.to_thread(self.settle, reservation_id, actuals)
        return cast(bool, result)

    async def asnapshot(self, spec: BucketSpec) -> BucketState:
        """Async :meth:`snapshot` (runs in a worker thread)."""
        return await asyncio.to_thread(self.snapshot, spec)

    async def asweep(self) -> tuple[ExpiredLease, ...]:
        """Async :meth:`sweep` (runs in a worker thread)."""
        return await asyncio.to_thread(self.sweep)

    async def aacknowledge(self, ids: Sequence[str]) -> None:
        """Async :meth:`acknowledge`: at once if no other writer is busy, else in a worker thread."""
        if ids and self._at_once(self._acknowledge, ids) is _WOULD_WAIT:
            await asyncio.to_thread(self.acknowledge, ids)

    async def aclose(self) -> None:
        """Async :meth:`close`."""
        self.close()

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"


def _store_time(clock_time: float, stored: float | None) -> tuple[float, bool]:
    """The time an operation uses: ``clock_time``, but never before the store time already
    recorded in the file. Returns it and whether it moves the recorded time forward."""
    if stored is None or clock_time > stored:
        return clock_time, True
    return stored, False


def _duplicate(reservation_id: str) -> None:
    msg = f"reservation id {reservation_id!r} is already open"
    raise ValueError(msg)


def _forget_connections_on_fork(store: SQLiteStore) -> None:
    if not hasattr(os, "register_at_fork"):  # pragma: no cover - Windows
        return
    ref = weakref.ref(store)

    def after_in_child() -> None:
        alive = ref()
        if alive is not None:
            alive._after_fork()

    os.register_at_fork(after_in_child=after_in_child)
