"""The guard's protocol, written once: estimate → reserve (→ overflow policies) → settle.

The protocol is a generator that *yields operations* and receives their results; it does
no I/O itself (the "sans-I/O" pattern of httpx's auth flows). :func:`drive` and
:func:`adrive` perform the operations, one with blocking calls, the other with awaits,
so every rule below holds identically in sync and async code:

* :class:`Reserve` → ``store.reserve`` / ``await store.areserve``
* :class:`Peek` → ``store.snapshot`` / ``await store.asnapshot`` (what budgets can afford)
* :class:`Sleep` → ``clock.sleep`` / ``await clock.asleep``
* :class:`Invoke` → ``runnable.invoke`` / ``await runnable.ainvoke`` (a summarizer call)

A store failure is thrown back into the generator, which decides between failing closed
(raise :class:`~budgetguard.errors.StoreUnavailable`) and failing open.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from budgetguard.errors import BudgetExceeded, StoreUnavailable
from budgetguard.stores.base import BucketSpec, ReserveRequest, Store

if TYPE_CHECKING:
    from langchain_core.runnables import Runnable, RunnableConfig

    from budgetguard.clock import Clock

__all__ = ["Flow", "Invoke", "Peek", "Reserve", "Sleep", "adrive", "drive"]

logger = logging.getLogger("budgetguard")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Reserve:
    """Ask the store to reserve a request; the flow receives a ``ReserveResult``."""

    request: ReserveRequest


@dataclass(frozen=True, slots=True)
class Peek:
    """Read buckets without changing them; the flow receives their levels, in order."""

    specs: tuple[BucketSpec, ...]


@dataclass(frozen=True, slots=True)
class Sleep:
    """Wait ``seconds`` (the clock decides how)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Invoke:
    """Run a runnable (e.g. a summarizer) and send its output back into the flow."""

    runnable: Runnable[Any, Any]
    input: Any
    config: RunnableConfig | None = field(default=None)


Op = Reserve | Peek | Sleep | Invoke
Flow = Generator[Op, Any, T]


def drive(flow: Flow[T], store: Store, clock: Clock) -> T:
    """Run a flow with blocking calls.

    Args:
        flow: The protocol generator.
        store: Where reservations go.
        clock: How to sleep.

    Returns:
        The flow's return value.
    """
    send: Any = None
    throw: BaseException | None = None
    while True:
        try:
            op = flow.throw(throw) if throw is not None else flow.send(send)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        send, throw = None, None
        try:
            if isinstance(op, Reserve):
                send = store.reserve(op.request)
            elif isinstance(op, Peek):
                send = tuple(store.snapshot(spec).level for spec in op.specs)
            elif isinstance(op, Sleep):
                clock.sleep(op.seconds)
            else:
                send = op.runnable.invoke(op.input, op.config)
        except (StoreUnavailable, BudgetExceeded) as exc:
            throw = exc


async def adrive(flow: Flow[T], store: Store, clock: Clock) -> T:
    """Run a flow with awaits; never blocks the event loop.

    Args:
        flow: The protocol generator.
        store: Where reservations go (its async methods are used).
        clock: How to sleep (``asleep``).

    Returns:
        The flow's return value.
    """
    send: Any = None
    throw: BaseException | None = None
    while True:
        try:
            op = flow.throw(throw) if throw is not None else flow.send(send)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        send, throw = None, None
        try:
            if isinstance(op, Reserve):
                send = await store.areserve(op.request)
            elif isinstance(op, Peek):
                send = tuple([(await store.asnapshot(spec)).level for spec in op.specs])
            elif isinstance(op, Sleep):
                await clock.asleep(op.seconds)
            else:
                send = await op.runnable.ainvoke(op.input, op.config)
        except (StoreUnavailable, BudgetExceeded) as exc:
            throw = exc
