"""Period rules with a boundary where a test wants one (any clock, real or fake)."""

from __future__ import annotations

from budgetguard.periods import PeriodRule

SIZES = {"minute": 60.0, "hour": 3600.0, "day": 86400.0}


def rule_ending_at(end: float, unit: str = "hour") -> PeriodRule:
    """A ``unit`` period (in a fixed-offset zone) whose current period ends at unix time ``end``.

    The zone's offset is chosen so that a boundary falls on ``end``: the period holding any
    time in ``[end - size, end)`` is exactly that span. ``end`` should be a whole number of
    seconds, so the bounds are exact.
    """
    return PeriodRule(unit, ((-end) % SIZES[unit],))
