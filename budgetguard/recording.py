"""What the guard writes down: a ledger record for every metered call.

Kept apart from the engine so the call path only pays for what is configured: with no
ledger these functions are never called. They take what they need (the ledger, the
price table, the time), not the guard.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from budgetguard.errors import ConfigurationError
from budgetguard.ledger_records import EXPIRED
from budgetguard.tickets import Call, Ticket, flat_scope

if TYPE_CHECKING:
    from budgetguard.errors import BudgetExceeded
    from budgetguard.ledger import Ledger
    from budgetguard.pricing import PriceTable
    from budgetguard.stores.base import ExpiredLease
    from budgetguard.usage import Usage

__all__ = [
    "check_ledger_argument",
    "default_ledger",
    "record_denied",
    "record_expired",
    "record_settled",
    "resolve_ledger",
]

logger = logging.getLogger("budgetguard")

_DEFAULT: Ledger | None = None
_DEFAULT_LOCK = threading.Lock()
_INTERNAL_PREFIXES = ("budgetguard", "ls_", "lc_", "langgraph_", "checkpoint_")


def default_ledger() -> Ledger | None:
    """The process-wide ledger at :func:`budgetguard.ledger.default_ledger_location`, opened once.

    Returns ``None`` (after one warning) when it cannot be opened, so a read-only home
    directory never breaks model calls.
    """
    global _DEFAULT  # noqa: PLW0603
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            from budgetguard.ledger import Ledger, default_ledger_location

            try:  # a file (its directory is made) or a postgresql:// URL
                _DEFAULT = Ledger(default_ledger_location())
            except Exception as exc:  # noqa: BLE001  (any failure: keep calls working)
                # the error names the file, or the URL without its password
                logger.warning("budgetguard: cannot open the default ledger (%s); not recording", exc)
                return None
        return _DEFAULT


def check_ledger_argument(ledger: Any) -> None:
    """Refuse a guard's ``ledger=`` that is not one, before anything is built.

    Raises:
        ConfigurationError: ``ledger`` is neither a path or ``postgresql://`` URL, ``None``,
            ``False``, nor an object with a ``record`` method (a :class:`~budgetguard.ledger.Ledger`).
    """
    if ledger is None or ledger is False or isinstance(ledger, (str, os.PathLike)):
        return
    if isinstance(ledger, type) or not callable(getattr(ledger, "record", None)):
        msg = (f"ledger={ledger!r} ({type(ledger).__name__}) is not a ledger; pass a file path, a "
               "'postgresql://' URL, a budgetguard.ledger.Ledger, None for the default ledger, or False for none")
        raise ConfigurationError(msg)


def resolve_ledger(ledger: Any) -> Any:
    """``None`` → the default ledger (lazily), ``False`` → none, a path → a ledger there."""
    if ledger is None:
        return "default"
    if ledger is False:
        return None
    if isinstance(ledger, (str, os.PathLike)):
        from budgetguard.ledger import Ledger

        return Ledger(ledger)
    return ledger


def _user_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metadata.items() if not k.startswith(_INTERNAL_PREFIXES)}


def _cost(prices: PriceTable, model: str | None, inp: float, out: float, cached: float = 0) -> float | None:
    info = prices.get(model) if model else None
    if info is None or info.input_cost_per_token is None:
        return None
    return info.cost(int(inp), int(out), int(cached))


def _record(ledger: Any, prices: PriceTable, call: Call, budgets: Sequence[str], **fields: Any) -> None:
    from budgetguard.ledger import LedgerRecord

    est = call.estimate
    ledger.record(
        LedgerRecord(
            run_id=str(call.run_id),
            root_run_id=str(call.root_run_id) if call.root_run_id else None,
            parent_run_id=str(call.parent_run_id) if call.parent_run_id else None,
            scope=flat_scope(call.scopes),
            tags=tuple(call.tags),
            metadata=_user_metadata(call.metadata),
            model_requested=call.model_requested or call.model,
            policy=call.policy,
            estimated_input_tokens=est.input_tokens,
            estimated_output_tokens=est.output_tokens,
            reserved_usd=_cost(prices, call.model, est.input_tokens, est.output_tokens),
            budgets=tuple(budgets),
            **fields,
        )
    )


def record_settled(
    ledger: Any,
    prices: PriceTable,
    ticket: Ticket,
    usage: Usage | None,
    outcome: str,
    error: BaseException | None,
    now: float,
) -> None:
    """Record a settled call (ok, fell back, compressed, cached, cancelled, error)."""
    call = ticket.call
    u = usage
    _record(
        ledger,
        prices,
        call,
        [ln.budget.name for ln in ticket.lines],
        ts=ticket.started,
        model_used=call.model,
        outcome=outcome,
        input_tokens=u.input_tokens if u else 0,
        output_tokens=u.output_tokens if u else 0,
        cached_input_tokens=u.cached_input_tokens if u else 0,
        reasoning_tokens=u.reasoning_tokens if u else 0,
        cost_usd=_cost(prices, call.model, u.input_tokens, u.output_tokens, u.cached_input_tokens) if u else 0.0,
        latency_s=max(now - ticket.started, 0.0),
        error=str(error) if error is not None else None,
    )


def record_denied(ledger: Any, prices: PriceTable, call: Call, error: BudgetExceeded, now: float) -> None:
    """Record a call the guard refused."""
    _record(
        ledger,
        prices,
        call,
        [error.budget],
        ts=now,
        model_used=None,
        outcome="denied",
        input_tokens=0,
        output_tokens=0,
        cached_input_tokens=0,
        reasoning_tokens=0,
        cost_usd=0.0,
        latency_s=None,
        error=str(error),
    )


def record_expired(ledger: Any, prices: PriceTable, lease: ExpiredLease, now: float) -> None:
    """Record a reservation whose lease expired unsettled (charged as reserved)."""
    from budgetguard.ledger import LedgerRecord

    try:
        meta = json.loads(lease.meta) if lease.meta else {}
    except ValueError:
        meta = {}
    est_in, est_out = (meta.get("est") or [0, 0])[:2]
    scope = flat_scope(meta.get("scopes") or {})
    model = meta.get("model")
    ledger.record(
        LedgerRecord(
            ts=now,
            run_id=lease.id,
            root_run_id=None,
            parent_run_id=None,
            scope=scope,
            tags=tuple(meta.get("tags") or ()),
            metadata={},
            model_requested=model,
            model_used=model,
            policy=None,
            outcome=EXPIRED,
            estimated_input_tokens=int(est_in),
            estimated_output_tokens=int(est_out),
            input_tokens=int(est_in),
            output_tokens=int(est_out),
            cached_input_tokens=0,
            reasoning_tokens=0,
            cost_usd=_cost(prices, model, est_in, est_out),
            reserved_usd=_cost(prices, model, est_in, est_out),
            latency_s=None,
            budgets=tuple(meta.get("budgets") or ()),
            error="lease expired before the call was settled; charged the reserved amount",
        )
    )
