"""Budget definitions: capacity, unit, refill, calendar period, scope and borrowing.

A :class:`Budget` is configuration only. The buckets it describes (one global bucket, or
one per value of its ``per`` key) live in a store; :mod:`budgetguard.stores.base` holds
the arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from datetime import datetime, tzinfo
from datetime import timezone as dt_timezone
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from budgetguard.errors import ConfigurationError, MissingScopeError
from budgetguard.periods import PeriodRule
from budgetguard.stores.base import BucketSpec

__all__ = ["PERIODS", "UNITS", "Budget", "BudgetSpecKey", "Period", "Unit"]

Unit = Literal["tokens", "usd"]
Period = Literal["minute", "hour", "day", "week", "month"]
UNITS: tuple[str, ...] = ("tokens", "usd")
PERIODS: tuple[str, ...] = ("minute", "hour", "day", "week", "month")

ScopeFn = Callable[[Mapping[str, Any]], "str | None"]
BudgetSpecKey = str
"""The store key of one bucket: budget name plus its scope (see :meth:`Budget.bucket_key`)."""


def _check_number(name: str, field_name: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        msg = f"budget '{name}': {field_name} must be a number, got {value!r}"
        raise ConfigurationError(msg)
    value = float(value)
    if not math.isfinite(value):
        msg = f"budget '{name}': {field_name} must be finite, got {value!r}"
        raise ConfigurationError(msg)
    if positive and value <= 0:
        msg = f"budget '{name}': {field_name} must be greater than 0, got {value!r}"
        raise ConfigurationError(msg)
    if value < 0:
        msg = f"budget '{name}': {field_name} must not be negative, got {value!r}"
        raise ConfigurationError(msg)
    return value


def _resolve_tz(name: str, tz: str | tzinfo | None) -> tzinfo:
    if tz is None:
        return dt_timezone.utc
    if isinstance(tz, tzinfo):
        return tz
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        msg = f"budget '{name}': unknown timezone {tz!r}; use an IANA name such as 'Europe/Berlin'"
        raise ConfigurationError(msg) from exc


@dataclass(frozen=True, eq=False)
class Budget:
    """One spending limit, applied to every model call the guard meters.

    Args:
        name: Unique name; it appears in errors, the ledger and store keys.
        limit: Capacity of each bucket, in ``unit``. Buckets start full.
        unit: ``"tokens"`` (input + output tokens) or ``"usd"`` (priced per model).
        per: ``None`` for one bucket shared by every call (a global budget, or a pool
            when several guards or processes name it); a key such as ``"user_id"`` for
            one bucket per value, read from ``config["configurable"]`` then
            ``config["metadata"]``; or a callable ``config -> str`` computing the key.
        period: ``"minute"``, ``"hour"``, ``"day"``, ``"week"`` (ISO, Monday) or
            ``"month"``: the bucket resets to full at each calendar boundary.
        refill_per_second: Continuous refill rate, in ``unit`` per second, up to ``limit``.
        borrow_from: Name of a global (``per=None``) budget of the same unit that covers
            this budget's shortfall in the same atomic reservation. A budget that is
            borrowed from is a *lending pool*: it is charged only for what borrowers take.
        timezone: Timezone of the calendar period (IANA name or ``tzinfo``); UTC by default.

    Example:
        >>> Budget("per-user", limit=20_000, per="user_id", period="day").scope_name
        'user_id'
    """

    name: str
    limit: float
    _: KW_ONLY
    unit: str = "tokens"
    per: str | ScopeFn | None = None
    period: str | None = None
    refill_per_second: float = 0.0
    borrow_from: str | None = None
    timezone: str | tzinfo | None = None
    _tz: tzinfo = field(init=False, repr=False)
    _bounds: list[float] = field(init=False, repr=False)
    _rules: dict[int, PeriodRule] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            msg = f"a budget needs a non-empty name, got {self.name!r}"
            raise ConfigurationError(msg)
        object.__setattr__(self, "limit", _check_number(self.name, "limit", self.limit, positive=True))
        refill = _check_number(self.name, "refill_per_second", self.refill_per_second, positive=False)
        object.__setattr__(self, "refill_per_second", refill)
        if self.unit not in UNITS:
            msg = f"budget '{self.name}': unknown unit {self.unit!r}; use one of {', '.join(UNITS)}"
            raise ConfigurationError(msg)
        if self.period is not None and self.period not in PERIODS:
            msg = f"budget '{self.name}': unknown period {self.period!r}; use one of {', '.join(PERIODS)}"
            raise ConfigurationError(msg)
        if self.per is not None and not callable(self.per) and not (isinstance(self.per, str) and self.per):
            msg = f"budget '{self.name}': per must be a key name, a callable or None, got {self.per!r}"
            raise ConfigurationError(msg)
        if self.borrow_from is not None and (not isinstance(self.borrow_from, str) or self.borrow_from == self.name):
            msg = f"budget '{self.name}': borrow_from must name another budget, got {self.borrow_from!r}"
            raise ConfigurationError(msg)
        object.__setattr__(self, "_tz", _resolve_tz(self.name, self.timezone))
        object.__setattr__(self, "_bounds", [math.inf, -math.inf])  # cached [start, end)
        object.__setattr__(self, "_rules", {})  # UTC year -> the rule built for it

    # -- scope -------------------------------------------------------------------------

    @property
    def scope_name(self) -> str | None:
        """The scope key this budget is split by (``"key"`` for a callable ``per``)."""
        if self.per is None:
            return None
        return self.per if isinstance(self.per, str) else getattr(self.per, "__name__", "key")

    def scope_for(self, config: Mapping[str, Any]) -> dict[str, str]:
        """Return this budget's scope for a run config, e.g. ``{"user_id": "alice"}``.

        Raises:
            MissingScopeError: The budget is per-key and the config names no value for it.
        """
        if self.per is None:
            return {}
        if callable(self.per):
            value = self.per(config)
        else:
            value = (config.get("configurable") or {}).get(self.per)
            if value is None:
                value = (config.get("metadata") or {}).get(self.per)
        if value is None or value == "":
            key = self.scope_name
            msg = (
                f"budget '{self.name}' is per {key!r} but this run gives no {key!r}; pass it as "
                f"config={{'configurable': {{'{key}': ...}}}} (or in metadata)"
            )
            raise MissingScopeError(msg)
        return {str(self.scope_name): str(value)}

    def scope_from_kwargs(self, scope: Mapping[str, Any]) -> dict[str, str]:
        """Scope from keyword arguments (``guard.remaining("per-user", user_id="alice")``)."""
        if self.per is None:
            return {}
        key = str(self.scope_name)
        if key not in scope:
            msg = f"budget '{self.name}' is per {key!r}: pass {key}=..."
            raise MissingScopeError(msg)
        return {key: str(scope[key])}

    def bucket_key(self, scope: Mapping[str, str]) -> BudgetSpecKey:
        """The store key of the bucket for ``scope``. Stores escape or hash it themselves."""
        if not scope:
            return self.name
        return self.name + "\x1f" + "\x1f".join(f"{k}={v}" for k, v in scope.items())

    def bucket_spec(self, scope: Mapping[str, str], now: float) -> BucketSpec:
        """What a store needs to know about the bucket of ``scope`` (its period as a rule
        the store evaluates on its own clock; ``now`` picks the years of offsets it lists)."""
        return BucketSpec(self.bucket_key(scope), self.limit, self.refill_per_second, self.period_rule(now))

    # -- calendar ---------------------------------------------------------------------

    def period_rule(self, now: float) -> PeriodRule | None:
        """This budget's calendar period as a :class:`~budgetguard.periods.PeriodRule`
        listing its timezone's offset changes around ``now`` (``None``: no period)."""
        if self.period is None:
            return None
        year = datetime.fromtimestamp(now, dt_timezone.utc).year
        rules = self._rules
        rule = rules.get(year)
        if rule is None:
            rule = PeriodRule.in_zone(self.period, self._tz, now)
            rules.clear()  # a process lives in one year at a time
            rules[year] = rule
        return rule

    def period_bounds(self, now: float) -> tuple[float, float] | None:
        """Return ``(start, end)`` in unix seconds of the calendar period holding ``now``."""
        if self.period is None:
            return None
        bounds = self._bounds
        if bounds[0] <= now < bounds[1]:
            return bounds[0], bounds[1]
        rule = self.period_rule(now)
        assert rule is not None
        start, end = rule.bounds(now)
        bounds[0], bounds[1] = start, end
        return start, end
