"""How the memory store forgets full, unheld buckets (its own details).

That no grant changes, on every store, is tests/contract/test_forgetting.py; here: a held
bucket is kept, one that never refills is kept, a refund can make one forgettable, one a
hair short of full is kept, a stream of one-off users stays bounded without a sweep, and
the dict and set give their memory back.
"""

from __future__ import annotations

import sys

import pytest

from budgetguard.clock import FakeClock
from budgetguard.stores import BucketSpec, Charge, MemoryStore, ReserveRequest


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
