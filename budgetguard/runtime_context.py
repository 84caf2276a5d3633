"""Scope values an agent keeps in LangGraph's runtime context (``create_agent(context_schema=...)``).

Agents put who is calling (a user id, an org id) in their runtime context rather than in
the run config. Inside a LangGraph graph the runtime rides in the run config, under the
``configurable`` key ``langgraph.runtime.get_runtime()`` reads; :func:`runtime_context` turns
its ``context`` (a dataclass, a ``TypedDict``, a pydantic model or any object with
attributes) into a mapping the budgets look their scope keys up in first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["LANGGRAPH_RUNTIME_KEY", "context_mapping", "runtime_context"]

LANGGRAPH_RUNTIME_KEY = "__pregel_runtime"
"""Where LangGraph keeps a graph run's ``Runtime`` in ``config["configurable"]``."""


def runtime_context(config: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The runtime context of the LangGraph run ``config`` belongs to, as a mapping (or ``None``)."""
    runtime = (config.get("configurable") or {}).get(LANGGRAPH_RUNTIME_KEY)
    return context_mapping(getattr(runtime, "context", None))


def context_mapping(context: Any) -> Mapping[str, Any] | None:
    """A runtime context as a mapping of its fields (``None`` when there is none)."""
    if context is None:
        return None
    if isinstance(context, Mapping):
        return context
    if dataclasses.is_dataclass(context) and not isinstance(context, type):
        return {f.name: getattr(context, f.name) for f in dataclasses.fields(context)}
    dump = getattr(context, "model_dump", None)
    if callable(dump):
        return dump()  # type: ignore[no-any-return]
    return dict(vars(context)) if hasattr(context, "__dict__") else None
