"""Cost ledger: one record per metered model call, kept across runs and queryable.

The guard hands every metered call (allowed, denied, fallen back, failed, expired) to
:meth:`Ledger.record`, which returns once the record is stored: a process killed right
after loses nothing. Concurrent callers share one write ("group commit"): whoever finds the
sink idle writes every record waiting at that moment. Records go to a *sink*:

* :class:`~budgetguard.ledger_sinks.SQLiteSink` (the default): one file, WAL mode, safe
  for several processes of one machine;
* :class:`~budgetguard.ledger_postgres.PostgresSink`: a ``postgresql://`` URL, one ledger
  for many machines (``pip install 'budgetguard[postgres]'``);
* :class:`~budgetguard.ledger_sinks.JSONLSink`: one JSON object per line;
* :class:`~budgetguard.ledger_sinks.MemorySink`: for tests.

A ledger keeps one record per call (its run id): when a lease expires because the process
died after recording its call but before settling it, the ``expired`` record replaces the
charge of the earlier one, so the ledger always says what the store charged (see
:mod:`budgetguard.ledger_sql`).

When a sink fails, records are kept in memory and retried by a background thread, so
model calls never wait on a broken ledger; :meth:`Ledger.flush` raises until it recovers.
Queries (:meth:`Ledger.totals`, :meth:`Ledger.run_cost`, :meth:`Ledger.accuracy`,
:meth:`Ledger.records`) read back from the sink.

Where the ledger lives by default, see :func:`default_ledger_location`.

Example:
    >>> ledger = Ledger(MemorySink())
    >>> ledger.totals(by="model")
    []
    >>> ledger.close()
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from budgetguard import ledger_query as _query
from budgetguard import ledger_sinks as _sinks
from budgetguard.ledger_records import (  # noqa: F401  (re-exported: ledger.X keeps working)
    LEDGER_ENV,
    OUTCOMES,
    LedgerError,
    LedgerPathError,
    LedgerRecord,
    check_ledger_path,
    default_ledger_location,
    default_ledger_path,
)

if TYPE_CHECKING:  # at run time these come from the module __getattr__ below
    from budgetguard.ledger_postgres import PostgresSink
    from budgetguard.ledger_query import AccuracyRow, Row
    from budgetguard.ledger_sinks import JSONLSink, MemorySink, Sink, SQLiteSink

__all__ = [
    "OUTCOMES",
    "AccuracyRow",
    "JSONLSink",
    "Ledger",
    "LedgerError",
    "LedgerPathError",
    "LedgerRecord",
    "MemorySink",
    "PostgresSink",
    "Row",
    "SQLiteSink",
    "Sink",
    "check_ledger_path",
    "default_ledger_location",
    "default_ledger_path",
    "open_ledger",
]

logger = logging.getLogger("budgetguard.ledger")

_LAZY_EXPORTS = {"Sink", "SQLiteSink", "JSONLSink", "MemorySink", "PostgresSink", "Row", "AccuracyRow"}


def __getattr__(name: str) -> Any:  # re-exports, resolved lazily so any import order works
    if name not in _LAZY_EXPORTS:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    if name == "PostgresSink":
        from budgetguard import ledger_postgres

        return ledger_postgres.PostgresSink
    return getattr(_query if name.endswith("Row") else _sinks, name)


# -- the facade --------------------------------------------------------------------------

_OPEN_LEDGERS: weakref.WeakSet[Ledger] = weakref.WeakSet()


class Ledger:
    """Records metered calls durably, and answers cost questions.

    Args:
        sink: Where records go: a :class:`Sink` (anything with ``write(records)`` and
            ``close()``), a ``postgresql://`` URL, a path (``.jsonl``/``.ndjson`` for
            JSONL, anything else SQLite), ``":memory:"`` for a :class:`MemorySink`, or
            ``None`` for :func:`default_ledger_location`.
        store_text: Keep ``prompt``/``completion`` text; stripped by default.
        batch_size: At most this many records per sink write.
        retry_interval: Seconds before the first retry of a failing sink (doubling, up
            to 30 s).
        max_pending: Records held in memory while the sink fails; records beyond this
            are dropped and counted in :attr:`dropped`.

    Raises:
        LedgerError: The sink cannot be opened (corrupt file, another database,
            unreachable server, ...); a :class:`LedgerPathError` when no file can be
            made at the path.
    """

    def __init__(
        self,
        sink: Sink | str | os.PathLike[str] | None = None,
        *,
        store_text: bool = False,
        batch_size: int = 256,
        retry_interval: float = 0.5,
        max_pending: int = 100_000,
    ) -> None:
        if batch_size < 1 or retry_interval <= 0 or max_pending < batch_size:
            msg = "Ledger needs batch_size >= 1, retry_interval > 0 and max_pending >= batch_size"
            raise LedgerError(msg)
        check_ledger_path(sink)
        self._sink: Sink = _sinks.sink_for(sink)
        self._store_text = store_text
        self._batch_size = batch_size
        self._retry_interval = retry_interval
        self._max_pending = max_pending
        self._closed = False
        self._dropped = 0
        self._init_sync()
        _OPEN_LEDGERS.add(self)

    def _init_sync(self) -> None:  # also run in a forked child: fresh locks, nothing pending
        # One condition guards the queue and the counters; it is released during a write.
        self._state = threading.Condition(threading.Lock())
        self._pending: deque[LedgerRecord] = deque()
        self._queued = 0  # records ever queued
        self._handled = 0  # of those, how many a write has taken care of (written, or kept to retry)
        self._writing = False  # a write is in progress (one at a time)
        self._failing = False  # the sink failed: records wait for the retry thread
        self._retrier: threading.Thread | None = None
        self._last_error: BaseException | None = None
        self._warned: set[str] = set()

    @property
    def sink(self) -> Sink:
        """The sink records are written to."""
        return self._sink

    @property
    def pending(self) -> int:
        """Records recorded but not yet written (kept while the sink fails)."""
        return len(self._pending)

    @property
    def dropped(self) -> int:
        """Records lost: queue full, recorded after close, or not storable."""
        return self._dropped

    # -- the call path -------------------------------------------------------------------

    def record(self, rec: LedgerRecord) -> None:
        """Store one call's record; return once it is stored. Never raises.

        Callers share writes: the first to find no write in progress writes every record
        waiting at that moment; the others wait for a write that carries theirs (or take
        the next turn). While the sink is failing, the record is kept in memory for the
        retry thread instead and the call returns at once (one warning says so).
        ``prompt``/``completion`` are stripped unless the ledger keeps text.
        """
        if not self._store_text and (rec.prompt is not None or rec.completion is not None):
            rec = replace(rec, prompt=None, completion=None)
        with self._state:
            if self._closed or len(self._pending) >= self._max_pending:
                self._drop("closed" if self._closed else "full")
                return
            self._pending.append(rec)
            self._queued += 1
            mine = self._queued
            while self._handled < mine and not self._failing:
                if self._writing:
                    self._state.wait()
                else:
                    self._write_pending()

    def _write_pending(self) -> bool:
        """Write everything queued, in batches; on failure keep the rest for the retry thread.

        The caller holds ``_state`` and no write is in progress; ``_state`` is released
        while the sink writes. Returns whether everything was written.
        """
        batch, upto = list(self._pending), self._queued
        self._pending.clear()
        self._writing = True
        unwritten: list[LedgerRecord] = batch
        self._state.release()
        try:
            for start in range(0, len(batch), self._batch_size):
                if not self._write(batch[start : start + self._batch_size]):
                    break
                unwritten = batch[start + self._batch_size :]
        finally:  # also on KeyboardInterrupt: nothing taken is lost
            self._state.acquire()
            self._writing = False
            self._handled = upto
            if unwritten:
                self._pending.extendleft(reversed(unwritten))
                self._failing = True
                self._start_retrier()
            self._state.notify_all()
        return not unwritten

    def _write(self, chunk: list[LedgerRecord]) -> bool:
        try:
            self._sink.write(chunk)
        except Exception as exc:  # noqa: BLE001 - a sink failure must never escape into a model call
            valid = self._storable(chunk)
            if len(valid) < len(chunk):  # a malformed record, not the sink: write the rest
                return not valid or self._write(valid)
            self._last_error = exc
            if "write" in self._warned:
                logger.debug("ledger sink %r still failing: %s", self._sink, exc)
            else:
                self._warned.add("write")
                logger.warning("ledger sink %r failed; keeping records in memory to retry: %s", self._sink, exc)
            return False
        if self._last_error is not None:
            logger.warning("ledger sink %r recovered; writing the records kept meanwhile", self._sink)
            self._last_error = None
            self._warned.discard("write")
        return True

    def _storable(self, batch: list[LedgerRecord]) -> list[LedgerRecord]:
        valid = []
        for rec in batch:
            try:
                rec.to_dict()
            except Exception as exc:  # noqa: BLE001 - logged, never raised
                self._drop(f"a record cannot be stored ({exc})")
            else:
                valid.append(rec)
        return valid

    def _drop(self, why: str, count: int = 1) -> None:
        self._dropped += count
        if why not in self._warned:
            self._warned.add(why)
            hint = {
                "closed": "the ledger is closed; record before close()",
                "full": f"{self._max_pending} records wait unwritten: the sink is failing",
            }.get(why, why)
            logger.warning("ledger %r: dropping records: %s", self._sink, hint)

    def _turn(self, timeout: float | None = None) -> bool:
        """Wait (holding ``_state``) until no write is in progress; ``False`` on timeout."""
        return self._state.wait_for(lambda: not self._writing, timeout)

    # -- while the sink fails ------------------------------------------------------------

    def _start_retrier(self) -> None:  # called holding _state
        if self._retrier is None and not self._closed:
            self._retrier = threading.Thread(target=self._retry, name="budgetguard-ledger-retry", daemon=True)
            self._retrier.start()

    def _retry(self) -> None:
        delay = self._retry_interval
        while True:
            time.sleep(delay)
            with self._state:
                self._turn()
                if self._closed:
                    return
                if self._write_pending() and not self._pending:  # checked holding _state: none slips by
                    self._failing = False
                    self._retrier = None
                    return
            delay = min(delay * 2, 30.0)

    # -- flushing and closing ----------------------------------------------------------

    def flush(self, timeout: float | None = None) -> None:
        """Write every record kept in memory now.

        Records are written as they are recorded; this only matters while the sink fails.

        Raises:
            LedgerError: The sink still fails (the records stay kept and retried), or
                another write held the sink for ``timeout`` seconds.
        """
        with self._state:
            if not self._turn(timeout):
                msg = f"ledger flush timed out after {timeout} s with {len(self._pending)} records unwritten"
                raise LedgerError(msg)
            if self._pending and not self._closed:
                self._write_pending()
            if self._pending and self._last_error is not None:
                msg = (
                    f"ledger sink {self._sink!r} is failing; {len(self._pending)} records are kept in memory "
                    f"and retried: {self._last_error}"
                )
                raise LedgerError(msg) from self._last_error

    def close(self, timeout: float | None = 30.0) -> None:
        """Try once more to write what is kept, then close the sink. Never raises.

        Safe to call twice. Records that still cannot be written are logged as lost.
        """
        with self._state:
            if self._closed:
                return
            self._closed = True
            if self._turn(timeout) and self._pending:
                self._write_pending()
            if self._pending:
                logger.error(
                    "ledger %r closed with %d records that could not be written", self._sink, len(self._pending)
                )
                self._dropped += len(self._pending)
                self._pending.clear()
        try:
            self._sink.close()
        except Exception as exc:  # noqa: BLE001 - logged, never raised
            logger.warning("closing ledger sink %r failed: %s", self._sink, exc)
        _OPEN_LEDGERS.discard(self)

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({self._sink!r}, pending={len(self._pending)}, closed={self._closed})"

    # -- queries ------------------------------------------------------------------------

    def totals(
        self,
        *,
        by: str | Sequence[str] = (),
        since: Any = None,
        until: Any = None,
        where: Mapping[str, Any] | None = None,
        top: int | None = None,
    ) -> list[Row]:
        """Sum calls, tokens and cost, grouped by one or more dimensions.

        Args:
            by: Dimension name(s): ``"day"`` (UTC), ``"month"``, ``"model"`` (model used; a denied call's requested model),
                ``"model_requested"``, ``"outcome"``, ``"policy"``, ``"run"`` (root run, or
                the call itself if it has none), ``"tag"``, ``"budget"``, ``"scope"`` (the
                whole scope as ``"k=v,..."``), ``"scope:KEY"``, ``"meta:KEY"``; aliases
                ``"user"`` = ``"scope:user_id"``, ``"feature"`` = ``"meta:feature"``.
                ``"tag"`` and ``"budget"`` give one row per value: a call with two tags
                counts in both rows (calls with none in a ``None`` row), so such rows can
                add up to more than the overall total.
            since: Start, inclusive: ``datetime`` (naive = UTC), ``date``, ISO string,
                unix seconds, ``"today"``, ``"yesterday"`` or an age like ``"7d"``/``"12h"``.
            until: End, exclusive; same forms.
            where: Filters ``{dimension: value or list of values}``; all must match.
            top: Keep only the ``top`` costliest groups (by cost, then tokens).

        Returns:
            :class:`Row` objects keyed by the names given in ``by``, sorted by group value
            (``None`` last), or by cost when ``top`` is given. Without ``by``: one row.

        Raises:
            LedgerError: Unknown dimension, unreadable time, or an unreadable ledger.
        """
        self.flush()
        return _query.totals(self._sink, by=by, since=since, until=until, where=where, top=top)

    def run_cost(self, root_run_id: str) -> Row:
        """Totals of one run and every call nested in it (a zero :class:`Row` if unknown)."""
        self.flush()
        rows = _query.totals(self._sink, by="run", where={"run": root_run_id})
        return rows[0] if rows else _query.Row(group={"run": root_run_id})

    def accuracy(self, *, by: str | Sequence[str] = "model", since: Any = None, until: Any = None) -> list[AccuracyRow]:
        """Reserved (estimated) versus used tokens and cost, per group.

        Only calls with outcome ``ok``, ``fell_back`` or ``compressed`` count. See
        :class:`AccuracyRow` (``headroom_ratio`` = reserved / used tokens).
        """
        self.flush()
        return _query.accuracy(self._sink, by=by, since=since, until=until)

    def records(self, *, since: Any = None, until: Any = None) -> Iterator[LedgerRecord]:
        """The stored records with ``since <= ts < until``, oldest first."""
        self.flush()
        lo, hi = _query.time_range(since, until)
        return _sinks.read_records(self._sink, lo, hi)


def open_ledger(path: str | os.PathLike[str] | None = None) -> Ledger:
    """Open an existing ledger for querying: a file (SQLite or JSONL, told by its content)
    or a ``postgresql://`` URL.

    Args:
        path: The ledger file or URL; ``None`` for :func:`default_ledger_location`.

    Raises:
        LedgerError: There is no ledger there, or it is not a budgetguard ledger.
    """
    return Ledger(_sinks.open_existing(default_ledger_location() if path is None else path))


def _close_all() -> None:
    for ledger in list(_OPEN_LEDGERS):
        ledger.close()


def _after_fork_in_child() -> None:
    # The parent writes its own pending records; the child starts empty with fresh locks.
    for ledger in list(_OPEN_LEDGERS):
        ledger._pending.clear()
        ledger._init_sync()


atexit.register(_close_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
