"""Callback meters: how the guard meets model calls it cannot reach.

``guard | chain`` meters every chat model it can reach with a metered copy
(:mod:`budgetguard.metered`). Some model calls cannot be reached that way: a model called
inside a lambda, a tool, a retriever or a custom runnable, a compiled LangGraph graph, and
text-completion LLMs (``BaseLLM``). For those the guard attaches callback handlers to the run:
they reserve in ``on_chat_model_start`` / ``on_llm_start`` (raising ``BudgetExceeded``
stops the call before its request exists) and settle in ``on_llm_end`` / ``on_llm_error``
by the same rule as every other path (:mod:`budgetguard.settlement`). A callback cannot
change a request, so of the overflow policies only ``wait_for_refill`` applies here.

Two gaps of LangChain's callbacks are closed here:

* A chat model's ``agenerate`` lets a cancellation escape without ``on_llm_error``. The
  meters watch the guarded invocation's outermost run: when it ends cancelled (or with
  ``KeyboardInterrupt``), every call of the invocation still open is settled then as
  interrupted, instead of being left to its lease. (A stream its consumer stopped is
  different: its model reports ``GeneratorExit`` itself, with what it had streamed, when
  its generator is closed.)
* LangChain logs every exception a handler raises as "Error in ... callback" before it
  re-raises it; a refusal is the meter doing its job, so that line is filtered out for
  the meters' own :class:`~budgetguard.errors.BudgetGuardError` (the caller still gets it).

Why two handlers. LangChain runs callbacks two ways: the sync dispatcher calls handlers
directly (and honours ``raise_error``), the async dispatcher awaits async handlers and
calls sync ones inline. An *async* handler driven by the *sync* dispatcher has its
exceptions swallowed, so a budget check there could never stop a call. So each guarded
invocation gets a :class:`SyncMeter` (``run_inline``), which meters every call the sync
dispatcher makes, and in async code also an :class:`AsyncMeter`, which meters the calls the
async dispatcher makes without blocking the loop. Both share one :class:`Invocation` and
claim a run id before touching it, so a call is metered exactly once. The sync dispatcher
runs sync handlers before async ones and the async dispatcher runs inline handlers first,
so the sync meter always sees a run first (the async meter is inline too, after it, so each
event is awaited in turn rather than run as a task); it defers to the async meter only when called
from inside a coroutine (the async dispatcher) and an async meter is attached.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from contextvars import Token
from typing import TYPE_CHECKING, Any
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.messages import BaseMessage
from langchain_core.outputs import LLMResult
from langchain_core.runnables.config import var_child_runnable_config

from budgetguard.errors import BudgetGuardError
from budgetguard.estimate import model_from_params
from budgetguard.runtime_context import runtime_context
from budgetguard.sending import sent_by
from budgetguard.settlement import Ending

if TYPE_CHECKING:
    from langchain_core.runnables import RunnableConfig

    from budgetguard.engine import BudgetEngine
    from budgetguard.tickets import Call, Ticket

__all__ = [
    "AsyncMeter", "Invocation", "SyncMeter", "ametering_inside", "attach_meters", "metering_inside", "meters_for"
]  # fmt: skip

logger = logging.getLogger("budgetguard")

_CO_COROUTINE = inspect.CO_COROUTINE


def _called_by_async_dispatcher() -> bool:
    # Frame 0 is this function, 1 the meter's method, 2 LangChain's dispatcher.
    return bool(sys._getframe(2).f_code.co_flags & _CO_COROUTINE)


class Invocation:
    """State shared by the meters of one guarded invocation."""

    __slots__ = ("claimed", "engine", "has_async", "root_run_id", "scopes", "tickets")

    def __init__(
        self, engine: BudgetEngine, config: Mapping[str, Any], scoped: tuple[Any, UUID | None] | None = None
    ) -> None:
        self.engine = engine
        if scoped is None:
            # raises MissingScopeError before any call; "run" is the guarded invocation's run
            scoped = (engine.scopes_for(config, runtime_context(config), run=config.get("run_id")), None)
        self.scopes: Any = scoped[0]
        self.root_run_id: UUID | None = scoped[1]
        self.tickets: dict[UUID, Ticket] = {}
        self.claimed: set[UUID] = set()
        self.has_async = False

    def claim(self, run_id: UUID) -> bool:
        """Claim a run for metering; ``False`` if the other meter already has it."""
        if run_id in self.claimed:
            return False
        self.claimed.add(run_id)
        return True

    def started(self, run_id: UUID) -> None:
        """Note the invocation's outermost run (the first one the meters see)."""
        if self.root_run_id is None:
            self.root_run_id = run_id

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
        self.started(kwargs.get("parent_run_id") or run_id)
        return self.engine.new_call(
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

    def cancelled(self, run_id: UUID, error: BaseException) -> bool:
        """Whether ``run_id`` is the outermost run and it ended cancelled (not a stopped stream)."""
        return run_id == self.root_run_id and isinstance(error, (asyncio.CancelledError, KeyboardInterrupt))

    def leftovers(self, owner: str | None = None) -> list[Ticket]:
        """Take the calls still open that ``owner``'s meter reserved (``None``: either meter)."""
        mine = [run for run, ticket in self.tickets.items() if owner is None or ticket.owner == owner]
        return [self.tickets.pop(run) for run in mine]


class _Meter:
    """What both meters share: model events and the outermost run, errors raised."""

    raise_error = True
    ignore_agent = True
    ignore_retriever = True
    ignore_retry = True
    ignore_custom_event = True

    def __init__(self, invocation: Invocation) -> None:
        self.inv = invocation

    def _claims(self, run_id: UUID) -> bool:
        """Whether this meter meters the run (not a metered copy of the guard, not the other meter)."""
        return not sent_by(self.inv.engine) and self.inv.claim(run_id)

    def _take(self, run_id: UUID, owner: str) -> Ticket | None:
        ticket = self.inv.tickets.get(run_id)
        if ticket is None or ticket.owner != owner:
            return None
        del self.inv.tickets[run_id]
        return ticket


class SyncMeter(_Meter, BaseCallbackHandler):
    """Meters model calls made by LangChain's sync dispatcher (see module docstring)."""

    run_inline = True

    def _begin(self, run_id: UUID, serialized: Any, kwargs: dict[str, Any], **call: Any) -> None:
        if self._claims(run_id):
            inv = self.inv
            inv.tickets[run_id] = inv.engine.reserve(inv.call_for(run_id, serialized, kwargs, **call), owner="sync")

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
        code therefore reserve with the store's blocking methods.
        """
        self._begin(run_id, serialized, kwargs, prompts=prompts)

    def _end(self, run_id: UUID, response: LLMResult | None, error: BaseException | None) -> None:
        ticket = self._take(run_id, "sync")
        if ticket is not None:
            self.inv.engine.end(ticket, Ending(response, error))

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        """Settle the reservation with the usage the model reported."""
        self._end(run_id, response, None)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Settle a call that failed or was interrupted, with what it produced."""
        self._end(run_id, kwargs.get("response"), error)

    def on_chain_start(self, serialized: Any, inputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Note the invocation's outermost run."""
        self.inv.started(run_id)

    def on_tool_start(self, serialized: Any, input_str: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Note the invocation's outermost run."""
        self.inv.started(run_id)

    def _outer_ended(self, run_id: UUID, error: BaseException) -> None:
        if not self.inv.cancelled(run_id, error):
            return
        if self.inv.has_async and _called_by_async_dispatcher():
            return
        for ticket in self.inv.leftovers("sync"):
            self.inv.engine.end(ticket, Ending(None, error))

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Settle the invocation's open calls when its outermost run was interrupted."""
        self._outer_ended(run_id, error)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Settle the invocation's open calls when its outermost run was interrupted."""
        self._outer_ended(run_id, error)


class AsyncMeter(_Meter, AsyncCallbackHandler):
    """Meters model calls made by LangChain's async dispatcher (see module docstring)."""

    # Awaited in turn, after the sync meter, rather than gathered as a task per event: the
    # dispatcher waits for both the same way, but a task for each streamed token's no-op
    # callback cost an async stream about 20 us a chunk.
    run_inline = True

    async def _begin(self, run_id: UUID, serialized: Any, kwargs: dict[str, Any], **call: Any) -> None:
        if self._claims(run_id):
            inv = self.inv
            call_ = inv.call_for(run_id, serialized, kwargs, **call)
            inv.tickets[run_id] = await inv.engine.areserve(call_, owner="async")

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
        ticket = self._take(run_id, "async")
        if ticket is not None:
            await self.inv.engine.aend(ticket, Ending(response, error))

    async def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        """Settle the reservation with the usage the model reported."""
        await self._end(run_id, response, None)

    async def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Settle a call that failed or was interrupted, with what it produced."""
        await self._end(run_id, kwargs.get("response"), error)

    async def on_chain_start(self, serialized: Any, inputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Note the invocation's outermost run."""
        self.inv.started(run_id)

    async def on_tool_start(self, serialized: Any, input_str: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Note the invocation's outermost run."""
        self.inv.started(run_id)

    async def _outer_ended(self, run_id: UUID, error: BaseException) -> None:
        if not self.inv.cancelled(run_id, error):
            return
        await _settle_all(self.inv.engine, self.inv.leftovers("async"), Ending(None, error))

    async def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Settle the invocation's open calls when its outermost run was interrupted."""
        await self._outer_ended(run_id, error)

    async def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Settle the invocation's open calls when its outermost run was interrupted."""
        await self._outer_ended(run_id, error)


def meters_for(
    engine: BudgetEngine, config: RunnableConfig, scoped: tuple[Any, UUID | None] | None = None
) -> list[BaseCallbackHandler]:
    """The handlers one guarded invocation attaches to its run.

    Args:
        engine: The guard.
        config: The invocation's config (its scopes are looked up there).
        scoped: The invocation's scopes and root run, when the caller knows them already.

    Raises:
        MissingScopeError: A per-key budget has no value in ``config``.
    """
    inv = Invocation(engine, config, scoped)
    handlers: list[BaseCallbackHandler] = [SyncMeter(inv)]
    if asyncio._get_running_loop() is not None:  # no exception round trip, unlike get_running_loop()
        inv.has_async = True
        handlers.append(AsyncMeter(inv))
    return handlers


def attach_meters(
    engine: BudgetEngine, config: RunnableConfig, scoped: tuple[Any, UUID | None] | None = None
) -> Invocation:
    """Give ``config``'s run this invocation's meters (a fresh config: changed in place).

    Meters of the same guard inherited from an enclosing guarded run are replaced: the inner
    invocation meters its own calls (with its own scopes), and no call is metered twice.
    Returns the invocation the meters share.
    """
    meters = meters_for(engine, config, scoped)
    callbacks = config.get("callbacks")
    if callbacks is None:
        config["callbacks"] = meters
    elif isinstance(callbacks, list):
        config["callbacks"] = [*(h for h in callbacks if not _meters_of(h, engine)), *meters]
    else:  # a callback manager: LangChain's merge_configs adds handlers to a copy the same way
        manager = callbacks.copy()
        for handler in [*manager.handlers, *manager.inheritable_handlers]:
            if _meters_of(handler, engine):
                manager.remove_handler(handler)
        for meter in meters:
            manager.add_handler(meter, inherit=True)
        config["callbacks"] = manager
    return meters[0].inv  # type: ignore[attr-defined, no-any-return]


@contextmanager
def metering_inside(
    engine: BudgetEngine, config: RunnableConfig, scoped: tuple[Any, UUID | None]
) -> Iterator[None]:
    """Meter, through callbacks, every model call made inside that the guard's copies do not send.

    The agent middleware puts its model's metered copy in the request, but middlewares it
    wraps may send the call to another model (``ModelFallbackMiddleware``'s fallbacks, a
    model of another guard): the code inside runs with this guard's meters attached to the
    config LangChain hands to whatever runs there (``var_child_runnable_config``, read by
    ``ensure_config``), so no such call goes out unmetered. Calls still open when the code
    inside is interrupted (a cancellation that skipped ``on_llm_error``) are settled then.

    Args:
        engine: The guard.
        config: The config of the code calling (a fresh copy, from ``ensure_config()``: the
            meters are added to it, and the code inside runs with it).
        scoped: The scopes and root run the calls inside are charged to.
    """
    inv, token = _meters_in_context(engine, config, scoped)
    error: BaseException | None = None
    try:
        yield
    except BaseException as exc:
        error = exc
        raise
    finally:
        var_child_runnable_config.reset(token)
        for ticket in inv.leftovers():
            engine.end(ticket, _abandoned(error))


@asynccontextmanager
async def ametering_inside(
    engine: BudgetEngine, config: RunnableConfig, scoped: tuple[Any, UUID | None]
) -> AsyncIterator[None]:
    """Async :func:`metering_inside`."""
    inv, token = _meters_in_context(engine, config, scoped)
    error: BaseException | None = None
    try:
        yield
    except BaseException as exc:
        error = exc
        raise
    finally:
        var_child_runnable_config.reset(token)
        await _settle_all(engine, inv.leftovers(), _abandoned(error))


def _meters_in_context(
    engine: BudgetEngine, config: RunnableConfig, scoped: tuple[Any, UUID | None]
) -> tuple[Invocation, Token[Any]]:
    """Attach the meters to ``config`` and make it the one code inside runs with."""
    inv = attach_meters(engine, config, scoped)
    return inv, var_child_runnable_config.set(config)


def _abandoned(error: BaseException | None) -> Ending:
    """How a call still open when the code that made it is done ended: interrupted with that
    code (a cancellation ``agenerate`` let past ``on_llm_error``), or, if it returned, given up
    on by whatever inside caught the interruption (e.g. a timeout a middleware handled)."""
    return Ending(None, error if error is not None else asyncio.CancelledError("abandoned inside the call"))


async def _settle_all(engine: BudgetEngine, tickets: list[Ticket], ending: Ending) -> None:
    """Settle every ticket; shielded as one, so a second cancellation cannot leave some held."""
    if tickets:
        await asyncio.shield(asyncio.gather(*(engine.aend(t, ending) for t in tickets)))


def _meters_of(handler: Any, engine: BudgetEngine) -> bool:
    return isinstance(handler, _Meter) and handler.inv.engine is engine


class _MeterRefusals(logging.Filter):
    """Drops LangChain's "Error in SyncMeter.on_chat_model_start callback: BudgetExceeded(...)".

    LangChain logs every exception a callback handler raises at WARNING, then re-raises it
    when the handler asks (``raise_error``). For the meters, raising is how a refused call
    is stopped; the caller gets the error, and the guard logs and records it already.
    """

    _NAMES = frozenset({SyncMeter.__name__, AsyncMeter.__name__})

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not (isinstance(args, tuple) and len(args) == 3 and args[0] in self._NAMES):
            return True
        exc = sys.exc_info()[1]
        return not isinstance(exc, BudgetGuardError)


logging.getLogger("langchain_core.callbacks.manager").addFilter(_MeterRefusals())
