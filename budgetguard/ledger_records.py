"""The ledger's record and where it lives: :class:`LedgerRecord`, the outcomes, the errors,
and the default location.

The bottom of the ledger modules: the sinks (:mod:`budgetguard.ledger_sinks`,
:mod:`budgetguard.ledger_postgres`), their SQL (:mod:`budgetguard.ledger_sql`) and the queries
(:mod:`budgetguard.ledger_query`) build on it, and :mod:`budgetguard.ledger` (the
:class:`~budgetguard.ledger.Ledger` itself) on all of them, so none imports another back.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from budgetguard.errors import BudgetGuardError, ConfigurationError

OUTCOMES: tuple[str, ...] = ("ok", "denied", "fell_back", "compressed", "cached", "cancelled", "error", "expired")
"""The outcomes the guard records (see :mod:`budgetguard.settlement`). ``denied``/``error``
are counted in query rows."""

EXPIRED = "expired"
"""The outcome of a lease the store swept: it charged the reserved amount."""
CHARGE_FIELDS: tuple[str, ...] = (
    "outcome",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "cost_usd",
    "error",
)
"""What an ``expired`` record replaces in an earlier record of the same run: what was charged."""

LEDGER_ENV = "BUDGETGUARD_LEDGER"


class LedgerError(BudgetGuardError):
    """The ledger cannot be opened, read or written, or a query is malformed."""


class LedgerPathError(LedgerError, ConfigurationError):
    """A ledger path no file can be made at: under a regular file, or a directory itself."""


def check_ledger_path(ledger: Any) -> None:
    """Refuse a ledger path that cannot hold a ledger file, before anything is created.

    Args:
        ledger: The ``ledger=`` argument of a guard, or a :class:`Ledger`'s sink; only a
            path (other than ``":memory:"``) is checked, not a ``postgresql://`` URL.

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
    if not isinstance(ledger, (str, os.PathLike)) or str(ledger) == ":memory:" or is_ledger_url(ledger):
        return
    path = Path(ledger).expanduser()
    if path.is_dir():
        msg = f"ledger path {ledger} is a directory; name a file in it, e.g. {path / 'ledger.sqlite3'}"
        raise LedgerPathError(msg)
    if path.is_file():
        _check_existing_file(path)
        return
    for parent in path.parents:  # the nearest one that exists decides whether the rest can be made
        if parent.exists():
            if not parent.is_dir():
                msg = (f"ledger path {ledger} cannot be created: {parent} is a file, not a directory. "
                       "Choose a path in a directory, or pass ledger=False for no ledger.")
                raise LedgerPathError(msg)
            return


_SQLITE_MAGIC = b"SQLite format 3\x00"
JSONL_SUFFIXES = (".jsonl", ".ndjson")


def ledger_file_kind(path: Path) -> str:
    """What an existing file holds, by its first bytes: ``"sqlite"``, ``"json"`` (it starts
    with ``{``), ``"empty"`` or ``"other"``.

    Raises:
        OSError: The file cannot be read.
    """
    with path.open("rb") as fh:
        head = fh.read(len(_SQLITE_MAGIC))
    if not head:
        return "empty"
    if head == _SQLITE_MAGIC:
        return "sqlite"
    return "json" if head.lstrip()[:1] == b"{" else "other"


def _check_existing_file(path: Path) -> None:
    """Refuse an existing file that is not in the format a ledger at that name is written in."""
    try:
        kind = ledger_file_kind(path)
    except OSError as exc:
        msg = f"ledger path {path} cannot be read: {exc}"
        raise LedgerPathError(msg) from exc
    jsonl = path.suffix.lower() in JSONL_SUFFIXES
    if kind in ("empty", "json" if jsonl else "sqlite"):  # empty: a new ledger is written into it
        return
    kind = "a JSON-lines file" if jsonl else "a SQLite database"
    msg = (f"ledger path {path} is an existing file that is not {kind}, so it is not a budgetguard ledger "
           "(a ledger is SQLite, or JSON lines for a .jsonl name). Choose another path, or pass ledger=False.")
    raise LedgerPathError(msg)


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
    be mutated after the record is handed to :meth:`Ledger.record` (while the sink fails it
    is kept and written later). Metadata values are stored as JSON; others are ``str()``'d.

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
    """Return the ledger file used when no sink, path or URL is given.

    In order: the ``BUDGETGUARD_LEDGER`` environment variable (a path; ``.jsonl`` selects
    the JSONL format); otherwise ``budgetguard/ledger.sqlite3`` inside the user data dir:
    ``$XDG_DATA_HOME`` or ``~/.local/share`` on Linux and other Unixes,
    ``~/Library/Application Support`` on macOS and ``%LOCALAPPDATA%`` on Windows.
    The directory is created when the ledger is first opened for writing.
    When ``BUDGETGUARD_LEDGER`` holds a ``postgresql://`` URL, use
    :func:`default_ledger_location`, which returns it as it is.
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


def is_ledger_url(spec: object) -> bool:
    """Whether ``spec`` is a PostgreSQL URL (``postgresql://...`` or ``postgres://...``)."""
    return isinstance(spec, str) and spec.startswith(("postgresql://", "postgres://"))


def default_ledger_location() -> str | Path:
    """Where the ledger is kept by default: ``$BUDGETGUARD_LEDGER`` when it is a
    ``postgresql://`` URL, else the file of :func:`default_ledger_path`."""
    env = os.environ.get(LEDGER_ENV, "")
    return env if is_ledger_url(env) else default_ledger_path()

