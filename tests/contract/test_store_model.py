"""Every store against a simple model, step by step (Hypothesis state machine).

The model is a few dicts and the bucket rules written plainly (below), not base.py's
functions. Hypothesis drives a store and the model through random reserves (one or two
charges, some borrowing from a pool), settles (with smaller and larger actual amounts,
none, twice, after the lease expired, many periods late), sweeps, acknowledgements of
swept leases (some twice, some never swept) and clock moves (from nothing to hours,
across minute and hour boundaries), and after every step compares every bucket (level,
spent, period), every outcome (granted, denied with the same charge, amount available
and wait, the journal of swept leases reported until acknowledged) and the open leases.

A store may forget a bucket that is full and that no open reservation holds, and make it
again, full, on next use (when is its own business): levels and periods must not show it,
but the bucket's ``spent`` then counts from that moment. So a bucket's ``spent`` must be
the model's, less what the model had spent at one of the moments it was full and unheld.

A denial's wait is checked against the model by search: the earliest moment at which
the denied charge fits (bisection on what the model's buckets would then hold).

Time is a fake clock on every store; the Redis store runs its own scripts with the
server's clock replaced by that fake (tests/redis_fake_time.py).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from budgetguard.clock import FakeClock
from budgetguard.periods import PeriodRule
from budgetguard.stores import BucketSpec, Charge, MemoryStore, ReserveRequest, Store
from budgetguard.stores.base import JOURNAL_REPORT

START = 1_767_225_600.0 + 50  # 10 s before a minute boundary
SPECS = {
    "plain": BucketSpec("plain", 100.0),
    "refill": BucketSpec("refill", 100.0, 0.5),
    "minute": BucketSpec("minute", 50.0, 0.0, PeriodRule("minute")),
    "hourly": BucketSpec("hourly\x1fuser=é", 1000.0, 1.0, PeriodRule("hour", (1800.0,))),
    "pool": BucketSpec("pool", 200.0, 0.0, PeriodRule("hour")),
}
BORROWERS = ["plain", "refill", "minute", "hourly"]
EXAMPLES = {"memory": 1000, "sqlite": 1000, "redis": 200}  # at least what the earlier ad-hoc machine ran


# -- the model ---------------------------------------------------------------------------


@dataclass
class Bucket:
    level: float
    at: float
    period: float | None
    spent: float = 0.0


@dataclass
class Lease:
    charges: list[tuple[str, str | None, float, float, float | None, float | None]]  # key, lender, took, lent, periods
    expires: float
    meta: str


@dataclass
class Model:
    """The bucket rules, plainly: a bucket is brought to ``now`` before each use."""

    buckets: dict[str, Bucket] = field(default_factory=dict)
    leases: dict[str, Lease] = field(default_factory=dict)
    journal: dict[str, tuple[tuple[float, ...], str]] = field(default_factory=dict)  # swept, unacknowledged

    @staticmethod
    def at(bucket: Bucket | None, spec: BucketSpec, now: float) -> Bucket:
        """The bucket as of ``now`` (a copy): new ones start full, a new period refills it,
        refill adds rate x elapsed up to the capacity; time never runs backwards."""
        period = spec.period.bounds(now)[0] if spec.period is not None else None
        if bucket is None:
            return Bucket(spec.capacity, now, period)
        b = Bucket(bucket.level, bucket.at, bucket.period, bucket.spent)
        if period is not None and (b.period is None or period > b.period):
            return Bucket(spec.capacity, now, period, b.spent)
        if now > b.at:
            if b.level < spec.capacity:
                b.level = min(spec.capacity, b.level + spec.refill_per_second * (now - b.at))
            b.at = now
        b.level = min(b.level, spec.capacity)
        return b

    def get(self, key: str, now: float) -> Bucket:
        self.buckets[key] = self.at(self.buckets.get(key), SPECS[key], now)
        return self.buckets[key]

    def sweep(self, now: float) -> set[tuple[str, tuple[float, ...], str]]:
        """Charge the due leases as reserved, into the journal; what a store reports then."""
        due = sorted(rid for rid, lease in self.leases.items() if lease.expires <= now)
        for rid in due:
            lease = self.leases[rid]
            self.journal[rid] = (tuple(took + lent for _, _, took, lent, _, _ in lease.charges), lease.meta)
            self.settle(rid, None, now)
        assert len(self.journal) <= JOURNAL_REPORT  # fewer steps than that: all of it is reported
        return {(rid, amounts, meta) for rid, (amounts, meta) in self.journal.items()}

    def settle(self, rid: str, actuals: list[float] | None, now: float) -> bool:
        lease = self.leases.pop(rid, None)
        if lease is None:
            return False
        for i, (key, lender, took, lent, period, lender_period) in enumerate(lease.charges):
            final = took + lent if actuals is None else actuals[i]
            own = self.get(key, now)
            lent_final = lent
            if final < took + lent:  # a refund: to the lender first, and only into the period it was taken in
                refund = took + lent - final
                back = min(refund, lent)
                lent_final = lent - back
                if lender is not None and back:
                    pool = self.get(lender, now)
                    if pool.period == lender_period:
                        pool.level = min(SPECS[lender].capacity, pool.level + back)
                if refund - back and own.period == period:
                    own.level = min(SPECS[key].capacity, own.level + refund - back)
            else:  # the excess: always to the current period
                own.level -= final - (took + lent)
            own.spent += final - lent_final
            if lender is not None and lent_final:
                self.get(lender, now).spent += lent_final
        return True

    def available(self, keys: list[str], planned: dict[str, float], now: float) -> float:
        """What the buckets ``keys`` could give at ``now``, after what is planned from them."""
        return sum(max(self.at(self.buckets.get(k), SPECS[k], now).level - planned.get(k, 0.0), 0.0) for k in keys)

    def reserve(
        self, rid: str, charges: list[tuple[str, float, str | None]], lease: float, now: float
    ) -> tuple[bool, Any]:
        """Grant all charges or none; a denial is (index, key, requested, available, planned)."""
        planned: dict[str, float] = {}
        held = []
        for i, (key, amount, lender) in enumerate(charges):
            own = self.at(self.buckets.get(key), SPECS[key], now)
            avail = max(own.level - planned.get(key, 0.0), 0.0)
            took, lent = amount, 0.0
            if avail < amount:
                lavail = self.available([lender], planned, now) if lender else 0.0
                if lavail < amount - avail:
                    return False, (i, key, amount, avail + lavail, dict(planned))
                took, lent = avail, amount - avail
            planned[key] = planned.get(key, 0.0) + took
            lender_period = None
            if lent:
                assert lender is not None
                planned[lender] = planned.get(lender, 0.0) + lent
                lender_period = self.at(self.buckets.get(lender), SPECS[lender], now).period
            held.append((key, lender if lent else None, took, lent, own.period, lender_period))
        for key, lender, took, lent, _, _ in held:
            self.get(key, now).level -= took
            if lender is not None:
                self.get(lender, now).level -= lent
        self.leases[rid] = Lease(held, now + lease, f"meta-{rid}")
        return True, None

    def wait(self, key: str, lender: str | None, amount: float, planned: dict[str, float], now: float) -> float | None:
        """The earliest wait after which the charge fits, by bisection (None: not within a day)."""
        keys = [key] + ([lender] if lender else [])

        def fits(wait: float) -> bool:
            return self.available(keys, planned, now + wait) >= amount

        if not fits(86_400.0):
            return None
        lo, hi = 0.0, 86_400.0
        for _ in range(80):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
        return hi


# -- the machine ----------------------------------------------------------------------------

amounts = st.sampled_from([0.0, 0.5, 1.0, 3.0, 7.25, 10.0, 25.0, 49.0, 60.0, 99.5, 150.0, 400.0])
steps = st.sampled_from([0.0, 0.25, 1.0, 2.0, 9.5, 30.0, 59.0, 61.0, 125.0, 900.0, 3600.0, 3 * 3600 + 17.0])
charge = st.tuples(st.sampled_from(BORROWERS), amounts, st.booleans())


def make_machine(kind: str, open_store: Callable[[], tuple[Store, FakeClock, Callable[[], None]]]) -> type:
    class StoreMatchesModel(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.store, self.clock, self.cleanup = open_store()
            self.model = Model()
            self.ids = itertools.count()
            self.closed: list[str] = []
            # Per bucket: the model's spent at each moment the store could have forgotten it.
            self.forgettable: dict[str, set[float]] = {name: {0.0} for name in SPECS}

        def teardown(self) -> None:
            self.store.close()
            self.cleanup()

        @rule(seconds=steps)
        def advance(self, seconds: float) -> None:
            self.clock.advance(seconds)

        @rule(charges=st.lists(charge, min_size=1, max_size=2), lease=st.sampled_from([20.0, 600.0, 86_400.0]))
        def reserve(self, charges: list[tuple[str, float, bool]], lease: float) -> None:
            now = self.clock.now()
            rid = f"r{next(self.ids)}"
            request = ReserveRequest(
                rid,
                tuple(Charge(SPECS[k], a, SPECS["pool"] if borrow else None) for k, a, borrow in charges),
                lease,
                f"meta-{rid}",
            )
            got = self.store.reserve(request)
            expired = self.model.sweep(now)
            assert {(e.id, e.amounts, e.meta) for e in got.expired} == expired
            ok, denial = self.model.reserve(rid, [(k, a, "pool" if b else None) for k, a, b in charges], lease, now)
            assert got.ok == ok, (got, denial)
            if not ok:
                index, key, requested, available, planned = denial
                assert got.denial is not None
                assert (got.denial.index, got.denial.key, got.denial.requested) == (index, SPECS[key].key, requested)
                assert got.denial.available == pytest.approx(available, abs=1e-6)
                lender = "pool" if charges[index][2] else None
                expected = self.model.wait(key, lender, requested, planned, now)
                if expected is None:
                    assert got.denial.retry_after is None
                else:
                    assert got.denial.retry_after == pytest.approx(expected, rel=1e-6, abs=1e-6)

        def settle_one(self, rid: str, scale: float | None) -> None:
            lease = self.model.leases[rid]
            actuals = None if scale is None else [(took + lent) * scale for _, _, took, lent, _, _ in lease.charges]
            assert self.store.settle(rid, actuals) is True
            assert self.model.settle(rid, actuals, self.clock.now())
            self.closed.append(rid)

        @precondition(lambda self: self.model.leases)
        @rule(data=st.data(), scale=st.sampled_from([None, 0.0, 0.5, 1.0, 1.5, 4.0]))
        def settle(self, data: st.DataObject, scale: float | None) -> None:
            self.settle_one(data.draw(st.sampled_from(sorted(self.model.leases))), scale)

        @precondition(lambda self: self.model.leases)
        @rule(
            data=st.data(),
            late=st.sampled_from([61.0, 125.0, 3601.0, 5 * 3600 + 7.0]),
            scale=st.sampled_from([0.5, 1.5, 4.0]),
        )
        def settle_late(self, data: st.DataObject, late: float, scale: float) -> None:
            """A call that ends one or many periods after it was reserved (its lease may be due)."""
            rid = data.draw(st.sampled_from(sorted(self.model.leases)))
            self.clock.advance(late)
            self.settle_one(rid, scale)

        @precondition(lambda self: self.closed)
        @rule(data=st.data())
        def settle_again(self, data: st.DataObject) -> None:
            rid = data.draw(st.sampled_from(self.closed))
            assert self.store.settle(rid, [1.0, 1.0]) is False  # settled or swept: changes nothing

        @rule()
        def sweep(self) -> None:
            got = self.store.sweep()
            expected = self.model.sweep(self.clock.now())
            assert {(e.id, e.amounts, e.meta) for e in got} == expected
            self.closed += [e.id for e in got if e.id not in self.closed]

        @precondition(lambda self: self.model.journal or self.closed)
        @rule(data=st.data(), stranger=st.booleans())
        def acknowledge(self, data: st.DataObject, stranger: bool) -> None:
            """Acknowledge some reported leases, maybe with ids acknowledged before (or
            settled normally) and one the store never saw: only the journal's go."""
            known = sorted({*self.model.journal, *self.closed})
            ids = data.draw(st.lists(st.sampled_from(known), max_size=3, unique=True))
            ids += ["never-reserved"] if stranger else []
            self.store.acknowledge(ids)
            for rid in ids:
                self.model.journal.pop(rid, None)

        @invariant()
        def buckets_match(self) -> None:
            now = self.clock.now()
            held = {k for lease in self.model.leases.values() for c in lease.charges for k in c[:2] if k}
            for name, spec in SPECS.items():
                got = self.store.snapshot(spec)
                want = self.model.at(self.model.buckets.get(name), spec, now)
                assert got.level == pytest.approx(want.level, abs=1e-6), name
                if want.level >= spec.capacity and name not in held:  # the store may have forgotten it already
                    self.forgettable[name].add(want.spent)
                since = [want.spent - at for at in self.forgettable[name]]
                assert any(got.spent == pytest.approx(s, abs=1e-6) for s in since), (name, got.spent, since)
                assert got.period_start == want.period, name
            if hasattr(self.store, "open_reservations"):
                assert self.store.open_reservations() == len(self.model.leases)

    StoreMatchesModel.__name__ = f"StoreMatchesModel_{kind}"
    return StoreMatchesModel


@pytest.mark.parametrize("kind", ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_store_matches_the_model(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kind == "redis":
        from redis_fake_time import close, fake_server_time

        from budgetguard.stores.redis import RedisStore

        server = request.getfixturevalue("redis_server")
        clock = fake_server_time(monkeypatch, server.url, START)

    def open_store() -> tuple[Store, FakeClock, Callable[[], None]]:
        if kind == "memory":
            fake = FakeClock(START)
            return MemoryStore(clock=fake), fake, lambda: None
        if kind == "sqlite":
            from budgetguard.stores.sqlite import SQLiteStore

            fake = FakeClock(START)
            path = tmp_path / f"{uuid.uuid4().hex}.db"
            return SQLiteStore(path, clock=fake, host_clock=fake), fake, lambda: None
        clock.set(START)  # also the server's time
        return RedisStore(server.url, namespace=f"model-{uuid.uuid4().hex[:12]}"), clock, lambda: None

    machine = make_machine(kind, open_store)
    try:
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=EXAMPLES[kind],
                stateful_step_count=30,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            ),
        )
    finally:
        if kind == "redis":
            close(clock)
