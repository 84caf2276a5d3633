"""Metered copies: how the guard meets every chat model it can reach.

``guard | chain`` replaces each chat model it can reach in ``chain`` (inside sequences,
parallels, bindings such as ``bind_tools`` and ``with_structured_output``, fallbacks) by a
*metered copy*; ``guard | llm`` and ``guard.model(llm)`` return one. The copy's class is a
thin subclass of the model's own class, so to LangChain it is the same model: same fields,
name, tools, structured output, serialization, and each call is exactly one chat-model run
in callbacks, traces, ``astream_events`` and LangGraph's message stream.

Its ``invoke`` / ``ainvoke`` / ``stream`` / ``astream`` (which ``batch``, ``transform``, the
event streams and LangGraph go through) are thin drivers of the engine's protocol:

1. describe and estimate the call as the model would send it;
2. reserve it, letting the overflow policies change it (output cap, cheaper model,
   compressed prompt, wait for refill);
3. send the call as decided through the model's own method, with the call current in
   :data:`~budgetguard.sending.SENDING` so the send gate can mark it sent (see
   :mod:`budgetguard.sending`);
4. settle it by the one rule of :mod:`budgetguard.settlement`, however it ended: returned,
   raised, cancelled, timed out, or a stream its consumer stopped (settled right there, with
   what was received).

A call the budgets refuse is still offered to LangChain's cache when the model has one: the
gate lets only a cached answer through. The run's scopes travel in the run config, under a
``configurable`` key LangChain keeps out of traces (it starts with ``__``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any
from weakref import ref

from langchain_core.caches import BaseCache
from langchain_core.globals import get_llm_cache
from langchain_core.language_models import BaseChatModel
from langchain_core.runnables import RunnableSequence
from langchain_core.runnables.base import coerce_to_runnable
from langchain_core.runnables.config import ensure_config
from langchain_core.utils.uuid import uuid7

from budgetguard.errors import BudgetExceeded, ConfigurationError
from budgetguard.estimate import CallShape, model_from_params
from budgetguard.runtime_context import runtime_context
from budgetguard.sending import SENDING, SendGate, Sending, sent_by
from budgetguard.settlement import Ending

if TYPE_CHECKING:
    from langchain_core.runnables import RunnableConfig

    from budgetguard.engine import BudgetEngine
    from budgetguard.tickets import Call, Ticket

__all__ = ["INVOCATION", "SCOPES_KEY", "invocation_scopes", "metered_by", "metered_copy"]

SCOPES_KEY = "__budgetguard_scopes"
"""``configurable`` key carrying a guarded invocation's scopes to the models it meters.

The value maps the guard's :attr:`~budgetguard.engine.BudgetEngine.uid` to
``(scopes, root_run_id)``, so nested guards never read each other's scopes.
"""

INVOCATION: ContextVar[Mapping[str, tuple[Any, Any]]] = ContextVar("budgetguard_invocation", default={})  # noqa: B039
"""The same mapping, for calls an adapter cannot hand a config to: the agent middleware sets
it around the model call the agent makes (``model.invoke(messages)``, no config)."""

_ENGINE_ATTR = "_budgetguard_engine"


def metered_by(model: Any) -> BudgetEngine | None:
    """The guard metering ``model`` (a metered copy), if any."""
    return getattr(type(model), _ENGINE_ATTR, None)


def metered_copy(model: BaseChatModel, engine: BudgetEngine) -> BaseChatModel:
    """A copy of ``model`` whose every call ``engine`` meters (``model`` itself if it is one).

    Raises:
        ConfigurationError: ``model`` is already metered by another guard.
    """
    owner = metered_by(model)
    if owner is engine:
        return model
    if owner is not None:
        msg = (
            "this chat model is already metered by another BudgetGuard; wrap the runnable that calls it "
            "(guard | chain) instead, and both guards will meter it"
        )
        raise ConfigurationError(msg)
    copy = model.model_copy(update={"rate_limiter": SendGate(model.rate_limiter)})
    copy.__class__ = _metered_class(type(model), engine)
    return copy


def _metered_class(cls: type[BaseChatModel], engine: BudgetEngine) -> type[BaseChatModel]:
    """A subclass of ``cls`` metered by ``engine`` (one per engine and model class)."""
    cache: dict[type, type] = engine.__dict__.setdefault("_metered_classes", {})
    found = cache.get(cls)
    if found is None:
        namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__slots__": ()}
        found = cache[cls] = type(cls.__name__, (_MeteredCalls, cls), namespace)
        type.__setattr__(found, _ENGINE_ATTR, engine)
    return found


class _MeteredCalls:
    """The call styles of a metered copy: thin drivers around plan, reserve, send, settle."""

    __slots__ = ()

    def invoke(self, input: Any, config: RunnableConfig | None = None, *, stop: Any = None, **kwargs: Any) -> Any:
        if sent_by(metered_by(self)):  # LangChain's stream() fell back to invoke(): the same call
            return super().invoke(input, config, stop=stop, **kwargs)  # type: ignore[misc]
        engine, config, call = _plan(self, input, config, stop, kwargs)
        ticket, sending = _reserve(engine, self, call)
        token = SENDING.set(sending)
        try:
            model, input, kwargs = _route(engine, self, input, call, ticket, kwargs)
            message = _unmetered(model, engine).invoke(input, config, stop=stop, **kwargs)
        except BaseException as exc:
            _interrupted(engine, ticket, sending, None, exc)
            raise
        finally:
            SENDING.reset(token)
        engine.end(ticket, Ending(message))
        return message

    async def ainvoke(
        self, input: Any, config: RunnableConfig | None = None, *, stop: Any = None, **kwargs: Any
    ) -> Any:
        if sent_by(metered_by(self)):  # LangChain's astream() fell back to ainvoke(): the same call
            return await super().ainvoke(input, config, stop=stop, **kwargs)  # type: ignore[misc]
        engine, config, call = _plan(self, input, config, stop, kwargs)
        ticket, sending = await _areserve(engine, self, call)
        token = SENDING.set(sending)
        try:
            model, input, kwargs = _route(engine, self, input, call, ticket, kwargs)
            message = await _unmetered(model, engine).ainvoke(input, config, stop=stop, **kwargs)
        except BaseException as exc:
            await _ainterrupted(engine, ticket, sending, None, exc)
            raise
        finally:
            SENDING.reset(token)
        await engine.aend(ticket, Ending(message))
        return message

    def stream(
        self, input: Any, config: RunnableConfig | None = None, *, stop: Any = None, **kwargs: Any
    ) -> Iterator[Any]:
        engine, config, call = _plan(self, input, config, stop, kwargs)
        ticket, sending = _reserve(engine, self, call)
        chunks = None
        received = None
        try:
            model, input, kwargs = _route(engine, self, input, call, ticket, kwargs)
            chunks = sending.through(_unmetered(model, engine).stream(input, config, stop=stop, **kwargs))
            for chunk in chunks:
                received = chunk if received is None else received + chunk
                yield chunk
        except BaseException as exc:  # also the consumer stopping early (GeneratorExit)
            if chunks is not None:
                chunks.close()  # stop the provider's stream before settling
            _interrupted(engine, ticket, sending, received, exc)
            raise
        engine.end(ticket, Ending(received))

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, *, stop: Any = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        engine, config, call = _plan(self, input, config, stop, kwargs)
        ticket, sending = await _areserve(engine, self, call)
        chunks = None
        received = None
        try:
            model, input, kwargs = _route(engine, self, input, call, ticket, kwargs)
            chunks = sending.athrough(_unmetered(model, engine).astream(input, config, stop=stop, **kwargs))
            async for chunk in chunks:
                received = chunk if received is None else received + chunk
                yield chunk
        except BaseException as exc:
            if chunks is not None:
                await chunks.aclose()
            await _ainterrupted(engine, ticket, sending, received, exc)
            raise
        await engine.aend(ticket, Ending(received))

    # ``guard | llm | parser | llm2`` is read as ``((guard | llm) | parser) | llm2``: a metered
    # copy piped into more steps takes them in, so the guard covers the whole chain.

    def __or__(self, other: Any) -> Any:
        return self.pipe(other)

    def pipe(self, *others: Any, name: str | None = None) -> Any:
        engine = metered_by(self)
        assert engine is not None
        return engine.wrap(RunnableSequence(self, *(coerce_to_runnable(o) for o in others), name=name))  # type: ignore[arg-type]

    # Entry points below the four call styles: LangChain's legacy ``generate`` (called
    # directly, not from ``invoke``) and the beta ``version="v3"`` event stream drive the
    # model's internals without them, so those calls are metered by the callback meters.

    def generate(self, messages: Any, stop: Any = None, callbacks: Any = None, **kwargs: Any) -> Any:
        if not sent_by(metered_by(self)):
            callbacks = _with_meters(self, {"callbacks": callbacks})["callbacks"]
        return super().generate(messages, stop, callbacks, **kwargs)  # type: ignore[misc]

    async def agenerate(self, messages: Any, stop: Any = None, callbacks: Any = None, **kwargs: Any) -> Any:
        if not sent_by(metered_by(self)):
            callbacks = _with_meters(self, {"callbacks": callbacks})["callbacks"]
        return await super().agenerate(messages, stop, callbacks, **kwargs)  # type: ignore[misc]

    def stream_events(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        if kwargs.get("version") == "v3":
            config = _with_meters(self, config)
        return super().stream_events(input, config, **kwargs)  # type: ignore[misc]

    def astream_events(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        if kwargs.get("version") == "v3":
            config = _with_meters(self, config)
        return super().astream_events(input, config, **kwargs)  # type: ignore[misc]


def _with_meters(model: Any, config: Any) -> RunnableConfig:
    """``config`` (with the config of the runnable calling us) plus this guard's callback meters."""
    from budgetguard.meter import attach_meters

    engine = metered_by(model)
    assert engine is not None
    config = ensure_config(config)
    config.setdefault("run_id", uuid7())  # the call's own run (per="run" budgets)
    attach_meters(engine, config)
    return config


# -- the steps, shared by the call styles ---------------------------------------------------


def invocation_scopes(engine: BudgetEngine, config: Mapping[str, Any]) -> tuple[Any, Any] | None:
    """The scopes and root run of the guarded invocation a call belongs to, or ``None``.

    A guarded runnable passes them in the config; the agent middleware sets them in
    :data:`INVOCATION`. The config wins: with ``guard | agent`` and the same guard's
    middleware, every call of the run is charged to the outer invocation's scopes.
    """
    mine = (config.get("configurable") or {}).get(SCOPES_KEY, {}).get(engine.uid)
    return mine if mine is not None else INVOCATION.get().get(engine.uid)


def _plan(model: Any, input: Any, config: RunnableConfig | None, stop: Any, kwargs: dict) -> Any:
    """The engine, the config to run with (its ``run_id`` set), and the estimated call."""
    engine = metered_by(model)
    assert engine is not None
    # ensure_config also reads the config of the runnable calling us (a LangGraph node, a
    # tool), so a model called without one still finds its run's scopes.
    config = ensure_config(config)
    run_id = config.get("run_id")
    if run_id is None:  # name the model's run, so the ledger and the trace agree
        run_id = config["run_id"] = uuid7()
    mine = invocation_scopes(engine, config)
    if mine is None:  # called on its own: this call is its run
        mine = (engine.scopes_for(config, runtime_context(config), run=run_id), None)
    scopes, root = mine
    params, name, shape = _shape(engine, model, stop, kwargs)
    call = engine.new_call(
        run_id=run_id,
        model=name,
        params=params,
        messages=model._convert_input(input).to_messages(),
        prompts=None,
        scopes=scopes,
        tags=config.get("tags"),
        metadata=config.get("metadata"),
        parent_run_id=getattr(config.get("callbacks"), "parent_run_id", None),
        root_run_id=root,
        shape=shape,
    )
    return engine, config, call


_SHAPES: dict[int, tuple[ref[Any], dict[str, Any], str | None, CallShape]] = {}


def _shape(engine: BudgetEngine, model: Any, stop: Any, kwargs: dict) -> tuple[dict[str, Any], str | None, CallShape]:
    """The call's invocation parameters, model name and estimate shape.

    A metered copy belongs to the chain that made it, so its fields do not change: its
    plain calls reuse the parameters of the first one. Calls with ``stop`` or bound
    arguments work them out afresh.
    """
    cacheable = stop is None and not kwargs
    if cacheable:
        entry = _SHAPES.get(id(model))
        if entry is not None and entry[0]() is model:
            return entry[1], entry[2], entry[3]
    params: dict[str, Any] = model._get_invocation_params(stop=stop, **kwargs)
    name = model_from_params(params, None)
    shape = engine.estimator.shape(name, params)
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


def _uses_cache(model: Any) -> bool:
    """Whether LangChain would look the call up in a cache first (as ``BaseChatModel`` decides)."""
    cache = model.cache
    if cache is False:
        return False
    return isinstance(cache, BaseCache) or get_llm_cache() is not None


def _reserve(engine: BudgetEngine, model: Any, call: Call) -> tuple[Ticket, Sending]:
    cached = _uses_cache(model)
    try:
        return engine.reserve(call, rewrite=True, record_denial=not cached), Sending(engine)
    except BudgetExceeded as refusal:
        if not cached:
            raise
        return engine.unheld(call), Sending(engine, refusal)


async def _areserve(engine: BudgetEngine, model: Any, call: Call) -> tuple[Ticket, Sending]:
    cached = _uses_cache(model)
    try:
        return await engine.areserve(call, rewrite=True, record_denial=not cached), Sending(engine)
    except BudgetExceeded as refusal:
        if not cached:
            raise
        return engine.unheld(call), Sending(engine, refusal)


def _route(
    engine: BudgetEngine, model: Any, input: Any, planned: Call, ticket: Ticket, kwargs: dict
) -> tuple[Any, Any, dict[str, Any]]:
    """The model, input and arguments to send, as the reservation decided them."""
    call = ticket.call
    target = call.target
    if target is None:
        chosen = model
    elif isinstance(target, str):
        chosen = _renamed(model, target)
    else:  # a model object from a cheaper_model ladder; metered so the gate marks its sends
        chosen = target if metered_by(target) is not None else metered_copy(target, engine)
    if call.messages is not planned.messages:  # compressed
        input = call.messages
    if call.send_kwargs:
        kwargs = {**kwargs, **call.send_kwargs}
    return chosen, input, kwargs


def _unmetered(model: Any, engine: BudgetEngine) -> Any:
    """``model``'s own call styles, below this guard's metering (another guard's stay on)."""
    return super(_MeteredCalls, model) if metered_by(model) is engine else model


def _renamed(model: BaseChatModel, name: str) -> BaseChatModel:
    for attr in ("model_name", "model", "model_id"):
        if attr in type(model).model_fields:
            return model.model_copy(update={attr: name})
    msg = f"cannot switch {type(model).__name__} to model {name!r}; put a model object in the ladder instead"
    raise ConfigurationError(msg)


def _interrupted(
    engine: BudgetEngine, ticket: Ticket, sending: Sending, received: Any, error: BaseException
) -> None:
    """Settle a call that ended with ``error`` (or record the refusal the cache could not answer)."""
    if error is sending.refusal:
        engine.refused(ticket.call, error)  # type: ignore[arg-type]
        return
    engine.end(ticket, Ending(received, error, sending.sent))


async def _ainterrupted(
    engine: BudgetEngine, ticket: Ticket, sending: Sending, received: Any, error: BaseException
) -> None:
    if error is sending.refusal:
        engine.refused(ticket.call, error)  # type: ignore[arg-type]
        return
    # Shielded: a second cancellation while settling must not leave the reservation held.
    await asyncio.shield(engine.aend(ticket, Ending(received, error, sending.sent)))
