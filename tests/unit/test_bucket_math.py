"""The pure bucket arithmetic every store shares (stores/base.py)."""

from __future__ import annotations

import pytest
from period_rules import rule_ending_at

from budgetguard.stores.base import (
    BucketSpec,
    BucketState,
    Charge,
    Denial,
    Held,
    apply_reserve,
    apply_settle,
    refresh,
    retry_after,
)

NOW = 1_000_000.0


def getter(states: dict[str, BucketState], now: float = NOW):
    def get(spec: BucketSpec) -> BucketState:
        states[spec.key] = refresh(states.get(spec.key), spec, now)
        return states[spec.key]

    return get


def test_new_bucket_starts_full() -> None:
    s = refresh(None, BucketSpec("k", 100), NOW)
    assert (s.level, s.spent) == (100, 0)


def test_refill_is_continuous_and_capped() -> None:
    spec = BucketSpec("k", 100, refill_per_second=2)
    s = BucketState(10, NOW, None)
    assert refresh(s, spec, NOW + 5).level == 20
    assert refresh(s, spec, NOW + 1000).level == 100


def test_clock_going_backwards_does_not_drain() -> None:
    spec = BucketSpec("k", 100, refill_per_second=2)
    s = BucketState(10, NOW, None)
    assert refresh(s, spec, NOW - 50).level == 10


def test_period_reset_fills_even_an_overspent_bucket() -> None:
    spec = BucketSpec("k", 100, period=rule_ending_at(NOW + 60, "minute"))
    s = BucketState(-40, NOW - 10, NOW - 60)
    assert refresh(s, spec, NOW).level == 100
    assert s.period_start == NOW


def test_the_period_is_the_one_holding_the_store_time() -> None:
    spec = BucketSpec("k", 100, period=rule_ending_at(NOW, "minute"))
    s = BucketState(5, NOW - 1, NOW - 60)
    refresh(s, spec, NOW + 1)
    assert (s.level, s.period_start) == (100, NOW)
    refresh(s, spec, NOW + 600)  # ten periods later: the current one, not the next
    assert s.period_start == NOW + 600


def test_a_store_time_behind_the_bucket_neither_resets_nor_refills() -> None:
    spec = BucketSpec("k", 100, refill_per_second=1, period=rule_ending_at(NOW, "minute"))
    s = BucketState(5, NOW + 30, NOW)
    refresh(s, spec, NOW - 30)  # an earlier period: not a new one
    assert (s.level, s.updated_at, s.period_start) == (5, NOW + 30, NOW)


def test_lowered_limit_caps_the_level() -> None:
    assert refresh(BucketState(500, NOW, None), BucketSpec("k", 100), NOW).level == 100


@pytest.mark.parametrize(
    ("spec", "level", "amount", "expected"),
    [
        (BucketSpec("k", 100, refill_per_second=2), 10, 30, 10.0),
        (BucketSpec("k", 100, period=rule_ending_at(NOW + 50)), 10, 30, 50.0),
        (BucketSpec("k", 100, refill_per_second=0.1, period=rule_ending_at(NOW + 50)), 10, 30, 50.0),
        (BucketSpec("k", 100), 10, 30, None),  # no refill, no period
        (BucketSpec("k", 100, refill_per_second=5), 10, 101, None),  # larger than capacity
        (BucketSpec("k", 100, refill_per_second=5), -50, 50, 20.0),  # overspent: pays the debt first
    ],
)
def test_retry_after_is_computed(spec: BucketSpec, level: float, amount: float, expected: float | None) -> None:
    state = refresh(BucketState(level, NOW, None), spec, NOW)
    state.level = level
    assert retry_after([(state, spec, 0.0)], amount, NOW) == expected


def test_retry_after_counts_what_the_lender_holds_while_the_bucket_refills() -> None:
    """The call fits once the bucket's refill and the lender's level cover it together."""
    user, pool = BucketSpec("u", 600, refill_per_second=1), BucketSpec("pool", 1500)
    states = {"u": BucketState(4, NOW, None), "pool": BucketState(296, NOW, None)}
    out = apply_reserve(getter(states), [Charge(user, 302, lender=pool)], NOW)
    assert isinstance(out, Denial)
    assert out.retry_after == 2.0  # not 298 s, the bucket's wait on its own


def test_retry_after_when_the_bucket_first_pays_its_debt_then_borrows() -> None:
    user, pool = BucketSpec("u", 600, refill_per_second=1), BucketSpec("pool", 1500)
    states = {"u": BucketState(-85, NOW, None), "pool": BucketState(100, NOW, None)}
    out = apply_reserve(getter(states), [Charge(user, 266, lender=pool)], NOW)
    assert isinstance(out, Denial)
    assert out.retry_after == 251.0  # 85 s to pay the debt, then 166 s of refill beside the pool's 100


def test_retry_after_with_both_refilling_and_the_lender_filling_up() -> None:
    user, pool = BucketSpec("u", 100, refill_per_second=1), BucketSpec("pool", 50, refill_per_second=4)
    states = {"u": BucketState(0, NOW, None), "pool": BucketState(30, NOW, None)}
    # Together +5/s until the pool is full (5 s: 5 + 50), then +1/s: 100 needs 45 s more.
    out = apply_reserve(getter(states), [Charge(user, 100, lender=pool)], NOW)
    assert isinstance(out, Denial)
    assert out.retry_after == 50.0


def test_retry_after_counts_a_lender_period_reset() -> None:
    user = BucketSpec("u", 100, refill_per_second=0.01)
    pool = BucketSpec("pool", 500, period=rule_ending_at(NOW + 40))
    states = {"u": BucketState(10, NOW, None), "pool": BucketState(0, NOW, NOW + 40 - 3600)}
    out = apply_reserve(getter(states), [Charge(user, 200, lender=pool)], NOW)
    assert isinstance(out, Denial)
    assert out.retry_after == 40.0  # the pool is full again when its hour ends
    out = apply_reserve(getter(states), [Charge(user, 700, lender=pool)], NOW)
    assert isinstance(out, Denial) and out.retry_after is None  # more than both can ever hold


def test_retry_after_counts_what_the_same_request_already_took() -> None:
    a = BucketSpec("a", 100, refill_per_second=1)
    states = {"a": BucketState(50, NOW, None)}
    out = apply_reserve(getter(states), [Charge(a, 40), Charge(a, 40)], NOW)
    assert isinstance(out, Denial)
    assert out.retry_after == 30.0  # both charges need 80 of the bucket's 50
    out = apply_reserve(getter({}), [Charge(a, 60), Charge(a, 60)], NOW)
    assert isinstance(out, Denial)
    assert out.retry_after is None  # 120 together: more than its capacity


def test_borrowing_takes_the_shortfall_from_the_lender() -> None:
    states: dict[str, BucketState] = {}
    user, pool = BucketSpec("u", 100), BucketSpec("pool", 1000)
    held = apply_reserve(getter(states), [Charge(user, 150, lender=pool)], NOW)
    assert not isinstance(held, Denial)
    assert (held[0].took, held[0].lent) == (100, 50)
    assert (states["u"].level, states["pool"].level) == (0, 950)


def test_borrow_denied_when_the_lender_is_short_too() -> None:
    states: dict[str, BucketState] = {"pool": BucketState(20, NOW, None)}
    user, pool = BucketSpec("u", 100), BucketSpec("pool", 1000, refill_per_second=10)
    out = apply_reserve(getter(states), [Charge(user, 150, lender=pool)], NOW)
    assert isinstance(out, Denial)
    assert out.available == 120
    assert out.retry_after == 3.0  # the pool refills its 30 missing in 3 s
    assert (states["u"].level, states["pool"].level) == (100, 20)


def test_settle_refunds_the_lender_first_then_the_borrower() -> None:
    states: dict[str, BucketState] = {}
    user, pool = BucketSpec("u", 100), BucketSpec("pool", 1000)
    get = getter(states)
    held = apply_reserve(get, [Charge(user, 150, lender=pool)], NOW)
    assert not isinstance(held, Denial)
    apply_settle(get, held, [70])
    assert (states["u"].level, states["pool"].level) == (30, 1000)
    assert (states["u"].spent, states["pool"].spent) == (70, 0)


def test_settle_partial_refund_keeps_the_rest_on_the_lender() -> None:
    states: dict[str, BucketState] = {}
    user, pool = BucketSpec("u", 100), BucketSpec("pool", 1000)
    get = getter(states)
    held = apply_reserve(get, [Charge(user, 150, lender=pool)], NOW)
    assert not isinstance(held, Denial)
    apply_settle(get, held, [120])
    assert (states["u"].level, states["pool"].level) == (0, 980)
    assert (states["u"].spent, states["pool"].spent) == (100, 20)


def test_settle_above_the_reservation_goes_negative() -> None:
    states: dict[str, BucketState] = {}
    a = BucketSpec("a", 100)
    get = getter(states)
    held = apply_reserve(get, [Charge(a, 80)], NOW)
    assert not isinstance(held, Denial)
    assert apply_settle(get, held, [130]) == (130.0,)
    assert (states["a"].level, states["a"].spent) == (-30, 130)


def test_refund_from_an_earlier_period_is_dropped() -> None:
    states: dict[str, BucketState] = {}
    spec = BucketSpec("a", 100, period=rule_ending_at(NOW + 60, "minute"))
    held = apply_reserve(getter(states, NOW), [Charge(spec, 80)], NOW)
    assert not isinstance(held, Denial)
    apply_settle(getter(states, NOW + 61), held, [10])
    assert states["a"].level == 100  # the new period is not credited with the old refund


@pytest.mark.parametrize("late", [61, 125, 3600 * 24 + 1])
def test_excess_lands_in_the_period_current_when_settled_however_late(late: float) -> None:
    """The lease's spec is a rule: settled after many boundaries, the excess is charged
    to the period holding the settle, which later calls in that period see."""
    states: dict[str, BucketState] = {}
    spec = BucketSpec("m", 10_000, period=rule_ending_at(NOW + 30, "minute"))
    held = apply_reserve(getter(states, NOW), [Charge(spec, 15)], NOW)
    assert not isinstance(held, Denial)
    apply_settle(getter(states, NOW + late), held, [3005])
    assert getter(states, NOW + late + 1)(spec).level == 10_000 - (3005 - 15)  # the reserved 15 was the old period's
    assert states["m"].spent == 3005


def test_held_keeps_the_period_each_amount_was_taken_in() -> None:
    spec = BucketSpec("m", 100, period=rule_ending_at(NOW + 30, "minute"))
    held = apply_reserve(getter({}, NOW), [Charge(spec, 15)], NOW)
    assert held == [Held(spec, None, 15, 0.0, NOW - 30, None)]


def test_settle_none_charges_the_reserved_amount() -> None:
    states: dict[str, BucketState] = {}
    a = BucketSpec("a", 100)
    get = getter(states)
    held = apply_reserve(get, [Charge(a, 80)], NOW)
    assert not isinstance(held, Denial)
    assert apply_settle(get, held, None) == (80,)
    assert (states["a"].level, states["a"].spent) == (20, 80)


@pytest.mark.parametrize("seed", range(20))
def test_full_after_is_when_refresh_reaches_the_capacity(seed: int) -> None:
    import random

    from budgetguard.periods import PeriodRule
    from budgetguard.stores.base import full_after

    rng = random.Random(seed)
    for _ in range(200):
        capacity = rng.choice([0.0, 1.0, 100.0, 1e6])
        rate = rng.choice([0.0, 0.0, 0.5, 3.0, 1e4])
        period = rng.choice([None, PeriodRule("minute"), PeriodRule("hour", (1800.0,)), PeriodRule("day", (-18000.0,))])
        spec = BucketSpec("k", capacity, rate, period)
        now = NOW + rng.random() * 86_400
        state = refresh(BucketState(rng.uniform(-capacity - 10, capacity + 5), now - rng.random() * 100, None), spec, now)
        wait = full_after(state, spec, now)
        if wait is None:  # never by itself: not even a day later
            assert rate == 0 and period is None
            assert refresh(state.copy(), spec, now + 86_400).level < capacity
            continue
        assert refresh(state.copy(), spec, now + wait + 1e-6).level >= capacity
        if wait > 1e-3:
            assert refresh(state.copy(), spec, now + wait * 0.999).level < capacity
