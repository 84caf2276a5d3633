"""Ledger queries: time ranges, grouping dimensions, totals and estimate accuracy.

Every query is one SQL ``GROUP BY`` over the ``calls`` table, written in the sink's
:class:`~budgetguard.ledger_sql.Dialect`. SQLite and PostgreSQL sinks run it themselves;
other readable sinks (JSONL) are first copied, for the queried time range only, into a
scratch in-memory SQLite ledger. So every sink answers identically.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any

from budgetguard import ledger_sinks as _sinks
from budgetguard.ledger_records import LedgerError
from budgetguard.ledger_sql import Dialect

__all__ = ["DIMENSIONS", "AccuracyRow", "Row", "parse_time", "resolve_dimensions", "select_top", "time_range"]

TIME_FORMATS = (
    "a datetime or date, unix seconds, an ISO date or time ('2026-11-01', '2026-11-01T12:00', "
    "'2026-11-01T12:00:00+01:00'), 'today', 'yesterday', or an age such as '7d', '12h', '30m'"
)
ALIASES = {"user": "scope:user_id", "feature": "meta:feature", "date": "day", "model_used": "model"}
_SIMPLE = {
    # The model that answered; for a call refused before it was sent, the model it asked for.
    "model": "COALESCE(calls.model_used, calls.model_requested)",
    "model_requested": "calls.model_requested",
    "outcome": "calls.outcome",
    "policy": "calls.policy",
    "day": "calls.day",
    "month": "substr(calls.day, 1, 7)",
    "run": "COALESCE(calls.root_run_id, calls.run_id)",
    "scope": "NULLIF(calls.scope_key, '')",
}
DIMENSIONS = (*_SIMPLE, "tag", "budget", "scope:KEY", "meta:KEY", *ALIASES)
COMPLETED = ("ok", "fell_back", "compressed")
_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([dhm])$")


# -- time ------------------------------------------------------------------------------


def parse_time(value: Any, *, name: str = "time", now: float | None = None) -> float | None:
    """Turn a time bound into unix seconds; ``None`` stays ``None`` (unbounded).

    Naive datetimes and ISO strings without an offset are UTC; a date is its UTC midnight.

    Raises:
        LedgerError: The value is none of the accepted forms (listed in the message).
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=timezone.utc).timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        now = time.time() if now is None else now
        midnight = datetime.fromtimestamp(now, timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
        age = _AGE.match(text)
        if text in ("today", "yesterday"):
            return (midnight - timedelta(days=1 if text == "yesterday" else 0)).timestamp()
        if age:
            return now - float(age.group(1)) * {"d": 86400, "h": 3600, "m": 60}[age.group(2)]
        try:
            return float(text)
        except ValueError:
            pass
        try:
            return parse_time(datetime.fromisoformat(text.upper().replace("Z", "+00:00")))
        except ValueError:
            pass
    msg = f"cannot read {name} {value!r}: use {TIME_FORMATS}"
    raise LedgerError(msg)


def time_range(since: Any, until: Any) -> tuple[float | None, float | None]:
    """Parse ``since``/``until`` into a half-open ``[since, until)`` range."""
    return parse_time(since, name="since"), parse_time(until, name="until")


# -- dimensions ------------------------------------------------------------------------


@dataclass(frozen=True)
class Dimension:
    """One grouping/filter axis. ``name`` is what the caller wrote (the row key)."""

    name: str
    kind: str  # a key of _SIMPLE, or tag | budget | scope_of | meta
    arg: str = ""

    def sql(self, dialect: Dialect, alias: str) -> tuple[list[str], str]:
        """SELECT expression(s) (meta: JSON type and value) and a JOIN clause, if any."""
        if self.kind in ("tag", "budget"):
            return [f"{alias}.value"], dialect.join_elements(self.kind + "s", alias)
        if self.kind == "meta":
            return list(dialect.member("metadata", self.arg)), ""
        if self.kind == "scope_of":
            return [dialect.member_text("scope", self.arg)], ""
        return [_SIMPLE[self.kind]], ""

    def decode(self, dialect: Dialect, columns: Sequence[Any]) -> Any:
        """Turn this dimension's SQL column(s) back into the Python group value."""
        return dialect.decode_member(*columns) if self.kind == "meta" else columns[0]

    def where(self, dialect: Dialect, wanted: Sequence[Any]) -> tuple[str, list[Any]]:
        """A WHERE clause true when this axis has any of the ``wanted`` values."""
        parts: list[str] = []
        params: list[Any] = []
        mark = dialect.param
        if self.kind in ("tag", "budget"):
            column = self.kind + "s"
            if None in wanted:
                parts.append(f"{dialect.array_length(column)} = 0")
            named = [str(w) for w in wanted if w is not None]
            if named:
                marks = ", ".join([mark] * len(named))
                parts.append(f"EXISTS (SELECT 1 FROM {dialect.elements(column, 'e')} WHERE e.value IN ({marks}))")
                params.extend(named)
        elif self.kind == "meta":
            jtype, value = dialect.member("metadata", self.arg)
            for w in wanted:
                if w is None:
                    parts.append(f"({jtype} IS NULL OR {jtype} = 'null')")
                    continue
                json_value = w if isinstance(w, (bool, int, float, dict, list)) else str(w)
                equal, extra = dialect.member_equals(value, json_value)
                parts.append(f"({jtype} IN ({_json_types(w)}) AND {equal})")
                params.extend(extra)
        else:
            (expr,) = self.sql(dialect, "")[0]
            for w in wanted:
                parts.append(f"{expr} IS NULL" if w is None else f"{expr} = {mark}")
                params.extend([] if w is None else [str(w)])
        return "(" + " OR ".join(parts or ["1 = 0"]) + ")", params


def _json_types(value: Any) -> str:
    """The JSON type names a member must have to equal ``value``."""
    if isinstance(value, bool):
        return "'boolean'"
    if isinstance(value, (int, float)):
        return "'number'"
    if isinstance(value, (dict, list)):
        return "'object', 'array'"
    return "'string'"


def _typed(value: Any) -> tuple[int, Any]:
    """A sortable, hashable key: booleans, then numbers (1 == 1.0), then strings."""
    if isinstance(value, bool):
        return (0, value)
    if isinstance(value, (int, float)):
        return (1, float(value))
    return (2, str(value))


def resolve_dimensions(by: str | Sequence[str]) -> list[Dimension]:
    """Parse ``by`` (one name or several) into dimensions.

    Raises:
        LedgerError: An unknown or repeated name (the message lists the accepted ones).
    """
    names = [by] if isinstance(by, str) else list(by)
    dims = []
    for name in names:
        real = ALIASES.get(name, name) if isinstance(name, str) else ""
        prefix, _, key = real.partition(":")
        if real in _SIMPLE or real in ("tag", "budget"):
            dims.append(Dimension(name, real))
        elif prefix in ("scope", "meta") and key and not any(c in key for c in '"\\'):
            dims.append(Dimension(name, "scope_of" if prefix == "scope" else "meta", key))
        else:
            msg = f"unknown ledger dimension {name!r}; use one of: {', '.join(DIMENSIONS)}"
            raise LedgerError(msg)
    if len({d.name for d in dims}) != len(dims):
        msg = f"ledger dimensions must not repeat: {names!r}"
        raise LedgerError(msg)
    return dims


# -- rows --------------------------------------------------------------------------------


class _RowMixin:
    group: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The group values followed by the metrics, as one flat dict."""
        out = dict(self.group)
        out.update({n: getattr(self, n) for n in self.__dataclass_fields__ if n != "group"})  # type: ignore[attr-defined]
        return out

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]


@dataclass(frozen=True)
class Row(_RowMixin):
    """Totals of one group; ``row["user"]`` reads a group value or a metric.

    ``total_tokens`` is input + output tokens (cached input is part of input, reasoning
    part of output). ``cost_usd`` sums the priced calls and is ``None`` when no call in
    the group had a price; ``unpriced_calls`` counts calls that used tokens but have no
    price. ``estimated_tokens`` is what was reserved (estimated input + output).
    ``denied``/``errors`` count calls with outcome ``denied``/``error``.
    """

    group: Mapping[str, Any] = field(default_factory=dict)
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    estimated_tokens: int = 0
    cost_usd: float | None = None
    unpriced_calls: int = 0
    denied: int = 0
    errors: int = 0
    first_ts: float | None = None
    last_ts: float | None = None


@dataclass(frozen=True)
class AccuracyRow(_RowMixin):
    """Estimate accuracy of one group's completed calls.

    ``headroom_ratio`` is reserved / used tokens: 1.0 is exact, above 1 over-reserves
    (budget is held, then refunded), below 1 under-reserves (a budget can be overspent);
    ``under_reserved`` counts calls that used more than they reserved. ``input_error`` is
    sum(|estimated - actual input|) / sum(actual input). ``reserved_usd``, ``cost_usd`` and
    ``usd_headroom_ratio`` cover the calls that have both a reserved and an actual cost.
    """

    group: Mapping[str, Any] = field(default_factory=dict)
    calls: int = 0
    estimated_input_tokens: int = 0
    input_tokens: int = 0
    estimated_output_tokens: int = 0
    output_tokens: int = 0
    reserved_tokens: int = 0
    used_tokens: int = 0
    headroom_ratio: float | None = None
    input_error: float | None = None
    under_reserved: int = 0
    reserved_usd: float | None = None
    cost_usd: float | None = None
    usd_headroom_ratio: float | None = None


# -- aggregation -------------------------------------------------------------------------

def _count(condition: str) -> str:
    """How many rows meet ``condition`` (PostgreSQL cannot sum booleans)."""
    return f"SUM(CASE WHEN {condition} THEN 1 ELSE 0 END)"


_BOTH_USD = "(calls.reserved_usd IS NOT NULL AND calls.cost_usd IS NOT NULL)"
_EST = "calls.estimated_input_tokens + calls.estimated_output_tokens"
_USED = "calls.input_tokens + calls.output_tokens"
TOTAL_METRICS = {
    "calls": "SUM(1)",
    "input_tokens": "SUM(calls.input_tokens)",
    "output_tokens": "SUM(calls.output_tokens)",
    "cached_input_tokens": "SUM(calls.cached_input_tokens)",
    "reasoning_tokens": "SUM(calls.reasoning_tokens)",
    "estimated_tokens": f"SUM({_EST})",
    "cost_sum": "SUM(COALESCE(calls.cost_usd, 0.0))",
    "cost_n": _count("calls.cost_usd IS NOT NULL"),
    "unpriced_calls": _count(f"calls.cost_usd IS NULL AND {_USED} > 0"),
    "denied": _count("calls.outcome = 'denied'"),
    "errors": _count("calls.outcome = 'error'"),
    "first_ts": "MIN(calls.ts)",
    "last_ts": "MAX(calls.ts)",
}
ACCURACY_METRICS = {
    "calls": "SUM(1)",
    "estimated_input_tokens": "SUM(calls.estimated_input_tokens)",
    "input_tokens": "SUM(calls.input_tokens)",
    "estimated_output_tokens": "SUM(calls.estimated_output_tokens)",
    "output_tokens": "SUM(calls.output_tokens)",
    "abs_input_error": "SUM(ABS(calls.estimated_input_tokens - calls.input_tokens))",
    "under_reserved": _count(f"{_USED} > {_EST}"),
    "usd_n": _count(_BOTH_USD),
    "reserved_usd": f"SUM(CASE WHEN {_BOTH_USD} THEN calls.reserved_usd ELSE 0.0 END)",
    "cost_usd": f"SUM(CASE WHEN {_BOTH_USD} THEN calls.cost_usd ELSE 0.0 END)",
}
_COMBINE: dict[str, Callable[[Any, Any], Any]] = {"MIN": min, "MAX": max}


@contextmanager
def _queryable(sink: Any, lo: float | None, hi: float | None) -> Iterator[Any]:
    if callable(getattr(sink, "execute_read", None)):
        yield sink
        return
    scratch = _sinks.scratch_sqlite(list(_sinks.read_records(sink, lo, hi)))
    try:
        yield scratch
    finally:
        scratch.close()


def _aggregate(
    sink: Any,
    dims: list[Dimension],
    metrics: Mapping[str, str],
    lo: float | None,
    hi: float | None,
    where: Mapping[str, Any] | None = None,
    outcomes: Sequence[str] | None = None,
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Run one GROUP BY; return (decoded group key, metric values) pairs."""
    with _queryable(sink, lo, hi) as source:
        dialect: Dialect = source.dialect
        mark = dialect.param
        select: list[str] = []
        spans: list[tuple[int, int]] = []
        joins = ""
        for i, dim in enumerate(dims):
            exprs, join = dim.sql(dialect, f"j{i}")
            spans.append((len(select), len(select) + len(exprs)))
            select.extend(exprs)
            joins += join
        n_keys = len(select)
        clauses = [f"calls.ts >= {mark}", f"calls.ts < {mark}"]
        params: list[Any] = [lo if lo is not None else -1e300, hi if hi is not None else 1e300]
        if outcomes is not None:
            clauses.append(f"calls.outcome IN ({', '.join([mark] * len(outcomes))})")
            params.extend(outcomes)
        where = where or {}
        for dim, value in zip(resolve_dimensions(list(where)), where.values()):
            wanted = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
            clause, extra = dim.where(dialect, wanted)
            clauses.append(clause)
            params.extend(extra)
        sql = f"SELECT {', '.join(select + list(metrics.values()))} FROM calls{joins} WHERE {' AND '.join(clauses)}"
        if n_keys:
            sql += " GROUP BY " + ", ".join(str(i + 1) for i in range(n_keys))
        raw = source.execute_read(sql, params)
    merged: dict[tuple[Any, ...], tuple[tuple[Any, ...], dict[str, Any]]] = {}
    for row in raw:
        if row[n_keys] is None:  # no GROUP BY and nothing matched
            continue
        key = tuple(dim.decode(dialect, row[a:b]) for dim, (a, b) in zip(dims, spans))
        values = dict(zip(metrics, row[n_keys:]))
        typed = tuple(_typed(k) if k is not None else None for k in key)
        if typed in merged:  # e.g. JSON null and a missing key both decode to None
            old = merged[typed][1]
            for name, expr in metrics.items():
                combine = _COMBINE.get(expr[:3], lambda a, b: a + b)
                old[name] = combine(old[name], values[name])
        else:
            merged[typed] = (key, values)
    return list(merged.values())


def _group(dims: list[Dimension], key: tuple[Any, ...]) -> dict[str, Any]:
    return {d.name: v for d, v in zip(dims, key)}


def _sort_key(row: Any) -> tuple[Any, ...]:
    """Group values ascending, ``None`` last."""
    return tuple((1, (0, 0)) if v is None else (0, _typed(v)) for v in row.group.values())


def select_top(rows: Sequence[Any], n: int | None) -> list[Any]:
    """Rows in group order; with ``n``, the ``n`` costliest (cost, then total tokens)."""
    ranked = sorted(rows, key=_sort_key)
    if n is None:
        return ranked
    ranked.sort(key=lambda r: (-(r.cost_usd or 0.0), -r.total_tokens))
    return ranked[: max(n, 0)]


def totals(
    sink: Any,
    *,
    by: str | Sequence[str] = (),
    since: Any = None,
    until: Any = None,
    where: Mapping[str, Any] | None = None,
    top: int | None = None,
) -> list[Row]:
    """Implementation of :meth:`budgetguard.ledger.Ledger.totals` for one sink."""
    dims = resolve_dimensions(by)
    lo, hi = time_range(since, until)
    rows = []
    for key, m in _aggregate(sink, dims, TOTAL_METRICS, lo, hi, where):
        rows.append(
            Row(
                group=_group(dims, key),
                calls=int(m["calls"]),
                input_tokens=int(m["input_tokens"]),
                output_tokens=int(m["output_tokens"]),
                cached_input_tokens=int(m["cached_input_tokens"]),
                reasoning_tokens=int(m["reasoning_tokens"]),
                total_tokens=int(m["input_tokens"] + m["output_tokens"]),
                estimated_tokens=int(m["estimated_tokens"]),
                cost_usd=round(m["cost_sum"], 10) if m["cost_n"] else None,
                unpriced_calls=int(m["unpriced_calls"]),
                denied=int(m["denied"]),
                errors=int(m["errors"]),
                first_ts=m["first_ts"],
                last_ts=m["last_ts"],
            )
        )
    if not dims and not rows:
        rows.append(Row())
    return select_top(rows, top)


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 6) if b else None


def accuracy(
    sink: Any, *, by: str | Sequence[str] = "model", since: Any = None, until: Any = None
) -> list[AccuracyRow]:
    """Implementation of :meth:`budgetguard.ledger.Ledger.accuracy` for one sink."""
    dims = resolve_dimensions(by)
    lo, hi = time_range(since, until)
    rows = []
    for key, m in _aggregate(sink, dims, ACCURACY_METRICS, lo, hi, outcomes=COMPLETED):
        reserved = int(m["estimated_input_tokens"] + m["estimated_output_tokens"])
        used = int(m["input_tokens"] + m["output_tokens"])
        usd = bool(m["usd_n"])
        rows.append(
            AccuracyRow(
                group=_group(dims, key),
                calls=int(m["calls"]),
                estimated_input_tokens=int(m["estimated_input_tokens"]),
                input_tokens=int(m["input_tokens"]),
                estimated_output_tokens=int(m["estimated_output_tokens"]),
                output_tokens=int(m["output_tokens"]),
                reserved_tokens=reserved,
                used_tokens=used,
                headroom_ratio=_ratio(reserved, used),
                input_error=_ratio(m["abs_input_error"], m["input_tokens"]),
                under_reserved=int(m["under_reserved"]),
                reserved_usd=round(m["reserved_usd"], 10) if usd else None,
                cost_usd=round(m["cost_usd"], 10) if usd else None,
                usd_headroom_ratio=_ratio(m["reserved_usd"], m["cost_usd"]) if usd else None,
            )
        )
    return sorted(rows, key=_sort_key)
