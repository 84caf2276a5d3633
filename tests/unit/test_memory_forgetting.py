"""How the memory store forgets full, unheld buckets (its own details).

That no grant changes, on every store, is tests/contract/test_forgetting.py; here: a held
bucket is kept, one that never refills is kept, a refund can make one forgettable, one a
hair short of full is kept, a stream of one-off users stays bounded without a sweep, the
dict and set give their memory back, and an idle store forgets in the background.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import time
from collections.abc import Callable

import pytest

from budgetguard.clock import FakeClock
from budgetguard.errors import ConfigurationError
from budgetguard.stores import memory
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


def _wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def forgetting(monkeypatch: pytest.MonkeyPatch) -> memory._Forgetting:
    """A background pass of its own, so other tests' stores do not keep its thread going."""
    own = memory._Forgetting()
    monkeypatch.setattr(memory, "_FORGETTING", own)
    return own


def test_an_idle_store_forgets_in_the_background(forgetting: memory._Forgetting) -> None:
    clock = FakeClock()
    store = MemoryStore(clock, forget_every=0.01)
    specs = [BucketSpec(f"u\x1fuser={i}", 100.0, refill_per_second=1.0) for i in range(5_000)]
    for i, spec in enumerate(specs):
        assert store.reserve(ReserveRequest(f"r{i}", (Charge(spec, 30.0),))).ok
        assert store.settle(f"r{i}", [30.0])
    assert len(store._buckets) == 5_000
    time.sleep(0.05)
    assert len(store._buckets) == 5_000  # not full yet: nothing to forget
    clock.advance(3600)  # every bucket refilled; no call comes
    assert _wait_for(lambda: not store._buckets)
    assert store.snapshot(specs[0]).level == 100.0


def test_the_background_pass_keeps_held_and_unfilled_buckets(forgetting: memory._Forgetting) -> None:
    clock = FakeClock()
    store = MemoryStore(clock, forget_every=0.01)
    held, slow = BucketSpec("held", 100.0, refill_per_second=10.0), BucketSpec("slow", 100.0, refill_per_second=0.001)
    assert store.reserve(ReserveRequest("h", (Charge(held, 5.0),))).ok
    assert store.reserve(ReserveRequest("s", (Charge(slow, 50.0),))).ok
    assert store.settle("s", [50.0])
    clock.advance(60)
    thread = forgetting._thread
    assert thread is not None
    time.sleep(0.1)  # several passes
    assert set(store._buckets) == {"held", "slow"}
    assert store.settle("h", [5.0])
    assert _wait_for(lambda: set(store._buckets) == {"slow"})


def test_the_background_thread_ends_with_its_stores(forgetting: memory._Forgetting) -> None:
    def used() -> MemoryStore:  # a bucket written (and so scheduled): the pass has the store
        store = MemoryStore(FakeClock(), forget_every=0.01)
        assert store.reserve(ReserveRequest("a", (Charge(BucketSpec("b", 10.0, refill_per_second=1.0), 1.0),))).ok
        assert store.settle("a", [1.0])
        return store

    store, closed = used(), used()
    thread = forgetting._thread
    assert thread is not None and thread.is_alive()
    closed.close()
    time.sleep(0.05)
    assert thread.is_alive()  # the other store is still there
    del store
    gc.collect()
    assert _wait_for(lambda: not thread.is_alive())
    assert forgetting._thread is None


def test_no_background_pass_when_asked_for_none(forgetting: memory._Forgetting) -> None:
    store = MemoryStore(FakeClock(), forget_every=None)
    assert store.reserve(ReserveRequest("a", (Charge(BucketSpec("b", 10.0, refill_per_second=1.0), 1.0),))).ok
    assert store.settle("a", [1.0])
    assert store._full_at and forgetting._thread is None


@pytest.mark.parametrize("every", [0, -1.0, "60", math.nan, math.inf, True])
def test_forget_every_must_be_a_positive_number(every: object) -> None:
    with pytest.raises(ConfigurationError, match="forget_every must be a positive number of seconds or None"):
        MemoryStore(forget_every=every)  # type: ignore[arg-type]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_during_a_pass_can_use_its_store() -> None:
    # A pass holds the store's lock while it forgets a batch; a child forked then must not
    # inherit it held by a thread the child does not have. (The process's own background
    # pass: the fork hooks serve it.)
    clock = FakeClock()
    store = MemoryStore(clock, forget_every=0.001)

    def use(prefix: str, users: range) -> None:
        for i in users:
            spec = BucketSpec(f"u\x1fuser={i}", 100.0, refill_per_second=1.0)
            assert store.reserve(ReserveRequest(f"{prefix}{i}", (Charge(spec, 30.0),))).ok
            assert store.settle(f"{prefix}{i}", [30.0])

    use("r", range(100_000))
    forks = 0
    for round_ in range(3):
        clock.advance(3600)  # all due: the pass forgets them, a thousand per hold of the lock
        while store._buckets:
            pid = os.fork()
            if pid == 0:
                os._exit(0 if store._lock.acquire(timeout=2) else 1)  # what every call does first
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            forks += 1
        use(f"again{round_}-", range(0, 100_000, 2))
    assert forks >= 3
