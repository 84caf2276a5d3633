"""Chat models metered in place: the guard's fast path when it can see every model call.

The meters in :mod:`budgetguard.meter` are callback handlers, so they reach any model
call however deeply it is nested (lambdas, tools, retrievers). The price is LangChain's
callback dispatch: once any handler is attached, every run of the chain dispatches its
events and every chat model checks its handlers for streaming support, which costs about
as much as a prompt template run.

When ``guard | chain`` can see that nothing in ``chain`` calls a model on its own (every
step is a sequence, parallel, binding, fallback, passthrough, assign, pick, LangChain
prompt template or output parser, or a chat model) and no overflow policy needs to
rewrite requests, it attaches no handler. Instead each chat model in the chain is
replaced by a copy whose class is a thin subclass of the model's own class. Its
``invoke`` / ``ainvoke`` / ``stream`` / ``astream`` (which ``batch``, ``transform`` and
the event streams go through) estimate and reserve before the model's own method runs,
and settle from the answer after. The copy is still an instance of the model's class,
with the same fields, name, tools and structured output, and its run is the same single
run in traces. The beta ``stream_events(version="v3")`` path attaches the callback meters
for that one call.

The invocation's scopes travel to the models in the run config, under a
``configurable`` key that LangChain keeps out of traces (it starts with ``__``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any
from weakref import ref

from langchain_core.language_models import BaseChatModel
from langchain_core.output_parsers import BaseOutputParser
from langchain_core.prompts import BasePromptTemplate
from langchain_core.runnables import (
    RunnableBinding,
    RunnableParallel,
    RunnablePassthrough,
    RunnableSequence,
)
from langchain_core.runnables.config import ensure_config
from langchain_core.runnables.fallbacks import RunnableWithFallbacks
from langchain_core.runnables.passthrough import RunnableAssign, RunnablePick
from langchain_core.utils.uuid import uuid7

from budgetguard.estimate import CallShape, model_from_params
from budgetguard.meter import build_call, conclude

if TYPE_CHECKING:
    from langchain_core.runnables import RunnableConfig

    from budgetguard.guard import BudgetGuard
    from budgetguard.tickets import Ticket

__all__ = ["SCOPES_KEY", "meter_in_place", "metered_by"]

SCOPES_KEY = "__budgetguard_scopes"
"""``configurable`` key carrying a guarded invocation's scopes to the models it meters in place.

The value maps the guard's :attr:`~budgetguard.BudgetGuard.uid` to ``(scopes, root_run_id)``,
so nested guards never read each other's scopes.
"""

_GUARD_ATTR = "_budgetguard_guard"

_TRANSPARENT_MODULES = ("langchain_core.prompts.", "langchain_core.output_parsers.")


def metered_by(model: Any) -> BudgetGuard | None:
    """The guard metering ``model`` in place, if any."""
    return getattr(type(model), _GUARD_ATTR, None)


def meter_in_place(runnable: Any, guard: BudgetGuard) -> Any | None:
    """``runnable`` with every chat model metered in place, or ``None`` if that cannot cover it.

    ``None`` means some step could call a model the guard cannot see (a lambda, a tool, a
    retriever, a custom runnable, a text-completion LLM): the callback meters are needed.
    """
    from budgetguard.model import _map_models

    rewired = _map_models(runnable, lambda m: _metered_copy(m, guard))
    return rewired if _covered(rewired, guard) else None


def _covered(runnable: Any, guard: BudgetGuard) -> bool:
    """Whether every model call ``runnable`` can make goes through a model ``guard`` meters."""
    if isinstance(runnable, BaseChatModel):
        return metered_by(runnable) is guard
    if isinstance(runnable, RunnableSequence):
        return all(_covered(step, guard) for step in runnable.steps)
    if isinstance(runnable, RunnableParallel):
        return all(_covered(step, guard) for step in runnable.steps__.values())
    if isinstance(runnable, RunnableBinding):
        return _covered(runnable.bound, guard)
    if isinstance(runnable, RunnableWithFallbacks):
        return all(_covered(r, guard) for r in (runnable.runnable, *runnable.fallbacks))
    if isinstance(runnable, RunnableAssign):
        return _covered(runnable.mapper, guard)
    if isinstance(runnable, RunnablePassthrough):
        return runnable.func is None and runnable.afunc is None
    if isinstance(runnable, RunnablePick):
        return True
    if isinstance(runnable, (BasePromptTemplate, BaseOutputParser)):
        # LangChain's own templates and parsers never call a model; subclasses from
        # elsewhere might (a parser that asks a model to fix its input).
        return type(runnable).__module__.startswith(_TRANSPARENT_MODULES)
    return False


def _metered_copy(model: BaseChatModel, guard: BudgetGuard) -> BaseChatModel:
    if metered_by(model) is guard:
        return model
    copy = model.model_copy()
    copy.__class__ = _metered_class(type(model), guard)
    return copy


def _metered_class(cls: type[BaseChatModel], guard: BudgetGuard) -> type[BaseChatModel]:
    """A subclass of ``cls`` metered by ``guard`` (one per guard and model class)."""
    cache: dict[type, type] = guard.__dict__.setdefault("_metered_classes", {})
    found = cache.get(cls)
    if found is None:
        namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__slots__": ()}
        found = cache[cls] = type(cls.__name__, (_MeteredCalls, cls), namespace)
        type.__setattr__(found, _GUARD_ATTR, guard)
    return found


class _MeteredCalls:
    """The call styles of a chat model metered in place: thin drivers around plan/settle."""

    __slots__ = ()

    def invoke(self, input: Any, config: RunnableConfig | None = None, *, stop: Any = None, **kwargs: Any) -> Any:
        guard, config, ticket = _reserve_sync(self, input, config, stop, kwargs)
        try:
            message = super().invoke(input, config, stop=stop, **kwargs)  # type: ignore[misc]
        except BaseException as exc:
            guard.settle(ticket, None, outcome="error", error=exc)
            raise
        _finish(guard, ticket, message, None)
        return message

    async def ainvoke(
        self, input: Any, config: RunnableConfig | None = None, *, stop: Any = None, **kwargs: Any
    ) -> Any:
        guard, config, ticket = await _reserve_async(self, input, config, stop, kwargs)
        try:
            message = await super().ainvoke(input, config, stop=stop, **kwargs)  # type: ignore[misc]
        except BaseException as exc:
            await guard.asettle(ticket, None, outcome="error", error=exc)
            raise
        await _afinish(guard, ticket, message, None)
        return message

    def stream(
        self, input: Any, config: RunnableConfig | None = None, *, stop: Any = None, **kwargs: Any
    ) -> Iterator[Any]:
        guard, config, ticket = _reserve_sync(self, input, config, stop, kwargs)
        total = None
        try:
            for chunk in super().stream(input, config, stop=stop, **kwargs):  # type: ignore[misc]
                total = chunk if total is None else total + chunk
                yield chunk
        except BaseException as exc:  # also the consumer stopping early (GeneratorExit)
            _finish(guard, ticket, total, exc)
            raise
        _finish(guard, ticket, total, None)

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, *, stop: Any = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        guard, config, ticket = await _reserve_async(self, input, config, stop, kwargs)
        total = None
        try:
            async for chunk in super().astream(input, config, stop=stop, **kwargs):  # type: ignore[misc]
                total = chunk if total is None else total + chunk
                yield chunk
        except BaseException as exc:
            await _afinish(guard, ticket, total, exc)
            raise
        await _afinish(guard, ticket, total, None)

    def stream_events(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        if kwargs.get("version") == "v3":
            config = _with_meters(self, config)
        return super().stream_events(input, config, **kwargs)  # type: ignore[misc]

    def astream_events(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        if kwargs.get("version") == "v3":
            config = _with_meters(self, config)
        return super().astream_events(input, config, **kwargs)  # type: ignore[misc]


def _with_meters(model: Any, config: RunnableConfig | None) -> RunnableConfig:
    from budgetguard.guard import _attach_meters

    guard = metered_by(model)
    assert guard is not None
    config = ensure_config(config)
    _attach_meters(guard, config)
    return config


# -- planning and settling, shared by the call styles -------------------------------------


def _plan(model: Any, input: Any, config: RunnableConfig | None, stop: Any, kwargs: dict) -> Any:
    """The guard, the config to run with (its ``run_id`` set), and the estimated call."""
    guard = metered_by(model)
    assert guard is not None
    config = ensure_config(config) if config is None else config
    run_id = config.get("run_id")
    if run_id is None:  # name the model's run, so the ledger and the trace agree
        run_id = uuid7()
        config = {**config, "run_id": run_id}
    mine = ((config.get("configurable") or {}).get(SCOPES_KEY) or {}).get(guard.uid)
    if mine is None:  # called outside its guarded runnable: resolve like the meters do
        mine = (guard.scopes_for(ensure_config(config)), None)
    params, name, shape = _shape(guard, model, stop, kwargs)
    call = build_call(
        guard,
        run_id=run_id,
        model=name,
        params=params,
        messages=model._convert_input(input).to_messages(),
        prompts=None,
        scopes=mine[0],
        tags=config.get("tags"),
        metadata=config.get("metadata"),
        parent_run_id=getattr(config.get("callbacks"), "parent_run_id", None),
        root_run_id=mine[1],
        shape=shape,
    )
    return guard, config, call


_SHAPES: dict[int, tuple[ref[Any], dict[str, Any], str | None, CallShape]] = {}


def _shape(guard: BudgetGuard, model: Any, stop: Any, kwargs: dict) -> tuple[dict[str, Any], str | None, CallShape]:
    """The call's invocation parameters, model name and estimate shape.

    The parameters are built from the model's fields (``model.dict()`` for most chat
    models: tens of microseconds for ``ChatOpenAI``), and the shape from them. A metered
    copy belongs to the chain that made it, so its fields do not change: its plain calls
    reuse the first ones. Calls with ``stop`` or bound arguments work them out afresh.
    """
    cacheable = stop is None and not kwargs
    if cacheable:
        entry = _SHAPES.get(id(model))
        if entry is not None and entry[0]() is model:
            return entry[1], entry[2], entry[3]
    params: dict[str, Any] = model._get_invocation_params(stop=stop, **kwargs)
    name = model_from_params(params, None)
    shape = guard.estimator.shape(name, params)
    if cacheable:
        key = id(model)
        try:
            _SHAPES[key] = (ref(model, _forget(key)), params, name, shape)
        except TypeError:  # a model class with __slots__ and no __weakref__: never cached
            pass
    return params, name, shape


def _forget(key: int) -> Any:
    """A weakref callback dropping ``key``'s cached entry once its model is gone."""

    def drop(dead: ref[Any]) -> None:
        entry = _SHAPES.get(key)
        if entry is not None and entry[0] is dead:
            del _SHAPES[key]

    return drop


def _reserve_sync(model: Any, input: Any, config: Any, stop: Any, kwargs: dict) -> tuple[Any, Any, Ticket]:
    guard, config, call = _plan(model, input, config, stop, kwargs)
    return guard, config, guard.reserve(call)


async def _reserve_async(model: Any, input: Any, config: Any, stop: Any, kwargs: dict) -> tuple[Any, Any, Ticket]:
    guard, config, call = _plan(model, input, config, stop, kwargs)
    return guard, config, await guard.areserve(call)


def _finish(guard: BudgetGuard, ticket: Ticket, message: Any, error: BaseException | None) -> None:
    usage, how, bad = conclude(guard, ticket, message, error)
    guard.settle(ticket, usage, outcome=how, error=error or bad)
    if bad is not None and error is None:
        raise bad


async def _afinish(guard: BudgetGuard, ticket: Ticket, message: Any, error: BaseException | None) -> None:
    usage, how, bad = conclude(guard, ticket, message, error)
    await guard.asettle(ticket, usage, outcome=how, error=error or bad)
    if bad is not None and error is None:
        raise bad
