"""Overflow policies: what the guard tries, in order, before raising ``BudgetExceeded``.

A policy looks at a call that cannot be reserved (or does not fit its model's context
window) and proposes a changed call, or declines. Policies are small objects with
function-like names, combined by listing them in the order to try::

    BudgetGuard(budgets, policies=[
        cap_output(min_output_tokens=128),
        cheaper_model({"gpt-4o": ["gpt-4o-mini"]}),
        compress_prompt("trim"),
        wait_for_refill(max_wait=20),
    ])

Each ``propose`` is a small flow (see :mod:`budgetguard.flow`): it may read bucket
levels (``Peek``), sleep (``Sleep``) or run a summarizer (``Invoke``) and returns the
changed call, so every policy works unchanged in sync and async code. The changed call
is estimated and reserved again; nothing is sent until a reservation succeeds.

Policies that change the request (``rewrites = True``: cap, cheaper model, compress) act
where the guard sends the call itself: in the metered copy of every chat model it can
reach (:mod:`budgetguard.metered`) and in the agent middleware. Models it cannot reach are
still metered, through callbacks; for them only :class:`wait_for_refill` applies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage, get_buffer_string, trim_messages

from budgetguard.errors import ConfigurationError, ContextWindowExceeded
from budgetguard.flow import Flow, Invoke, OverflowPolicy, Peek, PolicyContext, Sleep
from budgetguard.tickets import flat_scope

if TYPE_CHECKING:
    from langchain_core.runnables import RunnableConfig

    from budgetguard.errors import BudgetExceeded
    from budgetguard.tickets import Call

__all__ = ["OverflowPolicy", "cap_output", "cheaper_model", "compress_prompt", "wait_for_refill"]

_CAP_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "max_new_tokens", "num_predict")


def headroom(call: Call, guard: PolicyContext) -> Flow[tuple[float, float]]:
    """What the budgets can afford for ``call``: (max output tokens, max input tokens).

    Each is computed holding the other part of the call fixed, over every budget the
    call is charged to (a borrower's lender included), in tokens. A ``"calls"`` budget
    that cannot cover one more call leaves room for nothing.
    """
    lines = guard.lines_for(call)
    levels = yield Peek(guard.specs_for(lines))
    est = call.estimate
    max_out = max_in = math.inf
    i = 0
    for ln in lines:
        avail = max(levels[i], 0.0)
        i += 1
        if ln.budget.borrow_from:
            avail += max(levels[i], 0.0)
            i += 1
        if ln.budget.unit == "calls":  # a call counts one whatever its size: no smaller call fits better
            if avail < ln.amount:
                max_out = max_in = -math.inf
        elif ln.budget.unit == "usd":
            info = guard.prices.require_price(call.model)
            pin = info.input_cost_per_token or 0.0
            pout = info.output_cost_per_token or 0.0
            if pout > 0:
                max_out = min(max_out, (avail - est.input_tokens * pin) / pout)
            if pin > 0:
                max_in = min(max_in, (avail - est.output_tokens * pout) / pin)
        else:
            max_out = min(max_out, avail - est.input_tokens)
            max_in = min(max_in, avail - est.output_tokens)
    return max_out, max_in


def applied(call: Call, name: str) -> str:
    """The call's applied policies with ``name`` added (``"compress+cap_output"``)."""
    if not call.policy:
        return name
    names = call.policy.split("+")
    return call.policy if name in names else call.policy + "+" + name


def _cap_key(params: Mapping[str, Any]) -> str:
    for key in _CAP_KEYS:
        if params.get(key) is not None:
            return key
    return "max_tokens"


class cap_output(OverflowPolicy):  # noqa: N801  (reads like a function, as tenacity's policies do)
    """Lower the call's output cap to what the budgets and the context window allow.

    The call is then sent with that cap, so its reservation is a true bound.

    Args:
        min_output_tokens: Never cap below this; decline instead.
    """

    name = "cap_output"

    def __init__(self, min_output_tokens: int = 64) -> None:
        if not isinstance(min_output_tokens, int) or min_output_tokens < 1:
            msg = f"cap_output: min_output_tokens must be a positive integer, got {min_output_tokens!r}"
            raise ConfigurationError(msg)
        self.min_output_tokens = min_output_tokens

    def propose(self, call: Call, error: BudgetExceeded, guard: PolicyContext) -> Flow[Call | None]:
        """Propose the largest affordable cap of at least ``min_output_tokens``."""
        est = call.estimate
        limit = math.inf
        window = guard.prices.context_window(call.model)
        if window is not None:
            limit = window - est.input_tokens
        if not isinstance(error, ContextWindowExceeded):
            max_out, _ = yield from headroom(call, guard)
            limit = min(limit, max_out)
        cap = math.floor(limit) if math.isfinite(limit) else None
        if cap is None or cap < self.min_output_tokens or cap >= est.output_tokens:
            return None
        key = _cap_key(call.params)
        return call.but(
            estimate=replace(est, output_tokens=cap, output_capped=True),
            params={**call.params, key: cap},
            send_kwargs={**call.send_kwargs, key: cap},
            policy=applied(call, self.name),
        )


def _model_name(model: Any) -> str | None:
    if isinstance(model, str):
        return model
    for attr in ("model_name", "model", "model_id"):
        value = getattr(model, attr, None)
        if isinstance(value, str):
            return value
    return None


def _rung_cap(rung: Any, call: Call, guard: PolicyContext) -> int | None:
    """The output cap a ladder's model object is sent with: the call's cap, or the rung's own
    when it is lower (or when the call has none); ``None`` when neither has one. A name rung is
    a copy of the called model, so it keeps the call's own parameters."""
    if isinstance(rung, str):
        return None
    own = rung._get_invocation_params() if hasattr(rung, "_get_invocation_params") else {}
    caps = [c for c in (guard.estimator.output_cap(call.params), guard.estimator.output_cap(own)) if c is not None]
    return min(caps) if caps else None


class cheaper_model(OverflowPolicy):  # noqa: N801
    """Send the call to the first model of a ladder that the budgets cover and that fits.

    A model object in the ladder is sent the call's output cap (or its own, when lower), so
    what it answers stays within what was reserved for it.

    Args:
        ladder: For each model name, the models to try instead, in order: names (the
            same client with another model) or model objects (any chat model). A key
            matches the requested model exactly or as a prefix (``"gpt-4o"`` matches
            ``"gpt-4o-2024-08-06"``; the longest key wins).

    Example:
        >>> cheaper_model({"gpt-4o": ["gpt-4o-mini"]}).name
        'cheaper_model'
    """

    name = "cheaper_model"

    def __init__(self, ladder: Mapping[str, Sequence[Any]]) -> None:
        if not ladder:
            msg = "cheaper_model needs a ladder, e.g. {'gpt-4o': ['gpt-4o-mini']}"
            raise ConfigurationError(msg)
        self.ladder = {k: list(v) for k, v in ladder.items()}
        for key, rungs in self.ladder.items():
            for rung in rungs:
                if _model_name(rung) is None:
                    msg = f"cheaper_model: cannot tell the model name of {rung!r} in the ladder of {key!r}"
                    raise ConfigurationError(msg)

    def rungs(self, model: str | None) -> list[Any]:
        """The ladder for ``model`` (empty when it has none)."""
        if model is None:
            return []
        keys = [k for k in self.ladder if model == k or model.startswith(k)]
        return self.ladder[max(keys, key=len)] if keys else []

    def propose(self, call: Call, error: BudgetExceeded, guard: PolicyContext) -> Flow[Call | None]:
        """Propose the first rung that fits the window and that every budget can cover."""
        requested = call.model_requested or call.model
        for rung in self.rungs(call.model):
            name = _model_name(rung)
            params = {**call.params, "model_name": name, "model": name}
            send = dict(call.send_kwargs)
            cap = _rung_cap(rung, call, guard)
            if cap is not None:  # the rung answers with at most what is reserved for it
                key = _cap_key(call.params)
                params[key] = send[key] = cap
            est = guard.estimator.estimate(
                model=name, invocation_params=params, messages=call.messages, prompts=call.prompts
            )
            candidate = call.but(
                model=name,
                estimate=est,
                params=params,
                target=rung,
                send_kwargs=send,
                policy=applied(call, self.name),
                model_requested=requested,
            )
            if guard.window_error(candidate) is not None:
                continue
            max_out, _ = yield from headroom(candidate, guard)
            if max_out >= est.output_tokens:
                return candidate
        return None


class compress_prompt(OverflowPolicy):  # noqa: N801
    """Shorten the conversation so the prompt fits the budgets and the context window.

    The system message(s) and the latest user turn are always kept. Older turns are
    either dropped, newest kept first (``"trim"``, LangChain's ``trim_messages``), or
    replaced by a summary written by a cheap model (``"summarize"``); the summarizer's
    own call is metered, reserved and settled by the same guard.

    Args:
        strategy: ``"trim"`` or ``"summarize"``.
        summarizer: The chat model that writes summaries (``"summarize"`` only).
        summary_max_tokens: Output cap for the summary.
    """

    name = "compress"

    def __init__(self, strategy: str = "trim", *, summarizer: Any = None, summary_max_tokens: int = 256) -> None:
        if strategy not in ("trim", "summarize"):
            msg = f"compress_prompt: strategy must be 'trim' or 'summarize', got {strategy!r}"
            raise ConfigurationError(msg)
        if strategy == "summarize" and summarizer is None:
            msg = "compress_prompt('summarize') needs summarizer=<a cheap chat model>"
            raise ConfigurationError(msg)
        self.strategy = strategy
        self.summarizer = summarizer
        self.summary_max_tokens = summary_max_tokens

    def _target(self, call: Call, error: BudgetExceeded, guard: PolicyContext) -> Flow[float]:
        est = call.estimate
        target = math.inf
        window = guard.prices.context_window(call.model)
        if window is not None:
            target = window - (est.output_tokens if est.output_capped else 0)
        if not isinstance(error, ContextWindowExceeded):
            _, max_in = yield from headroom(call, guard)
            target = min(target, max_in)
        return target

    def propose(self, call: Call, error: BudgetExceeded, guard: PolicyContext) -> Flow[Call | None]:
        """Propose the compressed conversation, re-estimated."""
        messages = call.messages
        if not messages:
            return None
        target = yield from self._target(call, error, guard)
        if not math.isfinite(target) or target >= call.estimate.input_tokens:
            return None
        system, older, latest = _split(messages)
        if not latest:
            return None
        if self.strategy == "summarize" and older:
            summary = yield Invoke(
                guard.wrap(self.summarizer.bind(max_tokens=self.summary_max_tokens)),
                [
                    SystemMessage("Summarize this conversation in a few sentences. Keep names, numbers, decisions."),
                    HumanMessage(get_buffer_string(older)),
                ],
                _scoped_config(call),
            )
            kept: list[BaseMessage] | None = [
                *system, SystemMessage(f"Summary of the earlier conversation: {summary.content}"), *latest
            ]
        else:
            kept = self._trim(call, guard, system, older, latest, target)
        if kept is None or len(kept) >= len(messages):
            return None
        tools = call.params.get("tools") or call.params.get("functions")
        input_tokens = guard.estimator.count_messages(kept, call.model, tools=tools)
        return call.but(
            messages=kept,
            estimate=replace(call.estimate, input_tokens=input_tokens),
            policy=applied(call, self.name),
        )

    @staticmethod
    def _trim(
        call: Call,
        guard: PolicyContext,
        system: list[BaseMessage],
        older: list[BaseMessage],
        latest: list[BaseMessage],
        target: float,
    ) -> list[BaseMessage] | None:
        tools = call.params.get("tools") or call.params.get("functions")

        def count(msgs: list[BaseMessage]) -> int:
            return guard.estimator.count_messages(msgs, call.model, tools=tools)

        fixed = count([*system, *latest])
        if fixed > target:
            return None  # even the system prompt and the latest turn do not fit
        kept_older = trim_messages(
            older,
            max_tokens=int(target - fixed),
            token_counter=count,
            strategy="last",
            start_on="human",
            allow_partial=False,
        )
        return [*system, *kept_older, *latest]


def _split(messages: Sequence[BaseMessage]) -> tuple[list[BaseMessage], list[BaseMessage], list[BaseMessage]]:
    """(leading system messages, older turns, the latest user turn and what follows it)."""
    head = 0
    while head < len(messages) and messages[head].type == "system":
        head += 1
    last_human = max((i for i in range(head, len(messages)) if messages[i].type == "human"), default=None)
    if last_human is None:
        return list(messages[:head]), [], []
    return list(messages[:head]), list(messages[head:last_human]), list(messages[last_human:])


def _scoped_config(call: Call) -> RunnableConfig:
    flat = flat_scope(call.scopes)
    return {
        "configurable": flat,
        "metadata": {**flat, "budgetguard_purpose": "compress"},
        "tags": [*call.tags, "budgetguard:summarizer"],
    }


class wait_for_refill(OverflowPolicy):  # noqa: N801
    """Wait until refills cover the call, when that is at most ``max_wait`` seconds away.

    The wait is computed from the buckets (the denial's ``retry_after``), not polled;
    sync code sleeps with ``time.sleep``, async code with ``asyncio.sleep``. If another
    caller takes the refill first, the guard offers the call again, until ``max_wait``
    seconds have been spent on it.

    Args:
        max_wait: The most seconds one call may wait in total.
    """

    name = "wait_for_refill"
    rewrites = False
    retries = True

    def __init__(self, max_wait: float = 30.0) -> None:
        if not (isinstance(max_wait, (int, float)) and math.isfinite(max_wait) and max_wait > 0):
            msg = f"wait_for_refill: max_wait must be a positive number of seconds, got {max_wait!r}"
            raise ConfigurationError(msg)
        self.max_wait = float(max_wait)

    def propose(self, call: Call, error: BudgetExceeded, guard: PolicyContext) -> Flow[Call | None]:
        """Sleep for the computed refill time, then propose the same call."""
        wait = error.retry_after
        if isinstance(error, ContextWindowExceeded) or wait is None or call.waited + wait > self.max_wait:
            return None
        # A hair past the computed moment, so float rounding cannot leave us short.
        wait = wait + 1e-3
        yield Sleep(wait)
        return call.but(waited=call.waited + wait, policy=applied(call, self.name))
