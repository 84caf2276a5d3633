"""budgetguard: stop LangChain applications from spending more on LLM calls than allowed.

Example:
    >>> from budgetguard import BudgetGuard, Budget
    >>> guard = BudgetGuard(budgets=[Budget("per-user", limit=20_000, per="user_id", period="day")])
    >>> # chain = guard | (prompt | llm | parser)

Public names are imported on first use, so ``import budgetguard.errors`` (or the CLI)
does not pay for LangChain and tiktoken start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from budgetguard.errors import (
    BudgetExceeded,
    BudgetGuardError,
    ConfigurationError,
    ContextWindowExceeded,
    EstimationError,
    InvalidScopeError,
    MissingScopeError,
    StoreUnavailable,
    UnknownModelError,
    UsageError,
)

if TYPE_CHECKING:
    from budgetguard.budgets import Budget
    from budgetguard.clock import Clock, FakeClock, SystemClock
    from budgetguard.estimate import TokenEstimator
    from budgetguard.guard import BudgetGuard, GuardedRunnable
    from budgetguard.pricing import ModelInfo, PriceTable

_LAZY = {
    "Budget": "budgetguard.budgets",
    "BudgetGuard": "budgetguard.guard",
    "Clock": "budgetguard.clock",
    "FakeClock": "budgetguard.clock",
    "GuardedRunnable": "budgetguard.guard",
    "ModelInfo": "budgetguard.pricing",
    "PriceTable": "budgetguard.pricing",
    "SystemClock": "budgetguard.clock",
    "TokenEstimator": "budgetguard.estimate",
}

__all__ = [
    "Budget",
    "BudgetExceeded",
    "BudgetGuard",
    "BudgetGuardError",
    "Clock",
    "ConfigurationError",
    "ContextWindowExceeded",
    "EstimationError",
    "FakeClock",
    "GuardedRunnable",
    "InvalidScopeError",
    "MissingScopeError",
    "ModelInfo",
    "PriceTable",
    "StoreUnavailable",
    "SystemClock",
    "TokenEstimator",
    "UnknownModelError",
    "UsageError",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        msg = f"module 'budgetguard' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
