"""Calendar periods as rules that any clock can evaluate.

A budget with ``period="day"`` resets at every local midnight of its timezone. Which
midnight is the current one depends on *whose* clock reads the time, so a bucket's
period is not sent to a store as the bounds one client computed, but as a
:class:`PeriodRule`: the unit, and the timezone's UTC offsets as plain numbers. Each
store evaluates the rule on its own clock (the Redis store in Lua, on the server's
clock), so a client whose clock runs ahead or behind cannot start a period early or
keep one open late.

The arithmetic is written here once; ``stores/lua/lib.lua`` mirrors it for Redis
(``period_bounds``), and the contract suite checks that both agree.

How a period is defined: the span of instants whose local wall-clock reading falls in
the same calendar minute, hour, day, ISO week (from Monday) or month. A day with a DST
change is 23 or 25 hours long; a local time that a DST change skips is read with the
offset before the change, and one it repeats is its first occurrence (Python's
``fold=0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, tzinfo
from datetime import timezone as dt_timezone

__all__ = ["UNITS", "PeriodRule"]

_DAY = 86_400.0
_FIXED = {"minute": 60.0, "hour": 3_600.0, "day": _DAY}
UNITS: tuple[str, ...] = ("minute", "hour", "day", "week", "month")

_SCAN_STEP = 6 * 3_600
"""How finely a timezone is probed for offset changes (no zone changes twice in 6 h)."""


@dataclass(frozen=True, slots=True)
class PeriodRule:
    """A calendar period in a timezone: what a store needs to find the current period.

    Attributes:
        unit: ``"minute"``, ``"hour"``, ``"day"``, ``"week"`` (ISO, from Monday) or
            ``"month"``.
        offsets: The timezone's UTC offsets in seconds: the offset in effect first,
            then pairs of (unix time of a change, offset from then on), in time order.
            ``(0.0,)`` is UTC. A rule built by :meth:`in_zone` lists the changes of a
            few years around the time it was built; past the last one, the last offset
            holds.

    Example:
        >>> rule = PeriodRule("hour")
        >>> rule.bounds(1_767_225_600.0 + 90)
        (1767225600.0, 1767229200.0)
    """

    unit: str
    offsets: tuple[float, ...] = (0.0,)

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            msg = f"unknown period unit {self.unit!r}; use one of {', '.join(UNITS)}"
            raise ValueError(msg)
        if len(self.offsets) % 2 != 1:
            msg = f"offsets must be an offset followed by (time, offset) pairs, got {self.offsets!r}"
            raise ValueError(msg)

    @classmethod
    def in_zone(cls, unit: str, tz: tzinfo, now: float) -> PeriodRule:
        """The rule for ``unit`` in ``tz``, with the zone's offset changes around ``now``.

        The changes listed are those from the start of the (UTC) year before ``now`` to
        the end of the year after it, found by probing ``tz`` every 6 hours and
        bisecting to the second.
        """
        year = datetime.fromtimestamp(now, dt_timezone.utc).year
        since = datetime(year - 1, 1, 1, tzinfo=dt_timezone.utc).timestamp()
        until = datetime(year + 2, 1, 1, tzinfo=dt_timezone.utc).timestamp()
        return cls(unit, _zone_offsets(tz, int(since), int(until)))

    def bounds(self, now: float) -> tuple[float, float]:
        """``(start, end)``: unix times of the start of the period holding ``now`` and of the next.

        ``start <= now``; ``end > now`` except around a DST change that repeats a
        period's first local time (the repeated occurrence still belongs to the period
        that started at the first one).
        """
        offsets = self.offsets
        local = now + _offset_at(offsets, now)
        first = _local_start(self.unit, local)
        return _to_utc(offsets, first), _to_utc(offsets, _local_next(self.unit, first))


def _offset_at(offsets: tuple[float, ...], t: float) -> float:
    """The UTC offset in effect at unix time ``t``."""
    offset = offsets[0]
    for i in range(1, len(offsets), 2):
        if t < offsets[i]:
            break
        offset = offsets[i + 1]
    return offset


def _to_utc(offsets: tuple[float, ...], local: float) -> float:
    """The unix time whose local reading is ``local`` (the first one; in a gap, read
    with the offset before the change, as Python's ``fold=0``)."""
    offset = offsets[0]
    for i in range(1, len(offsets), 2):
        after = offsets[i + 1]
        # A change at unix time c is passed, in local time, once both readings of its
        # wall-clock moment are: at c + the larger of the two offsets.
        if local < offsets[i] + max(offset, after):
            break
        offset = after
    return local - offset


def _local_start(unit: str, local: float) -> float:
    """Start of the calendar unit holding ``local`` (seconds on the local clock since 1970-01-01)."""
    size = _FIXED.get(unit)
    if size is not None:
        return math.floor(local / size) * size
    days = math.floor(local / _DAY)
    if unit == "week":
        return (days - (days + 3) % 7) * _DAY  # 1970-01-01 was a Thursday: 3 days after a Monday
    _, _, day = _civil_from_days(days)
    return (days - day + 1) * _DAY


def _local_next(unit: str, start: float) -> float:
    """Start of the calendar unit after the one starting at local time ``start``."""
    size = _FIXED.get(unit)
    if size is not None:
        return start + size
    if unit == "week":
        return start + 7 * _DAY
    year, month, _ = _civil_from_days(math.floor(start / _DAY))
    year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return _days_from_civil(year, month, 1) * _DAY


# Proleptic Gregorian calendar <-> days since 1970-01-01 (Howard Hinnant's algorithms;
# floor division throughout, so Lua's math.floor gives the same numbers).


def _civil_from_days(days: int) -> tuple[int, int, int]:
    z = days + 719_468
    era = math.floor(z / 146_097)
    doe = z - era * 146_097
    yoe = math.floor((doe - math.floor(doe / 1_460) + math.floor(doe / 36_524) - math.floor(doe / 146_096)) / 365)
    doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
    mp = math.floor((5 * doy + 2) / 153)
    day = doy - math.floor((153 * mp + 2) / 5) + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (1 if month <= 2 else 0), month, day


def _days_from_civil(year: int, month: int, day: int) -> int:
    y = year - 1 if month <= 2 else year
    era = math.floor(y / 400)
    yoe = y - era * 400
    doy = math.floor((153 * (month - 3 if month > 2 else month + 9) + 2) / 5) + day - 1
    doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
    return era * 146_097 + doe - 719_468


def _zone_offsets(tz: tzinfo, since: int, until: int) -> tuple[float, ...]:
    """``tz``'s UTC offset at ``since`` and every change until ``until`` (unix seconds)."""

    def offset(t: int) -> float:
        delta = datetime.fromtimestamp(t, tz).utcoffset()
        return delta.total_seconds() if delta is not None else 0.0

    current = offset(since)
    out = [current]
    if isinstance(tz, dt_timezone):  # a fixed offset never changes
        return tuple(out)
    t = since
    while t < until:
        probe = min(t + _SCAN_STEP, until)
        seen = offset(probe)
        if seen != current:
            lo, hi = t, probe  # offset(lo) == current != offset(hi): the change is in (lo, hi]
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if offset(mid) == current:
                    lo = mid
                else:
                    hi = mid
            out += [float(hi), offset(hi)]
            current = offset(hi)
            if current != seen:  # a second change within the step: probe again from here
                probe = hi
        t = probe
    return tuple(out)
