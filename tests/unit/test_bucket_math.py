"""The pure bucket arithmetic every store shares (stores/base.py)."""

from __future__ import annotations

import pytest

from budgetguard.stores.base import (
    BucketSpec,
    BucketState,
    Charge,
    Denial,
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
    spec = BucketSpec("k", 100, period_start=NOW, period_end=NOW + 60)
    s = BucketState(-40, NOW - 10, NOW - 60)
    assert refresh(s, spec, NOW).level == 100
    assert s.period_start == NOW


def test_store_clock_past_period_end_uses_it_as_the_new_start() -> None:
    spec = BucketSpec("k", 100, period_start=NOW - 60, period_end=NOW)
    s = BucketState(5, NOW - 1, NOW - 60)
    refresh(s, spec, NOW + 1)
    assert (s.level, s.period_start) == (100, NOW)


def test_lowered_limit_caps_the_level() -> None:
    assert refresh(BucketState(500, NOW, None), BucketSpec("k", 100), NOW).level == 100


@pytest.mark.parametrize(
    ("spec", "level", "amount", "expected"),
    [
        (BucketSpec("k", 100, refill_per_second=2), 10, 30, 10.0),
        (BucketSpec("k", 100, period_start=NOW - 10, period_end=NOW + 50), 10, 30, 50.0),
        (BucketSpec("k", 100, refill_per_second=0.1, period_start=NOW, period_end=NOW + 50), 10, 30, 50.0),
        (BucketSpec("k", 100), 10, 30, None),  # no refill, no period
        (BucketSpec("k", 100, refill_per_second=5), 10, 101, None),  # larger than capacity
        (BucketSpec("k", 100, refill_per_second=5), -50, 50, 20.0),  # overspent: pays the debt first
    ],
)
def test_retry_after_is_computed(spec: BucketSpec, level: float, amount: float, expected: float | None) -> None:
    assert retry_after(BucketState(level, NOW, spec.period_start), spec, amount, NOW) == expected


def test_reserve_is_all_or_nothing() -> None:
    states: dict[str, BucketState] = {}
    a, b = BucketSpec("a", 100), BucketSpec("b", 10)
    out = apply_reserve(getter(states), [Charge(a, 50), Charge(b, 20)], NOW)
    assert isinstance(out, Denial)
    assert (out.index, out.key, out.requested, out.available) == (1, "b", 20, 10)
    assert states["a"].level == 100  # untouched


def test_two_charges_on_one_bucket_see_each_other() -> None:
    states: dict[str, BucketState] = {}
    a = BucketSpec("a", 100)
    assert isinstance(apply_reserve(getter(states), [Charge(a, 60), Charge(a, 60)], NOW), Denial)
    assert states["a"].level == 100


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
    p1 = BucketSpec("a", 100, period_start=NOW, period_end=NOW + 60)
    held = apply_reserve(getter(states, NOW), [Charge(p1, 80)], NOW)
    assert not isinstance(held, Denial)
    p2 = BucketSpec("a", 100, period_start=NOW + 60, period_end=NOW + 120)
    get2 = getter(states, NOW + 61)
    get2(p2)
    apply_settle(get2, [type(held[0])(p2, None, 80, 0, NOW, None)], [10])
    assert states["a"].level == 100  # the new period is not credited with the old refund


def test_settle_none_charges_the_reserved_amount() -> None:
    states: dict[str, BucketState] = {}
    a = BucketSpec("a", 100)
    get = getter(states)
    held = apply_reserve(get, [Charge(a, 80)], NOW)
    assert not isinstance(held, Denial)
    assert apply_settle(get, held, None) == (80,)
    assert (states["a"].level, states["a"].spent) == (20, 80)
