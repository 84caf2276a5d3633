"""Budgets inside LangChain agents: ``create_agent(..., middleware=[guard.middleware()])``.

:class:`BudgetMiddleware` is an ``AgentMiddleware`` (LangChain 1.x, ``pip install
budgetguard[agents]``). For every model call of the agent loop it puts the request's model's
metered copy (:mod:`budgetguard.metered`) in the request, so the call the agent really sends
(its messages, bound tools, response format and output cap) is estimated, reserved with the
overflow policies acting on it (cheaper model, output cap, compressed messages, wait for
refill), and settled by the one rule of :mod:`budgetguard.settlement` however it ends: the
same path as ``guard | chain``, and still one chat-model run per call. What the middleware
adds is what an agent knows:

* **Scope.** Budget keys are looked up in the agent's runtime context (``context_schema``)
  first, then the config's ``configurable`` (``thread_id``, ``user_id``, ...), then its
  metadata. ``per="run"`` budgets get one bucket per agent invocation.
* **Records.** Each call's ledger record has the agent invocation as its ``root_run_id`` and
  the thread id in its metadata.
* **Denial.** ``on_denied="raise"`` (default) raises :class:`~budgetguard.errors.BudgetExceeded`;
  ``"end"`` ends the run with an ``AIMessage`` that says which budget and when it refills
  (``response_metadata["budgetguard"]`` has the fields), like ``ModelCallLimitMiddleware``'s
  ``exit_behavior="end"``. The thread's checkpoint is untouched, so the conversation goes on
  when the budget has refilled.
* **Tool calls.** ``Budget(..., unit="tool_calls", tool="web_search")`` budgets are charged
  one per tool call in ``wrap_tool_call``; a refused tool call raises, or with
  ``on_denied="end"`` is answered with an error ``ToolMessage`` the model can read.

Order among LangChain's middlewares: list ``ModelFallbackMiddleware`` (and retry middlewares)
*before* this one, so they are outer and catch ``BudgetExceeded`` and try their fallbacks,
each metered with every policy. A middleware listed after this one that sends the call to
another model (a fallback, a model of another guard) is still metered, through callback
meters attached for the call (:func:`~budgetguard.meter.metering_inside`), with what those
can do: reserve before the request and settle after, no request-rewriting policies.
``SummarizationMiddleware`` calls its own model outside the agent's model
calls: give it ``guard.model(llm)`` and its summaries are metered with the same scopes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any, Literal
from uuid import UUID
from weakref import ref

from langchain.agents.middleware import AgentMiddleware, AgentState, ModelRequest
from langchain.agents.middleware.types import PrivateStateAttr
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.runnables.config import ensure_config
from langchain_core.utils.uuid import uuid7
from langgraph.channels.untracked_value import UntrackedValue
from typing_extensions import NotRequired, override

from budgetguard.errors import BudgetExceeded, ConfigurationError
from budgetguard.meter import ametering_inside, metering_inside
from budgetguard.metered import INVOCATION, invocation_scopes, metered_by, metered_copy
from budgetguard.runtime_context import context_mapping

if TYPE_CHECKING:
    from langchain.agents.middleware.types import ModelResponse, ToolCallRequest
    from langchain_core.language_models import BaseChatModel
    from langgraph.runtime import Runtime
    from langgraph.types import Command

    from budgetguard.engine import BudgetEngine

__all__ = ["BudgetMiddleware", "BudgetState"]

_RUN_KEY = "budgetguard_run"

OnDenied = Literal["raise", "end"]


class BudgetState(AgentState[Any]):
    """The agent state with the id of the current agent invocation (for ``per="run"``)."""

    budgetguard_run: NotRequired[Annotated[str, UntrackedValue, PrivateStateAttr]]


class BudgetMiddleware(AgentMiddleware[BudgetState, Any, Any]):
    """Budgets for every model call (and tool call) of a ``create_agent`` loop.

    Build it with :meth:`BudgetGuard.middleware() <budgetguard.guard.BudgetGuard.middleware>`.

    Args:
        engine: The guard.
        on_denied: ``"raise"`` raises ``BudgetExceeded``; ``"end"`` ends the run with an
            ``AIMessage`` saying which budget and when it refills (a refused tool call is
            answered with an error ``ToolMessage`` instead).
        denial_message: Writes the text of that ``AIMessage`` from the error.
    """

    state_schema = BudgetState  # type: ignore[assignment]

    def __init__(
        self,
        engine: BudgetEngine,
        *,
        on_denied: OnDenied = "raise",
        denial_message: Callable[[BudgetExceeded], str] | None = None,
    ) -> None:
        super().__init__()
        if on_denied not in ("raise", "end"):
            msg = f"on_denied must be 'raise' or 'end', got {on_denied!r}"
            raise ConfigurationError(msg)
        self.engine = engine
        self.on_denied = on_denied
        self.denial_message = denial_message or _default_denial_message
        self._copies: dict[int, tuple[ref[Any], BaseChatModel]] = {}

    @property
    @override
    def name(self) -> str:
        return f"BudgetMiddleware[{self.engine.uid}]"

    # -- the run -----------------------------------------------------------------------

    @override
    def before_model(self, state: BudgetState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        """Name this agent invocation once (``per="run"`` budgets, the ledger's root run).

        Before the first model call of each invocation, a resumed one included (``before_agent``
        does not run again when a run resumes after an interrupt): the key is not checkpointed,
        so every invocation starts without it.
        """
        return None if state.get(_RUN_KEY) else {_RUN_KEY: str(uuid7())}

    @override
    async def abefore_model(self, state: BudgetState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        return self.before_model(state, runtime)

    def _scoped(
        self, state: Mapping[str, Any], runtime: Any, config: Mapping[str, Any], *, tools: bool = False
    ) -> dict[str, tuple[Any, Any]]:
        """This guard's scopes and root run for a call of this agent run (see ``INVOCATION``)."""
        run = state.get(_RUN_KEY) or str(uuid7())  # a tool call before any model call: its own run
        context = context_mapping(getattr(runtime, "context", None))
        scopes = self.engine.scopes_for(config, context, run=run, tools=tools)
        return {**INVOCATION.get(), self.engine.uid: (scopes, UUID(run))}

    # -- model calls -------------------------------------------------------------------

    def _metered(self, request: ModelRequest) -> ModelRequest:
        """The request with its model's metered copy (kept per model object)."""
        model = request.model
        if metered_by(model) is not None:
            return request
        key = id(model)
        entry = self._copies.get(key)
        if entry is None or entry[0]() is not model:
            # The entry goes with its model (a model made per call leaves nothing behind).
            entry = (ref(model, partial(_forget, self._copies, key)), metered_copy(model, self.engine))
            self._copies[key] = entry
        return request.override(model=entry[1])

    @override
    def wrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]
    ) -> ModelResponse | AIMessage:
        """Meter the model call: estimated, reserved (policies), sent, settled."""
        config = ensure_config()  # the agent node's config, as LangGraph set it (a copy: the meters go in)
        token = INVOCATION.set(self._scoped(request.state, request.runtime, config))
        try:
            with metering_inside(self.engine, config, self._charged_to(config)):
                return handler(self._metered(request))
        except BudgetExceeded as exc:
            return self._refused(exc)
        finally:
            INVOCATION.reset(token)

    @override
    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelResponse]]
    ) -> ModelResponse | AIMessage:
        """Async :meth:`wrap_model_call`."""
        config = ensure_config()
        token = INVOCATION.set(self._scoped(request.state, request.runtime, config))
        try:
            async with ametering_inside(self.engine, config, self._charged_to(config)):
                return await handler(self._metered(request))
        except BudgetExceeded as exc:
            return self._refused(exc)
        finally:
            INVOCATION.reset(token)

    def _charged_to(self, config: Mapping[str, Any]) -> tuple[Any, Any]:
        """The scopes and root run this model call is charged to, by the rule the metered copy
        follows (an outer ``guard | agent`` of the same guard wins), so a call the meters
        catch lands in the same buckets as the copy's."""
        scoped = invocation_scopes(self.engine, config)
        assert scoped is not None  # INVOCATION is set
        return scoped

    def _refused(self, error: BudgetExceeded) -> AIMessage:
        if self.on_denied == "raise":
            raise error
        return AIMessage(
            content=self.denial_message(error),
            response_metadata={"budgetguard": _denial_fields(error)},
        )

    # -- tool calls --------------------------------------------------------------------

    def _tool_hold(self, request: ToolCallRequest) -> tuple[str, tuple[Any, ...]] | None:
        name = str(request.tool_call.get("name"))
        scopes = self._scoped(request.state or {}, request.runtime, ensure_config(), tools=True)[self.engine.uid][0]
        lines = self.engine.tool_lines(name, scopes)
        return (f"tool:{uuid7()}", lines) if lines else None

    @override
    def wrap_tool_call(
        self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], ToolMessage | Command[Any]]
    ) -> ToolMessage | Command[Any]:
        """Charge the tool-call budgets that count this tool, one each, or refuse the call."""
        hold = self._tool_hold(request)
        if hold is None:
            return handler(request)
        hold_id, lines = hold
        try:
            self.engine.hold(hold_id, lines, f"tool {request.tool_call.get('name')}")
        except BudgetExceeded as exc:
            return self._tool_refused(request, exc)
        try:
            return handler(request)
        finally:  # a tool call that started is a tool call, whatever became of it
            self.engine.store.settle(hold_id, tuple(ln.amount for ln in lines))

    @override
    async def awrap_tool_call(
        self,
        request: ToolCallRequest,
        handler: Callable[[ToolCallRequest], Awaitable[ToolMessage | Command[Any]]],
    ) -> ToolMessage | Command[Any]:
        """Async :meth:`wrap_tool_call`."""
        hold = self._tool_hold(request)
        if hold is None:
            return await handler(request)
        hold_id, lines = hold
        try:
            await self.engine.ahold(hold_id, lines, f"tool {request.tool_call.get('name')}")
        except BudgetExceeded as exc:
            return self._tool_refused(request, exc)
        try:
            return await handler(request)
        finally:
            await self.engine.store.asettle(hold_id, tuple(ln.amount for ln in lines))

    def _tool_refused(self, request: ToolCallRequest, error: BudgetExceeded) -> ToolMessage:
        if self.on_denied == "raise":
            raise error
        return ToolMessage(
            content=f"The tool was not run: {error}",
            tool_call_id=str(request.tool_call.get("id")),
            name=str(request.tool_call.get("name")),
            status="error",
            response_metadata={"budgetguard": _denial_fields(error)},
        )


def _forget(copies: dict[int, Any], key: int, gone: object) -> None:
    if key in copies and copies[key][0] is gone:  # not a newer model's entry under a reused id
        del copies[key]


def _denial_fields(error: BudgetExceeded) -> dict[str, Any]:
    return {
        "denied": True,
        "budget": error.budget,
        "scope": dict(error.scope),
        "unit": error.unit,
        "requested": error.requested,
        "available": error.available,
        "retry_after": error.retry_after,
        "model": error.model,
    }


def _default_denial_message(error: BudgetExceeded) -> str:
    when = (
        "It cannot refill enough to continue."
        if error.retry_after is None
        else f"It refills enough to continue in {_duration(error.retry_after)}."
    )
    return f"I have to stop here: the budget '{error.budget}' is used up for now. {when}"


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"
