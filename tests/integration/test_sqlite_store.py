"""SQLite-specific behaviour the store contract does not see.

* A file written by schema 1 (tables ``buckets`` and ``leases`` + expiry index) is
  migrated in place: buckets, open leases and their expiries carry over, once, even when
  several stores open it at the same time.
* The ``next_expiry`` bound that lets a reserve skip the lease scan is shared through
  the file: a lease written by another store (another process) is still swept on time,
  a stale bound only costs a scan, and a missing bound row is rebuilt.
* Processes with short leases, some abandoned: every lease is settled or swept and
  reported (until acknowledged), and the books balance.
* The journal of swept leases: a schema-4 file gains it in place; its size rides on the
  meta row, so a reserve runs no query for it while it is empty.
* The lease encoding writes exactly what ``json.dumps`` wrote (schema-1 leases read
  back unchanged) and floats round-trip bit for bit.
* Async writes run on the event loop's thread when they need not wait, and in a worker
  thread when another thread is writing or ``synchronous`` is FULL.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from budgetguard.clock import FakeClock
from budgetguard.periods import PeriodRule
from budgetguard.stores import BucketSpec, Charge, ExpiredLease, ReserveRequest
from budgetguard.stores.base import JOURNAL_REPORT, Held
from budgetguard.stores.sqlite import (
    SCHEMA_VERSION,
    SQLiteStore,
    _decode_held,
    _encode_held,
)

T0 = 1_700_000_000.0
TEAM = BucketSpec("team\x1fteam=search", 100.0, 0.5)
POOL = BucketSpec("company-pool", 1000.0)
TEAM_BIG = BucketSpec("team-big", 1e12)
POOL_BIG = BucketSpec("pool-big", 1e12)

# Schema 1, as budgetguard 0.1.0 wrote it.
V1_SCHEMA = (
    (
        "CREATE TABLE buckets (key TEXT PRIMARY KEY, level REAL NOT NULL, updated_at REAL NOT NULL,"
        " period_start REAL, spent REAL NOT NULL DEFAULT 0) WITHOUT ROWID"
    ),
    (
        "CREATE TABLE leases (id TEXT PRIMARY KEY, held TEXT NOT NULL, expires_at REAL NOT NULL,"
        " meta TEXT NOT NULL DEFAULT '') WITHOUT ROWID"
    ),
    "CREATE INDEX leases_by_expiry ON leases (expires_at)",
    "PRAGMA user_version = 1",
)


def v1_held(spec: BucketSpec, took: float, lender: BucketSpec | None = None, lent: float = 0.0) -> str:
    """A lease's ``held`` column as schema 1 wrote it (period bounds where a rule is now)."""

    def row(s: BucketSpec) -> list[object]:
        return [s.key, s.capacity, s.refill_per_second, None, None]

    return json.dumps(
        [[row(spec), row(lender) if lender else None, took, lent, None, None]],
        separators=(",", ":"),
    )


def write_v1_file(path: Path) -> None:
    """A schema-1 file: two buckets, a lease due at T0 + 10 and one due at T0 + 600."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    for statement in V1_SCHEMA:
        conn.execute(statement)
    conn.execute("INSERT INTO buckets VALUES (?, ?, ?, ?, ?)", (TEAM.key, 0.0, T0, None, 12.5))
    conn.execute("INSERT INTO buckets VALUES (?, ?, ?, ?, ?)", (POOL.key, 970.0, T0, None, 0.0))
    conn.execute(
        "INSERT INTO leases VALUES (?, ?, ?, ?)", ("soon", v1_held(TEAM, 60.0, POOL, 30.0), T0 + 10, '{"w": 1}')
    )
    conn.execute("INSERT INTO leases VALUES (?, ?, ?, ?)", ("later", v1_held(TEAM, 10.0), T0 + 600, ""))
    conn.close()


def next_expiry(path: Path) -> Any:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT expires_at FROM store WHERE kind = 0 AND key = 'next_expiry'").fetchall()
    return rows[0][0] if rows else "missing"


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}


# -- migration from schema 1 ------------------------------------------------------------


def test_schema_1_file_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    write_v1_file(path)
    clock = FakeClock(start=T0)
    with SQLiteStore(path, clock=clock) as store:
        assert tables(path) == {"store", "store_full_at"}  # the old tables and their index are gone
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        assert next_expiry(path) == T0 + 10
        team = store.snapshot(TEAM)
        assert (team.level, team.spent) == (0.0, 12.5)
        assert store.snapshot(POOL).level == 970.0
        assert store.open_reservations() == 2
        clock.advance(11)  # "soon" is due; its bound says so without a scan of its own
        result = store.reserve(ReserveRequest("new", (Charge(POOL, 1.0),), 60.0))
        assert result.expired == (ExpiredLease("soon", (90.0,), '{"w": 1}'),)
        assert store.settle("later", [4.0])  # a schema-1 lease settles like any other
        assert store.settle("new", [1.0])
        team, pool = store.snapshot(TEAM), store.snapshot(POOL)
        assert (team.spent, pool.spent) == (12.5 + 60.0 + 4.0, 30.0 + 1.0)
        assert store.open_reservations() == 0


# Schema 3, as budgetguard wrote it before buckets were forgotten (no holds, no full_at).
V3_SCHEMA = (
    (
        "CREATE TABLE store (kind INTEGER NOT NULL, key TEXT NOT NULL,"
        " level REAL, updated_at REAL, period_start REAL, spent REAL,"
        " expires_at REAL, held TEXT, meta TEXT, bucket TEXT,"
        " PRIMARY KEY (kind, key)) WITHOUT ROWID"
    ),
    "PRAGMA user_version = 3",
)


def test_schema_3_file_gains_the_forgetting_columns_in_place(tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    held = json.dumps([[[TEAM.key, 100.0, 0.5, None], None, 10.0, 0.0, None, None]], separators=(",", ":"))
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    for statement in V3_SCHEMA:
        conn.execute(statement)
    conn.execute("INSERT INTO store (kind, key, expires_at, updated_at) VALUES (0, 'next_expiry', ?, ?)", (T0 + 600, T0))
    conn.execute("INSERT INTO store (kind, key, level, updated_at, period_start, spent) VALUES (1, ?, 90.0, ?, NULL, 5.0)", (TEAM.key, T0))
    conn.execute("INSERT INTO store (kind, key, expires_at, held, meta, bucket) VALUES (2, 'open', ?, ?, '', ?)", (T0 + 600, held, TEAM.key))
    conn.close()
    clock = FakeClock(start=T0)
    with SQLiteStore(path, clock=clock, host_clock=clock) as store:
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
            columns = {row[1] for row in conn.execute("PRAGMA table_info(store)")}
        assert {"holds", "full_at"} <= columns
        assert tables(path) == {"store", "store_full_at"}
        assert (store.snapshot(TEAM).level, store.snapshot(TEAM).spent) == (90.0, 5.0)
        assert store.settle("open", [10.0])  # a lease written before holds were counted
        assert store.snapshot(TEAM).level == 90.0
        clock.advance(20)  # 10 tokens at 0.5/s: full again
        assert store.reserve(ReserveRequest("other", (Charge(POOL, 1.0),), 60.0)).ok
        assert store.settle("other", [1.0])  # forgets TEAM, full and unheld
        with sqlite3.connect(path) as conn:
            keys = {key for (key,) in conn.execute("SELECT key FROM store WHERE kind = 1")}
        assert keys == {POOL.key}  # POOL never refills: kept
        assert store.snapshot(TEAM).level == 100.0


# Schema 4, as budgetguard wrote it before the journal of swept leases.
V4_SCHEMA = (
    (
        "CREATE TABLE store (kind INTEGER NOT NULL, key TEXT NOT NULL,"
        " level REAL, updated_at REAL, period_start REAL, spent REAL,"
        " expires_at REAL, held TEXT, meta TEXT, bucket TEXT, holds INTEGER, full_at REAL,"
        " PRIMARY KEY (kind, key)) WITHOUT ROWID"
    ),
    "CREATE INDEX store_full_at ON store (full_at) WHERE full_at IS NOT NULL",
    "PRAGMA user_version = 4",
)


def test_schema_4_file_gains_the_journal_in_place(tmp_path: Path) -> None:
    """A lease left open by the old version is swept into the journal, reported to every
    process until acknowledged."""
    path = tmp_path / "v4.db"
    held = json.dumps([[[TEAM.key, 100.0, 0.5, None], None, 10.0, 0.0, None, None]], separators=(",", ":"))
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    for statement in V4_SCHEMA:
        conn.execute(statement)
    conn.execute("INSERT INTO store (kind, key, expires_at, updated_at) VALUES (0, 'next_expiry', ?, ?)", (T0 + 10, T0))
    conn.execute(
        "INSERT INTO store (kind, key, level, updated_at, period_start, spent, holds) VALUES (1, ?, 90.0, ?, NULL, 5.0, 1)",
        (TEAM.key, T0),
    )
    conn.execute("INSERT INTO store (kind, key, expires_at, held, meta, bucket) VALUES (2, 'old', ?, ?, 'm', ?)", (T0 + 10, held, TEAM.key))
    conn.close()
    clock = FakeClock(start=T0)
    with SQLiteStore(path, clock=clock, host_clock=clock) as store, SQLiteStore(path, clock=clock, host_clock=clock) as other:
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        clock.advance(11)
        swept = (ExpiredLease("old", (10.0,), "m"),)
        assert store.reserve(ReserveRequest("new", (Charge(POOL, 1.0),), 60.0)).expired == swept
        assert other.sweep() == swept
        assert store.snapshot(TEAM).spent == 15.0  # charged once
        other.acknowledge(["old"])
        assert store.sweep() == other.sweep() == ()
        with sqlite3.connect(path) as conn:
            assert conn.execute("SELECT count(*) FROM store WHERE kind = 3").fetchone()[0] == 0


def test_an_empty_journal_costs_a_reserve_no_query(tmp_path: Path) -> None:
    """The journal's size is read with the meta row the reserve reads anyway: a query for the
    journal's entries runs only while it holds some."""
    clock = FakeClock(start=T0)
    with SQLiteStore(tmp_path / "j.db", clock=clock, host_clock=clock) as store:
        statements: list[str] = []
        store._connection().set_trace_callback(statements.append)

        def pair(rid: str, lease: float = 600.0) -> list[str]:
            statements.clear()
            result = store.reserve(ReserveRequest(rid, (Charge(POOL, 1.0),), lease))
            store.settle(rid, [1.0])
            assert result.ok
            return [sql for sql in statements if "kind = 3" in sql]

        assert pair("a") == []
        assert store.reserve(ReserveRequest("dies", (Charge(POOL, 1.0),), 1.0)).ok
        clock.advance(2)
        read = "SELECT key, held, meta FROM store WHERE kind = 3"
        swept = pair("b")  # swept "dies" into the journal (counting it), then read it
        assert len(swept) == 2 and swept[0].startswith("REPLACE") and swept[1].startswith(read)
        assert [sql[: len(read)] for sql in pair("c")] == [read]  # not acknowledged: read again
        with sqlite3.connect(tmp_path / "j.db") as conn:
            assert conn.execute("SELECT holds FROM store WHERE kind = 0").fetchone()[0] == 1
        store.acknowledge(["dies"])
        assert pair("d") == []
        with sqlite3.connect(tmp_path / "j.db") as conn:
            assert conn.execute("SELECT holds FROM store WHERE kind = 0").fetchone()[0] == 0


def test_concurrent_openers_migrate_once(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    write_v1_file(path)
    errors: list[BaseException] = []
    stores: list[SQLiteStore] = []
    lock = threading.Lock()

    def open_one() -> None:
        try:
            store = SQLiteStore(path, clock=FakeClock(start=T0))
            with lock:
                stores.append(store)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert stores[0].open_reservations() == 2
    assert stores[0].snapshot(TEAM).spent == 12.5
    for store in stores:
        store.close()


def test_a_schema_1_writer_cannot_write_to_a_migrated_file(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    write_v1_file(path)
    SQLiteStore(path).close()
    with sqlite3.connect(path) as conn, pytest.raises(sqlite3.OperationalError, match="no such table"):
        conn.execute("UPDATE buckets SET spent = spent + 1")  # what an old process would run


# -- the next_expiry bound ---------------------------------------------------------------


def test_bound_follows_the_earliest_open_lease(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    clock = FakeClock(start=T0)
    with SQLiteStore(path, clock=clock) as store:
        assert next_expiry(path) is None  # no lease open
        assert store.reserve(ReserveRequest("a", (Charge(TEAM, 1.0),), 60.0)).ok
        assert next_expiry(path) == T0 + 60
        assert store.reserve(ReserveRequest("b", (Charge(TEAM, 1.0),), 600.0)).ok
        assert next_expiry(path) == T0 + 60  # a later lease leaves it alone
        assert store.reserve(ReserveRequest("c", (Charge(TEAM, 1.0),), 5.0)).ok
        assert next_expiry(path) == T0 + 5  # a sooner one lowers it
        assert store.settle("c", [1.0]) and store.settle("a", [1.0])
        assert next_expiry(path) == T0 + 5  # stale but still a lower bound
        clock.advance(6)
        assert store.sweep() == ()  # the scan found nothing due ...
        assert next_expiry(path) == T0 + 600  # ... and tightened the bound
        assert store.settle("b", [1.0])
        clock.advance(600)
        assert store.reserve(ReserveRequest("d", (Charge(TEAM, 1.0),), 60.0)).ok
        assert next_expiry(path) == T0 + 606 + 60  # scanned (nothing left), then lowered to "d"


def test_lease_of_another_store_is_swept_on_time(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    clock = FakeClock(start=T0)
    mine, theirs = SQLiteStore(path, clock=clock), SQLiteStore(path, clock=clock)
    try:
        assert mine.reserve(ReserveRequest("long", (Charge(TEAM, 10.0),), 600.0)).ok
        assert theirs.reserve(ReserveRequest("short", (Charge(TEAM, 20.0),), 1.0, "m")).ok
        clock.advance(2)
        result = mine.reserve(ReserveRequest("next", (Charge(TEAM, 1.0),), 600.0))
        assert result.expired == (ExpiredLease("short", (20.0,), "m"),)
        assert theirs.sweep() == result.expired  # reported to every process until acknowledged
        mine.acknowledge(["short"])
        assert theirs.sweep() == ()
        assert not theirs.settle("short", [1.0])
    finally:
        mine.close()
        theirs.close()


def reserve_short_lease(path: str, start: float, ready: Any) -> None:
    """Child process: reserve a 1-second lease and exit without settling it."""
    store = SQLiteStore(path, clock=FakeClock(start=start))
    ready.put(store.reserve(ReserveRequest("child", (Charge(TEAM, 30.0),), 1.0, "from child")).ok)
    store.close()


def test_lease_written_by_another_process_is_swept(tmp_path: Path) -> None:
    path = tmp_path / "processes.db"
    clock = FakeClock(start=T0)
    with SQLiteStore(path, clock=clock) as store:
        assert store.reserve(ReserveRequest("mine", (Charge(TEAM, 10.0),), 600.0)).ok  # bound: T0 + 600
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Queue()
        child = ctx.Process(target=reserve_short_lease, args=(str(path), T0, ready))
        child.start()
        assert ready.get(timeout=60) is True
        child.join(30)
        assert next_expiry(path) == T0 + 1  # the child lowered the shared bound
        clock.advance(2)
        assert store.sweep() == (ExpiredLease("child", (30.0,), "from child"),)
        assert store.snapshot(TEAM).spent == 30.0
        assert store.open_reservations() == 1


def short_lease_worker(path: str, ops: int, seed: int, results: Any) -> None:
    """Child process: reserve with short and long leases, abandon some, settle the rest."""
    rng = random.Random(seed)
    store = SQLiteStore(path, busy_timeout=15.0)
    settled, expired = 0.0, []
    for i in range(ops):
        rid, amount = f"{seed}-{i}", float(rng.randint(1, 100))
        result = store.reserve(
            ReserveRequest(rid, (Charge(TEAM_BIG, amount), Charge(POOL_BIG, 1.0)), rng.choice([0.05, 0.2, 600.0]))
        )
        expired += [(e.id, e.amounts) for e in result.expired]
        store.acknowledge([e.id for e in result.expired])  # recorded, as a guard does
        if rng.random() < 0.2:
            continue  # abandoned: a sweep must charge it at the reserved amount
        time.sleep(rng.random() * 0.002)
        actual = float(rng.randint(0, int(amount)))
        if store.settle(rid, [actual, 1.0]):  # False: it expired first and was swept
            settled += actual + 1.0
    store.close()
    results.put((settled, expired))


def test_processes_with_short_leases_balance_the_books(tmp_path: Path) -> None:
    path = tmp_path / "books.db"
    SQLiteStore(path).close()
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    workers = [ctx.Process(target=short_lease_worker, args=(str(path), 200, seed, results)) for seed in range(4)]
    for w in workers:
        w.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(30)
    later = FakeClock(start=time.time() + 10_000)  # the host's clock, 10,000 s on: every lease is due
    with SQLiteStore(path, clock=later, host_clock=later) as late:
        # A sweep reports at most JOURNAL_REPORT entries; each acknowledgement lets the next ones through.
        final: list[ExpiredLease] = []
        for _ in range(4 * 200 // JOURNAL_REPORT + 1):  # 800 leases at most: the journal empties by then
            batch = late.sweep()
            if not batch:
                break
            assert len(batch) <= JOURNAL_REPORT
            final += batch
            late.acknowledge([e.id for e in batch])
        assert late.sweep() == ()
        # A lease may be reported by several workers before one acknowledges it; always the same.
        reports = [e for _, reported in outcomes for e in reported] + [(e.id, e.amounts) for e in final]
        expired = dict(reports)
        assert set(reports) == set(expired.items())
        charged = sum(settled for settled, _ in outcomes) + sum(sum(amounts) for amounts in expired.values())
        team, pool = late.snapshot(TEAM_BIG), late.snapshot(POOL_BIG)
        assert team.spent + pool.spent == pytest.approx(charged, abs=1e-6)
        assert (team.level, pool.level) == (1e12 - team.spent, 1e12 - pool.spent)
        assert late.open_reservations() == 0
        assert next_expiry(path) is None


def test_missing_bound_row_means_scan_and_is_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    clock = FakeClock(start=T0)
    with SQLiteStore(path, clock=clock) as store:
        assert store.reserve(ReserveRequest("a", (Charge(TEAM, 5.0),), 1.0)).ok
        with sqlite3.connect(path) as conn:
            conn.execute("DELETE FROM store WHERE kind = 0")
        clock.advance(2)
        result = store.reserve(ReserveRequest("b", (Charge(TEAM, 5.0), Charge(POOL, 5.0)), 60.0))
        assert result.ok and result.expired == (ExpiredLease("a", (5.0,), ""),)
        assert next_expiry(path) == T0 + 2 + 60
        with sqlite3.connect(path) as conn:
            conn.execute("DELETE FROM store WHERE kind = 0")  # with it, the journal's count
        assert store.sweep() == result.expired  # nothing due, but the journal is looked at
        with sqlite3.connect(path) as conn:
            conn.execute("DELETE FROM store WHERE kind = 0")
        clock.advance(60)
        # The rebuilt row counts the journal again: "a", never acknowledged, is still reported.
        assert store.sweep() == (ExpiredLease("a", (5.0,), ""), ExpiredLease("b", (5.0, 5.0), ""))
        assert next_expiry(path) is None


def test_denied_reserve_still_sweeps_and_keeps_the_bound(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    clock = FakeClock(start=T0)
    with SQLiteStore(path, clock=clock) as store:
        assert store.reserve(ReserveRequest("a", (Charge(POOL, 5.0),), 1.0)).ok
        assert store.reserve(ReserveRequest("b", (Charge(POOL, 5.0),), 30.0)).ok
        clock.advance(2)
        result = store.reserve(ReserveRequest("big", (Charge(TEAM, 500.0),), 60.0))
        assert not result.ok and result.expired == (ExpiredLease("a", (5.0,), ""),)
        assert next_expiry(path) == T0 + 30
        with pytest.raises(ValueError, match="already open"):
            store.reserve(ReserveRequest("b", (Charge(TEAM, 500.0),), 60.0))


# -- the lease encoding ------------------------------------------------------------------


@pytest.mark.parametrize(
    "held",
    [
        [Held(BucketSpec("b", 1e15), None, 100.0, 0.0, None, None)],
        [
            Held(
                BucketSpec('ключ "q" \\ \x1f é', 0.1 + 0.2, 1 / 3, PeriodRule("day", (3600.0, 1_700_000_000.5, 7200.0))),
                BucketSpec("pool", 5e-324, 0.0, PeriodRule("month")),
                1e-7,
                2.5e300,
                1_700_000_000.123456,
                0.0,
            ),
            Held(BucketSpec("ints", 100, 0, None), None, 3, 0, None, None),
            Held(BucketSpec("neg", 10.0), None, -0.0, -1.5, None, None),
        ],
    ],
)
def test_lease_encoding_is_what_json_dumps_wrote(held: list[Held]) -> None:
    def row(s: BucketSpec) -> list[object]:
        return [s.key, s.capacity, s.refill_per_second, None if s.period is None else [s.period.unit, *s.period.offsets]]

    expected = json.dumps(
        [[row(h.bucket), row(h.lender) if h.lender else None, h.took, h.lent, h.period, h.lender_period] for h in held],
        separators=(",", ":"),
    )
    text = _encode_held(held)
    assert text == expected
    assert _decode_held(text) == held
    for a, b in zip(_decode_held(text), held, strict=True):
        assert [type(v) for v in (a.took, a.lent)] == [type(v) for v in (b.took, b.lent)]


# -- the settle memo ----------------------------------------------------------------------


def test_settle_uses_the_memo_only_for_the_very_lease_it_wrote(tmp_path: Path) -> None:
    path = tmp_path / "memo.db"
    clock = FakeClock(start=T0)
    first, second = SQLiteStore(path, clock=clock), SQLiteStore(path, clock=clock)
    try:
        assert first.reserve(ReserveRequest("same-id", (Charge(TEAM, 10.0),), 60.0)).ok
        assert second.settle("same-id", [10.0])  # no memo there: decoded from the row
        assert second.reserve(ReserveRequest("same-id", (Charge(POOL, 40.0),), 60.0)).ok
        assert first.settle("same-id", [25.0])  # its memo holds the old lease: not used
        team, pool = first.snapshot(TEAM), first.snapshot(POOL)
        assert (team.level, team.spent) == (90.0, 10.0)
        assert (pool.level, pool.spent) == (975.0, 25.0)
    finally:
        first.close()
        second.close()


def test_memo_stays_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from budgetguard.stores import sqlite as module

    monkeypatch.setattr(module, "_MEMO_SIZE", 3)
    with SQLiteStore(tmp_path / "bounded.db", clock=FakeClock(start=T0)) as store:
        for i in range(10):
            assert store.reserve(ReserveRequest(f"r{i}", (Charge(POOL, 1.0),), 60.0)).ok
        assert list(store._memo) == ["r7", "r8", "r9"]
        assert all(store.settle(f"r{i}", [0.5]) for i in range(10))  # remembered or not
        assert store.snapshot(POOL).spent == 5.0
        assert store._memo == {}


# -- async writes: at once on the loop, or in a worker thread when they would wait ------


def count_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the functions the store hands to asyncio.to_thread."""
    calls: list[str] = []
    real = asyncio.to_thread

    async def to_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(fn.__name__)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", to_thread)
    return calls


def test_async_writes_with_no_other_writer_run_on_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_threads(monkeypatch)
    store = SQLiteStore(tmp_path / "loop.db")

    async def main() -> None:
        for i in range(20):
            assert (await store.areserve(ReserveRequest(f"r{i}", (Charge(TEAM, 1.0, POOL),), 60.0))).ok
            assert await store.asettle(f"r{i}", [1.0])
        with pytest.raises(ValueError, match="already open"):  # the body's own errors still propagate
            await store.areserve(ReserveRequest("dup", (Charge(POOL, 1.0),), 60.0))
            await store.areserve(ReserveRequest("dup", (Charge(POOL, 1.0),), 60.0))

    asyncio.run(main())
    assert calls == []
    assert store.snapshot(TEAM).spent == 20.0
    assert store.open_reservations() == 1
    store.close()


def test_async_writes_wait_in_a_thread_while_another_thread_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_threads(monkeypatch)
    store = SQLiteStore(tmp_path / "busy.db")
    store._write_lock.acquire()  # as a worker thread in the middle of a write
    threading.Timer(0.2, store._write_lock.release).start()

    async def main() -> None:
        assert (await store.areserve(ReserveRequest("r", (Charge(POOL, 1.0),), 60.0))).ok

    asyncio.run(main())
    assert calls == ["reserve"]
    assert store.snapshot(POOL).level == 999.0
    store.close()


def test_async_writes_with_synchronous_full_use_a_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_threads(monkeypatch)
    store = SQLiteStore(tmp_path / "full.db", synchronous="FULL")

    async def main() -> None:
        assert (await store.areserve(ReserveRequest("r", (Charge(POOL, 1.0),), 60.0))).ok
        assert await store.asettle("r", [1.0])

    asyncio.run(main())
    assert calls == ["reserve", "settle"]  # every commit waits for the disk
    store.close()
