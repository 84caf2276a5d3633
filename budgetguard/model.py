"""The guard's chat-model wrapper: where overflow policies can change the request.

A callback can stop a call but cannot change it. :class:`GuardedChatModel` wraps a chat
model so the guard decides *before* the request exists: it estimates the call, reserves
it with every overflow policy allowed (smaller output cap, a cheaper model, a shorter
prompt, a wait), then sends the call as decided to the chosen model. The reserved ticket
is handed to the meter of the inner run, which settles it from the usage the model
reports (and puts the decision in the response metadata and trace).

``guard | chain`` wraps every chat model it can reach (inside sequences, parallels,
bindings such as ``bind_tools`` and ``with_structured_output``, and fallbacks); wrap a
model yourself with ``guard.model(llm)`` where it cannot reach (inside a lambda).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any
from uuid import uuid4

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import (
    Runnable,
    RunnableBinding,
    RunnableConfig,
    RunnableParallel,
    RunnableSequence,
)
from langchain_core.runnables.config import ensure_config
from langchain_core.runnables.fallbacks import RunnableWithFallbacks
from pydantic import ConfigDict, Field
from typing_extensions import override

from budgetguard.estimate import model_from_params
from budgetguard.meter import HANDOFF_KEY, WRAPPER_KEY, SyncMeter, build_call
from budgetguard.tickets import Call, Ticket
from budgetguard.usage import Usage, usage_from_message

__all__ = ["WRAPPER_KEY", "GuardedChatModel", "reach_models"]


class GuardedChatModel(BaseChatModel):
    """A chat model whose calls are planned by a guard before they are sent.

    Behaves like ``inner`` (tools, structured output, streaming); the answer's
    ``response_metadata["budgetguard"]`` says which model answered and why.
    """

    inner: BaseChatModel
    """The model the chain asked for."""
    guard: Any = Field(default=None, exclude=True)
    """The guard that plans the calls."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    def __init__(self, *, inner: BaseChatModel, guard: Any, **kwargs: Any) -> None:
        """Wrap ``inner``; prefer ``guard.model(llm)`` or ``guard | chain``."""
        metadata = {**(kwargs.pop("metadata", None) or {}), WRAPPER_KEY: True}
        super().__init__(inner=inner, guard=guard, metadata=metadata, **kwargs)  # type: ignore[call-arg]

    @property
    def _llm_type(self) -> str:
        return f"budgetguard-{self.inner._llm_type}"

    @property
    @override
    def _identifying_params(self) -> dict[str, Any]:
        return dict(self.inner._identifying_params)

    @override
    def get_name(self, suffix: str | None = None, *, name: str | None = None) -> str:
        return self.inner.get_name(suffix, name=name)

    # -- tools and structured output are the inner model's, bound on the wrapper ------

    @override
    def bind_tools(self, tools: Any, **kwargs: Any) -> Runnable[Any, AIMessage]:
        bound = self.inner.bind_tools(tools, **kwargs)
        return self.bind(**getattr(bound, "kwargs", {}))

    @override
    def with_structured_output(self, schema: Any, **kwargs: Any) -> Runnable[Any, Any]:
        return _retarget(self.inner.with_structured_output(schema, **kwargs), self.inner, self)

    # -- planning ------------------------------------------------------------------------

    def _plan(self, messages: list[BaseMessage], stop: list[str] | None, run_manager: Any, kwargs: dict) -> Call:
        params = self.inner._get_invocation_params(stop=stop, **kwargs)
        run_id = run_manager.run_id if run_manager is not None else None
        return build_call(
            self.guard,
            run_id=run_id or uuid4(),
            model=model_from_params(params, None),
            params=params,
            messages=list(messages),
            prompts=None,
            scopes=_scopes(self.guard, run_manager),
            tags=getattr(run_manager, "tags", None),
            metadata=dict(getattr(run_manager, "metadata", None) or {}),
            parent_run_id=getattr(run_manager, "parent_run_id", None),
            root_run_id=None,
        )

    def _route(
        self, ticket: Ticket, stop: list[str] | None, run_manager: Any, kwargs: dict
    ) -> tuple[BaseChatModel, list[BaseMessage], dict[str, Any], RunnableConfig]:
        call = ticket.call
        target = call.target
        if target is None:
            target = self.inner
        elif isinstance(target, str):
            target = _with_model_name(self.inner, target)
        key = self.guard.hand_off(ticket)
        config: RunnableConfig = {
            "callbacks": _child_callbacks(run_manager),
            "metadata": {HANDOFF_KEY: key},
        }
        send = {**kwargs, **call.send_kwargs}
        if stop is not None:
            send["stop"] = stop
        return target, list(call.messages or ()), send, config

    def _finish(self, ticket: Ticket, message: BaseMessage | None, error: BaseException | None) -> None:
        # The inner run's meter adopted and settled the ticket, unless no meter runs
        # (the wrapper is used outside `guard | chain`) or the call failed before start.
        if self.guard.take_handoff(ticket.id) is None:
            return
        usage = _usage(self.guard, ticket, message) if error is None else None
        self.guard.settle(ticket, usage, outcome="ok" if error is None else "error", error=error)

    async def _afinish(self, ticket: Ticket, message: BaseMessage | None, error: BaseException | None) -> None:
        if self.guard.take_handoff(ticket.id) is None:
            return
        usage = _usage(self.guard, ticket, message) if error is None else None
        await self.guard.asettle(ticket, usage, outcome="ok" if error is None else "error", error=error)

    # -- the four call styles: thin drivers around _plan / _route / _finish ------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        ticket = self.guard.reserve(self._plan(messages, stop, run_manager, kwargs), rewrite=True)
        target, msgs, send, config = self._route(ticket, stop, run_manager, kwargs)
        message: BaseMessage | None = None
        try:
            message = target.invoke(msgs, config, **send)
        except BaseException as exc:
            self._finish(ticket, None, exc)
            raise
        self._finish(ticket, message, None)
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        ticket = await self.guard.areserve(self._plan(messages, stop, run_manager, kwargs), rewrite=True)
        target, msgs, send, config = self._route(ticket, stop, run_manager, kwargs)
        try:
            message = await target.ainvoke(msgs, config, **send)
        except BaseException as exc:
            await self._afinish(ticket, None, exc)
            raise
        await self._afinish(ticket, message, None)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        ticket = self.guard.reserve(self._plan(messages, stop, run_manager, kwargs), rewrite=True)
        target, msgs, send, config = self._route(ticket, stop, run_manager, kwargs)
        total: AIMessageChunk | None = None
        try:
            for chunk in target.stream(msgs, config, **send):
                total = chunk if total is None else total + chunk
                yield ChatGenerationChunk(message=chunk)
        except BaseException as exc:
            self._finish(ticket, total, exc)
            raise
        self._finish(ticket, total, None)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        ticket = await self.guard.areserve(self._plan(messages, stop, run_manager, kwargs), rewrite=True)
        target, msgs, send, config = self._route(ticket, stop, run_manager, kwargs)
        total: AIMessageChunk | None = None
        try:
            async for chunk in target.astream(msgs, config, **send):
                total = chunk if total is None else total + chunk
                yield ChatGenerationChunk(message=chunk)
        except BaseException as exc:
            await self._afinish(ticket, total, exc)
            raise
        await self._afinish(ticket, total, None)


def _child_callbacks(run_manager: Any) -> Any:
    """Callbacks for a child of the wrapper's run (LLM run managers have no ``get_child``)."""
    if run_manager is None:
        return None
    cls = AsyncCallbackManager if isinstance(run_manager, AsyncCallbackManagerForLLMRun) else CallbackManager
    manager = cls(handlers=[], parent_run_id=run_manager.run_id)
    manager.set_handlers(run_manager.inheritable_handlers)
    manager.add_tags(run_manager.inheritable_tags)
    manager.add_metadata(run_manager.inheritable_metadata)
    return manager


def _scopes(guard: Any, run_manager: Any) -> dict[str, dict[str, str]]:
    # Inside `guard | chain` the meter already resolved this invocation's scopes.
    for handler in getattr(run_manager, "handlers", None) or ():
        if isinstance(handler, SyncMeter) and handler.inv.guard is guard:
            return handler.inv.scopes
    return guard.scopes_for(ensure_config())


def _usage(guard: Any, ticket: Ticket, message: BaseMessage | None) -> Usage | None:
    if message is None:
        return None
    usage = usage_from_message(message)
    if usage is not None:
        return usage
    text = message.text if isinstance(message.text, str) else str(message.content)
    return Usage(ticket.call.estimate.input_tokens, guard.estimator.count_text(text, ticket.call.model))


def _with_model_name(model: BaseChatModel, name: str) -> BaseChatModel:
    for attr in ("model_name", "model", "model_id"):
        if attr in type(model).model_fields:
            return model.model_copy(update={attr: name})
    msg = f"cannot switch {type(model).__name__} to model {name!r}; put a model object in the ladder instead"
    raise TypeError(msg)


def _retarget(runnable: Any, old: Any, new: Any) -> Any:
    """Replace ``old`` by ``new`` wherever a runnable graph holds it."""
    if runnable is old:
        return new
    return _map_models(runnable, lambda m: new if m is old else m)


def _map_models(runnable: Any, fn: Any) -> Any:
    if isinstance(runnable, BaseChatModel):
        return fn(runnable)
    if isinstance(runnable, RunnableBinding):
        bound = _map_models(runnable.bound, fn)
        return runnable if bound is runnable.bound else runnable.model_copy(update={"bound": bound})
    if isinstance(runnable, RunnableSequence):
        steps = [_map_models(s, fn) for s in runnable.steps]
        if all(a is b for a, b in zip(steps, runnable.steps)):
            return runnable
        return RunnableSequence(*steps, name=runnable.name)
    if isinstance(runnable, RunnableParallel):
        branches = {k: _map_models(v, fn) for k, v in runnable.steps__.items()}
        if all(branches[k] is v for k, v in runnable.steps__.items()):
            return runnable
        return RunnableParallel(steps__=branches)
    if isinstance(runnable, RunnableWithFallbacks):
        first = _map_models(runnable.runnable, fn)
        rest = [_map_models(f, fn) for f in runnable.fallbacks]
        return runnable.model_copy(update={"runnable": first, "fallbacks": rest})
    return runnable


def reach_models(runnable: Any, guard: Any) -> Any:
    """Wrap every chat model reachable in ``runnable`` in a :class:`GuardedChatModel`."""

    def wrap(model: BaseChatModel) -> BaseChatModel:
        if isinstance(model, GuardedChatModel):
            return model
        return GuardedChatModel(inner=model, guard=guard)

    return _map_models(runnable, wrap)
