"""``guard | chain``: the LCEL adapter.

``guard | runnable`` returns a :class:`GuardedRunnable`, a ``RunnableBindingBase`` around the
runnable (the pattern of LangChain's ``RunnableRetry``): schemas, names, config, tracing and
every call style come from LangChain. Before wrapping, every chat model the guard can reach
in the runnable (sequences, parallels, bindings such as ``bind_tools`` and
``with_structured_output``, fallbacks, assign/pick/passthrough) is replaced by a metered copy
(:mod:`budgetguard.metered`). Per invocation, the wrapper's config factory resolves the
budgets' scopes once and passes them down in the config; when something in the runnable
could call a model the guard cannot reach (a lambda, a tool, a retriever, a custom runnable,
a text-completion LLM, a compiled graph), it also attaches the callback meters
(:mod:`budgetguard.meter`) for those calls.

``guard | prompt | llm | parser`` is read by Python as ``((guard | prompt) | llm) | parser``;
a :class:`GuardedRunnable` piped into more steps takes them in, so it guards the whole chain
as ``guard | (prompt | llm | parser)`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from langchain_core.language_models import BaseChatModel
from langchain_core.output_parsers import BaseOutputParser
from langchain_core.prompts import BasePromptTemplate
from langchain_core.runnables import (
    Runnable,
    RunnableConfig,
    RunnableParallel,
    RunnablePassthrough,
    RunnableSequence,
    RunnableSerializable,
)
from langchain_core.runnables.base import RunnableBindingBase, coerce_to_runnable
from langchain_core.runnables.config import ensure_config
from langchain_core.runnables.fallbacks import RunnableWithFallbacks
from langchain_core.runnables.passthrough import RunnableAssign, RunnablePick
from langchain_core.utils.uuid import uuid7
from pydantic import ConfigDict, Field
from typing_extensions import override

from budgetguard.meter import attach_meters
from budgetguard.metered import SCOPES_KEY, metered_by, metered_copy

if TYPE_CHECKING:
    from budgetguard.engine import BudgetEngine

__all__ = ["GuardedRunnable", "guard_runnable", "reach_models"]

_TRANSPARENT_MODULES = ("langchain_core.prompts.", "langchain_core.output_parsers.")


def guard_runnable(engine: BudgetEngine, runnable: Any) -> RunnableSerializable[Any, Any]:
    """``runnable`` with every model call inside it metered by ``engine``.

    A chat model comes back as its metered copy (still a chat model); anything else as a
    :class:`GuardedRunnable`.
    """
    bound = coerce_to_runnable(runnable)
    if isinstance(bound, GuardedRunnable) and bound.guard is engine:
        return bound
    rewired = reach_models(bound, engine)
    if isinstance(rewired, BaseChatModel) and metered_by(rewired) is engine:
        return rewired
    return GuardedRunnable(bound=rewired, guard=engine, covered=_covered(rewired, engine))


def reach_models(runnable: Any, engine: BudgetEngine) -> Any:
    """``runnable`` with every chat model the guard can reach replaced by its metered copy."""

    def meter(model: BaseChatModel) -> BaseChatModel:
        return model if metered_by(model) is not None else metered_copy(model, engine)

    return _map_models(runnable, meter)


def _map_models(runnable: Any, fn: Callable[[BaseChatModel], BaseChatModel]) -> Any:
    if isinstance(runnable, BaseChatModel):
        return fn(runnable)
    if isinstance(runnable, RunnableBindingBase) and not isinstance(runnable, GuardedRunnable):
        # bindings, and LangChain's other wrappers of one runnable (with_retry,
        # RunnableWithMessageHistory): the model inside is the wrapped one's
        bound = _map_models(runnable.bound, fn)
        return runnable if bound is runnable.bound else runnable.model_copy(update={"bound": bound})
    if isinstance(runnable, RunnableSequence):
        steps = [_map_models(s, fn) for s in runnable.steps]
        if all(a is b for a, b in zip(steps, runnable.steps, strict=True)):
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
    if isinstance(runnable, RunnableAssign):
        mapper = _map_models(runnable.mapper, fn)
        return runnable if mapper is runnable.mapper else RunnableAssign(mapper)
    return runnable


def _covered(runnable: Any, engine: BudgetEngine) -> bool:
    """Whether every model call ``runnable`` can make goes through a copy ``engine`` meters."""
    if isinstance(runnable, BaseChatModel):
        return metered_by(runnable) is engine
    if isinstance(runnable, RunnableSequence):
        return all(_covered(step, engine) for step in runnable.steps)
    if isinstance(runnable, RunnableParallel):
        return all(_covered(step, engine) for step in runnable.steps__.values())
    if isinstance(runnable, RunnableBindingBase) and not isinstance(runnable, GuardedRunnable):
        return _covered(runnable.bound, engine)
    if isinstance(runnable, RunnableWithFallbacks):
        return all(_covered(r, engine) for r in (runnable.runnable, *runnable.fallbacks))
    if isinstance(runnable, RunnableAssign):
        return _covered(runnable.mapper, engine)
    if isinstance(runnable, RunnablePassthrough):
        return runnable.func is None and runnable.afunc is None
    if isinstance(runnable, RunnablePick):
        return True
    if isinstance(runnable, (BasePromptTemplate, BaseOutputParser)):
        # LangChain's own templates and parsers never call a model; subclasses from
        # elsewhere might (a parser that asks a model to fix its input).
        return type(runnable).__module__.startswith(_TRANSPARENT_MODULES)
    return False


class GuardedRunnable(RunnableBindingBase[Any, Any]):  # type: ignore[no-redef]
    """A runnable whose every model call is metered by a guard.

    Built by ``guard | runnable``. Behaves exactly like the runnable it wraps.
    """

    guard: Any = Field(default=None, exclude=True)
    """The guard (its :class:`~budgetguard.engine.BudgetEngine`) metering this runnable."""
    covered: bool = False
    """Whether every model call inside goes through a metered copy (no callback meters needed)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    def __init__(self, *, bound: Runnable[Any, Any], guard: BudgetEngine, covered: bool = False, **kwargs: Any) -> None:
        """Wrap ``bound``; use ``guard | runnable`` rather than calling this."""
        super().__init__(bound=bound, guard=guard, covered=covered, **kwargs)

    @override
    def _merge_configs(self, *configs: RunnableConfig | None) -> RunnableConfig:
        """The config for one invocation: the caller's, plus the guard's scopes (and meters).

        Raises:
            MissingScopeError: A per-key budget has no value in the config (nothing runs).
        """
        if len(configs) == 1 and not self.config and not self.config_factories:
            config = ensure_config(configs[0])  # a fresh dict: ours to change
        else:
            config = super()._merge_configs(*configs)
        _pass_scopes(self.guard, config)
        if not self.covered:
            attach_meters(self.guard, config)
        return config

    @override
    def __or__(self, other: Any) -> RunnableSerializable[Any, Any]:
        """``(guard | a) | b`` guards ``a | b``: the steps piped in are guarded too."""
        return guard_runnable(self.guard, self.bound | other)

    @override
    def pipe(self, *others: Any, name: str | None = None) -> RunnableSerializable[Any, Any]:
        """Like :meth:`__or__`: the steps piped in are guarded too."""
        return guard_runnable(self.guard, self.bound.pipe(*others, name=name))

    @override
    def get_graph(self, config: RunnableConfig | None = None) -> Any:
        """The wrapped runnable's graph (drawing it runs nothing, so it needs no scopes)."""
        return self.bound.get_graph(config)

    @override
    def get_input_jsonschema(self, config: RunnableConfig | None = None) -> dict[str, Any]:
        """The wrapped runnable's own input JSON schema (a LangGraph graph writes its own)."""
        return self.bound.get_input_jsonschema(config)

    @override
    def get_output_jsonschema(self, config: RunnableConfig | None = None) -> dict[str, Any]:
        """The wrapped runnable's own output JSON schema."""
        return self.bound.get_output_jsonschema(config)

    def __getattr__(self, name: str) -> Any:
        """The wrapped runnable's own interface (a LangGraph graph's ``get_state``,
        ``update_state``, ...), called as it is: reading state runs no model, needs no scope."""
        if name.startswith("_") or name == "bound":
            return super().__getattr__(name)  # type: ignore[misc]
        return getattr(self.bound, name)

    @classmethod
    @override
    def is_lc_serializable(cls) -> bool:
        return False

    @override
    def __repr__(self) -> str:
        return f"BudgetGuard | {self.bound!r}"


def _pass_scopes(engine: BudgetEngine, config: RunnableConfig) -> None:
    """Resolve the invocation's scopes once and hand them to the metered copies inside."""
    root = config.get("run_id")
    if root is None:
        root = config["run_id"] = uuid7()  # the guarded run's id, so the ledger can group its calls
    scopes = engine.scopes_for(config, run=root)
    configurable = config.get("configurable") or {}
    mine = {engine.uid: (scopes, root)}
    outer = configurable.get(SCOPES_KEY)
    config["configurable"] = {**configurable, SCOPES_KEY: {**outer, **mine} if outer else mine}
