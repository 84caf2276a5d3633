"""``BudgetGuard``: the engine's protocol, and the ways of putting it in front of model calls.

:class:`BudgetGuard` is the public façade: a :class:`~budgetguard.engine.BudgetEngine` (the
protocol: estimate → reserve → overflow policies → settle) plus the adapters that meet model
calls where they happen:

* ``guard | runnable`` (:mod:`budgetguard.lcel`): every chat model the guard can reach is
  replaced by a metered copy (:mod:`budgetguard.metered`); calls it cannot reach are metered
  through callbacks (:mod:`budgetguard.meter`);
* ``guard.model(llm)``: the metered copy of one chat model, to use where the guard cannot
  reach (inside a lambda, a tool, a LangGraph node);
* ``guard.middleware()``: agent middleware for LangChain's ``create_agent``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from budgetguard.engine import BudgetEngine
from budgetguard.errors import ConfigurationError
from budgetguard.lcel import GuardedRunnable, guard_runnable
from budgetguard.metered import metered_copy

if TYPE_CHECKING:
    from langchain_core.runnables import Runnable


__all__ = ["BudgetGuard", "GuardedRunnable"]


class BudgetGuard(BudgetEngine):
    """Budgets for every model call made inside the runnables it wraps.

    Args:
        budgets: The budgets; every call is charged against each of them (a budget that
            others ``borrow_from`` is charged only for what they borrow).
        store: A :class:`~budgetguard.stores.Store`, or a URL (``memory://``,
            ``sqlite:///budgets.db``, ``redis://localhost:6379/0``). In-memory by default.
        prices: Model prices and context windows: a
            :class:`~budgetguard.pricing.PriceTable` (the bundled table by default).
        estimator: Counts prompt tokens and picks the output reservation.
        policies: Overflow policies tried in order when a call cannot be reserved or does
            not fit its model's context window (see :mod:`budgetguard.policies`).
        ledger: Where every call is recorded: a :class:`~budgetguard.ledger.Ledger`, a
            file path (SQLite, or JSONL for ``.jsonl``), ``None`` for the process-wide
            default ledger at :func:`~budgetguard.ledger.default_ledger_path` (opened on
            first use), or ``False`` for no ledger.
        alerts: Soft thresholds and denial hooks (:class:`~budgetguard.alerts.Alerts`).
        lease_seconds: How long a reservation may stay unsettled before any process's
            sweep charges it at the reserved amount (a crashed worker's calls).
        fail_open: When the store is unreachable, let calls through (logged, recorded)
            instead of raising :class:`~budgetguard.errors.StoreUnavailable`.
        interrupted: What a call stopped after it was sent (a stream abandoned, a task
            cancelled, a timeout) is charged: ``"received"`` (default) the prompt
            estimate plus the output received so far, or ``"reserved"`` its whole
            reservation. See :mod:`budgetguard.settlement`.
        clock: Time source; inject :class:`~budgetguard.clock.FakeClock` in tests.

    Raises:
        ConfigurationError: Duplicate budget names, ``borrow_from`` naming no global
            budget of the same unit, no budgets at all, or a bad setting (checked before
            any store or ledger file is made).

    Example:
        >>> guard = BudgetGuard(budgets=[Budget("per-user", limit=20_000, per="user_id", period="day")])
        >>> guard.remaining("per-user", user_id="alice")
        20000.0
    """

    def __or__(self, other: Any) -> Runnable[Any, Any]:
        """``guard | runnable``: meter every model call made inside ``runnable``."""
        return self.wrap(other)

    def wrap(self, runnable: Any) -> Runnable[Any, Any]:
        """Return ``runnable`` guarded (same as ``guard | runnable``).

        Args:
            runnable: Any runnable, or anything LCEL coerces to one (a dict, a callable).
                A chat model comes back as its metered copy, still a chat model.
        """
        return guard_runnable(self, runnable)

    def model(self, llm: Any) -> Any:
        """The metered copy of a chat model: every call it makes is estimated, reserved
        (with the overflow policies) and settled, and it is still the same chat model.

        ``guard | chain`` does this for every chat model it can reach; use this for a model
        it cannot reach (one called inside a lambda, a tool or a LangGraph node). Per-key
        budgets find their scope in the config the model is called with, or in the config
        of the runnable calling it.

        Args:
            llm: A LangChain chat model.

        Raises:
            ConfigurationError: ``llm`` is already metered by another guard.
        """
        return metered_copy(llm, self)

    def middleware(self, *, on_denied: str = "raise", denial_message: Any = None) -> Any:
        """Agent middleware for LangChain's ``create_agent``: every model call of the loop
        estimated, reserved (overflow policies included) and settled; tool-call budgets.

        Needs ``langchain`` 1.x (``pip install budgetguard[agents]``). See
        :mod:`budgetguard.middleware`.

        Args:
            on_denied: ``"raise"`` (default) raises ``BudgetExceeded``; ``"end"`` ends the
                run with an ``AIMessage`` saying which budget and when it refills.
            denial_message: ``error -> str``, the text of that message.

        Raises:
            ConfigurationError: ``langchain`` is not installed, or a bad setting.

        Example:
            >>> # agent = create_agent(llm, tools, middleware=[guard.middleware(on_denied="end")])
        """
        try:
            from budgetguard.middleware import BudgetMiddleware
        except ImportError as exc:
            msg = f"guard.middleware() needs LangChain 1.x agents: pip install 'budgetguard[agents]' ({exc})"
            raise ConfigurationError(msg) from exc
        return BudgetMiddleware(self, on_denied=on_denied, denial_message=denial_message)  # type: ignore[arg-type]
