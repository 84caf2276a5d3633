"""How a model call that ended is charged: the one rule, for every way the guard meets a call.

Each adapter (metered copies in :mod:`budgetguard.metered`, callback meters in
:mod:`budgetguard.meter`, the agent middleware in :mod:`budgetguard.middleware`) reports
how a call ended as an :class:`Ending`: what came back (or what was received before the
end), the error it ended with, and whether the request reached the model's own method.
:func:`settle_rule` turns that into what to charge and how to record it:

* completed, usage reported: the reported usage; outcome ``ok`` (``fell_back`` or
  ``compressed`` when an overflow policy changed the call);
* answered from LangChain's cache: nothing; ``cached``;
* completed, no usage reported (a stream without its usage chunk): the prompt estimate plus
  the output counted; ``ok``;
* refused, or ended before the request was sent: nothing, the reservation is released;
  ``cancelled`` or ``error``;
* interrupted after it was sent (the consumer stopped the stream at any chunk, the first
  included; the task was cancelled; a timeout; ``KeyboardInterrupt``): the prompt estimate
  plus the output received so far, counted; ``cancelled``;
* failed after output arrived (a provider error mid-stream, a broken connection): the same;
  ``error``; when the stream had already reported some usage (Anthropic sends the prompt's
  count first and the output's last), each count is at least the reported one;
* failed before any output and not interrupted (the provider answered with an error status,
  a connection that never opened): nothing; ``error``;
* reported malformed usage: the reservation, and ``UsageError`` is raised after settling when
  the call itself succeeded; ``error``.

With ``interrupted="reserved"``, the two "received so far" cases charge the whole reservation
instead.

Why an interrupted call is charged what was received: OpenAI bills a request it has started
to process for its prompt and for the output it generated, whether or not the client read
it. The prompt estimate plus the counted output received is a lower bound of that bill (the
provider may have generated a few tokens more before it noticed), and it is what a careful
user can show was spent. ``interrupted="reserved"`` charges the reservation instead: an upper
bound when the call had an output cap.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGeneration, LLMResult

from budgetguard.errors import UsageError
from budgetguard.usage import Usage, usage_from_message, usage_from_result

if TYPE_CHECKING:
    from budgetguard.tickets import Ticket

__all__ = [
    "INTERRUPTED_CHARGES",
    "Ending",
    "Response",
    "Settlement",
    "describe",
    "is_interruption",
    "policy_outcome",
    "settle_rule",
]

Response = LLMResult | BaseMessage
"""What a call gave back: LangChain's ``LLMResult`` (callbacks), or the model's message
itself (a metered copy, the agent middleware), or the chunks received so far, added up."""

InterruptedCharge = Literal["received", "reserved"]
INTERRUPTED_CHARGES: tuple[str, ...] = ("received", "reserved")


def _interruptions() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the caller stopped waiting", not "the provider said no"."""
    kinds: list[type[BaseException]] = [GeneratorExit, asyncio.CancelledError, KeyboardInterrupt, TimeoutError]
    try:  # the HTTP clients under langchain-openai: their own timeout errors
        import httpx

        kinds.append(httpx.TimeoutException)
    except ImportError:  # pragma: no cover  (langchain-openai depends on both)
        pass
    try:
        import openai

        kinds.append(openai.APITimeoutError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(kinds)


_INTERRUPTIONS = _interruptions()


def is_interruption(error: BaseException) -> bool:
    """Whether ``error`` ended the call from the caller's side (stop, cancel, timeout)."""
    return isinstance(error, _INTERRUPTIONS)


@dataclass(frozen=True, slots=True)
class Ending:
    """How one model call ended, as an adapter saw it.

    Attributes:
        response: What came back, or what was received before the end (streamed chunks
            added up); ``None`` when nothing was.
        error: What the call ended with; ``None`` when it completed.
        sent: Whether the request reached the model's own method (``False``: refused, or
            ended before it was sent, e.g. cancelled while waiting for a rate limiter).
    """

    response: Response | None = None
    error: BaseException | None = None
    sent: bool = True


@dataclass(frozen=True, slots=True)
class Settlement:
    """What to charge for a call that ended, and how to record it.

    Attributes:
        usage: What to charge (``None``: release the reservation, charge nothing).
        outcome: The ledger outcome.
        problem: A :class:`UsageError` for malformed usage, raised after settling when
            the call itself succeeded.
    """

    usage: Usage | None
    outcome: str
    problem: UsageError | None = None


def settle_rule(
    ticket: Ticket,
    ending: Ending,
    count_text: Callable[[str, str | None], int],
    interrupted: InterruptedCharge = "received",
) -> Settlement:
    """The one rule: what a call that ended is charged (see the module docstring's table).

    Args:
        ticket: The call's reservation.
        ending: How it ended.
        count_text: Counts output text for a model (the guard's estimator).
        interrupted: ``"received"`` (default) or ``"reserved"``: what a call interrupted
            after it was sent is charged.
    """
    call, error, response = ticket.call, ending.error, ending.response
    est = call.estimate
    usage: Usage | None = None
    if error is None:
        done = policy_outcome(call.policy)
    else:
        done = "cancelled" if is_interruption(error) else "error"
    if response is not None and _has_answer(response):
        if _is_cache_hit(response):
            return Settlement(Usage(0, 0), "cached")
        try:
            usage = usage_from_message(response) if isinstance(response, BaseMessage) else usage_from_result(response)
        except UsageError as exc:
            bad = UsageError(
                f"{call.model or 'the model'} reported malformed usage ({exc}); the call was charged "
                f"its reservation ({est.input_tokens + est.output_tokens:,} tokens). Check the provider "
                "integration, or report it."
            )
            return Settlement(Usage(est.input_tokens, est.output_tokens), "error", bad)
        if usage is not None and error is None:
            return Settlement(usage, done)
    text = _generated_text(response) if response is not None else ""
    received = count_text(text, call.model) if text else 0
    floor = est.output_tokens if interrupted == "reserved" else 0
    if usage is not None:  # ended early, but the stream had reported usage so far (Anthropic
        # sends its prompt count first and its output count last): never less than what arrived
        inputs = usage.input_tokens or est.input_tokens
        outputs = max(usage.output_tokens, received, floor)
        return Settlement(Usage(inputs, outputs, min(usage.cached_input_tokens, inputs), usage.reasoning_tokens), done)
    if error is None:  # completed without usage (a stream without its usage chunk)
        return Settlement(Usage(est.input_tokens, received), done)
    if not ending.sent or (done == "error" and not text):
        return Settlement(None, done)  # nothing reached the provider, or it refused: nothing billed
    return Settlement(Usage(est.input_tokens, max(received, floor)), done)


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


def describe(ticket: Ticket, response: Response | None, usage: Usage | None) -> None:
    """Put the guard's decision where traces and the caller can see it (``budgetguard``)."""
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


def _has_answer(response: Response) -> bool:
    return isinstance(response, BaseMessage) or any(response.generations)


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
    """The text a model generated: its answer, and its tool calls' names and arguments as the
    provider wrote them (the streamed chunks' raw JSON when there are chunks)."""
    parts: list[str] = []
    for text, message in _answers(response):
        if text:
            parts.append(text)
        chunks = getattr(message, "tool_call_chunks", None)
        if chunks:
            parts.extend(str(tc.get("name") or "") + str(tc.get("args") or "") for tc in chunks)
            continue
        for tc in getattr(message, "tool_calls", None) or ():
            parts.append(str(tc.get("name", "")) + json.dumps(tc.get("args", {}), ensure_ascii=False))
    return "".join(parts)
