"""Every store forgets full, unheld buckets, and no call is granted anything else for it.

The oracle is the memory store with forgetting switched off, on its own fake clock moved
in step. A seeded run of reserves (many scopes, refill, hourly periods, a lending pool),
settles above and below the reservation (some many periods late), leases left to expire
and idle gaps must get the same answer from the store under test as from the oracle,
call for call (granted or denied, which charge, how much was available, the wait), and
read the same levels. Meanwhile the store must keep a fraction of the oracle's buckets,
and none once everything has refilled and a sweep has run.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from budgetguard.clock import FakeClock
from budgetguard.periods import PeriodRule
from budgetguard.stores import BucketSpec, Charge, MemoryStore, ReserveRequest, Store

HOUR = 3600.0
HOURLY = PeriodRule("hour")
START = 1_767_225_600.0 + 1_000


class NeverForgets(MemoryStore):
    """The oracle: every bucket ever used is kept."""

    def _forget_locked(self, now: float, limit: float) -> None:
        pass


def specs_of(user: int) -> tuple[BucketSpec, BucketSpec, BucketSpec]:
    """The buckets of one user's call: refill, hourly period, and the pool."""
    return (
        BucketSpec(f"refill\x1fuser={user}", 100.0, refill_per_second=1.0),
        BucketSpec(f"hourly\x1fuser={user}", 300.0, period=HOURLY),
        BucketSpec("pool", 400.0, refill_per_second=1.0),
    )


def run(store: Store, clock: FakeClock, seed: int, steps: int) -> list[Any]:
    """A seeded sequence of operations; returns everything the store answered."""
    rng = random.Random(seed)
    trace: list[Any] = []
    open_ids: list[tuple[str, int]] = []
    for i in range(steps):
        roll = rng.random()
        if roll < 0.05:
            clock.advance(rng.choice([30.0, 200.0, HOUR]))  # idle gaps: buckets refill or reset
        elif roll < 0.15:
            clock.advance(rng.random() * 5)
        user = rng.randrange(40) if rng.random() < 0.8 else 1_000 + i  # regulars and one-off users
        refill, hourly, pool = specs_of(user)
        amount = float(rng.choice([rng.randint(1, 10), rng.randint(1, 120)]))
        charges = (Charge(refill, amount, pool if rng.random() < 0.5 else None), Charge(hourly, amount))
        rid = f"r{i}"
        lease = 20.0 if rng.random() < 0.1 else 600.0  # some leases expire and are swept
        result = store.reserve(ReserveRequest(rid, charges, lease))
        denial = result.denial
        trace.append(
            (
                "reserve",
                rid,
                result.ok,
                None if denial is None else (denial.index, denial.available, denial.retry_after),
                sorted(e.id for e in result.expired),
            )
        )
        store.acknowledge([e.id for e in result.expired])  # recorded, as a guard does
        if result.ok:
            open_ids.append((rid, len(charges)))
        if open_ids and rng.random() < 0.7:
            rid, n = open_ids.pop(rng.randrange(len(open_ids)))
            actuals = [float(rng.randint(0, 150)) for _ in range(n)]
            trace.append(("settle", rid, store.settle(rid, actuals)))
        if rng.random() < 0.02:
            swept = store.sweep()
            trace.append(("sweep", sorted(e.id for e in swept)))
            store.acknowledge([e.id for e in swept])
        if rng.random() < 0.5:
            trace.append(("level", user, [store.snapshot(s).level for s in specs_of(user)]))
    return trace


def approx(trace: list[Any]) -> list[Any]:
    """Floats to 9 decimals (Redis computes in its own Lua; the contract suite allows that)."""

    def rounded(x: Any) -> Any:
        if isinstance(x, float):
            return round(x, 9)
        if isinstance(x, (list, tuple)):
            return type(x)(rounded(v) for v in x)
        return x

    return [rounded(step) for step in trace]


Deployment = tuple[Store, FakeClock, Callable[[], int]]


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def deployment(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Deployment]:
    """A store of the kind on a fake clock, and a count of the buckets it keeps."""
    kind = request.param
    if kind == "memory":
        clock = FakeClock(START)
        store = MemoryStore(clock)
        yield store, clock, lambda: len(store._buckets)
        return
    if kind == "sqlite":
        from budgetguard.stores.sqlite import SQLiteStore

        clock = FakeClock(START)
        path = tmp_path / "forget.db"
        store = SQLiteStore(path, clock=clock, host_clock=clock)

        def count() -> int:
            return int(store._connection().execute("SELECT count(*) FROM store WHERE kind = 1").fetchone()[0])

        yield store, clock, count
        store.close()
        return
    from redis_fake_time import close, fake_server_time

    from budgetguard.stores.redis import RedisStore

    server = request.getfixturevalue("redis_server")
    clock = fake_server_time(monkeypatch, server.url, START)
    store = RedisStore(server.url, namespace=f"forget-{uuid.uuid4().hex[:12]}")
    raw = redis.Redis.from_url(server.url)

    def fields() -> int:
        return sum(1 for f in raw.hkeys(store._state_key) if f.startswith(b"b:"))

    yield store, clock, fields
    raw.close()
    store.close()
    close(clock)


@pytest.mark.parametrize("seed", [1, 2])
def test_forgetting_changes_no_grant(deployment: Deployment, seed: int) -> None:
    store, clock, kept = deployment
    oracle_clock = FakeClock(START)
    oracle = NeverForgets(oracle_clock)
    got = run(store, clock, seed, 1_500)
    expected = run(oracle, oracle_clock, seed, 1_500)
    assert approx(got) == approx(expected)
    assert sum(1 for step in got if step[0] == "reserve" and step[2]) > 300  # plenty granted
    assert sum(1 for step in got if step[0] == "reserve" and not step[2]) > 50  # and refused
    assert kept() < len(oracle._buckets) / 2  # the same answers from a fraction of the state
    clock.advance(2 * HOUR)
    oracle_clock.advance(2 * HOUR)
    for _ in range(3):  # each sweep forgets a bounded number (SQLite, Redis: 1,000)
        store.sweep()
    assert kept() == 0  # leases left open expired; every bucket refilled or reset, then forgot
    assert len(oracle._buckets) > 300
    for user in (0, 1, 1_001):  # made again, full, when used
        assert [store.snapshot(s).level for s in specs_of(user)] == [100.0, 300.0, 400.0]
