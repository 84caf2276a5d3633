"""Concurrency stress: many threads, then many processes, hammer one budget.

Each worker loops: reserve a random amount from a global bucket and from one of four
per-user buckets (all or nothing), hold it briefly, then settle with a random actual
no larger than the reservation. With actual <= reserved nothing may ever overspend, so:

* no bucket is ever observed below zero (a sampler snapshots throughout);
* a shared ledger of "open reservations + settled spend", updated conservatively (after
  a grant, before a settle), never exceeds the capacity: every grant fit;
* afterwards ``spent`` equals the sum of the actuals exactly, ``level == capacity - spent``
  (no refill here) and no reservation is left open.

Bounded: a few thousand operations per test, each test well under 20 s on 2 cores.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from budgetguard.stores import BucketSpec, Charge, MemoryStore, ReserveRequest

pytestmark = pytest.mark.stress

# Reservations are large next to the capacities (64 threads want ~2M at once: many are
# denied for lack of room) while settled actuals are mostly small, so the budget is not
# simply used up before the test ends.
GLOBAL = BucketSpec("global", 1_500_000.0)
USERS = [BucketSpec(f"per-user\x1fuser_id=u{i}", 400_000.0) for i in range(4)]
ALL = [GLOBAL, *USERS]


def open_store(kind: str, target: str, namespace: str) -> Any:
    """A store object of ``kind`` (each thread group / process builds its own)."""
    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite":
        from budgetguard.stores.sqlite import SQLiteStore

        return SQLiteStore(target, busy_timeout=15.0)
    from budgetguard.stores.redis import RedisStore

    return RedisStore(target, namespace=namespace)


@dataclass
class Ledger:
    """Per bucket: open reservations + settled spend, as the workers see them."""

    lock: Any
    values: Any  # a sequence of floats, one per bucket in ALL
    violations: list[str] = field(default_factory=list)

    def grant(self, index: int, amount: float) -> None:
        with self.lock:
            for j in (0, index + 1):
                self.values[j] += amount
                if self.values[j] > ALL[j].capacity:
                    self.violations.append(f"{ALL[j].key}: {self.values[j]} > {ALL[j].capacity}")

    def before_settle(self, index: int, amount: float, actual: float) -> None:
        with self.lock:
            for j in (0, index + 1):
                self.values[j] -= amount - actual


def hammer(store: Any, seed: int, iterations: int, ledger: Ledger, prefix: str) -> tuple[list[float], int, int]:
    """Reserve/settle ``iterations`` times; returns the settled actuals, grants and denials."""
    rng = random.Random(seed)
    actuals: list[float] = []
    granted = denied = 0
    for i in range(iterations):
        user = rng.randrange(len(USERS))
        amount = float(rng.randint(1, 60_000))
        rid = f"{prefix}-{seed}-{i}"
        result = store.reserve(ReserveRequest(rid, (Charge(GLOBAL, amount), Charge(USERS[user], amount)), 60.0))
        if not result.ok:
            denied += 1
            time.sleep(rng.random() * 0.001)
            continue
        granted += 1
        ledger.grant(user, amount)
        if rng.random() < 0.5:
            time.sleep(rng.random() * 0.002)  # hold it a little
        actual = float(rng.randint(0, int(amount)) if rng.random() < 0.01 else rng.randint(0, int(amount) // 500))
        ledger.before_settle(user, amount, actual)
        assert store.settle(rid, [actual, actual])
        actuals.append(actual)
    return actuals, granted, denied


class Sampler(threading.Thread):
    """Snapshots every bucket until stopped; remembers the lowest level seen."""

    def __init__(self, store: Any) -> None:
        super().__init__(daemon=True)
        self.store = store
        self.lowest = {spec.key: spec.capacity for spec in ALL}
        self.samples = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            for spec in ALL:
                level = self.store.snapshot(spec).level
                self.lowest[spec.key] = min(self.lowest[spec.key], level)
            self.samples += 1
            time.sleep(0.001)

    def finish(self) -> dict[str, float]:
        self.stop_event.set()
        self.join(10)
        return self.lowest


def check_final(store: Any, actuals: list[float], per_user: dict[int, float] | None = None) -> None:
    total = sum(actuals)
    state = store.snapshot(GLOBAL)
    assert state.spent == total
    assert state.level == GLOBAL.capacity - total
    user_spent = sum(store.snapshot(spec).spent for spec in USERS)
    assert user_spent == total
    for spec in USERS:
        user = store.snapshot(spec)
        assert user.level == spec.capacity - user.spent
    if hasattr(store, "open_reservations"):
        assert store.open_reservations() == 0


def target_for(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if kind == "sqlite":
        return str(tmp_path / "stress.db")
    if kind == "redis":
        return str(request.getfixturevalue("redis_server").url)
    return ""


# -- threads ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_64_threads_never_overspend(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    namespace = f"stress-{uuid.uuid4().hex[:8]}"
    store = open_store(kind, target_for(kind, request, tmp_path), namespace)
    ledger = Ledger(threading.Lock(), [0.0] * len(ALL))
    results: list[tuple[list[float], int, int]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(64)

    def work(seed: int) -> None:
        try:
            barrier.wait()
            results.append(hammer(store, seed, 30, ledger, "t"))
        except BaseException as exc:
            errors.append(exc)

    sampler = Sampler(store)
    sampler.start()
    started = time.monotonic()
    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    lowest = sampler.finish()
    elapsed = time.monotonic() - started
    try:
        assert not errors, errors[:3]
        assert not ledger.violations, ledger.violations[:5]
        assert all(level >= 0 for level in lowest.values()), lowest
        assert sampler.samples > 0
        actuals = [a for acts, _, _ in results for a in acts]
        granted = sum(r[1] for r in results)
        denied = sum(r[2] for r in results)
        assert granted > 500, granted  # enough traffic to mean something
        assert denied > 0, "no reservation was ever refused: the test did not contend"
        check_final(store, actuals)
        assert elapsed < 30, elapsed
    finally:
        store.close()


# -- processes --------------------------------------------------------------------------


def process_worker(
    kind: str, target: str, namespace: str, seed: int, iterations: int, lock: Any, values: Any, out: Any
) -> None:
    """Runs in a spawned process with its own store object."""
    try:
        store = open_store(kind, target, namespace)
        ledger = Ledger(lock, values)
        actuals, granted, denied = hammer(store, seed, iterations, ledger, "p")
        lowest = min(store.snapshot(spec).level for spec in ALL)
        store.close()
        out.put(("ok", seed, actuals, granted, ledger.violations, lowest, denied))
    except BaseException as exc:
        out.put(("error", seed, repr(exc), 0, [], 0.0, 0))


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_4_processes_never_overspend(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    namespace = f"stress-{uuid.uuid4().hex[:8]}"
    target = target_for(kind, request, tmp_path)
    parent_store = open_store(kind, target, namespace)  # creates the file / loads nothing yet
    ctx = multiprocessing.get_context("spawn")
    lock = ctx.Lock()
    values = ctx.Array("d", len(ALL), lock=False)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=process_worker, args=(kind, target, namespace, seed, 400, lock, values, out))
        for seed in range(4)
    ]
    sampler = Sampler(parent_store)
    sampler.start()
    for p in procs:
        p.start()
    try:
        reports = [out.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        lowest = sampler.finish()
    try:
        errors = [r for r in reports if r[0] != "ok"]
        assert not errors, errors
        assert not [v for r in reports for v in r[4]]
        assert all(level >= 0 for level in lowest.values()), lowest
        assert all(r[5] >= 0 for r in reports)
        granted = sum(r[3] for r in reports)
        assert granted > 500, granted
        check_final(parent_store, [a for r in reports for a in r[2]])
    finally:
        parent_store.close()
