"""Load: a thousand guarded ``ainvoke``s in flight, and 64 threads, on every store.

For each store (memory, SQLite, Redis from a URL, a Redis client passed in) the guard
meters ``guard | model`` where the model holds every call until all of them are inside it
(or a generous deadline passes), so the test sees whether anything in the guard or the
store serialized the calls. Then:

* no call failed;
* every call was charged exactly what the model reported, on the global budget and on
  each user's;
* no reservation is left open;
* async: all 1,000 calls were inside the model at once;
* async on an event loop kept busy (each call spends CPU in the model before it waits):
  every call still reaches the model before the first one ends, as with no store at
  all (a store whose async calls queue for worker threads let them in a few at a time).

Bounded in count (1,000 async calls, 64 x 10 thread calls per store) and in time (each
wait has a deadline); assertions are about exactness, never speed.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatResult

from budgetguard import Budget, BudgetGuard
from budgetguard.stores import MemoryStore, Store
from budgetguard.testing.fake_models import UsageFakeChatModel

pytestmark = pytest.mark.stress

CALLS = 1_000
THREADS, PER_THREAD = 64, 10
USERS = 10
PER_CALL = 10 + 1  # the model reports 10 input tokens and a one-word reply
DEADLINE = 120.0  # seconds any one wait may take on a slow, shared machine


class Gate:
    """Counts calls inside the model; opens once ``expected`` are in (or at the deadline)."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.inside = 0
        self.most = 0
        self.lock = threading.Lock()
        self.full = threading.Event()

    def enter(self) -> None:
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
            if self.inside >= self.expected:
                self.full.set()

    def leave(self) -> None:
        with self.lock:
            self.inside -= 1


class GatedModel(UsageFakeChatModel):
    """A fake chat model whose calls wait at a :class:`Gate` (async: without a thread)."""

    gate: Any = None

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any) -> ChatResult:
        self.gate.enter()
        try:
            self.gate.full.wait(DEADLINE)
            return super()._generate(messages, stop, run_manager, **kw)
        finally:
            self.gate.leave()

    async def _agenerate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        self.gate.enter()
        try:
            deadline = time.monotonic() + DEADLINE
            while not self.gate.full.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            return super()._generate(messages, stop, None, **kw)
        finally:
            self.gate.leave()


StoreFactory = Callable[[], tuple[Store, Callable[[], None]]]


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis-url", marks=pytest.mark.redis),
                        pytest.param("redis-client", marks=pytest.mark.redis)])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Builds a fresh store of the kind (async and sync clients for a Redis client store)."""
    kind = request.param

    def make() -> tuple[Store, Callable[[], None]]:
        if kind == "memory":
            return MemoryStore(), lambda: None
        if kind == "sqlite":
            from budgetguard.stores.sqlite import SQLiteStore

            store = SQLiteStore(tmp_path / f"load-{uuid.uuid4().hex[:8]}.db")
            return store, store.close
        from budgetguard.stores.redis import RedisStore

        url = request.getfixturevalue("redis_server").url
        namespace = f"load-{uuid.uuid4().hex[:12]}"
        if kind == "redis-url":
            store = RedisStore(url, namespace=namespace)
            return store, store.close
        # redis-py's default pools, as an application would build them (sync: 100 connections).
        sync_client = redis.Redis.from_url(url)
        async_client = redis.asyncio.Redis.from_url(url)  # connects on first use; the async test closes it
        return RedisStore(sync_client, async_client=async_client, namespace=namespace), sync_client.close

    return make


def build(store: Store, gate: Gate) -> tuple[BudgetGuard, Any]:
    guard = BudgetGuard(
        [Budget("global", limit=1e9), Budget("per-user", limit=1e7, per="user_id")], store=store, ledger=False
    )
    model = GatedModel(model_name="gpt-4", replies=["ok"], input_tokens=10, max_tokens=50, gate=gate)
    return guard, guard | model


def check_books(guard: BudgetGuard, store: Store, calls: int) -> None:
    assert guard.remaining("global") == 1e9 - PER_CALL * calls
    for user in range(USERS):
        assert guard.remaining("per-user", user_id=f"u{user}") == 1e7 - PER_CALL * calls / USERS
    assert store.open_reservations() == 0  # type: ignore[attr-defined]


async def aclose_all(store: Any, close: Callable[[], None]) -> None:
    """Close the store, what the factory made for it, and a Redis store's async client."""
    await store.aclose()
    close()
    aclient = getattr(store, "_aclient", None)
    if aclient is not None:
        await aclient.aclose()


async def test_a_thousand_concurrent_ainvokes(make_store: StoreFactory) -> None:
    store, close = make_store()
    gate = Gate(CALLS)
    guard, chain = build(store, gate)
    errors: list[BaseException] = []

    async def one(i: int) -> None:
        try:
            await chain.ainvoke("hi", {"configurable": {"user_id": f"u{i % USERS}"}})
        except Exception as exc:  # noqa: BLE001 - every failure is collected and reported
            errors.append(exc)

    try:
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(CALLS))), 3 * DEADLINE)
        assert errors == [], f"{len(errors)} of {CALLS} calls failed, e.g. {errors[0]!r}"
        assert gate.most == CALLS  # nothing serialized the calls
        check_books(guard, store, CALLS)
    finally:
        await aclose_all(store, close)


class BusyModel(UsageFakeChatModel):
    """A model that keeps the event loop busy (2 ms of CPU) and then waits 50 ms."""

    gate: Any = None  # counts the calls inside (never closed: no waiting at it)

    async def _agenerate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        self.gate.enter()
        try:
            until = time.perf_counter() + 0.002
            while time.perf_counter() < until:
                pass
            await asyncio.sleep(0.05)
            return super()._generate(messages, stop, None, **kw)
        finally:
            self.gate.leave()


async def test_a_busy_event_loop_lets_every_call_in(make_store: StoreFactory) -> None:
    store, close = make_store()
    guard = BudgetGuard([Budget("global", limit=1e9), Budget("per-user", limit=1e7, per="user_id")], store=store, ledger=False)
    n = 200
    gate = Gate(n + 1)
    chain = guard | BusyModel(model_name="gpt-4", replies=["ok"], input_tokens=10, max_tokens=50, gate=gate)
    try:
        await asyncio.wait_for(
            asyncio.gather(*(chain.ainvoke("hi", {"configurable": {"user_id": f"u{i % USERS}"}}) for i in range(n))),
            DEADLINE,
        )
        assert gate.most == n
        check_books(guard, store, n)
    finally:
        await aclose_all(store, close)


def test_64_threads(make_store: StoreFactory) -> None:
    store, close = make_store()
    gate = Gate(THREADS)  # the first call of every thread waits for the others
    guard, chain = build(store, gate)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(PER_THREAD):
                chain.invoke("hi", {"configurable": {"user_id": f"u{(t * PER_THREAD + i) % USERS}"}})
        except Exception as exc:  # noqa: BLE001 - every failure is collected and reported
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(3 * DEADLINE)
        assert not any(t.is_alive() for t in threads)
        assert errors == [], f"{len(errors)} threads failed, e.g. {errors[0]!r}"
        assert gate.most == THREADS
        check_books(guard, store, THREADS * PER_THREAD)
    finally:
        close()
