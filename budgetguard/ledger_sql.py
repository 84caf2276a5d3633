"""The ledger's SQL, written once for SQLite and PostgreSQL: the table, its migrations, the
upsert that keeps one record per call, and the few expressions where the two differ.

Table ``calls`` (schema 2)::

    id             integer key          -- insertion order
    ts             float NOT NULL       -- unix seconds, call start
    day            text NOT NULL        -- UTC date of ts, 'YYYY-MM-DD'
    run_id         text NOT NULL, root_run_id text, parent_run_id text
    scope          JSON NOT NULL        -- object, e.g. {"user_id": "alice"}
    scope_key      text NOT NULL        -- 'user_id=alice' (keys sorted, ',' joined; '' if none)
    tags           JSON NOT NULL        -- array
    metadata       JSON NOT NULL        -- object
    model_requested, model_used, policy text; outcome text NOT NULL
    estimated_input_tokens, estimated_output_tokens, input_tokens, output_tokens,
    cached_input_tokens, reasoning_tokens  integer NOT NULL
    cost_usd, reserved_usd, latency_s  float
    budgets        JSON NOT NULL        -- array
    error, prompt, completion  text
    run_key        text UNIQUE          -- schema 2: the run id; NULL on schema-1 rows that repeat one

JSON is ``TEXT`` in SQLite and ``jsonb`` in PostgreSQL. Schema 1 had no ``run_key`` and
appended every record; migrating to 2 keys the rows whose run id is unique and leaves
repeated ones (history written before the rule below existed) as they were.

**One record per call.** A record is written before the store settles its call, so that a
process killed after the settle loses nothing. A process killed between the two leaves a
lease the store later sweeps, charging the reserved amount; the ``expired`` record of the
sweep then meets the call's own record under the same ``run_key``, and :data:`UPSERT` merges
them: the charge (:data:`~budgetguard.ledger_records.CHARGE_FIELDS`) from the ``expired`` one, which is
what the store charged, and everything that describes the call (time, runs, scope, metadata)
from the other, whichever arrives first. A repeat of the same kind changes nothing (a
retried write, or a second sweep report).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from budgetguard.ledger_records import CHARGE_FIELDS, EXPIRED, LedgerRecord, _utc_day

__all__ = [
    "COLUMNS",
    "JSON_FIELDS",
    "POSTGRES",
    "SCHEMA_VERSION",
    "SQLITE",
    "Dialect",
    "PostgresDialect",
    "canon_json",
    "compact_json",
    "from_row",
    "to_row",
]

SCHEMA_VERSION = 2
JSON_FIELDS = ("scope", "tags", "metadata", "budgets")
_FIELDS = tuple(LedgerRecord.__dataclass_fields__)
_V1_COLUMNS = ("ts", "day", *_FIELDS[1:5], "scope_key", *_FIELDS[5:])
COLUMNS = (*_V1_COLUMNS, "run_key")
"""The columns a write fills, in order (all but ``id``)."""
SELECT = f"SELECT {', '.join(_FIELDS)} FROM calls"
"""Every record field, in :class:`LedgerRecord` order."""


class Dialect:
    """The ledger's statements, in SQLite's words; :class:`PostgresDialect` overrides the few
    that PostgreSQL says otherwise (JSON access, types, parameter markers)."""

    param = "?"
    """The parameter marker."""
    json_param = "?"
    """The marker of a parameter holding JSON text."""
    id_column = "INTEGER PRIMARY KEY"
    real = "REAL"
    integer = "INTEGER"
    json = "TEXT"
    run_index = "COALESCE(root_run_id, run_id)"

    # -- schema ------------------------------------------------------------------------

    def column_type(self, column: str) -> str:
        """The declared type of ``column`` (with ``NOT NULL`` where the record requires it)."""
        if column in JSON_FIELDS:
            return f"{self.json} NOT NULL"
        if column.endswith("_tokens"):
            return f"{self.integer} NOT NULL"
        if column in ("cost_usd", "reserved_usd", "latency_s"):
            return self.real
        if column == "ts":
            return f"{self.real} NOT NULL"
        return "TEXT NOT NULL" if column in ("day", "run_id", "outcome", "scope_key") else "TEXT"

    def migrations(self) -> dict[int, tuple[str, ...]]:
        """The statements that bring a ledger from version ``n - 1`` to version ``n``."""
        columns = ", ".join(f"{c} {self.column_type(c)}" for c in _V1_COLUMNS)
        return {
            1: (
                f"CREATE TABLE calls (id {self.id_column}, {columns})",
                "CREATE INDEX calls_ts ON calls(ts)",
                "CREATE INDEX calls_model_used ON calls(model_used)",
                f"CREATE INDEX calls_run ON calls({self.run_index})",
            ),
            2: (
                "ALTER TABLE calls ADD COLUMN run_key TEXT",
                (
                    "UPDATE calls SET run_key = run_id WHERE run_id IN "
                    "(SELECT run_id FROM calls GROUP BY run_id HAVING COUNT(*) = 1)"
                ),
                "CREATE UNIQUE INDEX calls_run_key ON calls(run_key)",
            ),
        }

    # -- writing -----------------------------------------------------------------------

    def upsert(self) -> str:
        """The statement that writes one record (see the module docstring)."""
        marks = ", ".join(self.json_param if c in JSON_FIELDS else self.param for c in COLUMNS)
        new_expires = f"excluded.outcome = '{EXPIRED}'"
        sets = []
        for column in COLUMNS:
            if column in ("run_id", "run_key"):
                continue
            first, second = ("excluded", "calls") if column in CHARGE_FIELDS else ("calls", "excluded")
            sets.append(f"{column} = CASE WHEN {new_expires} THEN {first}.{column} ELSE {second}.{column} END")
        return (
            f"INSERT INTO calls AS calls ({', '.join(COLUMNS)}) VALUES ({marks}) "
            f"ON CONFLICT (run_key) DO UPDATE SET {', '.join(sets)} "
            f"WHERE ({new_expires}) <> (calls.outcome = '{EXPIRED}')"
        )

    # -- querying ----------------------------------------------------------------------

    def literal(self, text: str) -> str:
        """``text`` as an SQL string literal."""
        return "'" + text.replace("'", "''") + "'"

    def elements(self, column: str, alias: str) -> str:
        """The text elements of JSON array ``column`` as a table ``alias`` with column ``value``."""
        return f"json_each(calls.{column}) AS {alias}"

    def join_elements(self, column: str, alias: str) -> str:
        """A ``LEFT JOIN`` of each row with :meth:`elements` (a row with none is kept once)."""
        return f" LEFT JOIN {self.elements(column, alias)}"

    def array_length(self, column: str) -> str:
        """The length of JSON array ``column``."""
        return f"json_array_length(calls.{column})"

    def member(self, column: str, key: str) -> tuple[str, str]:
        """``(type, value)`` expressions of the member ``key`` of JSON object ``column``.

        Types are JSON's names: ``null``, ``boolean``, ``number``, ``string``, ``object``,
        ``array``; ``NULL`` when the key is missing.
        """
        jtype = f"json_type(calls.{column}, {self._path(key)})"
        named = " ".join(f"WHEN '{a}' THEN '{b}'" for a, b in _SQLITE_TYPES.items())
        return f"(CASE {jtype} {named} ELSE {jtype} END)", f"json_extract(calls.{column}, {self._path(key)})"

    def member_text(self, column: str, key: str) -> str:
        """The member ``key`` of JSON object ``column`` as text (scope values are strings)."""
        return f"json_extract(calls.{column}, {self._path(key)})"

    def _path(self, key: str) -> str:
        return self.literal('$."' + key + '"')

    def member_equals(self, value: str, wanted: Any) -> tuple[str, list[Any]]:
        """A condition that member ``value`` (from :meth:`member`) equals ``wanted``, and its parameters."""
        if isinstance(wanted, bool):
            return f"{value} = {self.param}", [int(wanted)]
        if isinstance(wanted, (dict, list)):
            return f"json({value}) = json({self.param})", [canon_json(wanted)]
        return f"{value} = {self.param}", [wanted]

    def decode_member(self, jtype: Any, value: Any) -> Any:
        """The Python value of a member read by :meth:`member` (objects as canonical JSON)."""
        if jtype is None or jtype == "null":
            return None
        if jtype == "boolean":
            return bool(value)
        if jtype in ("object", "array"):
            return canon_json(json.loads(value) if isinstance(value, str) else value)
        return value


_SQLITE_TYPES = {"true": "boolean", "false": "boolean", "integer": "number", "real": "number", "text": "string"}


class PostgresDialect(Dialect):
    """PostgreSQL: ``jsonb`` columns, ``%s`` markers, identity keys."""

    param = "%s"
    json_param = "%s::jsonb"
    id_column = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    real = "DOUBLE PRECISION"
    integer = "BIGINT"
    json = "JSONB"
    run_index = "(COALESCE(root_run_id, run_id))"

    def literal(self, text: str) -> str:
        """``text`` as a literal; ``%`` doubled, since psycopg reads it as a marker."""
        return super().literal(text).replace("%", "%%")

    def elements(self, column: str, alias: str) -> str:
        """The text elements of JSON array ``column`` as a table ``alias`` with column ``value``."""
        return f"jsonb_array_elements_text(calls.{column}) AS {alias}(value)"

    def join_elements(self, column: str, alias: str) -> str:
        """A ``LEFT JOIN LATERAL`` of each row with :meth:`elements`."""
        return f" LEFT JOIN LATERAL {self.elements(column, alias)} ON TRUE"

    def array_length(self, column: str) -> str:
        """The length of JSON array ``column``."""
        return f"jsonb_array_length(calls.{column})"

    def member(self, column: str, key: str) -> tuple[str, str]:
        """``(type, value)`` expressions of the member ``key`` of JSON object ``column``."""
        value = f"(calls.{column} -> {self.literal(key)})"
        return f"jsonb_typeof{value}", value

    def member_text(self, column: str, key: str) -> str:
        """The member ``key`` of JSON object ``column`` as text."""
        return f"(calls.{column} ->> {self.literal(key)})"

    def member_equals(self, value: str, wanted: Any) -> tuple[str, list[Any]]:
        """A condition that member ``value`` equals ``wanted`` (``jsonb`` equality)."""
        return f"{value} = {self.param}::jsonb", [json.dumps(wanted)]


def canon_json(value: Any) -> str:
    """``value`` as canonical JSON text (sorted keys, no spaces): how object groups are keyed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


SQLITE = Dialect()
POSTGRES = PostgresDialect()

compact_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
"""JSON text with no spaces and non-ASCII kept: how the ledger stores JSON, in every sink."""


def to_row(rec: LedgerRecord) -> tuple[Any, ...]:
    """The :data:`COLUMNS` values of a record (JSON fields as JSON text).

    Raises:
        LedgerError: A field has a type that cannot be stored.
    """
    data = rec.to_dict()
    for name in JSON_FIELDS:
        data[name] = compact_json(data[name])
    data["day"] = _utc_day(data["ts"])
    data["scope_key"] = rec.scope_key
    data["run_key"] = data["run_id"]
    return tuple(data[c] for c in COLUMNS)


def from_row(row: Sequence[Any]) -> LedgerRecord:
    """A record from a :data:`SELECT` row (JSON fields as text, or already decoded)."""
    data = dict(zip(_FIELDS, row))
    try:
        for name in JSON_FIELDS:
            if isinstance(data[name], str):
                data[name] = json.loads(data[name])
    except ValueError as exc:
        from budgetguard.ledger_records import LedgerError

        msg = f"ledger row of run {data.get('run_id')!r} holds malformed JSON: {exc}"
        raise LedgerError(msg) from exc
    return LedgerRecord.from_dict(data)
