"""SQLite store: buckets and leases in one file, shared by the processes of one machine.

Every write is one ``BEGIN IMMEDIATE`` transaction that runs the pure functions of
:mod:`.base` on the rows it touches, so the arithmetic is the memory store's, and
processes take turns through SQLite's write lock (WAL mode: readers never wait).

Layout (``PRAGMA user_version`` holds the schema version)::

    buckets(key PRIMARY KEY, level, updated_at, period_start, spent)
    leases(id PRIMARY KEY, held JSON, expires_at, meta)   + index on expires_at

``held`` keeps, per charge, the bucket specs and amounts the reservation took, so any
process can settle or sweep it later.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from budgetguard.clock import Clock, SystemClock
from budgetguard.errors import ConfigurationError, StoreUnavailable
from budgetguard.stores._retry import RetryPolicy
from budgetguard.stores.base import (
    BucketSpec,
    BucketState,
    ExpiredLease,
    Held,
    ReserveRequest,
    ReserveResult,
    apply_reserve,
    apply_settle,
    refresh,
)

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

T = TypeVar("T")

SCHEMA_VERSION = 1
"""Stored in ``PRAGMA user_version``; a file written by a newer budgetguard is refused."""

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS buckets ("
    " key TEXT PRIMARY KEY, level REAL NOT NULL, updated_at REAL NOT NULL,"
    " period_start REAL, spent REAL NOT NULL DEFAULT 0) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS leases ("
    " id TEXT PRIMARY KEY, held TEXT NOT NULL, expires_at REAL NOT NULL,"
    " meta TEXT NOT NULL DEFAULT '') WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS leases_by_expiry ON leases (expires_at)",
)

_SELECT_ONE = "SELECT key, level, updated_at, period_start, spent FROM buckets WHERE key = ?"
_UPSERT = (
    "INSERT INTO buckets (key, level, updated_at, period_start, spent) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (key) DO UPDATE SET level = excluded.level, updated_at = excluded.updated_at,"
    " period_start = excluded.period_start, spent = excluded.spent"
)
_DUE = "SELECT id, held, meta FROM leases WHERE expires_at <= ? ORDER BY expires_at, id"
_INSERT_LEASE = "INSERT INTO leases (id, held, expires_at, meta) VALUES (?, ?, ?, ?)"
_TAKE_LEASE = "DELETE FROM leases WHERE id = ? RETURNING held"
_DELETE_LEASE = "DELETE FROM leases WHERE id = ?"

_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")

Buckets = dict[str, "BucketState | None"]


class _Contended(Exception):
    """SQLite refused a lock without waiting (e.g. WAL recovery): worth another attempt."""

    def __init__(self, cause: sqlite3.OperationalError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _is_busy(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _spec_row(spec: BucketSpec) -> list[object]:
    return [spec.key, spec.capacity, spec.refill_per_second, spec.period_start, spec.period_end]


def _encode_held(held: Sequence[Held]) -> str:
    # json writes floats with repr(): they read back bit for bit.
    return json.dumps(
        [
            [
                _spec_row(h.bucket),
                _spec_row(h.lender) if h.lender is not None else None,
                h.took,
                h.lent,
                h.period,
                h.lender_period,
            ]
            for h in held
        ],
        separators=(",", ":"),
    )


def _decode_held(text: str) -> list[Held]:
    out = []
    for bucket, lender, took, lent, period, lender_period in json.loads(text):
        out.append(
            Held(
                BucketSpec(*bucket),
                BucketSpec(*lender) if lender is not None else None,
                took,
                lent,
                period,
                lender_period,
            )
        )
    return out


def _held_keys(held: Iterable[Held]) -> set[str]:
    keys = set()
    for h in held:
        keys.add(h.bucket.key)
        if h.lender is not None:
            keys.add(h.lender.key)
    return keys


class _Local(threading.local):
    conn: sqlite3.Connection | None = None


class SQLiteStore:
    """Buckets and leases in a SQLite file that many processes of one machine share.

    Each thread gets its own connection (created on first use); a process-wide lock
    lets the threads of one process take turns for writes instead of spinning in
    SQLite's busy handler, and SQLite's write lock does the same between processes.
    Time comes from ``clock`` (the machine's clock is shared by its processes).

    Args:
        path: The database file (created with its tables if missing; the directory
            must exist). ``":memory:"`` is refused: use ``memory://`` for one process.
        clock: Time source (inject :class:`~budgetguard.clock.FakeClock` in tests).
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
        self.busy_timeout = float(busy_timeout)
        self.synchronous = synchronous.upper()
        self.retry = retry or RetryPolicy()
        self._local = _Local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._in_sql: dict[int, str] = {}
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

    def _connection(self) -> sqlite3.Connection:
        conn = self._local.conn
        if conn is None:
            conn = self._open()
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False, cached_statements=64
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
        if version > SCHEMA_VERSION:
            msg = (
                f"SQLite store {self.path!r} has schema version {version}, newer than this budgetguard "
                f"understands ({SCHEMA_VERSION}); upgrade budgetguard or use another file"
            )
            raise ConfigurationError(msg)
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("PRAGMA user_version").fetchone()[0] == 0:  # another process may have won
                for statement in _SCHEMA:
                    conn.execute(statement)
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
        if isinstance(exc, (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)):
            return False
        return isinstance(exc, (sqlite3.DatabaseError, _Contended))

    @staticmethod
    def _is_transient(exc: BaseException) -> bool:
        return isinstance(exc, _Contended)

    def _run(self, fn: Callable[[], T]) -> T:
        return self.retry.call(
            fn, is_transient=self._is_transient, is_unavailable=self._is_unavailable, describe=self._describe
        )

    def _write(self, body: Callable[[sqlite3.Connection, float], T]) -> T:
        """Run ``body(conn, now)`` inside one ``BEGIN IMMEDIATE`` transaction."""

        def attempt() -> T:
            lock = self._write_lock
            if not (lock.acquire(timeout=self.busy_timeout) if self.busy_timeout > 0 else lock.acquire(blocking=False)):
                msg = "database is locked (another thread of this process held the write lock past busy_timeout)"
                raise sqlite3.OperationalError(msg)
            try:
                conn = self._connection()
                started = time.monotonic()
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError as exc:
                    # A refusal that came back without waiting is not another writer.
                    if _is_busy(exc) and time.monotonic() - started < self.busy_timeout / 2:
                        raise _Contended(exc) from exc
                    raise
                try:
                    result = body(conn, self.clock.now())  # time read while holding the lock
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):  # the connection may be gone
                            conn.execute("ROLLBACK")
                    raise
                return result
            finally:
                lock.release()

        return self._run(attempt)

    # -- row helpers ----------------------------------------------------------------

    def _load(self, conn: sqlite3.Connection, keys: Iterable[str], buckets: Buckets) -> None:
        wanted = [k for k in keys if k not in buckets]
        if not wanted:
            return
        if len(wanted) == 1:
            rows = conn.execute(_SELECT_ONE, wanted).fetchall()
        else:
            sql = self._in_sql.get(len(wanted))
            if sql is None:
                marks = ", ".join("?" * len(wanted))
                sql = f"SELECT key, level, updated_at, period_start, spent FROM buckets WHERE key IN ({marks})"
                self._in_sql[len(wanted)] = sql
            rows = conn.execute(sql, wanted).fetchall()
        for key in wanted:
            buckets[key] = None
        for key, level, updated_at, period_start, spent in rows:
            buckets[key] = BucketState(level, updated_at, period_start, spent)

    @staticmethod
    def _save(conn: sqlite3.Connection, touched: dict[str, BucketState]) -> None:
        rows = [(k, s.level, s.updated_at, s.period_start, s.spent) for k, s in touched.items()]
        if len(rows) == 1:
            conn.execute(_UPSERT, rows[0])
        elif rows:
            conn.executemany(_UPSERT, rows)

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

    def _sweep_due(self, conn: sqlite3.Connection, now: float, buckets: Buckets) -> tuple[ExpiredLease, ...]:
        rows = conn.execute(_DUE, (now,)).fetchall()  # an index probe when nothing is due
        if not rows:
            return ()
        leases = [(rid, _decode_held(held), meta) for rid, held, meta in rows]
        self._load(conn, {k for _, held, _ in leases for k in _held_keys(held)}, buckets)
        touched: dict[str, BucketState] = {}
        get = self._getter(buckets, touched, now)
        expired = tuple(ExpiredLease(rid, apply_settle(get, held, None), meta) for rid, held, meta in leases)
        buckets.update(touched)
        self._save(conn, touched)
        conn.executemany(_DELETE_LEASE, [(rid,) for rid, _, _ in leases])
        return expired

    # -- protocol -------------------------------------------------------------------

    def reserve(self, request: ReserveRequest) -> ReserveResult:
        """Reserve all charges or none in one transaction; also sweeps expired leases.

        Raises:
            ValueError: A reservation with this id is open.
            StoreUnavailable: The file cannot be used (see :class:`SQLiteStore`).
        """

        def body(conn: sqlite3.Connection, now: float) -> ReserveResult:
            buckets: Buckets = {}
            expired = self._sweep_due(conn, now, buckets)
            keys = []
            for charge in request.charges:
                keys.append(charge.bucket.key)
                if charge.lender is not None:
                    keys.append(charge.lender.key)
            self._load(conn, keys, buckets)
            touched: dict[str, BucketState] = {}
            outcome = apply_reserve(self._getter(buckets, touched, now), request.charges, now)
            if not isinstance(outcome, list):
                if conn.execute("SELECT 1 FROM leases WHERE id = ?", (request.id,)).fetchone():
                    _duplicate(request.id)
                return ReserveResult(False, outcome, expired)
            self._save(conn, touched)
            try:
                conn.execute(
                    _INSERT_LEASE, (request.id, _encode_held(outcome), now + request.lease_seconds, request.meta)
                )
            except sqlite3.IntegrityError:
                _duplicate(request.id)
            return ReserveResult(True, None, expired)

        return self._write(body)

    def settle(self, reservation_id: str, actuals: Sequence[float] | None) -> bool:
        """Settle once; later calls for the same id (or after expiry) return ``False``.

        Raises:
            ValueError: ``actuals`` has fewer amounts than the reservation has charges
                (nothing is changed).
        """

        def body(conn: sqlite3.Connection, now: float) -> bool:
            rows = conn.execute(_TAKE_LEASE, (reservation_id,)).fetchall()
            if not rows:
                return False
            held = _decode_held(rows[0][0])
            if actuals is not None and len(actuals) < len(held):
                msg = f"settle({reservation_id!r}) got {len(actuals)} actual amounts for {len(held)} charges"
                raise ValueError(msg)  # rolls the delete back
            buckets: Buckets = {}
            self._load(conn, _held_keys(held), buckets)
            touched: dict[str, BucketState] = {}
            apply_settle(self._getter(buckets, touched, now), held, actuals)
            self._save(conn, touched)
            return True

        return self._write(body)

    def snapshot(self, spec: BucketSpec) -> BucketState:
        """Return the bucket as of now (full if never used); reads never wait for writers."""

        def read() -> BucketState:
            row = self._connection().execute(_SELECT_ONE, (spec.key,)).fetchone()
            state = BucketState(row[1], row[2], row[3], row[4]) if row is not None else None
            return refresh(state, spec, self.clock.now())

        return self._run(read)

    def sweep(self) -> tuple[ExpiredLease, ...]:
        """Settle expired leases at their reserved amounts and report each once."""
        return self._write(lambda conn, now: self._sweep_due(conn, now, {}))

    def open_reservations(self) -> int:
        """How many reservations are reserved and not yet settled or swept."""
        return self._run(lambda: int(self._connection().execute("SELECT count(*) FROM leases").fetchone()[0]))

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

    # The async twins run the blocking work in a worker thread (one connection each).

    async def areserve(self, request: ReserveRequest) -> ReserveResult:
        """Async :meth:`reserve` (runs in a worker thread)."""
        return await asyncio.to_thread(self.reserve, request)

    async def asettle(self, reservation_id: str, actuals: Sequence[float] | None) -> bool:
        """Async :meth:`settle` (runs in a worker thread)."""
        return await asyncio.to_thread(self.settle, reservation_id, actuals)

    async def asnapshot(self, spec: BucketSpec) -> BucketState:
        """Async :meth:`snapshot` (runs in a worker thread)."""
        return await asyncio.to_thread(self.snapshot, spec)

    async def asweep(self) -> tuple[ExpiredLease, ...]:
        """Async :meth:`sweep` (runs in a worker thread)."""
        return await asyncio.to_thread(self.sweep)

    async def aclose(self) -> None:
        """Async :meth:`close`."""
        self.close()

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"


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
