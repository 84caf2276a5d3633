"""The call being sent right now, and the gate every metered copy sends through.

A metered copy (:mod:`budgetguard.metered`) sets :data:`SENDING` to a :class:`Sending` for
as long as the model works on one of its calls. Its ``rate_limiter`` is a :class:`SendGate`
around the model's own limiter. LangChain calls the rate limiter on every path (invoke,
stream, the event streams) after its cache lookup and right before the provider's method
runs, so the gate is where a call is known to be sent:

* it marks the current call as sent: a call interrupted before that point (say, cancelled
  while the model's own rate limiter made it wait) reached no provider and is charged
  nothing;
* for a call the budgets refused, which only LangChain's cache may still answer, it raises
  the refusal: a cached answer is served free, and a real request never leaves.

The callback meters read :data:`SENDING` too, to leave alone the runs a metered copy of the
same guard already meters.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from contextlib import aclosing, closing
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar

from langchain_core.rate_limiters import BaseRateLimiter

if TYPE_CHECKING:
    from budgetguard.errors import BudgetExceeded

__all__ = ["SENDING", "SendGate", "Sending", "sent_by"]

T = TypeVar("T")


class Sending:
    """One call on its way to the model.

    Attributes:
        owner: Who meters it (the guard's engine), so other meters leave its run alone.
        refusal: The budgets' refusal, for a call only LangChain's cache may answer.
        sent: Set when the call passed the gate (the provider's method is about to run).
    """

    __slots__ = ("owner", "refusal", "sent")

    def __init__(self, owner: object, refusal: BudgetExceeded | None = None) -> None:
        self.owner = owner
        self.refusal = refusal
        self.sent = False

    def through(self, chunks: Iterator[T]) -> Generator[T, None, None]:
        """Iterate a stream with this call current while the model produces each chunk."""
        with closing(chunks):  # type: ignore[type-var]
            while True:
                token = SENDING.set(self)
                try:
                    chunk = next(chunks)
                except StopIteration:
                    return
                finally:
                    SENDING.reset(token)
                yield chunk

    async def athrough(self, chunks: AsyncIterator[T]) -> AsyncGenerator[T, None]:
        """Async :meth:`through`."""
        async with aclosing(chunks):  # type: ignore[type-var]
            while True:
                token = SENDING.set(self)
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    return
                finally:
                    SENDING.reset(token)
                yield chunk


SENDING: ContextVar[Sending | None] = ContextVar("budgetguard_sending", default=None)
"""The call the model is working on in this context, if a metered copy sent it."""


class SendGate(BaseRateLimiter):
    """The rate limiter of a metered copy: the model's own limiter, then the gate.

    Args:
        inner: The model's own rate limiter, if it had one.
    """

    def __init__(self, inner: BaseRateLimiter | None) -> None:
        self.inner = inner

    def acquire(self, *, blocking: bool = True) -> bool:
        """Refuse a call the budgets refused; wait for the model's own limiter; mark it sent."""
        sending = SENDING.get()
        if sending is not None and sending.refusal is not None:
            raise sending.refusal
        acquired = self.inner.acquire(blocking=blocking) if self.inner is not None else True
        if sending is not None:
            sending.sent = True
        return acquired

    async def aacquire(self, *, blocking: bool = True) -> bool:
        """Async :meth:`acquire`."""
        sending = SENDING.get()
        if sending is not None and sending.refusal is not None:
            raise sending.refusal
        acquired = await self.inner.aacquire(blocking=blocking) if self.inner is not None else True
        if sending is not None:
            sending.sent = True
        return acquired

    def __repr__(self) -> str:
        return f"SendGate({self.inner!r})"


def sent_by(owner: Any) -> bool:
    """Whether the model call running in this context was sent by ``owner``'s metered copy."""
    sending = SENDING.get()
    return sending is not None and sending.owner is owner
