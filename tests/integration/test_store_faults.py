"""Faults the durable stores must survive.

* A worker killed (SIGKILL) between reserve and settle: once its lease runs out, the
  reservation is charged at the reserved amount exactly once, and reported once, however
  many processes sweep at the same time.
* Redis stopped in the middle of a load: calls raise ``StoreUnavailable`` quickly (no
  hang), nothing is charged twice, and the same store object works once Redis is back
  (its scripts are reloaded after the restart emptied the script cache).
* Redis hung (SIGSTOP): calls give up after ``socket_timeout``.
* A SQLite file locked by another process: ``StoreUnavailable`` after ``busy_timeout``,
  the file intact, and the store works once the lock is gone; a short lock just waits.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from budgetguard.errors import StoreUnavailable
from budgetguard.stores import BucketSpec, Charge, ExpiredLease, ReserveRequest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from redis_server import RedisServer, free_port, require_redis_server

SPEC = BucketSpec("team\x1fteam=search", 100.0)
POOL = BucketSpec("company-pool", 1000.0)


def open_store(kind: str, target: str, namespace: str, **options: Any) -> Any:
    if kind == "sqlite":
        from budgetguard.stores.sqlite import SQLiteStore

        return SQLiteStore(target, **options)
    from budgetguard.stores.redis import RedisStore

    return RedisStore(target, namespace=namespace, **options)


def target_for(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if kind == "sqlite":
        return str(tmp_path / "faults.db")
    return str(request.getfixturevalue("redis_server").url)


def dedicated_redis(**kwargs: Any) -> RedisServer:
    """A server of the test's own, which it may stop, pause and restart."""
    return RedisServer(require_redis_server(), **kwargs).start()


# -- a worker dies holding a reservation -------------------------------------------------


def reserve_then_hang(kind: str, target: str, namespace: str, ready: Any) -> None:
    """Child: reserve (borrowing from the pool), tell the parent, then wait to be killed."""
    store = open_store(kind, target, namespace)
    result = store.reserve(ReserveRequest("doomed", (Charge(SPEC, 130.0, POOL),), 1.0, '{"worker": "doomed"}'))
    ready.put(result.ok)
    time.sleep(120)


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_killed_worker_lease_is_charged_once(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    namespace = f"faults-{uuid.uuid4().hex[:8]}"
    target = target_for(kind, request, tmp_path)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    child = ctx.Process(target=reserve_then_hang, args=(kind, target, namespace, ready))
    child.start()
    try:
        assert ready.get(timeout=60) is True
    finally:
        child.kill()  # SIGKILL: no settle, no cleanup
        child.join(10)
    stores = [open_store(kind, target, namespace) for _ in range(4)]
    try:
        main = stores[0]
        assert (main.snapshot(SPEC).level, main.snapshot(POOL).level) == (0.0, 970.0)  # held, not spent
        reports: list[ExpiredLease] = []
        lock = threading.Lock()
        deadline = time.monotonic() + 10.0

        def sweeper(store: Any, n: int) -> None:
            i = 0
            while time.monotonic() < deadline and not reports:
                i += 1
                if i % 2:
                    expired = store.sweep()
                else:
                    result = store.reserve(ReserveRequest(f"probe-{n}-{i}", (Charge(POOL, 0.0),), 60.0))
                    assert store.settle(f"probe-{n}-{i}", [0.0])
                    expired = result.expired
                with lock:
                    reports.extend(expired)
                store.acknowledge([e.id for e in expired])  # recorded, as a guard does
                time.sleep(0.01)

        threads = [threading.Thread(target=sweeper, args=(store, n)) for n, store in enumerate(stores)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        # Reported (to any sweeper, maybe to several before one acknowledged it), charged once.
        assert set(reports) == {ExpiredLease("doomed", (130.0,), '{"worker": "doomed"}')}
        assert [store.sweep() for store in stores] == [()] * 4  # acknowledged: never reported again
        team, pool = main.snapshot(SPEC), main.snapshot(POOL)
        assert (team.level, team.spent) == (0.0, 100.0)
        assert (pool.level, pool.spent) == (970.0, 30.0)
        assert main.open_reservations() == 0
        assert not main.settle("doomed", [1.0])  # the worker's ghost cannot settle it now
        assert main.snapshot(SPEC).spent == 100.0
    finally:
        for store in stores:
            store.close()


# -- Redis goes away mid-load ------------------------------------------------------------


@pytest.mark.redis
def test_redis_outage_fails_fast_without_double_charge_and_recovers() -> None:
    # This server persists every write, so that after the restart we can check the books.
    server = dedicated_redis(extra_args=("--appendonly", "yes", "--appendfsync", "always"))
    from budgetguard.stores.redis import RedisStore

    store = RedisStore(server.url, namespace="outage", socket_timeout=1.0, socket_connect_timeout=1.0)
    spec = BucketSpec("outage", 1_000_000.0)
    outcomes: dict[str, dict[str, Any]] = {}
    slow: list[float] = []
    errors: list[BaseException] = []
    stop, hold, holding = threading.Event(), threading.Event(), threading.Event()
    counts = {"ok": 0, "unavailable": 0}

    def timed(fn: Any, *args: Any) -> Any:
        started = time.monotonic()
        try:
            return fn(*args)
        except StoreUnavailable:
            counts["unavailable"] += 1
            return "unavailable"
        finally:
            elapsed = time.monotonic() - started
            if elapsed > 2.0:
                slow.append(elapsed)

    def load() -> None:
        i = 0
        try:
            while not stop.is_set():
                if hold.is_set():
                    holding.set()
                    time.sleep(0.005)
                    continue
                i += 1
                rid, actual = f"op-{i}", float(i % 7)
                reserved = timed(store.reserve, ReserveRequest(rid, (Charge(spec, 10.0),), 600.0))
                outcome: dict[str, Any] = {
                    "actual": actual,
                    "reserve": reserved if reserved == "unavailable" else reserved.ok,
                }
                if reserved != "unavailable" and reserved.ok:
                    outcome["settle"] = timed(store.settle, rid, [actual])
                    counts["ok"] += outcome["settle"] is True
                outcomes[rid] = outcome
                if reserved == "unavailable":
                    time.sleep(0.02)
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        wait_until(lambda: counts["ok"] >= 100, 10)
        server.stop()
        wait_until(lambda: counts["unavailable"] >= 5, 10)
        hold.set()
        assert holding.wait(10)
        server.start()  # same port, data reloaded from its AOF, script cache empty
        with redis.Redis.from_url(server.url) as raw:
            assert raw.script_exists(store._sync_scripts().reserve.sha) == [False]
        hold.clear()
        before = counts["ok"]
        wait_until(lambda: counts["ok"] >= before + 50, 10)  # the same store object works again
    finally:
        stop.set()
        worker.join(30)
    try:
        assert not errors, errors
        assert not slow, f"calls took {slow} s during the outage"
        # Reconcile: settle again whatever may not have been settled; each counts once.
        expected = 0.0
        for rid, outcome in outcomes.items():
            if outcome["reserve"] is True:
                if outcome["settle"] == "unavailable":
                    store.settle(rid, [outcome["actual"]])
                expected += outcome["actual"]
            elif outcome["reserve"] == "unavailable" and store.settle(rid, [outcome["actual"]]):
                expected += outcome["actual"]  # the reservation had landed after all
        state = store.snapshot(spec)
        assert store.open_reservations() == 0
        assert state.spent == expected
        assert state.level == spec.capacity - expected
    finally:
        store.close()
        server.close()


@pytest.mark.redis
async def test_redis_outage_async_fails_fast_and_recovers() -> None:
    server = dedicated_redis()
    from budgetguard.stores.redis import RedisStore

    store = RedisStore(server.url, namespace="outage-async", socket_timeout=1.0, socket_connect_timeout=1.0)
    spec = BucketSpec("a", 100.0)
    try:
        assert (await store.areserve(ReserveRequest("a1", (Charge(spec, 1.0),), 60.0))).ok
        server.stop()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"redis://127\.0\.0\.1:\d+/0.*redis-server is running"):
            await store.areserve(ReserveRequest("a2", (Charge(spec, 1.0),), 60.0))
        assert time.monotonic() - started < 2.0
        server.start()
        assert (await store.areserve(ReserveRequest("a3", (Charge(spec, 1.0),), 60.0))).ok  # scripts reloaded
        assert await store.asettle("a3", [1.0])
    finally:
        await store.aclose()
        server.close()


@pytest.mark.redis
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_hung_redis_times_out(mode: str) -> None:
    server = dedicated_redis()
    from budgetguard.stores.redis import RedisStore

    store = RedisStore(server.url, namespace="hung", socket_timeout=0.5, socket_connect_timeout=0.5)
    spec = BucketSpec("h", 100.0)

    async def reserve(rid: str) -> Any:
        request = ReserveRequest(rid, (Charge(spec, 1.0),), 60.0)
        return store.reserve(request) if mode == "sync" else await store.areserve(request)

    try:
        assert (await reserve("h1")).ok
        server.pause()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="socket_timeout"):
            await reserve("h2")
        assert time.monotonic() - started < 2.0
        server.resume()
        assert (await reserve("h3")).ok
        # h2 reached the server before it froze, so it may have been reserved after all;
        # its lease would expire and be charged: either way it is counted at most once.
        assert store.open_reservations() in (2, 3)
    finally:
        server.resume()
        await store.aclose()
        server.close()


# -- SQLite file locked by another process ----------------------------------------------


def hold_write_lock(path: str, locked: Any, release: Any, seconds: float) -> None:
    """Child: take SQLite's write lock with BEGIN EXCLUSIVE and keep it."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    conn.execute("UPDATE store SET spent = spent WHERE kind = 1")  # a real write in flight
    locked.set()
    release.wait(seconds)
    conn.execute("COMMIT")
    conn.close()


def locker(path: Path, seconds: float) -> tuple[Any, Any, Any]:
    ctx = multiprocessing.get_context("spawn")
    locked, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=hold_write_lock, args=(str(path), locked, release, seconds))
    proc.start()
    assert locked.wait(30)
    return proc, release, ctx


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sqlite_file_locked_past_busy_timeout(mode: str, tmp_path: Path) -> None:
    from budgetguard.stores.sqlite import SQLiteStore

    path = tmp_path / "locked.db"
    store = SQLiteStore(path, busy_timeout=0.3)
    spec = BucketSpec("s", 100.0)

    def call(fn: str, *args: Any) -> Any:
        if mode == "sync":
            return getattr(store, fn)(*args)
        return asyncio.run(getattr(store, "a" + fn)(*args))

    assert call("reserve", ReserveRequest("before", (Charge(spec, 10.0),), 60.0)).ok
    proc, release, _ = locker(path, 30.0)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"locked\.db.*locked.*busy_timeout=0\.3") as info:
            call("reserve", ReserveRequest("during", (Charge(spec, 10.0),), 60.0))
        elapsed = time.monotonic() - started
        assert 0.25 <= elapsed < 3.0, elapsed
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        with pytest.raises(StoreUnavailable):
            call("settle", "before", [5.0])
        assert call("snapshot", spec).level == 90.0  # readers never wait in WAL mode
    finally:
        release.set()
        proc.join(30)
    with sqlite3.connect(path) as check:
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert call("settle", "before", [5.0])  # the failed settle changed nothing
    assert call("reserve", ReserveRequest("after", (Charge(spec, 10.0),), 60.0)).ok
    state = call("snapshot", spec)
    assert (state.level, state.spent) == (85.0, 5.0)
    store.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sqlite_short_lock_just_waits(mode: str, tmp_path: Path) -> None:
    from budgetguard.stores.sqlite import SQLiteStore

    path = tmp_path / "brief.db"
    store = SQLiteStore(path, busy_timeout=10.0)
    spec = BucketSpec("s", 100.0)
    assert store.reserve(ReserveRequest("r1", (Charge(spec, 10.0),), 60.0)).ok
    proc, release, _ = locker(path, 0.4)  # lets go by itself after 0.4 s
    try:
        started = time.monotonic()
        request = ReserveRequest("r2", (Charge(spec, 10.0),), 60.0)
        # async: the event loop's attempt does not wait; a worker thread does
        result = store.reserve(request) if mode == "sync" else asyncio.run(store.areserve(request))
        assert result.ok
        assert time.monotonic() - started >= 0.1  # it did wait for the lock
    finally:
        release.set()
        proc.join(30)
    assert store.snapshot(spec).level == 80.0
    store.close()


def wait_until(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            msg = f"condition not met within {timeout} s"
            raise AssertionError(msg)
        time.sleep(0.01)


# -- configuration mistakes ---------------------------------------------------------------


def test_unreachable_redis_message_hides_the_password() -> None:
    from budgetguard.stores.redis import RedisStore

    store = RedisStore(
        f"redis://app:hunter2@127.0.0.1:{free_port()}/0", namespace="nowhere", socket_connect_timeout=0.5
    )
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        store.reserve(ReserveRequest("x", (Charge(SPEC, 1.0),), 60.0))
    assert time.monotonic() - started < 2.0  # three quick attempts, then give up
    text = str(info.value)
    assert "hunter2" not in text
    assert "redis://app:***@127.0.0.1" in text
    assert "redis-server is running" in text
    with pytest.raises(StoreUnavailable):
        asyncio.run(store.asettle("x", [1.0]))
    store.close()


def test_sqlite_configuration_errors(tmp_path: Path) -> None:
    from budgetguard.errors import ConfigurationError
    from budgetguard.stores.sqlite import SCHEMA_VERSION, SQLiteStore

    with pytest.raises(ConfigurationError, match="memory://"):
        SQLiteStore(":memory:")
    with pytest.raises(StoreUnavailable, match="directory exists"):
        SQLiteStore(tmp_path / "missing" / "budgets.db")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(ConfigurationError, match="not a SQLite database"):
        SQLiteStore(junk)
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ConfigurationError, match="newer"):
        SQLiteStore(newer)


def test_sqlite_state_survives_a_restart(tmp_path: Path) -> None:
    from budgetguard.stores.sqlite import SQLiteStore

    path = tmp_path / "durable.db"
    spec = BucketSpec("durable", 100.0)
    with SQLiteStore(path) as store:
        assert store.reserve(ReserveRequest("open", (Charge(spec, 30.0),), 600.0, "meta")).ok
        assert store.reserve(ReserveRequest("done", (Charge(spec, 10.0),), 600.0)).ok
        assert store.settle("done", [4.0])
    with SQLiteStore(path) as again:  # a new process would see the same
        state = again.snapshot(spec)
        assert (state.level, state.spent) == (66.0, 4.0)
        assert again.open_reservations() == 1
        assert again.settle("open", [20.0])
        assert again.snapshot(spec).level == 76.0
