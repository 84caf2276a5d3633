"""The meters: callback handlers that reserve before a model call and settle after it.

Why two handlers. LangChain runs callbacks two ways: the sync dispatcher calls handlers
directly (and honours ``raise_error``), the async dispatcher awaits async handlers and
calls sync ones inline. An *async* handler driven by the *sync* dispatcher has its
exceptions swallowed, so a budget check there could never stop a call. So each guarded
invocation gets

* a :class:`SyncMeter` (``run_inline``): it meters every call the sync dispatcher makes,
  with blocking store calls;
* in async code, also an :class:`AsyncMeter`: it meters calls the async dispatcher makes,
  with the store's async methods and ``asyncio`` sleeps, never blocking the loop.

Both share one :class:`Invocation` and claim a run id before touching it, so a call is
metered exactly once whichever dispatcher runs it. The sync dispatcher always runs sync
handlers before any async one, and the async dispatcher runs inline handlers first, so
the sync meter always sees a run first; it defers to the async meter only when it is
called from inside a coroutine (the async dispatcher) and an async meter is attached.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGeneration, LLMResult

from budgetguard.errors import UsageError
from budgetguard.estimate import CallShape, model_from_params
from budgetguard.tickets import Call, Ticket
from budgetguard.usage import Usage, usage_from_message, usage_from_result

if TYPE_CHECKING:
    from langchain_core.runnables import RunnableConfig

    from budgetguard.guard import BudgetGuard

__all__ = [
    "HANDOFF_KEY",
    "WRAPPER_KEY",
    "AsyncMeter",
    "Invocation",
    "SyncMeter",
    "build_call",
    "conclude",
    "decorate",
    "meters_for",
    "outcome",
]

logger = logging.getLogger("budgetguard")

HANDOFF_KEY = "budgetguard_ticket"
"""Metadata key by which the guard's model wrapper hands a reserved ticket to the meter."""

WRAPPER_KEY = "budgetguard_wrapper"
"""Metadata marking the model wrapper's own run, which the meters leave alone."""

_CO_COROUTINE = inspect.CO_COROUTINE


def _called_by_async_dispatcher() -> bool:
    # Frame 0 is this function, 1 the meter's method, 2 LangChain's dispatcher.
    return bool(sys._getframe(2).f_code.co_flags & _CO_COROUTINE)


class Invocation:
    """State shared by the meters of one guarded invocation."""

    __slots__ = ("claimed", "guard", "has_async", "root_run_id", "scopes", "tickets")

    def __init__(self, guard: BudgetGuard, config: Mapping[str, Any]) -> None:
        self.guard = guard
        self.scopes = guard.scopes_for(config)  # raises MissingScopeError before any call
        self.tickets: dict[UUID, Ticket] = {}
        self.claimed: set[UUID] = set()
        self.has_async = False
        self.root_run_id: UUID | None = None

    # -- start -------------------------------------------------------------------------

    def claim(self, run_id: UUID) -> bool:
        """Claim a run for metering; ``False`` if the other meter already has it."""
        if run_id in self.claimed:
            return False
        self.claimed.add(run_id)
        return True

    def call_for(
        self,
        run_id: UUID,
        serialized: Mapping[str, Any] | None,
        kwargs: Mapping[str, Any],
        messages: Sequence[Sequence[BaseMessage]] | None = None,
        prompts: Sequence[str] | None = None,
    ) -> Call:
        """Build and estimate the call LangChain is about to send."""
        params = kwargs.get("invocation_params") or {}
        if self.root_run_id is None:
            self.root_run_id = kwargs.get("parent_run_id") or run_id
        return build_call(
            self.guard,
            run_id=run_id,
            model=model_from_params(params, serialized),
            params=params,
            messages=[m for batch in messages for m in batch] if messages is not None else None,
            prompts=list(prompts) if prompts is not None else None,
            scopes=self.scopes,
            tags=kwargs.get("tags"),
            metadata=kwargs.get("metadata"),
            parent_run_id=kwargs.get("parent_run_id"),
            root_run_id=self.root_run_id,
        )

    def adopt(self, run_id: UUID, kwargs: Mapping[str, Any], owner: str) -> bool:
        """Take over a ticket the model wrapper reserved for this run, if there is one.

        Also returns ``True`` for the wrapper's own run, which is not metered: the
        wrapper plans the call and its inner run carries the ticket.
        """
        metadata = kwargs.get("metadata") or {}
        if metadata.get(WRAPPER_KEY):
            return True
        handoff = metadata.get(HANDOFF_KEY)
        if handoff is None:
            return False
        ticket = self.guard.take_handoff(handoff)
        if ticket is None:
            return False
        ticket.owner = owner
        self.tickets[run_id] = ticket
        return True

def build_call(
    guard: BudgetGuard,
    *,
    run_id: UUID,
    model: str | None,
    params: Mapping[str, Any],
    messages: list[BaseMessage] | None,
    prompts: list[str] | None,
    scopes: Mapping[str, Mapping[str, str]],
    tags: Sequence[str] | None,
    metadata: Mapping[str, Any] | None,
    parent_run_id: UUID | None,
    root_run_id: UUID | None,
    shape: CallShape | None = None,
) -> Call:
    """Estimate a call about to be sent and describe it for the guard.

    ``shape`` is the guard's estimator's :meth:`~budgetguard.estimate.TokenEstimator.shape`
    of ``model`` and ``params``, when the caller already has it.
    """
    estimator = guard.estimator
    if shape is None:
        shape = estimator.shape(model, params)
    estimate = estimator.estimate_with(shape, messages=messages, prompts=prompts)
    # Positional, every field given: this runs on every call, and keywords and default
    # factories cost more than the rest of the constructor.
    return Call(run_id, model, estimate, messages, prompts, params, scopes, model, None,
                tuple(tags) if tags else (), metadata or {}, parent_run_id, root_run_id, None, {}, 0.0)


Response = LLMResult | BaseMessage
"""What a finished call gave back: LangChain's ``LLMResult`` (callbacks), or the model's
message itself (a model metered in place)."""


def outcome(
    guard: BudgetGuard, ticket: Ticket, response: Response | None, error: BaseException | None
) -> tuple[Usage | None, str, UsageError | None]:
    """What to settle a finished (or failed) call with, and how to record it.

    Args:
        guard: The guard settling the call.
        ticket: The call's ticket.
        response: What came back (``None``: nothing did).
        error: The call's error, if it failed.

    Returns:
        The usage to settle (``None``: release the reservation), the ledger outcome, and
        a :class:`UsageError` to raise after settling when the model reported malformed
        usage (the call is then charged its reservation).
    """
    outcome = policy_outcome(ticket.call.policy) if error is None else "error"
    if response is None:
        return None, outcome, None  # nothing came back: release the reservation
    message = response if isinstance(response, BaseMessage) else None
    if message is None and not any(response.generations):  # type: ignore[union-attr]
        return None, outcome, None
    if _is_cache_hit(response):
        return Usage(0, 0), "ok", None
    try:
        usage = usage_from_message(message) if message is not None else usage_from_result(response)  # type: ignore[arg-type]
    except UsageError as exc:
        est = ticket.call.estimate
        bad = UsageError(
            f"{ticket.call.model or 'the model'} reported malformed usage ({exc}); the call was charged "
            f"its reservation ({est.input_tokens + est.output_tokens:,} tokens). Check the provider "
            "integration, or report it."
        )
        return Usage(est.input_tokens, est.output_tokens), "error", bad
    if usage is None:
        # No usage reported (a stream without a usage chunk, a stopped or broken
        # stream): count what came back and charge the prompt as estimated.
        text = _generated_text(response)
        if error is not None and not text:
            return None, outcome, None
        output = guard.estimator.count_text(text, ticket.call.model) if text else 0
        usage = Usage(ticket.call.estimate.input_tokens, output)
    return usage, outcome, None


def decorate(ticket: Ticket, response: Response | None, usage: Usage | None) -> None:
    """Put the guard's decision where traces and the caller can see it."""
    if response is None:
        return
    summary = ticket.summary()
    if usage is not None:
        summary["input_tokens"] = usage.input_tokens
        summary["output_tokens"] = usage.output_tokens
    if isinstance(response, BaseMessage):
        response.response_metadata["budgetguard"] = summary
        return
    response.llm_output = {**(response.llm_output or {}), "budgetguard": summary}
    for gens in response.generations:
        for gen in gens:
            if isinstance(gen, ChatGeneration):
                gen.message.response_metadata["budgetguard"] = summary


def conclude(
    guard: BudgetGuard, ticket: Ticket, response: Response | None, error: BaseException | None
) -> tuple[Usage | None, str, UsageError | None]:
    """:func:`outcome`, with the decision put on the response (:func:`decorate`)."""
    usage, how, bad = outcome(guard, ticket, response, error)
    decorate(ticket, response, usage)
    return usage, how, bad


def policy_outcome(policy: str | None) -> str:
    """The ledger outcome of a call that succeeded after ``policy`` (``"a+b"`` for several)."""
    if not policy:
        return "ok"
    names = policy.split("+")
    if "cheaper_model" in names:
        return "fell_back"
    if "compress" in names:
        return "compressed"
    return "ok"


def _answers(response: Response) -> list[tuple[str, Any]]:
    """``(text, message or None)`` of each generation in ``response``."""
    if isinstance(response, BaseMessage):
        content = response.content
        return [(content if isinstance(content, str) else response.text, response)]
    return [(gen.text, getattr(gen, "message", None)) for gens in response.generations for gen in gens]


def _is_cache_hit(response: Response) -> bool:
    # LangChain marks chat generations served from its cache with total_cost == 0.
    if isinstance(response, BaseMessage):
        usage = getattr(response, "usage_metadata", None)
        return bool(usage) and usage.get("total_cost") == 0  # type: ignore[union-attr]
    for gens in response.generations:
        for gen in gens:
            usage = getattr(getattr(gen, "message", None), "usage_metadata", None)
            if usage and usage.get("total_cost") == 0:
                return True
    return False


def _generated_text(response: Response) -> str:
    parts: list[str] = []
    for text, message in _answers(response):
        if text:
            parts.append(text)
        for tc in getattr(message, "tool_calls", None) or ():
            parts.append(str(tc.get("name", "")) + str(tc.get("args", "")))
        for tc in getattr(message, "tool_call_chunks", None) or ():
            parts.append(str(tc.get("name") or "") + str(tc.get("args") or ""))
    return "".join(parts)


class _ModelEvents:
    """What both meters share: model events only, errors raised, one invocation."""

    raise_error = True
    # Only model events matter: skipping the rest saves LangChain a dispatch per chain step.
    ignore_chain = True
    ignore_agent = True
    ignore_retriever = True
    ignore_retry = True
    ignore_custom_event = True

    def __init__(self, invocation: Invocation) -> None:
        self.inv = invocation


class SyncMeter(_ModelEvents, BaseCallbackHandler):
    """Meters model calls made by LangChain's sync dispatcher (see module docstring)."""

    run_inline = True

    def _begin(self, run_id: UUID, serialized: Any, kwargs: dict[str, Any], **call: Any) -> None:
        inv = self.inv
        if not inv.claim(run_id) or inv.adopt(run_id, kwargs, "sync"):
            return
        inv.tickets[run_id] = inv.guard.reserve(inv.call_for(run_id, serialized, kwargs, **call), owner="sync")

    def on_chat_model_start(
        self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *, run_id: UUID, **kwargs: Any
    ) -> None:
        """Estimate and reserve before the request is sent; raises ``BudgetExceeded``."""
        if self.inv.has_async and _called_by_async_dispatcher():
            return
        self._begin(run_id, serialized, kwargs, messages=messages)

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID, **kwargs: Any) -> None:
        """Same as :meth:`on_chat_model_start`, for text-completion LLMs.

        Always handled here, in async code too: LangChain's async ``on_llm_start``
        dispatch skips non-inline (async) handlers whenever an inline handler is
        attached, so the async meter never sees it. Text-completion calls in async
        code therefore reserve with the store's blocking methods (microseconds for the
        memory store, one round trip for Redis).
        """
        self._begin(run_id, serialized, kwargs, prompts=prompts)

    def _end(self, run_id: UUID, response: LLMResult | None, error: BaseException | None) -> None:
        ticket = self.inv.tickets.get(run_id)
        if ticket is None or ticket.owner != "sync":
            return
        del self.inv.tickets[run_id]
        usage, result, bad = conclude(self.inv.guard, ticket, response, error)
        self.inv.guard.settle(ticket, usage, outcome=result, error=error or bad)
        if bad is not None:
            raise bad

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        """Settle the reservation with the usage the model reported."""
        self._end(run_id, response, None)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Release the reservation, or settle what a broken stream produced."""
        self._end(run_id, kwargs.get("response"), error)


class AsyncMeter(_ModelEvents, AsyncCallbackHandler):
    """Meters model calls made by LangChain's async dispatcher (see module docstring)."""

    async def _begin(self, run_id: UUID, serialized: Any, kwargs: dict[str, Any], **call: Any) -> None:
        inv = self.inv
        if not inv.claim(run_id) or inv.adopt(run_id, kwargs, "async"):
            return
        call_ = inv.call_for(run_id, serialized, kwargs, **call)
        inv.tickets[run_id] = await inv.guard.areserve(call_, owner="async")

    async def on_chat_model_start(
        self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *, run_id: UUID, **kwargs: Any
    ) -> None:
        """Estimate and reserve before the request is sent; raises ``BudgetExceeded``."""
        await self._begin(run_id, serialized, kwargs, messages=messages)

    async def on_llm_start(
        self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID, **kwargs: Any
    ) -> None:
        """Same as :meth:`on_chat_model_start`, for text-completion LLMs."""
        await self._begin(run_id, serialized, kwargs, prompts=prompts)

    async def _end(self, run_id: UUID, response: LLMResult | None, error: BaseException | None) -> None:
        ticket = self.inv.tickets.get(run_id)
        if ticket is None or ticket.owner != "async":
            return
        del self.inv.tickets[run_id]
        usage, result, bad = conclude(self.inv.guard, ticket, response, error)
        await self.inv.guard.asettle(ticket, usage, outcome=result, error=error or bad)
        if bad is not None:
            raise bad

    async def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        """Settle the reservation with the usage the model reported."""
        await self._end(run_id, response, None)

    async def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Release the reservation, or settle what a broken stream produced."""
        await self._end(run_id, kwargs.get("response"), error)


def meters_for(guard: BudgetGuard, config: RunnableConfig) -> list[BaseCallbackHandler]:
    """The handlers one guarded invocation attaches to its run.

    Raises:
        MissingScopeError: A per-key budget has no value in ``config``.
    """
    from budgetguard.guard import running_loop

    inv = Invocation(guard, config)
    handlers: list[BaseCallbackHandler] = [SyncMeter(inv)]
    if running_loop():
        inv.has_async = True
        handlers.append(AsyncMeter(inv))
    return handlers
