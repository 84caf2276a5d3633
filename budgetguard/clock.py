"""Injectable clocks, so refill, periods, leases and waits are testable without sleeping.

Budgets are wall-clock things (a "day" starts at midnight in some timezone, leases are
shared between processes), so every clock reports unix seconds. Waiting goes through the
clock too: :class:`FakeClock` advances itself instead of sleeping.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "FakeClock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """Where budgetguard reads the time and how it waits."""

    def now(self) -> float:
        """Return the current time in unix seconds."""
        ...

    def sleep(self, seconds: float) -> None:
        """Block the calling thread for ``seconds``."""
        ...

    async def asleep(self, seconds: float) -> None:
        """Suspend the calling task for ``seconds`` without blocking the event loop."""
        ...


class SystemClock:
    """The real clock: ``time.time``, ``time.sleep`` and ``asyncio.sleep``."""

    __slots__ = ()

    def now(self) -> float:
        """Return ``time.time()``."""
        return time.time()

    def sleep(self, seconds: float) -> None:
        """Sleep with ``time.sleep``."""
        if seconds > 0:
            time.sleep(seconds)

    async def asleep(self, seconds: float) -> None:
        """Sleep with ``asyncio.sleep``."""
        await asyncio.sleep(max(seconds, 0.0))


class FakeClock:
    """A clock that only moves when told to; sleeping advances it instantly.

    Example:
        >>> clock = FakeClock(start=1_700_000_000.0)
        >>> clock.advance(30)
        >>> clock.now()
        1700000030.0
    """

    __slots__ = ("_lock", "_now", "slept")

    def __init__(self, start: float = 1_767_225_600.0) -> None:  # 2026-01-01T00:00:00Z
        self._now = float(start)
        self._lock = threading.Lock()
        self.slept: list[float] = []
        """Every sleep requested, in order (tests assert on it)."""

    def now(self) -> float:
        """Return the fake time."""
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``."""
        with self._lock:
            self._now += seconds

    def set(self, when: float) -> None:
        """Jump to unix time ``when``."""
        with self._lock:
            self._now = float(when)

    def sleep(self, seconds: float) -> None:
        """Record the sleep and advance the clock instead of blocking."""
        self.slept.append(seconds)
        self.advance(max(seconds, 0.0))

    async def asleep(self, seconds: float) -> None:
        """Record the sleep, advance the clock and yield to the loop once."""
        self.slept.append(seconds)
        self.advance(max(seconds, 0.0))
        await asyncio.sleep(0)
