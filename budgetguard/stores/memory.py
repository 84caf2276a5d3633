"""In-process store: the default. One lock; the arithmetic lives in :mod:`.base`."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

from budgetguard.clock import Clock, SystemClock
from budgetguard.stores.base import (
    BucketSpec,
    BucketState,
    ExpiredLease,
    Held,
    ReserveRequest,
    ReserveResult,
    StateGetter,
    apply_reserve,
    apply_settle,
    refresh,
)

__all__ = ["MemoryStore"]

_RESERVED = ReserveResult(True)  # results are immutable: the common one is shared


class MemoryStore:
    """Buckets and leases in a dict, shared by every thread and task of one process.

    Operations hold a ``threading.Lock`` for a few microseconds and do no I/O, so the
    async twins call the sync ones directly: they never wait on anything but that lock.

    Args:
        clock: Time source (inject :class:`~budgetguard.clock.FakeClock` in tests).
    """

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or SystemClock()
        self._lock = threading.Lock()
        self._buckets: dict[str, BucketState] = {}
        self._open: dict[str, tuple[list[Held], float, ReserveRequest]] = {}
        # Earliest lease expiry among open reservations; a sweep scans only the
        # (few) open reservations, and only once this moment has passed.
        self._next_expiry = math.inf

    # -- helpers --------------------------------------------------------------------

    def _getter(self, now: float) -> StateGetter:
        buckets = self._buckets

        def get(spec: BucketSpec) -> BucketState:
            # Refreshing in place is safe even if the request is then denied: it only
            # brings the bucket up to date, and refreshing again at the same moment
            # changes nothing, so every charge on one bucket sees the same object.
            state = buckets.get(spec.key)
            if state is None:
                state = buckets[spec.key] = refresh(None, spec, now)
                return state
            return refresh(state, spec, now)

        return get

    def _sweep_locked(self, now: float) -> tuple[ExpiredLease, ...]:
        if now < self._next_expiry:
            return ()
        expired: list[ExpiredLease] = []
        get = self._getter(now)
        next_expiry = math.inf
        for rid, (held, expires, request) in list(self._open.items()):
            if expires <= now:
                del self._open[rid]
                expired.append(ExpiredLease(rid, apply_settle(get, held, None), request.meta_text()))
            elif expires < next_expiry:
                next_expiry = expires
        self._next_expiry = next_expiry
        return tuple(expired)

    # -- protocol -------------------------------------------------------------------

    def reserve(self, request: ReserveRequest) -> ReserveResult:
        """Reserve all charges or none (see :func:`~budgetguard.stores.base.apply_reserve`)."""
        now = self.clock.now()
        with self._lock:
            expired = self._sweep_locked(now) if now >= self._next_expiry else ()
            if request.id in self._open:
                msg = f"reservation id {request.id!r} is already open"
                raise ValueError(msg)
            outcome = apply_reserve(self._getter(now), request.charges, now)
            if not isinstance(outcome, list):
                return ReserveResult(False, outcome, expired)
            expires = now + request.lease_seconds
            self._open[request.id] = (outcome, expires, request)
            if expires < self._next_expiry:
                self._next_expiry = expires
        return ReserveResult(True, None, expired) if expired else _RESERVED

    def settle(self, reservation_id: str, actuals: Sequence[float] | None) -> bool:
        """Settle once; later calls for the same id return ``False`` and change nothing."""
        now = self.clock.now()
        with self._lock:
            entry = self._open.get(reservation_id)
            if entry is None:
                return False
            if actuals is not None and len(actuals) < len(entry[0]):
                msg = f"settle({reservation_id!r}) got {len(actuals)} amounts for {len(entry[0])} charges"
                raise ValueError(msg)
            del self._open[reservation_id]
            apply_settle(self._getter(now), entry[0], actuals)
        return True

    def snapshot(self, spec: BucketSpec) -> BucketState:
        """Return a refreshed copy of the bucket (full if never used)."""
        now = self.clock.now()
        with self._lock:
            stored = self._buckets.get(spec.key)
            return refresh(stored.copy() if stored is not None else None, spec, now)

    def sweep(self) -> tuple[ExpiredLease, ...]:
        """Settle expired leases at their reserved amounts."""
        with self._lock:
            return self._sweep_locked(self.clock.now())

    def open_reservations(self) -> int:
        """How many reservations are reserved and not yet settled."""
        with self._lock:
            return len(self._open)

    def close(self) -> None:
        """Nothing to release."""

    async def areserve(self, request: ReserveRequest) -> ReserveResult:
        """Same as :meth:`reserve` (no I/O)."""
        return self.reserve(request)

    async def asettle(self, reservation_id: str, actuals: Sequence[float] | None) -> bool:
        """Same as :meth:`settle` (no I/O)."""
        return self.settle(reservation_id, actuals)

    async def asnapshot(self, spec: BucketSpec) -> BucketState:
        """Same as :meth:`snapshot` (no I/O)."""
        return self.snapshot(spec)

    async def asweep(self) -> tuple[ExpiredLease, ...]:
        """Same as :meth:`sweep` (no I/O)."""
        return self.sweep()

    async def aclose(self) -> None:
        """Nothing to release."""
