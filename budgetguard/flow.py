"""The guard's protocol, written once: estimate → reserve (→ overflow policies) → settle.

The protocol is a generator that *yields operations* and receives their results; it does
no I/O itself (the "sans-I/O" pattern of httpx's auth flows). :func:`drive` and
:func:`adrive` perform the operations, one with blocking calls, the other with awaits,
so every rule below holds identically in sync and async code:

* :class:`Reserve` → ``store.reserve`` / ``await store.areserve``
* :class:`Peek` → ``store.snapshot`` / ``await store.asnapshot`` (what budgets can afford)
* :class:`Sleep` → ``clock.sleep`` / ``await clock.asleep``
* :class:`Invoke` → ``runnable.invoke`` / ``await runnable.ainvoke`` (a summarizer call)
* :class:`Acknowledge` → ``store.acknowledge`` / a task that awaits ``store.aacknowledge``

A store failure is thrown back into the generator, which decides between failing closed
(raise :class:`~budgetguard.errors.StoreUnavailable`) and failing open; a failure to
acknowledge is only logged (see :class:`Acknowledge`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from budgetguard.errors import BudgetExceeded, StoreUnavailable
from budgetguard.stores.base import BucketSpec, ReserveRequest, Store

if TYPE_CHECKING:
    from langchain_core.runnables import Runnable, RunnableConfig

    from budgetguard.clock import Clock
    from budgetguard.errors import ContextWindowExceeded
    from budgetguard.estimate import TokenEstimator
    from budgetguard.pricing import PriceTable
    from budgetguard.tickets import Call, Line

__all__ = [
    "Acknowledge",
    "Flow",
    "Invoke",
    "OverflowPolicy",
    "Peek",
    "PolicyContext",
    "Reserve",
    "Sleep",
    "adrive",
    "drive",
]

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


@dataclass(frozen=True, slots=True)
class Acknowledge:
    """Tell the store that these swept leases are recorded (it stops reporting them);
    the flow receives ``None``.

    Nothing is lost if this fails or never happens: the store keeps reporting the leases,
    and recording one again changes nothing. So a failure is logged, never thrown into
    the flow, and :func:`adrive` acknowledges in a task of its own rather than awaiting it
    (see :func:`_acknowledge_soon`).
    """

    ids: tuple[str, ...]


Op = Reserve | Peek | Sleep | Invoke | Acknowledge
Flow = Generator[Op, Any, T]


class PolicyContext(Protocol):
    """What an overflow policy may ask of the guard (:class:`~budgetguard.engine.BudgetEngine`)."""

    estimator: TokenEstimator
    prices: PriceTable

    def lines_for(self, call: Call, now: float | None = None) -> tuple[Line, ...]:
        """What each budget would hold for ``call``."""
        ...

    def specs_for(self, lines: Sequence[Line]) -> tuple[BucketSpec, ...]:
        """The buckets of ``lines`` (each borrower's lender right after it)."""
        ...

    def window_error(self, call: Call) -> ContextWindowExceeded | None:
        """The error for a call that does not fit its model's context window, if any."""
        ...

    def wrap(self, runnable: Any) -> Runnable[Any, Any]:
        """``runnable`` with its model calls metered by the same guard."""
        ...


class OverflowPolicy:
    """Base of the overflow policies (see :mod:`budgetguard.policies`).

    A policy looks at a call that cannot be reserved (or does not fit its model's context
    window) and proposes a changed call, or declines. ``propose`` is a flow: it may read
    bucket levels, sleep or run a summarizer, so every policy works in sync and async code.

    Attributes:
        name: How the policy is named in errors, traces and the ledger.
        rewrites: Whether it changes the request (only an adapter that sends the call
            itself can apply it: not the callback meters).
        retries: Whether the guard may offer it the same call again after it acted.
    """

    name: ClassVar[str] = "policy"
    rewrites: ClassVar[bool] = True
    retries: ClassVar[bool] = False

    def propose(self, call: Call, error: BudgetExceeded, guard: PolicyContext) -> Flow[Call | None]:
        """Return a changed call to reserve instead, or ``None`` to decline."""
        raise NotImplementedError
        yield  # pragma: no cover  (makes this a generator)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


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
            elif isinstance(op, Acknowledge):
                _acknowledge(store, op.ids)
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
                send = await _areserve(flow, store, op.request)
            elif isinstance(op, Peek):
                send = tuple([(await store.asnapshot(spec)).level for spec in op.specs])
            elif isinstance(op, Sleep):
                await clock.asleep(op.seconds)
            elif isinstance(op, Acknowledge):
                _acknowledge_soon(store, op.ids)
            else:
                send = await op.runnable.ainvoke(op.input, op.config)
        except (StoreUnavailable, BudgetExceeded) as exc:
            throw = exc


async def _areserve(flow: Flow[Any], store: Store, request: ReserveRequest) -> Any:
    """``store.areserve(request)``, safe against the awaiting task being cancelled meanwhile.

    A store that works in a thread (SQLite, a sync Redis client) or over a connection commits
    the reservation whatever becomes of the task waiting for it. So on cancellation the store's
    answer is still awaited and shown to the flow (which records any swept leases it reports;
    they are left unacknowledged, so the store reports them again), and a reservation it
    made is released: nothing was sent.
    """
    task = asyncio.ensure_future(store.areserve(request))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        try:
            result = await task
        except (StoreUnavailable, BudgetExceeded):
            flow.close()
            raise asyncio.CancelledError from None
        try:
            flow.send(result)
        except (StopIteration, BudgetExceeded):
            pass  # the flow had its answer (a ticket, or a refusal); the cancellation wins
        finally:
            flow.close()
        if result.ok:
            await store.asettle(request.id, tuple(0.0 for _ in request.charges))
        raise


def _acknowledge(store: Store, ids: tuple[str, ...]) -> None:
    try:
        store.acknowledge(ids)
    except StoreUnavailable as exc:
        _unacknowledged(ids, exc)


_ACKNOWLEDGING: set[asyncio.Task[None]] = set()
"""Acknowledgements in flight (the loop keeps only weak references to tasks)."""


def _acknowledge_soon(store: Store, ids: tuple[str, ...]) -> None:
    """Acknowledge in a task: an await in the flow would be a cancellation point between a
    reservation and the ticket that settles it (a call cancelled there would leave its
    reservation held, charged in full when its lease expired). A task the loop never runs
    (it closes first) costs only a second report of the same leases."""
    task = asyncio.get_running_loop().create_task(_aacknowledge(store, ids))
    _ACKNOWLEDGING.add(task)
    task.add_done_callback(_ACKNOWLEDGING.discard)


async def _aacknowledge(store: Store, ids: tuple[str, ...]) -> None:
    try:
        await store.aacknowledge(ids)
    except StoreUnavailable as exc:
        _unacknowledged(ids, exc)


def _unacknowledged(ids: tuple[str, ...], error: StoreUnavailable) -> None:
    logger.warning(
        "budgetguard: could not acknowledge %d recorded expired lease(s) (%s); the store reports them again "
        "and they are recorded once more (the ledger keeps one record per run)",
        len(ids),
        error,
    )
