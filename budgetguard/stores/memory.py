"""In-process store: the default. One lock; the arithmetic lives in :mod:`.base`."""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Sequence

from budgetguard.clock import Clock, SystemClock
from budgetguard.errors import ConfigurationError
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
    touched_specs,
)

__all__ = ["MemoryStore"]

logger = logging.getLogger("budgetguard")

_RESERVED = ReserveResult(True)  # results are immutable: the common one is shared

# Due buckets each reserve or settle forgets at most: a call creates a bucket per scope it
# is the first to use, so this keeps up with new scopes while no call pays for a backlog.
_FORGET_PER_CALL = 8
# Due buckets the background pass forgets per hold of the lock (about a millisecond).
_FORGET_PER_PASS = 1_000


class MemoryStore:
    """Buckets and leases in a dict, shared by every thread and task of one process.

    Operations hold a ``threading.Lock`` for a few microseconds and do no I/O, so the
    async twins call the sync ones directly: they never wait on anything but that lock.

    A bucket that is full and that no open reservation holds is forgotten: it grants
    exactly what a bucket never used grants, and one is made, full, when it is next used.
    So the store keeps the buckets in use, not one per scope value ever seen. Each bucket
    written is checked once it should be full again (refilled, or reset by its period);
    each reserve or settle forgets a few such buckets, and a background thread forgets the
    rest every ``forget_every`` seconds (so an idle process gives the memory back too), as
    does :meth:`sweep`. What is lost is the forgotten bucket's ``spent`` (a snapshot reads 0
    again, as for a new bucket): that is the ledger's job.

    Swept leases wait in a journal until acknowledged, as on every store (this one dies
    with its process, but callers get one contract).

    Args:
        clock: Time source (inject :class:`~budgetguard.clock.FakeClock` in tests).
        forget_every: Seconds between the background thread's passes (started with the
            first bucket written: one daemon thread for every store of the process, which
            holds the stores weakly and ends when none is left or all are closed);
            ``None`` for no thread (calls and :meth:`sweep` still forget).

    Raises:
        ConfigurationError: ``forget_every`` is not a positive number or ``None``.
    """

    def __init__(self, clock: Clock | None = None, *, forget_every: float | None = 60.0) -> None:
        if forget_every is not None and not (
            isinstance(forget_every, (int, float)) and not isinstance(forget_every, bool)
            and math.isfinite(forget_every) and forget_every > 0
        ):
            msg = f"forget_every must be a positive number of seconds or None, got {forget_every!r}"
            raise ConfigurationError(msg)
        self.clock: Clock = clock or SystemClock()
        self.forget_every = forget_every
        self._forgetting = False  # whether the background pass has this store
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
        for spec in touched_specs(held):
            holds[spec.key] = holds.get(spec.key, 0) + 1

    def _release(self, held: list[Held], now: float) -> None:
        """Drop a settled reservation's holds and schedule the buckets it wrote."""
        holds = self._holds
        for spec in touched_specs(held):
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
        if not self._forgetting and self.forget_every is not None:
            self._forgetting = True
            _FORGETTING.add(self, self.forget_every)

    def _forget_locked(self, now: float, limit: float, compact: bool = True) -> None:
        """Forget up to ``limit`` due buckets that are full and unheld (and give the memory
        of forgotten ones back, unless ``compact`` is false)."""
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
        if compact:
            self._compact_locked()

    def _compact_locked(self) -> None:
        if self._forgotten > len(self._buckets) + 1024:
            # A dict or set keeps its table when entries are deleted (until later inserts
            # grow it again): copied, they give the memory of forgotten buckets back now.
            # The copy costs less than the deletions it follows.
            self._buckets = dict(self._buckets)
            self._scheduled = set(self._scheduled)
            self._forgotten = 0

    def _schedule_charges(self, request: ReserveRequest, now: float) -> None:
        for spec in touched_specs(request.charges):
            self._schedule(spec, now)

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

    def forget_due(self) -> None:
        """Forget every due bucket that is full and unheld, a thousand at a time (the lock is
        let go between batches, so calls go on meanwhile). The background thread's pass."""
        now = self.clock.now()
        for _ in range(len(self._full_at) // _FORGET_PER_PASS + 1):
            with self._lock:
                self._forget_locked(now, _FORGET_PER_PASS, compact=False)
                if not (self._full_at and self._full_at[0][0] <= now):
                    break
        # Compacted once, at the end: what a copy allocates in this thread lands in glibc's
        # arena for it, which keeps freed memory; copying the few buckets left after an idle
        # spell costs next to nothing (a copy after each batch kept ~30 MB there for 1M users).
        with self._lock:
            self._compact_locked()

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
        """Stop the background pass (the store still works; calls still forget)."""
        _FORGETTING.remove(self)
        self.forget_every = None

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
        """Same as :meth:`close`."""
        self.close()


class _Forgetting:
    """One daemon thread for every memory store of the process: it calls each store's
    :meth:`MemoryStore.forget_due` every ``forget_every`` seconds. Stores are held weakly;
    the thread ends when none is left (or every one is closed), and starts again with the
    next store that writes a bucket."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next: weakref.WeakKeyDictionary[MemoryStore, float] = weakref.WeakKeyDictionary()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()  # a new store may want its turn sooner
        self._held_for_fork: list[threading.Lock] = []

    def add(self, store: MemoryStore, every: float) -> None:
        with self._lock:
            self._next[store] = time.monotonic() + every
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="budgetguard-forget", daemon=True)
                self._thread.start()
            else:
                self._wake.set()

    def remove(self, store: MemoryStore) -> None:
        with self._lock:
            self._next.pop(store, None)

    def _run(self) -> None:
        try:
            while (wait := self._pass()) is not None:
                self._wake.wait(wait)
                self._wake.clear()
        finally:  # however it ends, the next store to write a bucket starts a thread again
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None

    def _pass(self) -> float | None:
        """Forget what is due in each store whose turn it is; the seconds until the next turn,
        or ``None`` when no store is left (the thread ends). Stores are not held after it."""
        with self._lock:
            now = time.monotonic()
            due = [store for store, at in self._next.items() if at <= now]
            for store in due:
                self._next[store] = now + (store.forget_every or 60.0)
            if not self._next:
                self._thread = None
                return None
            wait = min(self._next.values()) - now
        for store in due:
            try:
                store.forget_due()
            except Exception:  # the thread must go on for the other stores
                logger.exception("budgetguard: forgetting full buckets failed; retried next pass")
        return max(wait, 0.0)

    def before_fork(self) -> None:
        # A pass holds a store's lock for a moment: a child forked then would inherit it held
        # by a thread it does not have. The forking thread holds every such lock instead.
        with self._lock:
            stores = list(self._next)
        for store in stores:
            store._lock.acquire()
            self._held_for_fork.append(store._lock)

    def release_fork_locks(self) -> None:
        for lock in self._held_for_fork:
            lock.release()
        self._held_for_fork.clear()

    def after_fork_in_child(self) -> None:
        # The child has the parent's stores but not this thread: each starts it again
        # when it next writes a bucket.
        self.release_fork_locks()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        for store in list(self._next):
            store._forgetting = False
        self._next = weakref.WeakKeyDictionary()
        self._thread = None


_FORGETTING = _Forgetting()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_FORGETTING.before_fork,
        after_in_parent=_FORGETTING.release_fork_locks,
        after_in_child=_FORGETTING.after_fork_in_child,
    )
