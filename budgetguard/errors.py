"""Typed exceptions raised by budgetguard.

The hierarchy::

    BudgetGuardError                 base of everything budgetguard raises
    ├── BudgetExceeded               a call could not be reserved; nothing was sent
    │   └── ContextWindowExceeded    prompt + output cap do not fit the model's window
    ├── ConfigurationError           budgets, guard or pricing set up wrongly (also a ValueError)
    │   ├── MissingScopeError        a per-key budget found no value for its key
    │   ├── InvalidScopeError        a scope value is not a string, an integer or a UUID
    │   └── UnknownModelError        a USD budget met a model with no price
    ├── EstimationError              a call's input cannot be counted (unknown content part)
    ├── UsageError                   a model reported malformed usage
    └── StoreUnavailable             the budget store cannot be reached

Every message says what happened and what the user can do about it.
"""

from __future__ import annotations

import math
from typing import Any

from budgetguard.money import format_usd

__all__ = [
    "BudgetExceeded",
    "BudgetGuardError",
    "ConfigurationError",
    "ContextWindowExceeded",
    "EstimationError",
    "InvalidScopeError",
    "MissingScopeError",
    "StoreUnavailable",
    "UnknownModelError",
    "UsageError",
]


class BudgetGuardError(Exception):
    """Base class of every error budgetguard raises."""


_UNIT_NOUNS = {"tokens": "tokens", "calls": "model calls", "tool_calls": "tool calls"}


def format_amount(amount: float, unit: str) -> str:
    """An amount of a budget's unit as errors and alerts write it: ``$0.0125``, ``1,200 tokens``,
    ``3 model calls`` (whole units rounded away from zero: never less than was meant)."""
    if unit == "usd":
        return format_usd(amount)
    noun = _UNIT_NOUNS.get(unit, unit)
    return f"{math.ceil(amount):,} {noun}" if amount >= 0 else f"{math.floor(amount):,} {noun}"


def _fmt_scope(scope: dict[str, Any] | None) -> str:
    if not scope:
        return ""
    return " (" + ", ".join(f"{k}={v}" for k, v in scope.items()) + ")"


class BudgetExceeded(BudgetGuardError):
    """A model call could not be reserved against a budget; the request was not sent.

    Attributes:
        budget: Name of the budget that could not cover the call.
        scope: The scope values of that budget's bucket, e.g. ``{"user_id": "alice"}``;
            empty for a global or pooled budget.
        unit: ``"tokens"``, ``"usd"``, ``"calls"`` or ``"tool_calls"``.
        requested: What the call needed, in ``unit``.
        available: What the bucket held when the call was refused, in ``unit``.
        retry_after: Seconds until refills or a period reset cover the call, computed
            from the bucket; ``None`` when no refill can ever cover it.
        model: The model the call was for, when known.
        tried: Overflow policies that were tried before giving up, in order.
    """

    def __init__(
        self,
        budget: str,
        *,
        scope: dict[str, Any] | None = None,
        unit: str = "tokens",
        requested: float = 0.0,
        available: float = 0.0,
        retry_after: float | None = None,
        model: str | None = None,
        tried: tuple[str, ...] = (),
        reason: str | None = None,
    ) -> None:
        self.budget = budget
        self.scope = dict(scope or {})
        self.unit = unit
        self.requested = requested
        self.available = available
        self.retry_after = retry_after
        self.model = model
        self.tried = tuple(tried)
        self.reason = reason
        super().__init__(self._render())

    def _render(self) -> str:
        if self.reason:
            msg = self.reason
        else:
            msg = (
                f"budget '{self.budget}'{_fmt_scope(self.scope)} cannot cover this call"
                f"{' to ' + self.model if self.model else ''}: needs "
                f"{format_amount(self.requested, self.unit)}, "
                f"{format_amount(max(self.available, 0.0), self.unit)} available"
            )
            if self.available < 0:
                msg += f" (overspent by {format_amount(-self.available, self.unit)})"
            if self.retry_after is None:
                msg += "; no refill within its period can cover it"
            else:
                msg += f"; refills enough in {math.ceil(self.retry_after):,} s"
        if self.tried:
            msg += f" (tried: {', '.join(self.tried)})"
        return msg

    def with_tried(self, tried: tuple[str, ...]) -> BudgetExceeded:
        """Return a copy of this error that names the overflow policies tried."""
        return type(self)(
            self.budget,
            scope=self.scope,
            unit=self.unit,
            requested=self.requested,
            available=self.available,
            retry_after=self.retry_after,
            model=self.model,
            tried=tried,
            reason=self.reason,
        )

    def __reduce__(self) -> tuple[Any, ...]:  # keep pickling (multiprocessing) working
        return (_rebuild, (type(self), self.budget, self.__dict__))


def _rebuild(cls: type[BudgetExceeded], budget: str, state: dict[str, Any]) -> BudgetExceeded:
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    Exception.__init__(obj, obj._render())
    return obj


class ContextWindowExceeded(BudgetExceeded):
    """The prompt plus the output cap would not fit the model's context window.

    ``requested`` is prompt + output tokens, ``available`` is the context window.
    """


class ConfigurationError(BudgetGuardError, ValueError):
    """The guard, a budget or the pricing table was configured wrongly."""


class MissingScopeError(ConfigurationError):
    """A per-key budget found no value for its key in the run's config."""


class InvalidScopeError(ConfigurationError):
    """A scope value is not a string, an integer or a UUID (e.g. a dict); nothing was sent."""


class UnknownModelError(ConfigurationError):
    """A USD budget was asked to price a model that has no price."""


class EstimationError(BudgetGuardError, ValueError):
    """The input of a call cannot be counted (for example an unsupported content part)."""


class UsageError(BudgetGuardError, ValueError):
    """A model reported usage that cannot be read (negative, non-numeric, ...)."""


class StoreUnavailable(BudgetGuardError):
    """The budget store could not be reached; the call was not sent (fail-closed)."""
