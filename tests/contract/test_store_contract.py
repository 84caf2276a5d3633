"""One contract for every store: memory, SQLite and Redis, each driven sync and async.

Every test body is written once against :class:`Harness`, whose methods are awaitable
and call either the sync method (``mode="sync"``) or its async twin (``mode="async"``).

Time: memory and SQLite use a :class:`FakeClock` (``advance`` is instant and exact);
Redis uses its server's clock, so ``advance`` really sleeps and the checks allow for the
time that passes in between (``Harness.real_time``). Steps are short (tenths of seconds)
and period bounds are set relative to ``now``, so the same body works for both.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from period_rules import rule_ending_at

from budgetguard.clock import FakeClock
from budgetguard.stores import (
    BucketSpec,
    Charge,
    ExpiredLease,
    MemoryStore,
    ReserveRequest,
    ReserveResult,
)
from budgetguard.stores.base import JOURNAL_REPORT, BucketState

KINDS = ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)]
SLACK = 0.5  # seconds of real time a Redis test may lose between two steps


def make_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Any:
    """Build a fresh store of ``kind`` (Redis: a new namespace on the session's server)."""
    if kind == "memory":
        return MemoryStore(clock=clock)
    if kind == "sqlite":
        from budgetguard.stores.sqlite import SQLiteStore

        return SQLiteStore(tmp_path / "budgets.db", clock=clock, busy_timeout=5.0)
    from budgetguard.stores.redis import RedisStore

    server = request.getfixturevalue("redis_server")
    return RedisStore(server.url, namespace=f"contract-{uuid.uuid4().hex[:12]}")


@dataclass
class Harness:
    """A store plus how to call it (sync or async) and how time moves for it."""

    store: Any
    mode: str
    clock: FakeClock | None  # None: the store keeps real (server) time

    @property
    def real_time(self) -> bool:
        return self.clock is None

    def now(self) -> float:
        return time.time() if self.clock is None else self.clock.now()

    async def advance(self, seconds: float) -> None:
        if self.clock is None:
            await asyncio.sleep(seconds)
        else:
            self.clock.advance(seconds)

    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        return self.store.reserve(request) if self.mode == "sync" else await self.store.areserve(request)

    async def settle(self, rid: str, actuals: Sequence[float] | None) -> bool:
        return self.store.settle(rid, actuals) if self.mode == "sync" else await self.store.asettle(rid, actuals)

    async def snapshot(self, spec: BucketSpec) -> BucketState:
        return self.store.snapshot(spec) if self.mode == "sync" else await self.store.asnapshot(spec)

    async def sweep(self) -> tuple[ExpiredLease, ...]:
        return self.store.sweep() if self.mode == "sync" else await self.store.asweep()

    async def acknowledge(self, ids: Sequence[str]) -> None:
        if self.mode == "sync":
            self.store.acknowledge(ids)
        else:
            await self.store.aacknowledge(ids)

    async def level(self, spec: BucketSpec) -> float:
        return (await self.snapshot(spec)).level

    def near(self, actual: float, expected: float, *, rate: float = 0.0) -> bool:
        """``actual`` is ``expected``, or (real time) up to SLACK seconds of refill above it."""
        if not self.real_time:
            return actual == pytest.approx(expected, abs=1e-9)
        return expected - 1e-6 <= actual <= expected + rate * SLACK + 1e-6

    def wait_near(self, actual: float | None, expected: float) -> bool:
        """A retry_after: exact, or (real time) up to SLACK seconds shorter."""
        if actual is None:
            return False
        if not self.real_time:
            return actual == pytest.approx(expected, abs=1e-9)
        return expected - SLACK - 1e-6 <= actual <= expected + 1e-6


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=KINDS)
async def h(request: pytest.FixtureRequest, mode: str, tmp_path: Path) -> AsyncIterator[Harness]:
    clock = FakeClock()
    kind = str(request.param)
    store = make_store(kind, request, tmp_path, clock)
    harness = Harness(store, mode, None if kind == "redis" else clock)
    try:
        yield harness
    finally:
        if hasattr(store, "aclose"):
            await store.aclose()
        else:
            store.close()


def req(rid: str, *charges: Charge, lease: float = 60.0, meta: str = "") -> ReserveRequest:
    return ReserveRequest(rid, tuple(charges), lease, meta)


# -- new buckets, all-or-nothing, denials -----------------------------------------------


async def test_new_bucket_is_full(h: Harness) -> None:
    spec = BucketSpec("fresh", 10.0, 1.0)
    state = await h.snapshot(spec)
    assert state.level == 10.0
    assert state.spent == 0.0
    assert (await h.reserve(req("r1", Charge(spec, 10.0)))).ok
    assert h.near(await h.level(spec), 0.0, rate=1.0)


async def test_snapshot_is_read_only(h: Harness) -> None:
    spec = BucketSpec("ro", 10.0)
    await h.snapshot(spec)
    assert (await h.snapshot(BucketSpec("ro", 20.0))).level == 20.0  # nothing was stored


async def test_reservation_is_all_or_nothing(h: Harness) -> None:
    a, b, c = BucketSpec("a", 10.0), BucketSpec("b", 5.0), BucketSpec("c", 100.0)
    result = await h.reserve(req("r1", Charge(a, 4.0), Charge(b, 6.0), Charge(c, 1.0)))
    assert not result.ok
    assert result.denial is not None
    assert (result.denial.index, result.denial.key, result.denial.requested, result.denial.available) == (
        1,
        "b",
        6.0,
        5.0,
    )
    assert result.denial.retry_after is None  # more than b's capacity, and b never refills
    assert [await h.level(s) for s in (a, b, c)] == [10.0, 5.0, 100.0]
    assert not await h.settle("r1", [0.0, 0.0, 0.0])  # the denied reservation holds nothing

    # Two charges on one bucket see each other.
    result = await h.reserve(req("r2", Charge(a, 6.0), Charge(a, 6.0)))
    assert result.denial is not None
    assert (result.denial.index, result.denial.available) == (1, 4.0)
    assert await h.level(a) == 10.0

    assert (await h.reserve(req("r3", Charge(a, 4.0), Charge(b, 5.0), Charge(c, 1.0)))).ok
    assert [await h.level(s) for s in (a, b, c)] == [6.0, 0.0, 99.0]


async def test_duplicate_open_id_is_refused(h: Harness) -> None:
    spec = BucketSpec("dup", 10.0)
    assert (await h.reserve(req("same", Charge(spec, 1.0)))).ok
    with pytest.raises(ValueError, match="already open"):
        await h.reserve(req("same", Charge(spec, 1.0)))
    assert await h.level(spec) == 9.0
    assert await h.settle("same", [1.0])
    assert (await h.reserve(req("same", Charge(spec, 1.0)))).ok  # settled ids may be reused


async def test_denial_retry_after_refill(h: Harness) -> None:
    spec = BucketSpec("refill", 10.0, 2.0)
    assert (await h.reserve(req("r1", Charge(spec, 10.0)))).ok
    result = await h.reserve(req("r2", Charge(spec, 4.0)))
    assert result.denial is not None
    assert (result.denial.key, result.denial.requested) == ("refill", 4.0)
    assert h.near(result.denial.available, 0.0, rate=2.0)
    assert h.wait_near(result.denial.retry_after, 2.0)


async def test_denial_retry_after_period(h: Harness) -> None:
    now = h.now()
    spec = BucketSpec("daily", 10.0, 0.0, rule_ending_at(now + 100.0))
    assert (await h.reserve(req("r1", Charge(spec, 8.0)))).ok
    result = await h.reserve(req("r2", Charge(spec, 3.0)))
    assert result.denial is not None
    assert result.denial.available == 2.0
    assert h.wait_near(result.denial.retry_after, 100.0)
    # Refill and period together: the sooner one counts.
    both = BucketSpec("both", 10.0, 0.01, rule_ending_at(now + 100.0))
    assert (await h.reserve(req("r3", Charge(both, 10.0)))).ok
    result = await h.reserve(req("r4", Charge(both, 0.5)))
    assert result.denial is not None
    assert h.wait_near(result.denial.retry_after, 50.0)


async def test_denial_retry_after_never(h: Harness) -> None:
    now = h.now()
    for spec in (
        BucketSpec("plain", 10.0),
        BucketSpec("refilling", 10.0, 5.0),
        BucketSpec("period", 10.0, 0.0, rule_ending_at(now + 60.0)),
    ):
        result = await h.reserve(req(f"big-{spec.key}", Charge(spec, 10.5)))
        assert result.denial is not None
        assert result.denial.retry_after is None, spec  # more than the capacity
    plain = BucketSpec("plain", 10.0)
    assert (await h.reserve(req("r1", Charge(plain, 10.0)))).ok
    result = await h.reserve(req("r2", Charge(plain, 1.0)))
    assert result.denial is not None
    assert result.denial.retry_after is None  # no refill, no period


# -- refill and periods -----------------------------------------------------------------


async def test_continuous_refill_up_to_capacity(h: Harness) -> None:
    spec = BucketSpec("tps", 10.0, 20.0)
    assert (await h.reserve(req("r1", Charge(spec, 10.0)))).ok
    await h.advance(0.25)
    assert h.near(await h.level(spec), 5.0, rate=20.0)
    await h.advance(0.3)
    assert await h.level(spec) == 10.0  # capped
    await h.advance(0.1)
    assert await h.level(spec) == 10.0


async def test_lowered_capacity_caps_the_level(h: Harness) -> None:
    assert (await h.reserve(req("r1", Charge(BucketSpec("cap", 100.0), 10.0)))).ok
    assert await h.level(BucketSpec("cap", 50.0)) == 50.0
    assert (await h.reserve(req("r2", Charge(BucketSpec("cap", 50.0), 5.0)))).ok
    assert await h.level(BucketSpec("cap", 50.0)) == 45.0


async def test_calendar_period_reset(h: Harness) -> None:
    now = h.now()
    spec = BucketSpec("monthly", 10.0, 0.0, rule_ending_at(now + 0.2))
    assert (await h.reserve(req("r1", Charge(spec, 10.0)))).ok
    assert (await h.reserve(req("r2", Charge(spec, 1.0)))).denial is not None
    assert (await h.snapshot(spec)).level == 0.0
    await h.advance(0.3)  # the store's clock passes the boundary: a full bucket
    state = await h.snapshot(spec)
    assert (state.level, state.period_start) == (10.0, pytest.approx(now + 0.2, abs=1e-6))
    assert (await h.reserve(req("r3", Charge(spec, 4.0)))).ok
    assert (await h.snapshot(spec)).level == 6.0


async def test_a_new_period_drops_old_refunds_and_takes_the_excess(h: Harness) -> None:
    now = h.now()
    spec = BucketSpec("hourly", 10.0, 0.0, rule_ending_at(now + 0.2))
    assert (await h.reserve(req("old", Charge(spec, 6.0)))).ok
    assert (await h.reserve(req("old2", Charge(spec, 4.0)))).ok
    await h.advance(0.3)
    state = await h.snapshot(spec)
    assert (state.level, state.period_start) == (10.0, pytest.approx(now + 0.2, abs=1e-6))
    assert (await h.reserve(req("new", Charge(spec, 3.0)))).ok
    assert await h.settle("old", [1.0])  # its refund of 5 belongs to the finished period
    assert await h.settle("old2", [9.0])  # its excess of 5 lands in the current period
    state = await h.snapshot(spec)
    assert state.level == 2.0
    assert state.spent == 10.0


# -- borrowing --------------------------------------------------------------------------


async def test_borrowing_from_a_lender_and_refunds_to_the_lender_first(h: Harness) -> None:
    team, pool = BucketSpec("team", 10.0), BucketSpec("pool", 100.0)
    assert (await h.reserve(req("r1", Charge(team, 15.0, pool)))).ok
    assert (await h.level(team), await h.level(pool)) == (0.0, 95.0)
    assert await h.settle("r1", [12.0])  # refund 3: all of it goes back to the pool
    team_state, pool_state = await h.snapshot(team), await h.snapshot(pool)
    assert (team_state.level, pool_state.level) == (0.0, 98.0)
    assert (team_state.spent, pool_state.spent) == (10.0, 2.0)

    other = BucketSpec("other", 10.0)
    assert (await h.reserve(req("r2", Charge(other, 15.0, pool)))).ok  # takes 10 + 5
    assert await h.settle("r2", [4.0])  # refund 11: 5 to the pool, 6 to the bucket
    other_state, pool_state = await h.snapshot(other), await h.snapshot(pool)
    assert (other_state.level, pool_state.level) == (6.0, 98.0)
    assert (other_state.spent, pool_state.spent) == (4.0, 2.0)


async def test_borrowing_denied_when_the_lender_cannot_cover(h: Harness) -> None:
    team, pool = BucketSpec("team", 10.0), BucketSpec("small-pool", 3.0, 1.0)
    result = await h.reserve(req("r1", Charge(team, 15.0, pool)))
    assert result.denial is not None
    assert (result.denial.key, result.denial.requested, result.denial.available) == ("team", 15.0, 13.0)
    assert result.denial.retry_after is None  # 15 > the team's capacity, and 5 > the pool's
    assert (await h.level(team), await h.level(pool)) == (10.0, 3.0)
    # The shortfall fits the pool once it refills: the pool's wait counts.
    assert (await h.reserve(req("r2", Charge(pool, 3.0)))).ok
    result = await h.reserve(req("r3", Charge(team, 12.0, pool)))
    assert result.denial is not None
    assert h.wait_near(result.denial.retry_after, 2.0)


# -- reconciliation ----------------------------------------------------------------------


async def test_reconcile_down_refunds(h: Harness) -> None:
    spec = BucketSpec("usd", 1.0)
    assert (await h.reserve(req("r1", Charge(spec, 0.3)))).ok
    assert await h.settle("r1", [0.1])
    state = await h.snapshot(spec)
    assert state.level == pytest.approx(0.9, abs=1e-12)
    assert state.spent == pytest.approx(0.1, abs=1e-12)


async def test_reconcile_up_overspends_then_waits(h: Harness) -> None:
    spec = BucketSpec("tokens", 10.0, 1.0)
    assert (await h.reserve(req("r1", Charge(spec, 5.0)))).ok
    assert await h.settle("r1", [12.0])
    state = await h.snapshot(spec)
    assert h.near(state.level, -2.0, rate=1.0)
    assert state.spent == 12.0
    result = await h.reserve(req("r2", Charge(spec, 1.0)))
    assert result.denial is not None
    assert result.denial.available == 0.0
    assert h.wait_near(result.denial.retry_after, 3.0)


async def test_settle_twice_is_once(h: Harness) -> None:
    spec = BucketSpec("once", 10.0)
    assert (await h.reserve(req("r1", Charge(spec, 5.0)))).ok
    assert await h.settle("r1", [2.0])
    assert not await h.settle("r1", [2.0])
    assert not await h.settle("r1", None)
    state = await h.snapshot(spec)
    assert (state.level, state.spent) == (8.0, 2.0)


async def test_settle_unknown_id(h: Harness) -> None:
    assert not await h.settle("never-reserved", [1.0])
    assert not await h.settle("never-reserved", None)
    assert (await h.snapshot(BucketSpec("x", 5.0))).level == 5.0


async def test_settle_without_actuals_charges_the_reservation(h: Harness) -> None:
    spec = BucketSpec("release", 10.0)
    assert (await h.reserve(req("r1", Charge(spec, 4.0)))).ok
    assert await h.settle("r1", None)
    state = await h.snapshot(spec)
    assert (state.level, state.spent) == (6.0, 4.0)


# -- leases -----------------------------------------------------------------------------


async def test_expired_lease_is_charged_once_and_reported_until_acknowledged(h: Harness) -> None:
    spec, other = BucketSpec("lease", 10.0), BucketSpec("unrelated", 10.0)
    dead = ExpiredLease("dead", (4.0,), '{"run": "dead"}')
    assert (await h.reserve(req("dead", Charge(spec, 4.0), lease=0.2, meta=dead.meta))).ok
    assert (await h.reserve(req("alive", Charge(spec, 1.0), lease=60.0))).ok
    await h.advance(0.3)
    result = await h.reserve(req("next", Charge(other, 1.0)))
    assert result.ok
    assert result.expired == (dead,)
    state = await h.snapshot(spec)
    assert (state.level, state.spent) == (5.0, 4.0)  # charged the reserved amount
    # Whoever was told may die before recording it: every later reserve and sweep (of any
    # process) reports it again, until someone acknowledges it; it is charged only once.
    assert (await h.reserve(req("next2", Charge(other, 1.0)))).expired == (dead,)
    assert await h.sweep() == (dead,)
    assert await h.sweep() == (dead,)
    assert not await h.settle("dead", [0.0])  # too late: nothing changes
    await h.acknowledge(["dead"])
    assert (await h.reserve(req("next3", Charge(other, 1.0)))).expired == ()
    assert await h.sweep() == ()
    await h.acknowledge(["dead"])  # again, and ids the store never knew: nothing happens
    await h.acknowledge(["never-swept", "alive"])
    await h.acknowledge([])
    after = await h.snapshot(spec)
    assert (after.level, after.spent) == (5.0, 4.0)
    assert await h.settle("alive", [1.0])  # an open lease is not a journal entry
    assert (await h.snapshot(spec)).spent == 5.0


async def test_sweep_reports_expired_leases_and_a_denial_still_reports_them(h: Harness) -> None:
    team, pool = BucketSpec("team", 10.0), BucketSpec("pool", 100.0)
    assert (await h.reserve(req("a", Charge(team, 12.0, pool), lease=0.2, meta="m-a"))).ok
    assert (await h.reserve(req("b", Charge(pool, 3.0), lease=0.2, meta="m-b"))).ok
    await h.advance(0.3)
    expired = await h.sweep()
    swept = [ExpiredLease("a", (12.0,), "m-a"), ExpiredLease("b", (3.0,), "m-b")]
    assert sorted(expired, key=lambda e: e.id) == swept
    await h.acknowledge(["b"])  # one of two
    assert await h.sweep() == (swept[0],)
    await h.acknowledge(["a"])
    assert await h.sweep() == ()
    team_state, pool_state = await h.snapshot(team), await h.snapshot(pool)
    assert (team_state.level, team_state.spent) == (0.0, 10.0)
    assert (pool_state.level, pool_state.spent) == (95.0, 5.0)

    assert (await h.reserve(req("c", Charge(pool, 1.0), lease=0.2, meta="m-c"))).ok
    await h.advance(0.3)
    result = await h.reserve(req("d", Charge(team, 1.0)))  # denied, and reports the sweep
    assert result.denial is not None
    assert result.expired == (ExpiredLease("c", (1.0,), "m-c"),)
    again = await h.reserve(req("d", Charge(team, 1.0)))  # denied again: the journal still reported
    assert again.denial is not None and again.expired == result.expired
    await h.acknowledge(["c"])
    last = await h.reserve(req("d", Charge(team, 1.0)))
    assert last.denial is not None and last.expired == ()
    assert (await h.snapshot(pool)).spent == 6.0


async def test_the_journal_reports_its_oldest_sweeps_a_bounded_number_per_call(h: Harness) -> None:
    """After a crash of many workers the journal may be long: each call reports at most
    JOURNAL_REPORT entries, the oldest sweeps first, and the rest once those are acknowledged."""
    spec = BucketSpec("many", 1e9)
    early = [f"early-{i}" for i in range(5)]
    for rid in early:
        assert (await h.reserve(req(rid, Charge(spec, 1.0), lease=0.2))).ok
    await h.advance(0.3)
    assert {e.id for e in await h.sweep()} == set(early)
    late = [f"late-{i}" for i in range(JOURNAL_REPORT + 10)]
    for rid in late:
        assert (await h.reserve(req(rid, Charge(spec, 2.0), lease=0.5))).ok
    await h.advance(0.6)
    first = await h.sweep()
    assert len(first) == JOURNAL_REPORT
    assert set(early) <= {e.id for e in first}  # swept earlier: reported first
    assert (await h.reserve(req("probe", Charge(spec, 1.0)))).expired == first
    await h.acknowledge([e.id for e in first])
    rest = await h.sweep()
    assert {e.id for e in rest} == set(early + late) - {e.id for e in first}
    assert all(e.amounts == (2.0,) for e in rest)
    await h.acknowledge([e.id for e in rest])
    assert await h.sweep() == ()
    assert (await h.snapshot(spec)).spent == 5 * 1.0 + len(late) * 2.0


# -- accounting and keys ----------------------------------------------------------------


async def test_spent_counts_settled_spend(h: Harness) -> None:
    spec = BucketSpec("spend", 1000.0)
    rng = random.Random(7)
    total = 0.0
    for i in range(20):
        amount = float(rng.randint(1, 40))
        assert (await h.reserve(req(f"r{i}", Charge(spec, amount)))).ok
        actual = float(rng.randint(0, 60))
        assert await h.settle(f"r{i}", [actual])
        total += actual
    state = await h.snapshot(spec)
    assert state.spent == total
    assert state.level == 1000.0 - total


async def test_float_amounts_round_trip_exactly(h: Harness) -> None:
    spec = BucketSpec("usd-precise", 0.1 + 0.2)
    assert (await h.reserve(req("r1", Charge(spec, 1 / 3)))).denial is not None
    assert (await h.reserve(req("r2", Charge(spec, 0.1)))).ok
    assert await h.settle("r2", [1e-7])
    state = await h.snapshot(spec)
    assert state.level == (0.1 + 0.2) - 0.1 + (0.1 - 1e-7)
    assert state.spent == 1e-7


HOSTILE_KEYS = [
    "user:1",
    "user:1\n",
    "user\x1fuser_id=1",
    "{user}:1",
    "{contract}:leases",
    "bucket:x",
    "",
    " ",
    "ünïcødé-💸",
    "k" * 2000,
    "a\r\nHSET x y z",
]


async def test_hostile_keys_do_not_collide(h: Harness) -> None:
    specs = [BucketSpec(key, 100.0) for key in HOSTILE_KEYS]
    for i, spec in enumerate(specs):
        assert (await h.reserve(req(f"r{i}\n{{x}}", Charge(spec, float(i + 1)), meta=spec.key))).ok
    for i, spec in enumerate(specs):
        assert await h.level(spec) == 100.0 - (i + 1), repr(spec.key)
    for i, _ in enumerate(specs):
        assert await h.settle(f"r{i}\n{{x}}", [0.0])
    assert all([(await h.level(spec)) == 100.0 for spec in specs])


# -- the stores agree with the reference ------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def test_random_workload_matches_memory_store(
    kind: str, mode: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A seeded random mix of reserves, settles and sweeps leaves identical buckets.

    SQLite shares the reference's fake clock, refill included. Redis keeps its own clock,
    so its workload has no refill and only leases that never expire mid-test.
    """
    fake = FakeClock()
    ref = Harness(MemoryStore(clock=fake), "sync", fake)
    other_store = make_store(kind, request, tmp_path, fake)
    other = Harness(other_store, mode, fake if kind == "sqlite" else None)
    rng = random.Random(2024)
    refill = kind == "sqlite"
    specs = [
        BucketSpec(f"b{i}", float(rng.choice([50, 100, 1000])), rng.choice([0.0, 0.5]) if refill else 0.0)
        for i in range(4)
    ]
    pool = BucketSpec("pool", 500.0)
    open_ids: list[str] = []
    try:
        for step in range(150):
            op = rng.random()
            if op < 0.55 or not open_ids:
                charges = tuple(
                    Charge(spec, float(rng.randint(1, 60)), pool if rng.random() < 0.3 else None)
                    for spec in rng.sample(specs, rng.randint(1, 3))
                )
                lease = rng.choice([5.0, 600.0]) if refill else 600.0
                request_ = req(f"s{step}", *charges, lease=lease, meta=f"m{step}")
                expected, got = await ref.reserve(request_), await other.reserve(request_)
                assert (got.ok, got.denial) == (expected.ok, expected.denial), step
                assert sorted(got.expired, key=lambda e: e.id) == sorted(expected.expired, key=lambda e: e.id), step
                reported = [e.id for e in got.expired]  # recorded: as a guard does
                await ref.acknowledge(reported)
                await other.acknowledge(reported)
                if got.ok:
                    open_ids.append(request_.id)
            else:
                rid = open_ids.pop(rng.randrange(len(open_ids)))
                actuals = None if rng.random() < 0.2 else [float(rng.randint(0, 80)) for _ in range(3)]
                assert await other.settle(rid, actuals) == await ref.settle(rid, actuals), step
            if refill:
                fake.advance(rng.choice([0.0, 0.5, 3.0]))
        if refill:
            fake.advance(10.0)
            assert sorted(await other.sweep(), key=lambda e: e.id) == sorted(await ref.sweep(), key=lambda e: e.id)
        for spec in [*specs, pool]:
            expected_state, got_state = await ref.snapshot(spec), await other.snapshot(spec)
            assert (got_state.level, got_state.spent) == (expected_state.level, expected_state.spent), spec.key
    finally:
        if hasattr(other_store, "aclose"):
            await other_store.aclose()


# -- building stores --------------------------------------------------------------------


def test_store_from_url(tmp_path: Path) -> None:
    from budgetguard.stores import store_from_url
    from budgetguard.stores.sqlite import SQLiteStore

    store = store_from_url(f"sqlite:///{tmp_path}/from-url.db", clock=FakeClock(), busy_timeout=1.0)
    assert isinstance(store, SQLiteStore)
    assert store.busy_timeout == 1.0
    assert store.reserve(req("r", Charge(BucketSpec("u", 5.0), 1.0))).ok
    store.close()


@pytest.mark.redis
async def test_redis_store_takes_clients_and_urls(redis_server: Any) -> None:
    import redis
    import redis.asyncio

    from budgetguard.errors import ConfigurationError
    from budgetguard.stores import store_from_url
    from budgetguard.stores.redis import RedisStore

    spec = BucketSpec("clients", 10.0)
    for bad in ("", "a{b}", "x\n"):
        with pytest.raises(ConfigurationError, match="namespace"):
            RedisStore(redis_server.url, namespace=bad)
    from_url = store_from_url(redis_server.url, namespace="clients")
    assert isinstance(from_url, RedisStore)

    sync_client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    store = RedisStore(sync_client, namespace="clients")  # async methods use a worker thread
    assert (await store.areserve(req("c1", Charge(spec, 3.0), meta="m"))).ok
    assert store.snapshot(spec).level == 7.0

    async_client = redis.asyncio.Redis.from_url(redis_server.url)
    both = RedisStore(sync_client, async_client=async_client, namespace="clients")
    assert await both.asettle("c1", [1.0])
    assert (await both.asnapshot(spec)).level == 9.0
    async_only = RedisStore(async_client, namespace="clients")
    assert (await async_only.asnapshot(spec)).spent == 1.0
    with pytest.raises(ConfigurationError, match="asyncio client only"):
        async_only.snapshot(spec)
    assert from_url.snapshot(spec).level == 9.0
    hex_key = from_url.bucket_field(spec.key).removeprefix("b:")
    assert sync_client.hget("{clients}:state", "k:" + hex_key) == "clients"  # the readable key
    await async_client.aclose()
    sync_client.close()
    from_url.close()


# -- the guard over each store ---------------------------------------------------------


async def test_a_guard_reserves_borrows_and_reconciles_through_the_store(h: Harness) -> None:
    """``guard | model`` end to end on this store: the guard's lines are the store's charges."""
    from budgetguard import Budget, BudgetExceeded, BudgetGuard
    from budgetguard.testing.fake_models import UsageFakeChatModel

    guard = BudgetGuard(
        [
            Budget("g", limit=1000),
            Budget("u", limit=20, per="user_id", borrow_from="pool"),
            Budget("pool", limit=100),
        ],
        store=h.store,
        clock=h.clock,
        ledger=False,
    )
    model = UsageFakeChatModel(model_name="gpt-4", replies=["one two three"], input_tokens=10, max_tokens=5)
    question = "please summarise the following text for me in one line"
    alice = {"configurable": {"user_id": "alice"}}

    async def call(runnable: Any) -> Any:
        if h.mode == "sync":
            return runnable.invoke(question, alice)
        return await runnable.ainvoke(question, alice)

    chain = guard | model
    first = await call(chain)
    reserved = first.response_metadata["budgetguard"]["reserved"]["u"]
    assert reserved > 13  # the estimate (prompt + the cap of 5) exceeds what the call reports
    # Call 1 used 13 of alice's 20. Call 2 reserves more than the 7 left, borrows the rest
    # from the pool, and the refund goes back to the pool first: the pool gets back all but 6.
    await call(chain)
    assert guard.remaining("u", user_id="alice") == pytest.approx(0.0, abs=1e-9)
    assert guard.remaining("pool") == pytest.approx(94.0, abs=1e-9)
    assert guard.remaining("g") == pytest.approx(1000.0 - 26, abs=1e-9)
    # Spend: alice 13 + 7 of her own, the pool the 6 it lent and kept.
    assert h.store.snapshot(guard._spec(guard.budgets["u"], {"user_id": "alice"})).spent == pytest.approx(20.0)
    assert h.store.snapshot(guard._spec(guard.budgets["pool"], {})).spent == pytest.approx(6.0)

    # A call whose cap the pool cannot cover is refused before it is sent; nothing changes.
    big = guard | model.model_copy(update={"max_tokens": 500})
    with pytest.raises(BudgetExceeded) as info:
        await call(big)
    assert info.value.budget == "u" and info.value.scope == {"user_id": "alice"}
    assert model.calls == 2
    assert guard.remaining("pool") == pytest.approx(94.0, abs=1e-9)
    assert guard.remaining("g") == pytest.approx(974.0, abs=1e-9)
    assert h.store.open_reservations() == 0


async def test_every_ending_through_a_guard_on_this_store(h: Harness) -> None:
    """The one settlement rule on this store: completed, stopped stream, failed, cancelled."""
    from budgetguard import Budget, BudgetGuard
    from budgetguard.testing.fake_models import UsageFakeChatModel

    guard = BudgetGuard([Budget("g", limit=10_000)], store=h.store, clock=h.clock, ledger=False)
    model = UsageFakeChatModel(model_name="gpt-4", replies=["alpha beta gamma delta"], input_tokens=12, max_tokens=20)
    copy = guard.model(model)
    prompt = guard.estimator.count_messages([HumanMessage("hi")], "gpt-4")

    async def left() -> float:
        return guard.remaining("g") if h.mode == "sync" else await guard.aremaining("g")

    # completed: the reported usage
    await (asyncio.to_thread(copy.invoke, "hi") if h.mode == "sync" else copy.ainvoke("hi"))
    assert h.near(await left(), 10_000 - (12 + 4))
    # stopped after the first chunk: the prompt estimate and the chunk, on the spot
    before = await left()
    if h.mode == "sync":
        stream = copy.stream("hi")
        next(stream)
        stream.close()
    else:
        astream = copy.astream("hi")
        await anext(astream)
        await astream.aclose()
    assert h.store.open_reservations() == 0
    assert h.near(await left(), before - (prompt + 1))
    # failed before any output: nothing
    before = await left()
    broken = guard.model(model.model_copy(update={"fail_with": ConnectionError("refused")}))
    with pytest.raises(ConnectionError):
        await (asyncio.to_thread(broken.invoke, "hi") if h.mode == "sync" else broken.ainvoke("hi"))
    assert h.near(await left(), before)
    # cancelled while the model works: the prompt estimate, on the spot
    if h.mode == "async":
        before = await left()
        slow = guard.model(model.model_copy(update={"latency": 5.0}))
        task = asyncio.create_task(slow.ainvoke("hi"))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert h.store.open_reservations() == 0
        assert h.near(await left(), before - prompt)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_call_cancelled_while_its_store_reserves_holds_nothing(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The store finishes a reservation whatever becomes of the task awaiting it (SQLite works in
    a thread): a call cancelled meanwhile must not leave it held until its lease expires. (Async
    only: nothing cancels a sync call but Ctrl-C.)"""
    from budgetguard import Budget, BudgetGuard
    from budgetguard.testing.fake_models import UsageFakeChatModel

    clock = FakeClock()
    store = make_store(kind, request, tmp_path, clock)
    h = Harness(store, "async", None if kind == "redis" else clock)
    guard = BudgetGuard([Budget("g", limit=10_000)], store=h.store, clock=h.clock, ledger=False)
    model = UsageFakeChatModel(model_name="gpt-4", input_tokens=10, max_tokens=5)
    slow_reserve = h.store.areserve

    async def slowly(request: ReserveRequest) -> ReserveResult:
        result = await slow_reserve(request)  # committed: then the caller is cancelled
        await asyncio.sleep(0.3)
        return result

    h.store.areserve = slowly  # type: ignore[method-assign]
    task = asyncio.create_task((guard | model).ainvoke("hi"))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert model.calls == 0
    assert h.store.open_reservations() == 0
    assert h.near(guard.remaining("g"), 10_000)
    await store.aclose() if hasattr(store, "aclose") else store.close()
