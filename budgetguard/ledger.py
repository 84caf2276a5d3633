"""Cost ledger: one record per metered model call, kept across runs and queryable.

The guard hands every metered call (allowed, denied, fallen back, failed) to
:meth:`Ledger.record`. That call only appends to an in-memory queue; a background
writer thread drains the queue in batches into a *sink*:

* :class:`~budgetguard.ledger_sinks.SQLiteSink` (the default): one file, WAL mode, safe
  for several processes appending at once;
* :class:`~budgetguard.ledger_sinks.JSONLSink`: one JSON object per line;
* :class:`~budgetguard.ledger_sinks.MemorySink`: for tests.

Records left in the queue are flushed when the interpreter exits normally (``atexit``).
Queries (:meth:`Ledger.totals`, :meth:`Ledger.run_cost`, :meth:`Ledger.accuracy`,
:meth:`Ledger.records`) flush first, then read back from the sink.

Where the ledger lives by default, see :func:`default_ledger_path`.

Example:
    >>> ledger = Ledger(MemorySink())
    >>> ledger.totals(by="model")
    []
    >>> ledger.close()
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import os
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from budgetguard.errors import BudgetGuardError, ConfigurationError

if TYPE_CHECKING:  # at run time these come from the module __getattr__ below
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
    "Row",
    "SQLiteSink",
    "Sink",
    "check_ledger_path",
    "default_ledger_path",
    "open_ledger",
]

logger = logging.getLogger("budgetguard.ledger")

OUTCOMES: tuple[str, ...] = ("ok", "denied", "fell_back", "compressed", "cached", "cancelled", "error", "expired")
"""The outcomes the guard records (see :mod:`budgetguard.settlement`). ``denied``/``error``
are counted in query rows."""

LEDGER_ENV = "BUDGETGUARD_LEDGER"


class LedgerError(BudgetGuardError):
    """The ledger cannot be opened, read or written, or a query is malformed."""


class LedgerPathError(LedgerError, ConfigurationError):
    """A ledger path no file can be made at: under a regular file, or a directory itself."""


def check_ledger_path(ledger: Any) -> None:
    """Refuse a ledger path that cannot hold a ledger file, before anything is created.

    Args:
        ledger: The ``ledger=`` argument of a guard, or a :class:`Ledger`'s sink; only a
            path (other than ``":memory:"``) is checked.

    Raises:
        LedgerPathError: (a :class:`~budgetguard.errors.ConfigurationError`) If the path
            is a directory, or the nearest part of it that exists is a regular file, so
            its directories cannot be made.

    Example:
        >>> check_ledger_path("/etc/hostname/ledger.sqlite3")
        Traceback (most recent call last):
        ...
        budgetguard.ledger.LedgerPathError: ledger path /etc/hostname/ledger.sqlite3 cannot be created: /etc/hostname \
is a file, not a directory. Choose a path in a directory, or pass ledger=False for no ledger.
    """
    if not isinstance(ledger, (str, os.PathLike)) or str(ledger) == ":memory:":
        return
    path = Path(ledger).expanduser()
    if path.is_dir():
        msg = f"ledger path {ledger} is a directory; name a file in it, e.g. {path / 'ledger.sqlite3'}"
        raise LedgerPathError(msg)
    for parent in path.parents:  # the nearest one that exists decides whether the rest can be made
        if parent.exists():
            if not parent.is_dir():
                msg = (f"ledger path {ledger} cannot be created: {parent} is a file, not a directory. "
                       "Choose a path in a directory, or pass ledger=False for no ledger.")
                raise LedgerPathError(msg)
            return


# -- the record ------------------------------------------------------------------------


def _utc_day(ts: float) -> str:
    return _day_number(int(ts // 86400))


@functools.lru_cache(maxsize=256)
def _day_number(days: int) -> str:
    return datetime.fromtimestamp(days * 86400, timezone.utc).strftime("%Y-%m-%d")


def _jsonable(value: Any, depth: int = 0) -> Any:
    """Return ``value`` as strict JSON data (no NaN); anything else is ``str()``'d."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth < 16 and isinstance(value, Mapping):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if depth < 16 and isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in value]
    return str(value)


def _number(kind: Callable[[Any], Any]) -> Callable[[str, Any], Any]:
    def convert(name: str, value: Any) -> Any:
        if type(value) is kind and value - value == 0:  # fast path; x - x is nan for nan/inf
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            msg = f"ledger record field {name!r} must be a finite number, got {value!r}"
            raise LedgerError(msg)
        return kind(value)

    return convert


def _sequence(name: str, value: Any) -> list[str]:
    if isinstance(value, (str, bytes, Mapping)):
        msg = f"ledger record field {name!r} must be a list of strings, got {value!r:.80}"
        raise LedgerError(msg)
    return [v if type(v) is str else str(v) for v in value or ()]


def _mapping(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        msg = f"ledger record field {name!r} must be a JSON object, got {value!r:.80}"
        raise LedgerError(msg)
    if name == "metadata":
        return {str(k): _jsonable(v) for k, v in value.items()}
    return {str(k): v if type(v) is str else str(v) for k, v in value.items()}


def _text(name: str, value: Any) -> str | None:
    return value if value is None or type(value) is str else str(value)


def _required(name: str, value: Any) -> str:
    if value is None:
        msg = f"ledger record field {name!r} is required, got None"
        raise LedgerError(msg)
    return value if type(value) is str else str(value)


_float, _int = _number(float), _number(int)
_CONVERT: dict[str, Any] = {
    "ts": _float,
    "run_id": _required,
    "outcome": _required,
    "scope": _mapping,
    "metadata": _mapping,
    "tags": _sequence,
    "budgets": _sequence,
}
_CONVERT.update(
    {n: lambda n, v: None if v is None else _float(n, v) for n in ("cost_usd", "reserved_usd", "latency_s")}
)


@dataclass(frozen=True, slots=True)
class LedgerRecord:
    """One metered model call, including denied ones.

    Token counts are the provider's actual usage (0 for a denied call); ``estimated_*``
    are what the guard reserved before the call. ``scope``/``tags``/``metadata`` must not
    be mutated after the record is handed to :meth:`Ledger.record` (it is written later,
    on a background thread). Metadata values are stored as JSON; others are ``str()``'d.

    Attributes:
        ts: Unix seconds (UTC) when the call started.
        run_id: The model call's run id.
        root_run_id: The outermost run (the guarded chain invocation), if any.
        parent_run_id: The direct parent run, if any.
        scope: Budget scope values, e.g. ``{"user_id": "alice"}``.
        tags: Run tags.
        metadata: User metadata, e.g. ``{"feature": "summarizer"}``.
        model_requested: The model the caller asked for.
        model_used: The model that actually answered (``None`` when denied).
        policy: Overflow policy applied (``"cap_output"``, ``"cheaper_model"``,
            ``"compress"``, ``"wait"``) or ``None``.
        outcome: One of :data:`OUTCOMES`.
        cost_usd: Actual cost; ``None`` when the model has no price.
        reserved_usd: Cost reserved before the call, if priced.
        latency_s: Wall time of the call, if it ran.
        budgets: Names of the budgets the call touched.
        error: Denial or error message.
        prompt: Prompt text, kept only when the ledger was opened with ``store_text``.
        completion: Completion text, same rule as ``prompt``.
    """

    ts: float
    run_id: str
    root_run_id: str | None
    parent_run_id: str | None
    scope: Mapping[str, str]
    tags: tuple[str, ...]
    metadata: Mapping[str, Any]
    model_requested: str | None
    model_used: str | None
    policy: str | None
    outcome: str
    estimated_input_tokens: int
    estimated_output_tokens: int
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    reasoning_tokens: int
    cost_usd: float | None
    reserved_usd: float | None
    latency_s: float | None
    budgets: tuple[str, ...]
    error: str | None = None
    prompt: str | None = None
    completion: str | None = None

    @property
    def day(self) -> str:
        """The UTC calendar date of :attr:`ts` as ``YYYY-MM-DD``."""
        return _utc_day(self.ts)

    @property
    def scope_key(self) -> str:
        """The scope as one sortable string, e.g. ``"org=acme,user_id=alice"`` (``""`` if none)."""
        return ",".join(f"{k}={v}" for k, v in sorted((str(k), str(v)) for k, v in self.scope.items()))

    def to_dict(self) -> dict[str, Any]:
        """Return the record as strict JSON data (lists for tuples, strings for scope values).

        Raises:
            LedgerError: A field has a type that cannot be stored (e.g. text tokens).
        """
        return {name: convert(name, getattr(self, name)) for name, convert in _CONVERTERS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LedgerRecord:
        """Build a record from :meth:`to_dict` output; unknown keys are ignored.

        Raises:
            LedgerError: A required field is missing or a field has the wrong type.
        """
        if not isinstance(data, Mapping):
            msg = f"a ledger record must be a JSON object, got {type(data).__name__}"
            raise LedgerError(msg)
        missing = [name for name in ("ts", "run_id", "outcome") if data.get(name) is None]
        if missing:
            msg = f"ledger record lacks required field(s) {', '.join(missing)}: {dict(data)!r:.200}"
            raise LedgerError(msg)
        values = {}
        for name, convert in _CONVERTERS:
            value = data.get(name)
            values[name] = convert(name, _DEFAULTS.get(name) if value is None else value)
        values["tags"], values["budgets"] = tuple(values["tags"]), tuple(values["budgets"])
        return cls(**values)


_FIELD_NAMES = tuple(LedgerRecord.__dataclass_fields__)
_CONVERTERS = tuple((n, _CONVERT.get(n, _int if n.endswith("_tokens") else _text)) for n in _FIELD_NAMES)
_DEFAULTS: dict[str, Any] = {"scope": {}, "metadata": {}, "tags": (), "budgets": ()}
_DEFAULTS.update({n: 0 for n in _FIELD_NAMES if n.endswith("_tokens")})


def default_ledger_path() -> Path:
    """Return where the ledger is kept when no sink or path is given.

    In order: the ``BUDGETGUARD_LEDGER`` environment variable (a path; ``.jsonl`` selects
    the JSONL format); otherwise ``budgetguard/ledger.sqlite3`` inside the user data dir:
    ``$XDG_DATA_HOME`` or ``~/.local/share`` on Linux and other Unixes,
    ``~/Library/Application Support`` on macOS and ``%LOCALAPPDATA%`` on Windows.
    The directory is created when the ledger is first opened for writing.
    """
    env = os.environ.get(LEDGER_ENV)
    if env:
        return Path(env).expanduser()
    home = Path.home()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        xdg = os.environ.get("XDG_DATA_HOME")
        base = Path(xdg) if xdg and os.path.isabs(xdg) else home / ".local" / "share"
    return base / "budgetguard" / "ledger.sqlite3"


# Submodules import the names above from this (possibly half-initialised) module, so they
# are imported as modules, after those names exist, and used through attribute access.
from budgetguard import ledger_query as _query  # noqa: E402
from budgetguard import ledger_sinks as _sinks  # noqa: E402

_LAZY_EXPORTS = {"Sink", "SQLiteSink", "JSONLSink", "MemorySink", "Row", "AccuracyRow"}


def __getattr__(name: str) -> Any:  # re-exports, resolved lazily so any import order works
    if name not in _LAZY_EXPORTS:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    return getattr(_query if name.endswith("Row") else _sinks, name)


# -- the facade --------------------------------------------------------------------------

_OPEN_LEDGERS: weakref.WeakSet[Ledger] = weakref.WeakSet()


class Ledger:
    """Records metered calls without slowing them down, and answers cost questions.

    Args:
        sink: Where records go: a :class:`Sink` (anything with ``write(records)`` and
            ``close()``), a path (``.jsonl``/``.ndjson`` for JSONL, anything else SQLite),
            ``":memory:"`` for a :class:`MemorySink`, or ``None`` for
            :func:`default_ledger_path`.
        store_text: Keep ``prompt``/``completion`` text; stripped by default.
        batch_size: The writer wakes up as soon as this many records wait, and writes
            at most this many per sink call.
        flush_interval: Otherwise it writes whatever waits every this many seconds.
        max_pending: Records held in memory while the sink fails (they are retried with
            backoff); records beyond this are dropped and counted in :attr:`dropped`.

    Raises:
        LedgerError: The path is not a usable ledger (corrupt, another database, ...);
            a :class:`LedgerPathError` when no file can be made there.
    """

    def __init__(
        self,
        sink: Sink | str | os.PathLike[str] | None = None,
        *,
        store_text: bool = False,
        batch_size: int = 256,
        flush_interval: float = 0.5,
        max_pending: int = 100_000,
    ) -> None:
        if batch_size < 1 or flush_interval <= 0 or max_pending < batch_size:
            msg = "Ledger needs batch_size >= 1, flush_interval > 0 and max_pending >= batch_size"
            raise LedgerError(msg)
        check_ledger_path(sink)
        self._sink: Sink = _sinks.sink_for(sink)
        self._store_text = store_text
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._max_pending = max_pending
        self._pending: deque[LedgerRecord] = deque()
        self._dropped = 0
        self._closed = False
        self._init_sync()
        _OPEN_LEDGERS.add(self)

    def _init_sync(self) -> None:  # also run in a forked child: fresh locks, no thread
        self._lock = threading.Lock()
        self._cv = threading.Condition()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._flush_requested = self._flush_done = 0
        self._last_error: BaseException | None = None
        self._warned: set[str] = set()

    @property
    def sink(self) -> Sink:
        """The sink records are written to."""
        return self._sink

    @property
    def pending(self) -> int:
        """Records recorded but not yet written."""
        return len(self._pending)

    @property
    def dropped(self) -> int:
        """Records lost: queue full, recorded after close, or not storable."""
        return self._dropped

    # -- hot path ------------------------------------------------------------------------

    def record(self, rec: LedgerRecord) -> None:
        """Queue one call's record: O(1), never waits for I/O, never raises.

        ``prompt``/``completion`` are stripped unless the ledger keeps text.
        """
        if not self._store_text and (rec.prompt is not None or rec.completion is not None):
            rec = replace(rec, prompt=None, completion=None)
        pending = self._pending
        if len(pending) >= self._max_pending or self._closed:
            self._drop("closed" if self._closed else "full")
            return
        pending.append(rec)
        if self._thread is None:
            self._start()
        if len(pending) >= self._batch_size:
            self._wake.set()

    def _drop(self, why: str, count: int = 1) -> None:
        self._dropped += count
        if why not in self._warned:
            self._warned.add(why)
            hint = {
                "closed": "the ledger is closed; record before close()",
                "full": f"{self._max_pending} records wait unwritten: the sink is failing or slower than the calls",
            }.get(why, why)
            logger.warning("ledger %r: dropping records: %s", self._sink, hint)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None and not self._closed:
                thread = threading.Thread(target=self._run, name="budgetguard-ledger", daemon=True)
                thread.start()
                self._thread = thread

    # -- writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while True:
            self._wake.wait(min(self._flush_interval * 2**failures, 30.0))
            self._wake.clear()
            with self._cv:
                requested, stop = self._flush_requested, self._stop
            failures = 0 if self._drain() else min(failures + 1, 16)
            with self._cv:
                self._flush_done = requested
                self._cv.notify_all()
            if stop:
                return

    def _drain(self) -> bool:
        """Write every pending record in batches; on a sink error put the batch back."""
        pending = self._pending
        while pending:
            batch: list[LedgerRecord] = []
            try:
                while len(batch) < self._batch_size:
                    batch.append(pending.popleft())
            except IndexError:
                pass
            try:
                self._sink.write(batch)
            except Exception as exc:  # a sink failure must never escape
                valid = self._storable(batch)
                if len(valid) < len(batch):  # a malformed record, not the sink: retry the rest
                    pending.extendleft(reversed(valid))
                    continue
                pending.extendleft(reversed(batch))
                self._last_error = exc
                if "write" in self._warned:
                    logger.debug("ledger sink %r still failing: %s", self._sink, exc)
                else:
                    self._warned.add("write")
                    logger.warning(
                        "ledger sink %r failed; keeping %d records to retry: %s", self._sink, len(pending), exc
                    )
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

    # -- flushing and closing ----------------------------------------------------------

    def flush(self, timeout: float | None = None) -> None:
        """Block until every record recorded before this call is written.

        Raises:
            LedgerError: The sink failed (the records are kept and retried) or
                ``timeout`` seconds passed first.
        """
        thread = self._thread
        if thread is None or not thread.is_alive():
            with self._lock:
                if not self._closed:
                    self._drain()
        else:
            with self._cv:
                self._flush_requested += 1
                target = self._flush_requested
                self._wake.set()
                done = self._cv.wait_for(lambda: self._flush_done >= target or not thread.is_alive(), timeout)
            if not done:
                msg = f"ledger flush timed out after {timeout} s with {len(self._pending)} records unwritten"
                raise LedgerError(msg)
        if self._pending and self._last_error is not None:
            msg = (
                f"ledger sink {self._sink!r} is failing; {len(self._pending)} records are kept in memory "
                f"and retried: {self._last_error}"
            )
            raise LedgerError(msg) from self._last_error

    def close(self, timeout: float | None = 30.0) -> None:
        """Write what is pending, stop the writer and close the sink. Never raises.

        Safe to call twice. Records that still cannot be written are logged as lost.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is not None and thread.is_alive():
            with self._cv:
                self._stop = True
            self._wake.set()
            thread.join(timeout)
        else:
            self._drain()
        if self._pending:
            logger.error("ledger %r closed with %d records that could not be written", self._sink, len(self._pending))
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
    """Open an existing ledger file for querying; SQLite or JSONL is told by its content.

    Args:
        path: The ledger file; ``None`` for :func:`default_ledger_path`.

    Raises:
        LedgerError: The file does not exist or is not a budgetguard ledger.
    """
    return Ledger(_sinks.open_existing(Path(path) if path is not None else default_ledger_path()))


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
