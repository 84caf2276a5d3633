"""What the guard knows about one model call: the call as it will be sent, and its ticket.

A :class:`Call` is built from what LangChain reports at the start of a model run (the
messages, the invocation parameters), estimated, and possibly changed by overflow
policies. A :class:`Ticket` is a call whose reservation succeeded: it carries what each
budget holds until the call is settled.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any
from uuid import UUID

from budgetguard.stores.base import Charge

if TYPE_CHECKING:
    from langchain_core.messages import BaseMessage

    from budgetguard.budgets import Budget
    from budgetguard.estimate import Estimate

__all__ = ["Call", "Line", "Ticket", "flat_scope"]


@dataclass(slots=True)
class Call:
    """A model call about to be sent.

    Attributes:
        run_id: The model run's id (also the reservation id).
        model: Model name as sent (``None`` when the model does not say).
        estimate: Prompt tokens + reserved output tokens.
        messages: Chat messages (chat models) or ``None``.
        prompts: Prompt strings (text LLMs) or ``None``.
        params: The call's invocation parameters.
        scopes: Scope of each budget for this call, by budget name.
        model_requested: The model the chain asked for (differs after a fallback).
        policy: Overflow policy applied, if any.
        tags: Run tags.
        metadata: Run metadata.
        parent_run_id: The parent run.
        root_run_id: The guarded invocation's outermost run, when known.
        target: The model object to send the call to, when a policy chose another one.
        send_kwargs: Call arguments a policy changed (e.g. a lower ``max_tokens``).
        waited: Seconds already spent waiting for refill on this call.
    """

    run_id: UUID
    model: str | None
    estimate: Estimate
    messages: list[BaseMessage] | None
    prompts: list[str] | None
    params: Mapping[str, Any]
    scopes: Mapping[str, Mapping[str, str]]
    model_requested: str | None = None
    policy: str | None = None
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    parent_run_id: UUID | None = None
    root_run_id: UUID | None = None
    target: Any = None
    send_kwargs: Mapping[str, Any] = field(default_factory=dict)
    waited: float = 0.0

    def but(self, **changes: Any) -> Call:
        """Return a copy with ``changes`` applied."""
        return replace(self, **changes)


@dataclass(frozen=True, slots=True, kw_only=True)
class Line(Charge):
    """One budget's share of a call: the store's :class:`~budgetguard.stores.base.Charge`
    (bucket, amount in the budget's unit, the pool it may borrow from), plus the budget
    and scope it belongs to. A ticket's lines are the reservation the store receives.
    """

    budget: Budget
    scope: Mapping[str, str]


@dataclass(slots=True)
class Ticket:
    """A reserved call, open until settled exactly once.

    Attributes:
        call: The call as it was reserved (after any policy).
        lines: What each budget holds.
        started: Clock time of the reservation.
        owner: ``"sync"`` or ``"async"``: the callback meter that reserved it settles it.
        fail_open: The store was unreachable and the guard was told to let calls through.
        held: Whether the store holds a reservation for it (``False`` when failing open,
            or for a refused call that only LangChain's cache may answer).
        tried: Overflow policies tried before this reservation succeeded.
        settled: Set once the ticket is settled.
        id: The reservation id (the run id as text).
    """

    call: Call
    lines: tuple[Line, ...]
    started: float
    owner: str = "sync"
    fail_open: bool = False
    held: bool = True
    tried: tuple[str, ...] = ()
    settled: bool = False
    id: str = field(init=False)
    """The reservation id (the run id as text)."""

    def __post_init__(self) -> None:
        self.id = str(self.call.run_id)

    def summary(self) -> dict[str, Any]:
        """A JSON-able record of the decision, for traces and logs."""
        est = self.call.estimate
        return {
            "model": self.call.model,
            "model_requested": self.call.model_requested,
            "policy": self.call.policy,
            "estimated_input_tokens": est.input_tokens,
            "estimated_output_tokens": est.output_tokens,
            "output_capped": est.output_capped,
            "reserved": {ln.budget.name: round(ln.amount, 8) for ln in self.lines},
            "fail_open": self.fail_open,
        }

    def meta_json(self) -> str:
        """Compact JSON kept with the lease, so an expired lease can still be reported."""
        return json.dumps(
            {
                "model": self.call.model,
                "scopes": {k: dict(v) for k, v in self.call.scopes.items() if v},
                "budgets": [ln.budget.name for ln in self.lines],
                "est": [self.call.estimate.input_tokens, self.call.estimate.output_tokens],
                "tags": list(self.call.tags),
            },
            separators=(",", ":"),
        )


def flat_scope(scopes: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """Every scope value of a call in one mapping (``{"user_id": "alice"}``)."""
    out: dict[str, str] = {}
    for scope in scopes.values():
        out.update(scope)
    return out
