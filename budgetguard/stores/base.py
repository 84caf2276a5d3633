"""The store protocol and the bucket arithmetic, written once.

A store keeps buckets (level, last update, current period, lifetime spend) and open
reservations (leases). Every store runs the same three operations atomically:

* **reserve** all of a call's charges, all or nothing;
* **settle** one reservation with what the call really cost, exactly once;
* **sweep** reservations whose lease expired (the process died between reserve and
  settle). The rule: an expired reservation is charged at the reserved amount and
  reported as ``expired``.

The swept-lease journal: a sweep moves each lease it charges into the store's journal,
in the same atomic step, and every reserve and sweep reports the journal's entries (at
most :data:`JOURNAL_REPORT` per call, oldest sweeps first) until someone acknowledges
them (:meth:`Store.acknowledge`). The guard acknowledges once their ``expired`` ledger
records are stored, so a process killed between a sweep and its records leaves them for
the next caller to record instead of losing them. Several callers may report and record
the same entry meanwhile: the ledger keeps one record per run, and acknowledging twice
changes nothing. The journal is almost always empty, and each store reads a marker it
already fetches (never a query of its own) to know so.

:class:`MemoryStore` and :class:`SQLiteStore` apply the pure functions below inside a
lock or a transaction; the Redis store runs the same rules as Lua scripts (the contract
suite checks they agree).

Bucket rules:

* A new bucket starts full (``level == capacity``).
* Continuous refill adds ``refill_per_second * elapsed`` up to capacity.
* A calendar period resets the bucket to full when a new period starts. The spec carries
  the period as a rule (:class:`~budgetguard.periods.PeriodRule`), and the store finds
  the period holding *its own* time; a time in an earlier period than the bucket's
  changes nothing (no reset, no refill).
* Reservations take from the level; settlement refunds the difference (to the lender
  first) or charges the excess to the borrower's own bucket, which may go negative:
  later calls then wait for refill. Refunds of a reservation made in an earlier period
  are dropped (that period is over); excess charges land in the period current when
  the call is settled, however many periods later.
* A denial's ``retry_after`` is the earliest wait after which the denied charge fits,
  counting what its bucket and its lender can give together (refill, filling up,
  period resets, and what the same request already takes from them).

Whose time: every function here takes ``now`` from the store, never from a client.
The memory store reads its clock (one process). The SQLite store reads its clock but
never past the host's (``host_clock``) and never before the latest time already used
on the file (a high-water mark kept in the file). The Redis store uses the server's
``TIME`` for periods, refill and leases.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from budgetguard.periods import PeriodRule

__all__ = [
    "JOURNAL_REPORT",
    "BucketSpec",
    "BucketState",
    "Charge",
    "Denial",
    "ExpiredLease",
    "Held",
    "ReserveRequest",
    "ReserveResult",
    "Source",
    "Store",
    "apply_reserve",
    "apply_settle",
    "current_period",
    "full_after",
    "refresh",
    "retry_after",
]


@dataclass(frozen=True, slots=True)
class BucketSpec:
    """What a store needs to know about one bucket to do its arithmetic.

    Attributes:
        key: Unique bucket key (budget name + scope); stores escape or hash it.
        capacity: The budget's limit.
        refill_per_second: Continuous refill rate (0 for none).
        period: The calendar period the bucket resets at, as a rule the store evaluates
            on its own clock, or ``None`` when the budget has no period.
    """

    key: str
    capacity: float
    refill_per_second: float = 0.0
    period: PeriodRule | None = None


@dataclass(frozen=True, slots=True)
class Charge:
    """An amount to take from one bucket, optionally borrowing the shortfall from a pool."""

    bucket: BucketSpec
    amount: float
    lender: BucketSpec | None = None


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    """All charges of one model call, reserved together or not at all.

    Attributes:
        id: Unique reservation id (the guard uses the model run's id).
        charges: One charge per applicable budget.
        lease_seconds: How long the reservation may stay unsettled before a sweep
            charges it at the reserved amount.
        meta: Opaque JSON text kept with the lease (for reporting expired leases), or a
            function that returns it; a store that keeps leases in memory calls it only if
            the lease expires. Read it with :meth:`meta_text`.
    """

    id: str
    charges: tuple[Charge, ...]
    lease_seconds: float = 600.0
    meta: str | Callable[[], str] = ""

    def meta_text(self) -> str:
        """The lease's meta text (calls :attr:`meta` when it is a function)."""
        meta = self.meta
        return meta if isinstance(meta, str) else meta()


@dataclass(frozen=True, slots=True)
class Denial:
    """Why a reservation was refused: the first charge that could not be covered."""

    index: int
    key: str
    requested: float
    available: float
    retry_after: float | None


JOURNAL_REPORT = 100
"""Journal entries one reserve or sweep reports at most (the rest on later calls)."""


@dataclass(frozen=True, slots=True)
class ExpiredLease:
    """A reservation settled by a sweep because its lease ran out: an entry of the store's
    journal, reported by every reserve and sweep until acknowledged.

    Attributes:
        id: The reservation id (the guard's run id: the ledger records it under that id).
        amounts: What the sweep charged, per charge (the reserved amounts).
        meta: The lease's meta text (see :attr:`ReserveRequest.meta`).
    """

    id: str
    amounts: tuple[float, ...]
    meta: str


@dataclass(frozen=True, slots=True)
class ReserveResult:
    """Outcome of :meth:`Store.reserve`.

    Attributes:
        ok: Whether every charge was reserved.
        denial: Why not, when ``ok`` is false.
        expired: The journal's unacknowledged entries (at most :data:`JOURNAL_REPORT`),
            the leases this call swept included; reported on a denial too.
    """

    ok: bool
    denial: Denial | None = None
    expired: tuple[ExpiredLease, ...] = ()


class BucketState:
    """Mutable state of one bucket."""

    __slots__ = ("level", "period_start", "spent", "updated_at")

    def __init__(self, level: float, updated_at: float, period_start: float | None, spent: float = 0.0) -> None:
        self.level = level
        self.updated_at = updated_at
        self.period_start = period_start
        self.spent = spent

    def copy(self) -> BucketState:
        """Return an independent copy."""
        return BucketState(self.level, self.updated_at, self.period_start, self.spent)

    def __repr__(self) -> str:
        return f"BucketState(level={self.level!r}, updated_at={self.updated_at!r}, period_start={self.period_start!r}, spent={self.spent!r})"


@dataclass(slots=True)
class Held:
    """What one charge of an open reservation holds, per bucket.

    ``took`` and ``lent`` are the amounts taken from the bucket and from the lender;
    ``period`` and ``lender_period`` the period each was taken in.
    """

    bucket: BucketSpec
    lender: BucketSpec | None
    took: float
    lent: float
    period: float | None
    lender_period: float | None

    @property
    def total(self) -> float:
        """The whole amount reserved by this charge."""
        return self.took + self.lent


def current_period(spec: BucketSpec, now: float) -> float | None:
    """Start of the bucket's calendar period holding ``now`` (``None``: it has no period)."""
    return None if spec.period is None else spec.period.bounds(now)[0]


def refresh(state: BucketState | None, spec: BucketSpec, now: float) -> BucketState:
    """Bring a bucket up to ``now``: period reset, then continuous refill.

    Args:
        state: The stored state, or ``None`` for a bucket never used (it starts full).
        spec: The bucket's configuration.
        now: The store's current time.

    Returns:
        The same object (mutated) or a new full bucket.
    """
    period = current_period(spec, now)
    if state is None:
        return BucketState(spec.capacity, now, period)
    if period is not None and (state.period_start is None or period > state.period_start):
        state.level = spec.capacity
        state.period_start = period
        state.updated_at = now
        return state
    elapsed = now - state.updated_at
    if elapsed > 0:
        if spec.refill_per_second > 0 and state.level < spec.capacity:
            state.level = min(spec.capacity, state.level + spec.refill_per_second * elapsed)
        state.updated_at = now
    if state.level > spec.capacity:  # the limit was lowered since the bucket was written
        state.level = spec.capacity
    return state


Source = tuple[BucketState, BucketSpec, float]
"""A bucket a charge may draw on: its refreshed state, its spec, and what the same
request already plans to take from it."""


def retry_after(sources: Sequence[Source], amount: float, now: float) -> float | None:
    """Seconds until ``sources`` together can cover ``amount``, or ``None`` if they never can.

    A charge draws on its bucket and, when it borrows, on its lender too: it fits once
    what they can give together covers it. What a source can give, ``level - planned``
    (at least 0), grows while it refills (up to its capacity) and becomes
    ``capacity - planned`` when its period ends. The sum therefore grows piecewise
    linearly; the wait is found by walking from one change of slope (a source's level
    passing ``planned``, reaching its capacity, or resetting) to the next.
    """
    # Seconds until each source's period ends (inf: no period, or no end ahead of now).
    ends = []
    for _, spec, _ in sources:
        end = math.inf if spec.period is None else spec.period.bounds(now)[1] - now
        ends.append(end if end > 0 else math.inf)

    def level(i: int, at: float) -> float:
        """Source ``i``'s level ``at`` seconds from now."""
        state, spec, _ = sources[i]
        if at >= ends[i]:
            return spec.capacity
        return min(spec.capacity, state.level + spec.refill_per_second * at)

    changes = set(ends)
    for state, spec, planned in sources:
        if spec.refill_per_second > 0:
            changes.add((planned - state.level) / spec.refill_per_second)
            changes.add((spec.capacity - state.level) / spec.refill_per_second)
    at = 0.0
    for until in [*sorted(t for t in changes if 0 < t < math.inf), math.inf]:
        covered = sum(max(level(i, at) - source[2], 0.0) for i, source in enumerate(sources))
        if covered >= amount:
            return at
        # Each source is linear between two changes: its slope is read in the middle.
        middle = at + 1.0 if until == math.inf else (at + until) / 2
        slope = sum(
            spec.refill_per_second
            for i, (_, spec, planned) in enumerate(sources)
            if spec.refill_per_second > 0 and planned < level(i, middle) < spec.capacity
        )
        if slope > 0 and at + (amount - covered) / slope <= until:
            return at + (amount - covered) / slope
        at = until
    return None


def full_after(state: BucketState, spec: BucketSpec, now: float) -> float | None:
    """Seconds until the (refreshed) bucket is full again by itself, or ``None`` if never.

    What :func:`refresh` does, solved for the level reaching the capacity: refill gets
    there at ``(capacity - level) / refill_per_second``, a new period at the current one's
    end, whichever comes first; a bucket with neither fills only by a refund. A bucket
    that is full and that no reservation holds grants what a new bucket grants, so the
    stores forget it then.
    """
    if state.level >= spec.capacity:
        return 0.0
    wait = math.inf
    if spec.refill_per_second > 0:
        wait = (spec.capacity - state.level) / spec.refill_per_second
    if spec.period is not None:
        end = spec.period.bounds(now)[1] - now
        if 0 < end < wait:
            wait = end
    return None if wait == math.inf else wait


StateGetter = Callable[[BucketSpec], BucketState]


def apply_reserve(get: StateGetter, charges: Sequence[Charge], now: float) -> list[Held] | Denial:
    """Take every charge from its bucket (borrowing the shortfall), or refuse.

    ``get`` returns the (refreshed, mutable) state for a spec; the same object must be
    returned for the same key so charges on a shared bucket see each other. On a denial
    the caller discards the states it fetched (they were mutated only by refresh).

    Returns:
        The amounts held per charge, or the :class:`Denial` of the first charge that
        cannot be covered.
    """
    planned: dict[str, float] = {}  # key -> amount taken so far by this request
    held: list[Held] = []
    takes: list[tuple[BucketState, float]] = []  # (state, amount) to take once all are covered
    for index, charge in enumerate(charges):
        bucket = charge.bucket
        state = get(bucket)
        avail = max(state.level - planned.get(bucket.key, 0.0), 0.0) if planned else max(state.level, 0.0)
        took, lent = charge.amount, 0.0
        lender_state: BucketState | None = None
        if avail < took:
            short = took - avail
            if charge.lender is not None:
                lender_state = get(charge.lender)
                lender_avail = max(lender_state.level - planned.get(charge.lender.key, 0.0), 0.0)
            else:
                lender_avail = 0.0
            if lender_avail < short:
                sources: list[Source] = [(state, bucket, planned.get(bucket.key, 0.0))]
                if charge.lender is not None and lender_state is not None:
                    sources.append((lender_state, charge.lender, planned.get(charge.lender.key, 0.0)))
                wait = retry_after(sources, charge.amount, now)
                return Denial(index, bucket.key, charge.amount, avail + lender_avail, wait)
            took, lent = avail, short
        planned[bucket.key] = planned.get(bucket.key, 0.0) + took
        takes.append((state, took))
        if lent:
            assert charge.lender is not None and lender_state is not None
            planned[charge.lender.key] = planned.get(charge.lender.key, 0.0) + lent
            takes.append((lender_state, lent))
        held.append(
            Held(
                bucket,
                charge.lender if lent else None,
                took,
                lent,
                state.period_start,
                lender_state.period_start if lender_state is not None and lent else None,
            )
        )
    for state, amount in takes:
        state.level -= amount
    return held


def apply_settle(get: StateGetter, held: Sequence[Held], actuals: Sequence[float] | None) -> tuple[float, ...]:
    """Settle a reservation: refund or charge the difference, and count the spend.

    Args:
        get: Returns the refreshed, mutable state for a spec.
        held: What the reservation holds, per charge.
        actuals: What the call really cost per charge (same order), or ``None`` to
            charge exactly the reserved amounts (the expired-lease rule).

    Returns:
        The amounts finally charged per charge.
    """
    finals: list[float] = []
    for i, h in enumerate(held):
        final = h.total if actuals is None else float(actuals[i])
        delta = final - h.total
        state = get(h.bucket)
        lent_final = h.lent
        if delta < 0:
            refund = -delta
            back_to_lender = min(refund, h.lent)
            lent_final = h.lent - back_to_lender
            if h.lender is not None and back_to_lender:
                lender = get(h.lender)
                if lender.period_start == h.lender_period:
                    lender.level = min(h.lender.capacity, lender.level + back_to_lender)
            rest = refund - back_to_lender
            if rest and state.period_start == h.period:
                state.level = min(h.bucket.capacity, state.level + rest)
        elif delta > 0:
            state.level -= delta
        state.spent += final - lent_final
        if h.lender is not None and lent_final:
            get(h.lender).spent += lent_final
        finals.append(final)
    return tuple(finals)


@runtime_checkable
class Store(Protocol):
    """Where buckets and leases live. Every method is atomic; async twins never block.

    Implementations: :class:`~budgetguard.stores.MemoryStore`,
    :class:`~budgetguard.stores.SQLiteStore`, :class:`~budgetguard.stores.RedisStore`.
    """

    def reserve(self, request: ReserveRequest) -> ReserveResult:
        """Reserve every charge of ``request`` or none; also sweeps expired leases and
        reports the journal (see :class:`ReserveResult`)."""
        ...

    def settle(self, reservation_id: str, actuals: Sequence[float] | None) -> bool:
        """Settle a reservation once; ``False`` if unknown or already settled."""
        ...

    def snapshot(self, spec: BucketSpec) -> BucketState:
        """The bucket as of now (read-only; a never-used bucket reads full)."""
        ...

    def sweep(self) -> tuple[ExpiredLease, ...]:
        """Settle every reservation whose lease has expired, at its reserved amount, into
        the journal; return the journal's unacknowledged entries (at most
        :data:`JOURNAL_REPORT`)."""
        ...

    def acknowledge(self, ids: Sequence[str]) -> None:
        """Drop journal entries whose records are stored; unknown ids are ignored."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...

    async def areserve(self, request: ReserveRequest) -> ReserveResult:
        """Async :meth:`reserve`."""
        ...

    async def asettle(self, reservation_id: str, actuals: Sequence[float] | None) -> bool:
        """Async :meth:`settle`."""
        ...

    async def asnapshot(self, spec: BucketSpec) -> BucketState:
        """Async :meth:`snapshot`."""
        ...

    async def asweep(self) -> tuple[ExpiredLease, ...]:
        """Async :meth:`sweep`."""
        ...

    async def aacknowledge(self, ids: Sequence[str]) -> None:
        """Async :meth:`acknowledge`."""
        ...


def touched_specs(items: Sequence[Charge] | Sequence[Held]) -> Iterator[BucketSpec]:
    """The buckets that charges (or what a reservation holds) touch: each item's bucket, then
    its lender's when it has one (a bucket two items touch comes twice)."""
    for item in items:
        yield item.bucket
        if item.lender is not None:
            yield item.lender


def bucket_keys(items: Sequence[Charge] | Sequence[Held]) -> list[str]:
    """The keys of the buckets that charges (or what a reservation holds) touch.

    Each item's bucket, then its lender's; every key once, in first-seen order.
    """
    if len(items) == 1 and items[0].lender is None:  # the common case
        return [items[0].bucket.key]
    return list(dict.fromkeys(spec.key for spec in touched_specs(items)))
