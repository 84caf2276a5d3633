"""How the Redis store uses connections under load.

* Async calls of one event loop share one connection, pipelined: a thousand concurrent
  calls work from a URL and through a client passed in with redis-py's default pool (100
  connections, refusing past that), and take one or two connections, not a thousand.
* A store built from a URL waits for a free connection when ``max_connections`` are in
  use, up to ``pool_timeout``, then raises ``StoreUnavailable`` saying what to raise.
* A client passed in with a non-blocking pool too small for its callers fails as
  ``StoreUnavailable`` with a message that says how to fix it; on a
  ``BlockingConnectionPool`` its callers wait.
* A batch that fails as a whole (server gone) fails every call in it as
  ``StoreUnavailable``, and the same store works when the server is back; a cancelled
  caller does not disturb the others.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio

from budgetguard.errors import StoreUnavailable
from budgetguard.stores import BucketSpec, Charge, ReserveRequest
from budgetguard.stores.redis import RedisStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from redis_server import RedisServer, require_redis_server

pytestmark = pytest.mark.redis

N = 1_000


@pytest.fixture
def raw(redis_server: Any) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def named_connections(raw: redis.Redis, name: str) -> int:
    return sum(1 for c in raw.client_list() if c.get("name") == name)


async def reserve_and_settle_all(store: RedisStore, spec: BucketSpec, n: int, tag: str) -> list[BaseException]:
    async def one(i: int) -> None:
        assert (await store.areserve(ReserveRequest(f"{tag}-{i}", (Charge(spec, 2.0),), 60.0))).ok
        assert await store.asettle(f"{tag}-{i}", [1.0])

    results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    return [r for r in results if isinstance(r, BaseException)]


async def test_a_thousand_concurrent_async_calls_from_a_url_share_one_connection(
    redis_server: Any, raw: redis.Redis
) -> None:
    name = f"bg-{uuid.uuid4().hex[:10]}"
    store = RedisStore(
        redis_server.url, namespace=name, max_connections=2, client_options={"client_name": name}
    )
    spec = BucketSpec("load", 1e9)
    try:
        errors = await reserve_and_settle_all(store, spec, N, "a")
        assert errors == []
        state = await store.asnapshot(spec)
        assert (state.spent, state.level) == (N * 1.0, 1e9 - N)
        assert store.open_reservations() == 0
        assert named_connections(raw, name) <= 2  # the loop's pipeline (and the sync client's zcard)
    finally:
        await store.aclose()


async def test_a_thousand_concurrent_async_calls_through_a_default_pool_client(redis_server: Any) -> None:
    client = redis.asyncio.Redis.from_url(redis_server.url)  # ConnectionPool: refuses past 100
    store = RedisStore(client, namespace=f"client-{uuid.uuid4().hex[:10]}")
    spec = BucketSpec("load", 1e9)
    try:
        errors = await reserve_and_settle_all(store, spec, N, "c")
        assert errors == []
        assert (await store.asnapshot(spec)).spent == N * 1.0
        pool = client.connection_pool
        assert len(pool._in_use_connections) + len(pool._available_connections) == 1  # the pipeline's
        await store.aclose()
        assert len(pool._in_use_connections) == 0  # given back
    finally:
        await store.aclose()
        await client.aclose()


def test_a_url_store_waits_for_a_connection_then_gives_up(redis_server: Any) -> None:
    store = RedisStore(redis_server.url, namespace=f"wait-{uuid.uuid4().hex[:10]}", max_connections=1, pool_timeout=0.4)
    try:
        assert store.open_reservations() == 0
        pool = store.client.connection_pool
        held = pool.get_connection()  # the only connection
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"max_connections=1 .*pool_timeout=0\.4"):
            store.open_reservations()
        assert 0.35 < time.monotonic() - started < 5.0  # waited, bounded
        threading.Timer(0.2, pool.release, args=(held,)).start()
        started = time.monotonic()
        assert store.open_reservations() == 0  # waited for the connection to come back
        assert 0.1 < time.monotonic() - started < 5.0
    finally:
        store.close()


async def test_an_async_url_store_waits_for_a_connection_then_gives_up(redis_server: Any) -> None:
    store = RedisStore(redis_server.url, namespace=f"await-{uuid.uuid4().hex[:10]}", max_connections=1, pool_timeout=0.4)
    spec = BucketSpec("w", 100.0)
    try:
        store._async_scripts()  # this loop's client, made before its first call
        pool = store._loops[asyncio.get_running_loop()][0].connection_pool
        held = await pool.get_connection()  # the only connection: the pipeline's first call waits
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="max_connections=1"):
            await store.asnapshot(spec)
        assert 0.35 < time.monotonic() - started < 5.0

        async def give_back() -> None:
            await asyncio.sleep(0.2)
            await pool.release(held)

        held_task = asyncio.create_task(give_back())
        assert (await store.asnapshot(spec)).level == 100.0
        await held_task
    finally:
        await store.aclose()


def test_a_client_whose_pool_refuses_fails_with_an_actionable_message(redis_server: Any) -> None:
    client = redis.Redis(connection_pool=redis.ConnectionPool.from_url(redis_server.url, max_connections=2))
    store = RedisStore(client, namespace=f"small-{uuid.uuid4().hex[:10]}")
    spec = BucketSpec("s", 100.0)
    try:
        assert store.reserve(ReserveRequest("ok", (Charge(spec, 1.0),))).ok
        held = [client.connection_pool.get_connection() for _ in range(2)]
        with pytest.raises(StoreUnavailable, match=r"Too many connections.*BlockingConnectionPool"):
            store.reserve(ReserveRequest("refused", (Charge(spec, 1.0),)))
        for conn in held:
            client.connection_pool.release(conn)
        assert store.settle("ok", [1.0])
        assert store.open_reservations() == 0  # the refused call reserved nothing
    finally:
        client.close()


def test_64_threads_through_a_small_blocking_pool_client(redis_server: Any) -> None:
    pool = redis.BlockingConnectionPool.from_url(redis_server.url, max_connections=4, timeout=30)
    client = redis.Redis.from_pool(pool)
    store = RedisStore(client, namespace=f"block-{uuid.uuid4().hex[:10]}")
    spec = BucketSpec("t", 1e9)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(20):
                assert store.reserve(ReserveRequest(f"{t}-{i}", (Charge(spec, 2.0),), 60.0)).ok
                assert store.settle(f"{t}-{i}", [1.0])
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert errors == []
        assert store.snapshot(spec).spent == 64 * 20 * 1.0
        assert store.open_reservations() == 0
    finally:
        client.close()


async def test_a_failed_batch_fails_each_call_and_the_store_recovers() -> None:
    server = RedisServer(require_redis_server()).start()
    store = RedisStore(server.url, namespace="batch", socket_timeout=1.0, socket_connect_timeout=1.0)
    spec = BucketSpec("b", 1e9)
    try:
        assert await reserve_and_settle_all(store, spec, 10, "warm") == []
        server.stop()
        started = time.monotonic()
        errors = await reserve_and_settle_all(store, spec, 200, "down")
        assert len(errors) == 200
        assert all(isinstance(e, StoreUnavailable) for e in errors), {type(e) for e in errors}
        assert len({id(e.__cause__) for e in errors}) == 200  # each call raised its own error
        assert time.monotonic() - started < 10.0
        server.start()  # empty: nothing was persisted, and the script cache is empty
        assert await reserve_and_settle_all(store, spec, 200, "up") == []
        assert (await store.asnapshot(spec)).spent == 200.0
    finally:
        await store.aclose()
        server.close()


async def test_cancelled_callers_leave_the_others_alone(redis_server: Any) -> None:
    store = RedisStore(redis_server.url, namespace=f"cancel-{uuid.uuid4().hex[:10]}")
    spec = BucketSpec("c", 1e9)
    try:
        tasks = [
            asyncio.create_task(store.areserve(ReserveRequest(f"r{i}", (Charge(spec, 1.0),), 60.0))) for i in range(300)
        ]
        await asyncio.sleep(0)  # every task has queued its command
        for task in tasks[::2]:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        cancelled = [r for r in results if isinstance(r, asyncio.CancelledError)]
        assert len(cancelled) == 150
        assert all(r.ok for r in results if not isinstance(r, BaseException))
        # A cancelled caller loses its reply, not its command: its reservation may exist.
        # Settling every id charges each reservation that was made, once.
        settled = sum([await store.asettle(f"r{i}", [1.0]) for i in range(300)])
        assert 150 <= settled <= 300
        assert (await store.asnapshot(spec)).spent == float(settled)
        assert store.open_reservations() == 0
    finally:
        await store.aclose()
