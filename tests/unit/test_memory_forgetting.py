"""The memory store forgets full, unheld buckets, and no call is granted anything else for it.

The oracle is the same store with forgetting switched off: a randomized run of reserves
(many scopes, refill, calendar periods, a lending pool), settles above and below the
reservation, leases left to expire and long idle gaps must get the same result from both,
call for call, and read the same levels, while the forgetting store keeps far fewer buckets.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import pytest

from budgetguard.clock import FakeClock
from budgetguard.periods import PeriodRule
from budgetguard.stores import BucketSpec, Charge, MemoryStore, ReserveRequest

HOUR = 3600.0
HOURLY = PeriodRule("hour")  # UTC hours


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


def run(store: MemoryStore, clock: FakeClock, seed: int, steps: int) -> list[Any]:
    """A seeded sequence of operations; returns everything the store answered."""
    rng = random.Random(seed)
    trace: list[Any] = []
    open_ids: list[tuple[str, int]] = []
    for i in range(steps):
        roll = rng.random()
        if roll < 0.05:
            clock.advance(rng.choice([30.0, 200.0, HOUR]))  # long idle gaps: buckets refill or reset
        elif roll < 0.15:
            clock.advance(rng.random() * 5)
        user = rng.randrange(60) if rng.random() < 0.8 else 1_000 + i  # regulars and one-off users
        refill, hourly, pool = specs_of(user)
        amount = float(rng.choice([rng.randint(1, 10), rng.randint(1, 120)]))
        charges = (Charge(refill, amount, pool if rng.random() < 0.5 else None), Charge(hourly, amount))
        rid = f"r{i}"
        lease = 20.0 if rng.random() < 0.1 else 600.0  # some leases will expire and be swept
        result = store.reserve(ReserveRequest(rid, charges, lease))
        trace.append(("reserve", rid, result.ok, result.denial, sorted(e.id for e in result.expired)))
        if result.ok:
            open_ids.append((rid, len(charges)))
        if open_ids and rng.random() < 0.7:
            rid, n = open_ids.pop(rng.randrange(len(open_ids)))
            actuals = [float(rng.randint(0, 150)) for _ in range(n)]
            trace.append(("settle", rid, store.settle(rid, actuals)))
        if rng.random() < 0.02:
            trace.append(("sweep", sorted(e.id for e in store.sweep())))
        if rng.random() < 0.5:
            trace.append(("level", user, [store.snapshot(s).level for s in specs_of(user)]))
    return trace


@pytest.mark.parametrize("seed", range(6))
def test_forgetting_changes_no_grant(seed: int) -> None:
    clock_a, clock_b = FakeClock(), FakeClock()
    forgetting, keeping = MemoryStore(clock_a), NeverForgets(clock_b)
    got = run(forgetting, clock_a, seed, 3_000)
    expected = run(keeping, clock_b, seed, 3_000)
    assert got == expected
    assert sum(1 for step in got if step[0] == "reserve" and step[2]) > 500  # plenty granted
    assert sum(1 for step in got if step[0] == "reserve" and not step[2]) > 100  # and refused
    # The same answers from a fraction of the state.
    assert len(forgetting._buckets) < len(keeping._buckets) / 3
    clock_a.advance(2 * HOUR)
    clock_b.advance(2 * HOUR)
    forgetting.sweep()  # expires the leases left open, then forgets every full bucket
    keeping.sweep()
    assert forgetting.open_reservations() == 0
    assert forgetting._buckets == {}  # settles many periods late included
    assert len(keeping._buckets) > 1_000


def test_a_held_bucket_is_kept_until_settled() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    spec = BucketSpec("held", 100.0, refill_per_second=10.0)
    assert store.reserve(ReserveRequest("a", (Charge(spec, 5.0),))).ok
    clock.advance(60)  # refilled to full while the reservation is open
    store.sweep()
    assert spec.key in store._buckets
    assert store.settle("a", [50.0])
    assert store.snapshot(spec).level == 55.0  # the excess landed on the kept bucket
    clock.advance(60)
    store.sweep()
    assert spec.key not in store._buckets
    assert store.snapshot(spec).level == 100.0


def test_a_bucket_that_never_refills_is_kept() -> None:
    store = MemoryStore(FakeClock())
    spec = BucketSpec("lifetime", 100.0)
    assert store.reserve(ReserveRequest("a", (Charge(spec, 5.0),))).ok
    assert store.settle("a", [5.0])
    store.sweep()
    assert store.snapshot(spec).level == 95.0
    assert spec.key in store._buckets


def test_a_refund_to_full_makes_a_never_refilling_bucket_forgettable() -> None:
    store = MemoryStore(FakeClock())
    spec = BucketSpec("lifetime", 100.0)
    assert store.reserve(ReserveRequest("a", (Charge(spec, 5.0),))).ok
    assert store.settle("a", [0.0])
    store.sweep()
    assert spec.key not in store._buckets


def test_calls_forget_without_a_sweep_and_state_stays_bounded() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    most = 0
    for user in range(20_000):  # a stream of one-off users, one call each, 10 calls a second
        spec = BucketSpec(f"u\x1fuser={user}", 100.0, refill_per_second=1.0)
        assert store.reserve(ReserveRequest(f"r{user}", (Charge(spec, 30.0),))).ok
        assert store.settle(f"r{user}", [30.0])
        clock.advance(0.1)
        most = max(most, len(store._buckets))
    # A bucket refills 30 tokens in 30 s: about 300 users are not full yet at any time.
    assert most < 400
    assert len(store._full_at) == len(store._scheduled) <= most


def test_a_bucket_a_hair_short_of_full_is_kept() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    spec = BucketSpec("almost", 100.0, refill_per_second=1.0)
    assert store.reserve(ReserveRequest("a", (Charge(spec, 50.0),))).ok
    assert store.settle("a", [50.0])  # full again in 50 s: checked then
    clock.advance(49.5)
    assert store.reserve(ReserveRequest("b", (Charge(spec, 0.01),))).ok
    assert store.settle("b", [0.01])
    clock.advance(0.5)
    store.sweep()  # the check is due: 99.99, not full
    assert spec.key in store._buckets
    assert store.snapshot(spec).level == pytest.approx(99.99, abs=1e-9)
    clock.advance(0.02)
    store.sweep()
    assert spec.key not in store._buckets


def test_forgetting_gives_the_memory_back() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    for user in range(20_000):
        spec = BucketSpec(f"u\x1fuser={user}", 100.0, refill_per_second=1.0)
        assert store.reserve(ReserveRequest(f"r{user}", (Charge(spec, 30.0),))).ok
        assert store.settle(f"r{user}", [30.0])
    big = sys.getsizeof(store._buckets) + sys.getsizeof(store._scheduled)
    clock.advance(60)
    store.sweep()
    assert store._buckets == {}
    # A dict or set keeps its table when emptied; the store copies them.
    assert sys.getsizeof(store._buckets) + sys.getsizeof(store._scheduled) < big / 100
