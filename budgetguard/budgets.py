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
from uuid import UUID
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from budgetguard.errors import ConfigurationError, InvalidScopeError, MissingScopeError
from budgetguard.periods import PeriodRule
from budgetguard.stores.base import BucketSpec

__all__ = ["MODEL_UNITS", "PERIODS", "RUN_SCOPE", "UNITS", "Budget", "BudgetSpecKey", "Period", "Unit"]

Unit = Literal["tokens", "usd", "calls", "tool_calls"]
Period = Literal["minute", "hour", "day", "week", "month"]
UNITS: tuple[str, ...] = ("tokens", "usd", "calls", "tool_calls")
MODEL_UNITS: tuple[str, ...] = ("tokens", "usd", "calls")
"""Units charged by model calls (``tool_calls`` budgets are charged by tool calls)."""
RUN_SCOPE = "run"
"""The scope name ``per="run"`` budgets use: one bucket per run (an agent invocation, or one
invocation of a guarded runnable)."""
PERIODS: tuple[str, ...] = ("minute", "hour", "day", "week", "month")

ScopeFn = Callable[[Mapping[str, Any]], Any]
"""Computes a scope value (a string, an integer or a UUID) from a run config."""
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
        unit: ``"tokens"`` (input + output tokens), ``"usd"`` (priced per model),
            ``"calls"`` (one per model call) or ``"tool_calls"`` (one per tool call an
            agent makes, through :meth:`~budgetguard.guard.BudgetGuard.middleware`). A model
            call is charged to every budget of the first three units, all or nothing.
        per: ``None`` for one bucket shared by every call (a global budget, or a pool
            when several guards or processes name it); a key such as ``"user_id"`` for
            one bucket per value, read from ``config["configurable"]`` then
            ``config["metadata"]``; or ``(name, fn)``, a scope name and a function
            ``config -> value`` computing the value (a named function alone is named
            after itself). Scope values are strings, integers or UUIDs, and are kept
            as text (``42`` and ``"42"`` are the same bucket). ``per="run"`` keeps one
            bucket per run: one agent invocation, or one invocation of a guarded runnable.
        period: ``"minute"``, ``"hour"``, ``"day"``, ``"week"`` (ISO, Monday) or
            ``"month"``: the bucket resets to full at each calendar boundary.
        refill_per_second: Continuous refill rate, in ``unit`` per second, up to ``limit``.
        borrow_from: Name of a global (``per=None``) budget of the same unit that covers
            this budget's shortfall in the same atomic reservation. A budget that is
            borrowed from is a *lending pool*: it is charged only for what borrowers take.
        timezone: Timezone of the calendar period (IANA name or ``tzinfo``); UTC by default.
        tool: For a ``"tool_calls"`` budget, the one tool it counts (``None``: every tool).

    Example:
        >>> Budget("per-user", limit=20_000, per="user_id", period="day").scope_name
        'user_id'
    """

    name: str
    limit: float
    _: KW_ONLY
    unit: str = "tokens"
    per: str | ScopeFn | tuple[str, ScopeFn] | None = None
    period: str | None = None
    refill_per_second: float = 0.0
    borrow_from: str | None = None
    timezone: str | tzinfo | None = None
    tool: str | None = None
    _tz: tzinfo = field(init=False, repr=False)
    _bounds: list[float] = field(init=False, repr=False)
    _scope_name: str | None = field(init=False, repr=False)
    _scope_fn: ScopeFn | None = field(init=False, repr=False)
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
        if self.tool is not None and (self.unit != "tool_calls" or not isinstance(self.tool, str) or not self.tool):
            msg = f"budget '{self.name}': tool= names the tool a unit='tool_calls' budget counts, got {self.tool!r}"
            raise ConfigurationError(msg)
        name, fn = _scope_rule(self.name, self.per)
        object.__setattr__(self, "_scope_name", name)
        object.__setattr__(self, "_scope_fn", fn)
        if self.borrow_from is not None and (not isinstance(self.borrow_from, str) or self.borrow_from == self.name):
            msg = f"budget '{self.name}': borrow_from must name another budget, got {self.borrow_from!r}"
            raise ConfigurationError(msg)
        object.__setattr__(self, "_tz", _resolve_tz(self.name, self.timezone))
        object.__setattr__(self, "_bounds", [math.inf, -math.inf])  # cached [start, end)
        object.__setattr__(self, "_rules", {})  # UTC year -> the rule built for it

    # -- scope -------------------------------------------------------------------------

    @property
    def scope_name(self) -> str | None:
        """The scope key this budget is split by (``None`` for a global budget)."""
        return self._scope_name

    def scope_for(
        self,
        config: Mapping[str, Any],
        context: Mapping[str, Any] | None = None,
        fallback: Mapping[str, Any] | None = None,
    ) -> dict[str, str]:
        """Return this budget's scope for a run config, e.g. ``{"user_id": "alice"}``.

        A named key is looked up in ``context`` first (an agent's runtime context), then
        ``config["configurable"]``, then ``config["metadata"]``, then ``fallback`` (what the
        adapter knows of the run when nothing names it: its id as ``"run"``).

        Raises:
            MissingScopeError: The budget is per-key and the config names no value for it.
            InvalidScopeError: The value is not a string, an integer or a UUID.
        """
        key = self._scope_name
        if key is None:
            return {}
        if self._scope_fn is not None:
            try:
                value = self._scope_fn(config)
            except LookupError as exc:  # the function indexed a key the config lacks
                msg = (
                    f"budget '{self.name}' is per {key!r}, but its scope function could not find its "
                    f"value in this run's config ({type(exc).__name__}: {exc}); pass what it reads in "
                    "config={'configurable': {...}}"
                )
                raise MissingScopeError(msg) from exc
        else:
            value = context.get(key) if context else None
            if value is None:
                value = (config.get("configurable") or {}).get(key)
            if value is None:
                value = (config.get("metadata") or {}).get(key)
            if value is None and fallback:
                value = fallback.get(key)
        if value is None or value == "":
            msg = (
                f"budget '{self.name}' is per {key!r} but this run gives no {key!r}; pass it as "
                f"config={{'configurable': {{'{key}': ...}}}} (or in metadata)"
            )
            raise MissingScopeError(msg)
        return {key: self._scope_text(value)}

    def scope_from_kwargs(self, scope: Mapping[str, Any]) -> dict[str, str]:
        """Scope from keyword arguments (``guard.remaining("per-user", user_id="alice")``)."""
        key = self._scope_name
        if key is None:
            return {}
        if key not in scope:
            msg = f"budget '{self.name}' is per {key!r}: pass {key}=..."
            raise MissingScopeError(msg)
        return {key: self._scope_text(scope[key])}

    def _scope_text(self, value: Any) -> str:
        """The one text form of a scope value (a string, an integer or a UUID)."""
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, UUID):
            return str(value)
        msg = (
            f"budget '{self.name}' is per {self._scope_name!r}, and its value must be a string, an integer "
            f"or a UUID; got {type(value).__name__} {value!r}"
        )
        raise InvalidScopeError(msg)

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


def _scope_rule(name: str, per: Any) -> tuple[str | None, ScopeFn | None]:
    """The scope name and function of ``per`` (see :class:`Budget`)."""
    if per is None:
        return None, None
    if isinstance(per, str) and per:
        return per, None
    if isinstance(per, tuple) and len(per) == 2 and isinstance(per[0], str) and per[0] and callable(per[1]):
        return per[0], per[1]
    if callable(per):
        fn_name = getattr(per, "__name__", "")
        if fn_name.isidentifier():
            return fn_name, per
        msg = (
            f"budget '{name}': a scope function needs a name for errors, the ledger and remaining(); "
            f"pass per=('org_id', fn) instead of per={fn_name or per!r}"
        )
        raise ConfigurationError(msg)
    msg = f"budget '{name}': per must be a key name, (name, function) or None, got {per!r}"
    raise ConfigurationError(msg)

