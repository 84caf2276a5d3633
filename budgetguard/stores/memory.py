"""In-process store: the default. One lock; the arithmetic lives in :mod:`.base`."""

from __future__ import annotations

import heapq
import itertools
import math
import threading
from collections.abc import Sequence

from budgetguard.clock import Clock, SystemClock
from budgetguard.stores.base import (
    JOURNAL_REPORT,
    BucketSpec,
    BucketState,
    ExpiredLease,
    Held,
    ReserveRequest,
    ReserveResult,
    StateGetter,
    apply_reserve,
    apply_settle,
    full_after,
    refresh,
)

__all__ = ["MemoryStore"]

_RESERVED = ReserveResult(True)  # results are immutable: the common one is shared

# Due buckets each reserve or settle forgets at most: a call creates a bucket per scope it
# is the first to use, so this keeps up with new scopes while no call pays for a backlog.
_FORGET_PER_CALL = 8


class MemoryStore:
    """Buckets and leases in a dict, shared by every thread and task of one process.

    Operations hold a ``threading.Lock`` for a few microseconds and do no I/O, so the
    async twins call the sync ones directly: they never wait on anything but that lock.

    A bucket that is full and that no open reservation holds is forgotten: it grants
    exactly what a bucket never used grants, and one is made, full, when it is next used.
    So the store keeps the buckets in use, not one per scope value ever seen. Each bucket
    written is checked once it should be full again (refilled, or reset by its period);
    each reserve or settle forgets a few such buckets, :meth:`sweep` all of them. What is
    lost is the forgotten bucket's ``spent`` (a snapshot reads 0 again, as for a new
    bucket): that is the ledger's job.

    Swept leases wait in a journal until acknowledged, as on every store (this one dies
    with its process, but callers get one contract).

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
        # Swept leases until acknowledged, oldest sweep first (see base: the journal).
        self._journal: dict[str, ExpiredLease] = {}
        # Forgetting full buckets: when each scheduled bucket should be full again (a heap
        # of (time, key, spec), one entry per key in _scheduled), and how many open
        # reservations hold each bucket (a held bucket is kept).
        self._full_at: list[tuple[float, str, BucketSpec]] = []
        self._scheduled: set[str] = set()
        self._holds: dict[str, int] = {}
        self._forgotten = 0  # since _buckets and _scheduled were last compacted

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

    def _sweep_locked(self, now: float) -> None:
        """Charge every due lease at its reserved amount, into the journal."""
        if now < self._next_expiry:
            return
        get = self._getter(now)
        next_expiry = math.inf
        for rid, (held, expires, request) in list(self._open.items()):
            if expires <= now:
                del self._open[rid]
                self._journal[rid] = ExpiredLease(rid, apply_settle(get, held, None), request.meta_text())
                self._release(held, now)
            elif expires < next_expiry:
                next_expiry = expires
        self._next_expiry = next_expiry

    def _journal_locked(self) -> tuple[ExpiredLease, ...]:
        """The journal's oldest unacknowledged entries (at most ``JOURNAL_REPORT``)."""
        return tuple(itertools.islice(self._journal.values(), JOURNAL_REPORT))

    def _hold(self, held: list[Held]) -> None:
        holds = self._holds
        for h in held:
            holds[h.bucket.key] = holds.get(h.bucket.key, 0) + 1
            if h.lender is not None:
                holds[h.lender.key] = holds.get(h.lender.key, 0) + 1

    def _release(self, held: list[Held], now: float) -> None:
        """Drop a settled reservation's holds and schedule the buckets it wrote."""
        holds = self._holds
        for h in held:
            for spec in (h.bucket, h.lender):
                if spec is None:
                    continue
                left = holds[spec.key] - 1
                if left:
                    holds[spec.key] = left
                else:
                    del holds[spec.key]
                self._schedule(spec, now)

    def _schedule(self, spec: BucketSpec, now: float) -> None:
        """Check ``spec``'s bucket again when it should be full (unless a check is due already)."""
        key = spec.key
        if key in self._scheduled:
            return  # checked at an earlier estimate; rescheduled then if not full yet
        state = self._buckets.get(key)
        if state is not None:
            self._schedule_state(spec, state, now)

    def _schedule_state(self, spec: BucketSpec, state: BucketState, now: float) -> None:
        wait = full_after(state, spec, now)
        if wait is None:
            return  # only a refund can fill it, and the settle that refunds schedules it
        self._scheduled.add(spec.key)
        heapq.heappush(self._full_at, (now + wait, spec.key, spec))

    def _forget_locked(self, now: float, limit: float) -> None:
        """Forget up to ``limit`` due buckets that are full and unheld."""
        heap, buckets = self._full_at, self._buckets
        later: list[tuple[BucketSpec, BucketState]] = []
        while heap and heap[0][0] <= now and limit > 0:
            limit -= 1
            _, key, spec = heapq.heappop(heap)
            self._scheduled.discard(key)
            if key in self._holds:
                continue  # the settle that releases it schedules it again
            state = buckets.get(key)
            if state is None:
                continue
            fresh = refresh(state.copy(), spec, now)
            if fresh.level >= spec.capacity:
                del buckets[key]
                self._forgotten += 1
            else:  # used since it was scheduled
                later.append((spec, fresh))
        # Scheduled after the pass: a bucket a rounding error short of full is due "now"
        # again, and would otherwise be popped again in this pass, forever.
        for spec, fresh in later:
            self._schedule_state(spec, fresh, now)
        if self._forgotten > len(buckets) + 1024:
            # A dict or set keeps its table when entries are deleted (until later inserts
            # grow it again): copied, they give the memory of forgotten buckets back now.
            # The copy costs less than the deletions it follows.
            self._buckets = dict(buckets)
            self._scheduled = set(self._scheduled)
            self._forgotten = 0

    def _schedule_charges(self, request: ReserveRequest, now: float) -> None:
        for charge in request.charges:
            self._schedule(charge.bucket, now)
            if charge.lender is not None:
                self._schedule(charge.lender, now)

    # -- protocol -------------------------------------------------------------------

    def reserve(self, request: ReserveRequest) -> ReserveResult:
        """Reserve all charges or none (see :func:`~budgetguard.stores.base.apply_reserve`)."""
        now = self.clock.now()
        with self._lock:
            if now >= self._next_expiry:
                self._sweep_locked(now)
            expired = self._journal_locked() if self._journal else ()
            if request.id in self._open:
                msg = f"reservation id {request.id!r} is already open"
                raise ValueError(msg)
            outcome = apply_reserve(self._getter(now), request.charges, now)
            if isinstance(outcome, list):
                # Every bucket the request touched is now held: its settle schedules it.
                expires = now + request.lease_seconds
                self._open[request.id] = (outcome, expires, request)
                self._hold(outcome)
                if expires < self._next_expiry:
                    self._next_expiry = expires
            else:
                self._schedule_charges(request, now)  # a denial may have made new (full) buckets
            if self._full_at:
                self._forget_locked(now, _FORGET_PER_CALL)
        if not isinstance(outcome, list):
            return ReserveResult(False, outcome, expired)
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
            self._release(entry[0], now)
            if self._full_at:
                self._forget_locked(now, _FORGET_PER_CALL)
        return True

    def snapshot(self, spec: BucketSpec) -> BucketState:
        """Return a refreshed copy of the bucket (full if never used)."""
        now = self.clock.now()
        with self._lock:
            stored = self._buckets.get(spec.key)
            return refresh(stored.copy() if stored is not None else None, spec, now)

    def sweep(self) -> tuple[ExpiredLease, ...]:
        """Settle expired leases at their reserved amounts into the journal and report it;
        forget every full, unheld bucket."""
        now = self.clock.now()
        with self._lock:
            self._sweep_locked(now)
            self._forget_locked(now, math.inf)
            return self._journal_locked()

    def acknowledge(self, ids: Sequence[str]) -> None:
        """Drop these entries from the journal (their records are stored)."""
        with self._lock:
            for rid in ids:
                self._journal.pop(rid, None)

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

    async def aacknowledge(self, ids: Sequence[str]) -> None:
        """Same as :meth:`acknowledge` (no I/O)."""
        self.acknowledge(ids)

    async def aclose(self) -> None:
        """Nothing to release."""
