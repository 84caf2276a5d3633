"""Unit tests of the ledger: records, sinks, the writer (durable on return, shared writes) and queries.

Query results are checked against totals computed by hand from ``SAMPLE`` (the numbers in
the tests are written out, not recomputed), on every sink.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from dataclasses import replace
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from budgetguard.ledger import (
    JSONLSink,
    Ledger,
    LedgerError,
    LedgerRecord,
    MemorySink,
    SQLiteSink,
    default_ledger_path,
    open_ledger,
)
from budgetguard.ledger_query import parse_time

D1 = 1793491200.0  # 2026-11-01T00:00:00Z
HOUR, DAY = 3600.0, 86400.0


def rec(n: int, ts: float, **kw: Any) -> LedgerRecord:
    fields: dict[str, Any] = {
        "ts": ts,
        "run_id": f"r{n}",
        "root_run_id": None,
        "parent_run_id": None,
        "scope": {},
        "tags": (),
        "metadata": {},
        "model_requested": "gpt-4o",
        "model_used": "gpt-4o",
        "policy": None,
        "outcome": "ok",
        "estimated_input_tokens": 0,
        "estimated_output_tokens": 0,
        "input_tokens": 0,
        "output_tokens": 0,
        "cached_input_tokens": 0,
        "reasoning_tokens": 0,
        "cost_usd": None,
        "reserved_usd": None,
        "latency_s": 0.5,
        "budgets": ("per-user",),
    }
    fields.update(kw)
    return LedgerRecord(**fields)


def u(name: str) -> dict[str, str]:
    return {"user_id": name}


# Three UTC days, three users + a global call, four models (one unpriced), tags, outcomes.
SAMPLE = [
    rec(1, D1 + 1 * HOUR, root_run_id="rootA", scope=u("alice"), tags=("prod",),
        metadata={"feature": "summarizer", "priority": 1}, input_tokens=1000, output_tokens=200,
        cached_input_tokens=100, cost_usd=0.0045, reserved_usd=0.006, estimated_input_tokens=1100,
        estimated_output_tokens=500),
    rec(2, D1 + 2 * HOUR, root_run_id="rootA", parent_run_id="r1", scope=u("alice"), tags=("prod", "beta"),
        metadata={"feature": "summarizer"}, model_used="gpt-4o-mini", policy="cheaper_model", outcome="fell_back",
        input_tokens=1000, output_tokens=300, cost_usd=0.00033, reserved_usd=0.0005,
        estimated_input_tokens=1050, estimated_output_tokens=500),
    rec(3, D1 + 3 * HOUR, root_run_id="rootB", scope=u("bob"), metadata={"feature": "chat", "priority": True},
        input_tokens=500, output_tokens=100, reasoning_tokens=50, cost_usd=0.00225, reserved_usd=0.003,
        estimated_input_tokens=520, estimated_output_tokens=400),
    rec(4, D1 + 4 * HOUR, root_run_id="rootC", scope=u("bob"), tags=("prod",), metadata={"feature": "chat"},
        model_used=None, outcome="denied", cost_usd=0.0, error="budget 'per-user' cannot cover this call",
        estimated_input_tokens=5000, estimated_output_tokens=1000),
    rec(5, D1 + DAY + 10 * HOUR, root_run_id="rootD", scope=u("alice"), tags=("beta",),
        metadata={"feature": "chat", "priority": 1.0}, input_tokens=2000, output_tokens=400, cost_usd=0.009,
        reserved_usd=0.008, estimated_input_tokens=1900, estimated_output_tokens=300),
    rec(6, D1 + DAY + 11 * HOUR, root_run_id="rootE", scope={"user_id": "carol", "org": "acme"}, tags=("prod",),
        model_requested="local-llama", model_used="local-llama", input_tokens=800, output_tokens=200,
        estimated_input_tokens=800, estimated_output_tokens=256),
    rec(7, D1 + DAY + 12 * HOUR, root_run_id="rootE", scope={"user_id": "carol", "org": "acme"},
        metadata={"feature": "summarizer"}, outcome="error", error="timeout", input_tokens=300, cost_usd=0.00075,
        estimated_input_tokens=300, estimated_output_tokens=500),
    rec(8, D1 + 3 * DAY - 1, tags=("batch",), metadata={"feature": "summarizer"}, model_requested="gpt-4o-mini",
        model_used="gpt-4o-mini", input_tokens=100, output_tokens=50, cost_usd=0.000045,
        estimated_input_tokens=120, estimated_output_tokens=100),
    rec(9, D1 + 2 * DAY, root_run_id="rootF", scope=u("alice"), tags=("prod",), metadata={"feature": "summarizer"},
        policy="compress", outcome="compressed", input_tokens=1500, output_tokens=250, cost_usd=0.00625,
        reserved_usd=0.007, estimated_input_tokens=1600, estimated_output_tokens=300),
    rec(10, D1 + 2 * DAY + 5 * HOUR, root_run_id="rootG", scope=u("bob"), tags=("batch",), metadata={"feature": "chat"},
        model_used=None, outcome="denied", estimated_input_tokens=4000, estimated_output_tokens=500),
]  # fmt: skip


SINKS = ["sqlite", "jsonl", "memory", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture
def make_sink(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """``make_sink(kind)``: a new, empty sink; PostgreSQL ones each in a schema of their own."""

    def make(kind: str) -> Any:
        if kind == "postgres":
            from budgetguard.ledger_postgres import PostgresSink

            server = request.getfixturevalue("postgres_server")
            return PostgresSink(server.url, schema=f"t_{uuid.uuid4().hex[:12]}")
        return {
            "sqlite": lambda: SQLiteSink(tmp_path / "ledger.sqlite3"),
            "jsonl": lambda: JSONLSink(tmp_path / "ledger.jsonl"),
            "memory": MemorySink,
        }[kind]()

    return make


@pytest.fixture(params=SINKS)
def ledger(request: pytest.FixtureRequest, make_sink: Any) -> Any:
    led = Ledger(make_sink(request.param))
    for r in SAMPLE:
        led.record(r)
    yield led
    led.close()


def pick(rows: list[Any], *fields: str) -> list[tuple[Any, ...]]:
    return [tuple(row[f] for f in fields) for row in rows]


# -- the record ---------------------------------------------------------------------------


def test_record_round_trips_through_dict_and_json() -> None:
    full = replace(SAMPLE[1], prompt="hi", completion="hello")
    assert LedgerRecord.from_dict(full.to_dict()) == full
    assert LedgerRecord.from_dict(json.loads(json.dumps(full.to_dict()))) == full
    assert full.to_dict()["tags"] == ["prod", "beta"]
    assert SAMPLE[0].day == "2026-11-01" and SAMPLE[7].day == "2026-11-03" and SAMPLE[8].day == "2026-11-03"
    assert SAMPLE[5].scope_key == "org=acme,user_id=carol" and SAMPLE[7].scope_key == ""


def test_record_metadata_is_made_json_safe() -> None:
    odd = rec(1, D1, metadata={"when": date(2026, 1, 2), "nan": float("nan"), "nested": {"k": (1, 2)}, 3: "x"})
    data = json.loads(json.dumps(odd.to_dict(), allow_nan=False))
    assert data["metadata"] == {"when": "2026-01-02", "nan": "nan", "nested": {"k": [1, 2]}, "3": "x"}


def test_from_dict_rejects_broken_records_clearly() -> None:
    with pytest.raises(LedgerError, match="required field"):
        LedgerRecord.from_dict({"run_id": "x"})
    with pytest.raises(LedgerError, match="'input_tokens' must be a finite number"):
        LedgerRecord.from_dict({**SAMPLE[0].to_dict(), "input_tokens": "many"})
    with pytest.raises(LedgerError, match="'tags' must be a list"):
        LedgerRecord.from_dict({**SAMPLE[0].to_dict(), "tags": "prod"})
    with pytest.raises(LedgerError, match="JSON object"):
        LedgerRecord.from_dict(["not", "a", "dict"])  # type: ignore[arg-type]


# -- sinks: completeness and round trip ------------------------------------------------------


@pytest.mark.parametrize("kind", SINKS)
def test_every_sink_round_trips_every_field(kind: str, make_sink: Any) -> None:
    with_text = [replace(r, prompt=f"p{i}", completion=f"c{i}") for i, r in enumerate(SAMPLE)]
    led = Ledger(make_sink(kind), store_text=True)
    for r in reversed(with_text):
        led.record(r)
    assert list(led.records()) == sorted(with_text, key=lambda r: r.ts)
    assert [r.run_id for r in led.records(since=D1 + 2 * DAY)] == ["r9", "r10", "r8"]
    led.close()


def test_text_is_stripped_unless_store_text(tmp_path: Path) -> None:
    led = Ledger(SQLiteSink(tmp_path / "l.sqlite3"))
    led.record(replace(SAMPLE[0], prompt="secret prompt", completion="secret answer"))
    (back,) = led.records()
    assert back.prompt is None and back.completion is None
    led.close()
    raw = (tmp_path / "l.sqlite3").read_bytes()
    assert b"secret" not in raw


def test_ledger_picks_sink_from_path(tmp_path: Path) -> None:
    for spec, kind in (
        ((tmp_path / "a.jsonl"), JSONLSink),
        (str(tmp_path / "a.db"), SQLiteSink),
        (":memory:", MemorySink),
    ):
        led = Ledger(spec)
        assert isinstance(led.sink, kind)
        led.close()
    with pytest.raises(LedgerError, match="write"):
        Ledger(object())  # type: ignore[arg-type]


def test_default_path_follows_env_and_platform(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BUDGETGUARD_LEDGER", str(tmp_path / "x.sqlite3"))
    assert default_ledger_path() == tmp_path / "x.sqlite3"
    monkeypatch.delenv("BUDGETGUARD_LEDGER")
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_ledger_path() == tmp_path / "xdg" / "budgetguard" / "ledger.sqlite3"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_ledger_path() == Path.home() / ".local/share/budgetguard/ledger.sqlite3"
    monkeypatch.setattr("sys.platform", "darwin")
    assert default_ledger_path() == Path.home() / "Library/Application Support/budgetguard/ledger.sqlite3"
    monkeypatch.setattr("sys.platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert default_ledger_path() == tmp_path / "local" / "budgetguard" / "ledger.sqlite3"


# -- sqlite files that are not ledgers ---------------------------------------------------


def test_sqlite_rejects_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.sqlite3"
    path.write_bytes(b"this is not a database at all\n" * 200)
    with pytest.raises(LedgerError, match="not a budgetguard ledger or is corrupt"):
        SQLiteSink(path)
    with pytest.raises(LedgerError, match="neither a SQLite nor a JSONL"):
        open_ledger(path)


def test_sqlite_rejects_unrelated_database(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    with pytest.raises(LedgerError, match="tables users, not a budgetguard ledger"):
        SQLiteSink(path)
    with pytest.raises(LedgerError, match="not a budgetguard ledger"):
        open_ledger(path)


def test_sqlite_rejects_newer_schema_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite3"
    SQLiteSink(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(LedgerError, match="newer budgetguard"):
        SQLiteSink(path)
    with pytest.raises(LedgerError, match="no ledger at"):
        SQLiteSink(tmp_path / "missing.sqlite3", create=False)
    with pytest.raises(LedgerError, match="no ledger at"):
        open_ledger(tmp_path / "missing.sqlite3")
    (tmp_path / "empty.sqlite3").write_bytes(b"")
    with pytest.raises(LedgerError, match="is empty"):
        open_ledger(tmp_path / "empty.sqlite3")


def test_sqlite_reports_damaged_pages(tmp_path: Path) -> None:
    path = tmp_path / "damaged.sqlite3"
    led = Ledger(SQLiteSink(path))
    for i in range(2000):
        led.record(replace(SAMPLE[0], run_id=f"x{i}", error="e" * 200))
    led.close()
    data = bytearray(path.read_bytes())
    assert len(data) > 40 * 4096
    data[8192:-4096] = b"\xff" * (len(data) - 8192 - 4096)
    path.write_bytes(bytes(data))
    with pytest.raises(LedgerError, match="corrupt"):
        reader = open_ledger(path)
        try:
            reader.totals(by="model")
        finally:
            reader.close()


def test_jsonl_tolerates_torn_last_line_but_not_a_bad_middle(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "l.jsonl"
    good = json.dumps(SAMPLE[0].to_dict())
    path.write_text(good + "\n" + good[:40])
    with caplog.at_level(logging.WARNING):
        assert len(list(JSONLSink(path, create=False).read())) == 1
    assert "incomplete last line" in caplog.text
    path.write_text(good + "\n{oops\n" + good + "\n")
    with pytest.raises(LedgerError, match="line 2"):
        list(JSONLSink(path).read())


# -- queries against hand-computed totals --------------------------------------------------


def test_overall_totals(ledger: Ledger) -> None:
    (row,) = ledger.totals()
    assert (row.calls, row.input_tokens, row.output_tokens, row.total_tokens) == (10, 7200, 1500, 8700)
    assert (row.cached_input_tokens, row.reasoning_tokens, row.estimated_tokens) == (100, 50, 20746)
    assert row.cost_usd == pytest.approx(0.023125)
    assert (row.denied, row.errors, row.unpriced_calls) == (2, 1, 1)
    assert (row.first_ts, row.last_ts) == (D1 + HOUR, D1 + 3 * DAY - 1)


def test_totals_by_user(ledger: Ledger) -> None:
    rows = ledger.totals(by="user")
    assert pick(rows, "user", "calls", "input_tokens", "output_tokens", "denied", "errors", "unpriced_calls") == [
        ("alice", 4, 5500, 1150, 0, 0, 0),
        ("bob", 3, 500, 100, 2, 0, 0),
        ("carol", 2, 1100, 200, 0, 1, 1),
        (None, 1, 100, 50, 0, 0, 0),
    ]
    assert [r.cost_usd for r in rows] == pytest.approx([0.02008, 0.00225, 0.00075, 0.000045])
    assert pick(ledger.totals(by="scope:user_id"), "scope:user_id", "calls") == pick(rows, "user", "calls")
    assert pick(ledger.totals(by="scope"), "scope", "calls") == [
        ("org=acme,user_id=carol", 2), ("user_id=alice", 4), ("user_id=bob", 3), (None, 1)
    ]  # fmt: skip


def test_totals_by_model_and_day(ledger: Ledger) -> None:
    rows = ledger.totals(by="model")
    assert pick(rows, "model", "calls", "input_tokens", "output_tokens", "denied", "unpriced_calls") == [
        ("gpt-4o", 7, 5300, 950, 2, 0),  # the two denied calls asked for gpt-4o: they count there
        ("gpt-4o-mini", 2, 1100, 350, 0, 0),
        ("local-llama", 1, 800, 200, 0, 1),
    ]
    assert [r.cost_usd for r in rows] == pytest.approx([0.02275, 0.000375, None])
    days = ledger.totals(by="day")
    assert pick(days, "day", "calls", "input_tokens", "output_tokens", "denied", "errors") == [
        ("2026-11-01", 4, 2500, 600, 1, 0),
        ("2026-11-02", 3, 3100, 600, 0, 1),
        ("2026-11-03", 3, 1600, 300, 1, 0),
    ]
    assert [r.cost_usd for r in days] == pytest.approx([0.00708, 0.00975, 0.006295])
    assert pick(ledger.totals(by="month"), "month", "calls") == [("2026-11", 10)]
    assert pick(ledger.totals(by="model_requested"), "model_requested", "calls") == [
        ("gpt-4o", 8), ("gpt-4o-mini", 1), ("local-llama", 1)
    ]  # fmt: skip


def test_totals_by_tag_counts_multi_tag_calls_in_each(ledger: Ledger) -> None:
    rows = ledger.totals(by="tag")
    assert pick(rows, "tag", "calls", "input_tokens", "denied") == [
        ("batch", 2, 100, 1),
        ("beta", 2, 3000, 0),
        ("prod", 5, 4300, 1),
        (None, 2, 800, 0),
    ]
    assert [r.cost_usd for r in rows] == pytest.approx([0.000045, 0.00933, 0.01108, 0.003])
    assert sum(r.calls for r in rows) == 11  # r2 has two tags


def test_totals_by_feature_outcome_run_budget(ledger: Ledger) -> None:
    rows = ledger.totals(by="feature")
    assert pick(rows, "feature", "calls", "input_tokens", "denied") == [
        ("chat", 4, 2500, 2), ("summarizer", 5, 3900, 0), (None, 1, 800, 0)
    ]  # fmt: skip
    assert [r.cost_usd for r in rows] == pytest.approx([0.01125, 0.011875, None])
    assert pick(ledger.totals(by="meta:feature"), "meta:feature", "calls") == pick(rows, "feature", "calls")
    assert pick(ledger.totals(by="outcome"), "outcome", "calls") == [
        ("compressed", 1), ("denied", 2), ("error", 1), ("fell_back", 1), ("ok", 5)
    ]  # fmt: skip
    assert pick(ledger.totals(by="run"), "run", "calls") == [
        ("r8", 1), ("rootA", 2), ("rootB", 1), ("rootC", 1), ("rootD", 1), ("rootE", 2), ("rootF", 1), ("rootG", 1)
    ]  # fmt: skip
    assert pick(ledger.totals(by="policy"), "policy", "calls") == [("cheaper_model", 1), ("compress", 1), (None, 8)]
    assert pick(ledger.totals(by="budget"), "budget", "calls") == [("per-user", 10)]


def test_metadata_groups_keep_types(ledger: Ledger) -> None:
    rows = ledger.totals(by="meta:priority")
    assert pick(rows, "meta:priority", "calls") == [(True, 1), (1, 2), (None, 7)]
    assert isinstance(rows[0]["meta:priority"], bool)
    assert ledger.totals(where={"meta:priority": 1})[0].calls == 2
    assert ledger.totals(where={"meta:priority": True})[0].calls == 1
    assert ledger.totals(where={"meta:priority": None})[0].calls == 7


def test_multi_dimension_and_where(ledger: Ledger) -> None:
    rows = ledger.totals(by=("day", "model"))
    assert pick(rows, "day", "model", "calls") == [
        ("2026-11-01", "gpt-4o", 3), ("2026-11-01", "gpt-4o-mini", 1),
        ("2026-11-02", "gpt-4o", 2), ("2026-11-02", "local-llama", 1),
        ("2026-11-03", "gpt-4o", 2), ("2026-11-03", "gpt-4o-mini", 1),
    ]  # fmt: skip
    assert ledger.totals(where={"user": "alice", "tag": "prod"})[0].calls == 3
    assert ledger.totals(where={"model": ["gpt-4o-mini", "local-llama"]})[0].calls == 3
    assert ledger.totals(where={"feature": None})[0].calls == 1
    assert ledger.totals(where={"tag": None})[0].calls == 2
    assert pick(ledger.totals(by="user", where={"outcome": "denied"}), "user", "calls") == [("bob", 2)]
    assert ledger.totals(by="user", where={"user": "nobody"}) == []
    (none,) = ledger.totals(where={"user": "nobody"})
    assert none.calls == 0 and none.cost_usd is None


def test_top_keeps_costliest_groups(ledger: Ledger) -> None:
    assert pick(ledger.totals(by="user", top=2), "user") == [("alice",), ("bob",)]
    assert pick(ledger.totals(by="tag", top=1), "tag") == [("prod",)]


def test_time_ranges_are_half_open(ledger: Ledger) -> None:
    d3 = D1 + 2 * DAY
    for since in ("2026-11-03", "2026-11-03T00:00", "2026-11-03T00:00:00Z", "2026-11-03T01:00:00+01:00", d3,
                  datetime(2026, 11, 3), datetime(2026, 11, 3, tzinfo=timezone.utc), date(2026, 11, 3)):  # fmt: skip
        assert ledger.totals(since=since)[0].calls == 3, since
        assert ledger.totals(until=since)[0].calls == 7, since
    assert ledger.totals(since="2026-11-02", until="2026-11-03")[0].calls == 3
    assert ledger.totals(since=d3, until=d3)[0].calls == 0


def test_relative_and_bad_times() -> None:
    now = D1 + 10 * HOUR
    assert parse_time("today", now=now) == D1
    assert parse_time("yesterday", now=now) == D1 - DAY
    assert parse_time("7d", now=now) == now - 7 * DAY
    assert parse_time("12h", now=now) == now - 12 * HOUR
    for bad in ("last tuesday", "2026-13-01", "", True):
        with pytest.raises(LedgerError, match="use a datetime or date, unix seconds, an ISO date"):
            parse_time(bad, name="since")


def test_unknown_dimensions_are_explained(ledger: Ledger) -> None:
    with pytest.raises(LedgerError, match=r"unknown ledger dimension 'usr'; use one of: model, .*scope:KEY"):
        ledger.totals(by="usr")
    with pytest.raises(LedgerError, match="unknown ledger dimension"):
        ledger.totals(by='meta:we"ird')
    with pytest.raises(LedgerError, match="must not repeat"):
        ledger.totals(by=("user", "user"))
    with pytest.raises(LedgerError, match="unknown ledger dimension"):
        ledger.totals(where={"colour": "red"})


def test_run_cost(ledger: Ledger) -> None:
    row = ledger.run_cost("rootE")
    assert (row.calls, row.input_tokens, row.errors, row.unpriced_calls) == (2, 1100, 1, 1)
    assert row.cost_usd == pytest.approx(0.00075)
    assert ledger.run_cost("rootA").calls == 2
    assert ledger.run_cost("r8").calls == 1  # a call without a root is its own run
    missing = ledger.run_cost("nope")
    assert missing.calls == 0 and missing["run"] == "nope"


def test_accuracy_by_model(ledger: Ledger) -> None:
    rows = {r["model"]: r for r in ledger.accuracy()}
    assert set(rows) == {"gpt-4o", "gpt-4o-mini", "local-llama"}  # denied/error calls excluded
    big = rows["gpt-4o"]
    assert (big.calls, big.reserved_tokens, big.used_tokens, big.under_reserved) == (4, 6620, 5950, 1)
    assert big.headroom_ratio == pytest.approx(6620 / 5950, abs=1e-6)
    assert big.input_error == pytest.approx(320 / 5000)
    assert (big.reserved_usd, big.cost_usd) == pytest.approx((0.024, 0.022))
    mini = rows["gpt-4o-mini"]
    assert (mini.reserved_tokens, mini.used_tokens, mini.under_reserved) == (1770, 1450, 0)
    assert (mini.reserved_usd, mini.cost_usd) == pytest.approx((0.0005, 0.00033))  # r8 has no reserved cost
    local = rows["local-llama"]
    assert (local.headroom_ratio, local.reserved_usd, local.usd_headroom_ratio) == (1.056, None, None)


def test_rows_serialise_flat(ledger: Ledger) -> None:
    row = ledger.totals(by=("user", "tag"))[0]
    data = row.to_dict()
    assert list(data)[:3] == ["user", "tag", "calls"]
    assert json.loads(json.dumps(data)) == data


@pytest.mark.postgres
def test_sinks_answer_identically(make_sink: Any) -> None:
    answers = []
    for kind in ("sqlite", "jsonl", "memory", "postgres"):
        led = Ledger(make_sink(kind))
        for r in SAMPLE:
            led.record(r)
        answers.append(
            [
                [r.to_dict() for r in led.totals(by=by, since="2026-11-01T02:00")]
                for by in ("day", "user", ("model", "tag"), "meta:priority", "run", "scope")
            ]
            + [[r.to_dict() for r in led.accuracy(by="feature")]]
        )
        led.close()
    assert answers[0] == answers[1] == answers[2] == answers[3]


# -- the writer: durable on return, shared writes, failures ------------------------------


class FlakySink(MemorySink):
    """Fails its first ``failures`` writes; remembers the size of each write."""

    def __init__(self, failures: int = 0, delay: float = 0.0) -> None:
        super().__init__()
        self.failures = failures
        self.delay = delay
        self.calls = 0
        self.sizes: list[int] = []

    def write(self, records: Any) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError("disk on fire")
        time.sleep(self.delay)
        super().write(records)
        self.sizes.append(len(records))


def wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("kind", SINKS)
def test_a_record_is_stored_when_record_returns(kind: str, make_sink: Any) -> None:
    led = Ledger(make_sink(kind))
    for n, r in enumerate(SAMPLE, 1):
        led.record(r)
        # read back through the sink itself: no flush(), no writer thread to wait for
        assert len(list(led.sink.read())) == n
    assert led.pending == 0
    led.close()


def test_concurrent_records_share_writes() -> None:
    sink = FlakySink(delay=0.01)  # a slow sink: callers pile up behind each write
    led = Ledger(sink)
    stored_on_return: list[bool] = []

    def work(t: int) -> None:
        for i in range(20):
            led.record(replace(SAMPLE[0], run_id=f"{t}-{i}"))
            ids = {r.run_id for r in sink.read()}
            stored_on_return.append(f"{t}-{i}" in ids)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(stored_on_return) == 160 and all(stored_on_return)
    assert len(sink.records) == 160
    # While one write runs, the other seven callers queue their records; the next write takes
    # them all (about 1 + 7 per two writes: 40 writes, not 80 or more).
    assert sum(sink.sizes) == 160 and len(sink.sizes) <= 50
    led.close()


def test_failing_sink_keeps_records_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    sink = FlakySink(failures=2)
    led = Ledger(sink, batch_size=4, retry_interval=0.01)
    with caplog.at_level(logging.WARNING, logger="budgetguard"):
        start = time.perf_counter()
        for r in SAMPLE:
            led.record(r)  # never raises; after the first failure, does not even try the sink
        assert time.perf_counter() - start < 1.0
        assert wait_for(lambda: led.pending == 0)  # the retry thread writes them, with backoff
        led.flush()
        assert sorted(r.run_id for r in sink.records) == sorted(r.run_id for r in SAMPLE)
        assert max(sink.sizes) <= 4  # kept records go in writes of batch_size
        led.record(replace(SAMPLE[0], run_id="after"))  # the sink works again: stored on return
        assert "after" in {r.run_id for r in sink.records}
    assert caplog.text.count("disk on fire") == 1  # logged once, not per retry
    assert "recovered" in caplog.text
    led.close()


def test_flush_raises_while_the_sink_fails() -> None:
    sink = FlakySink(failures=10**9)
    led = Ledger(sink, retry_interval=60)
    led.record(SAMPLE[0])
    assert led.pending == 1
    with pytest.raises(LedgerError, match="disk on fire"):
        led.flush()
    led.close(timeout=2)
    assert led.dropped == 1


def test_queue_is_bounded_when_sink_never_recovers(caplog: pytest.LogCaptureFixture) -> None:
    sink = FlakySink(failures=10**9)
    led = Ledger(sink, batch_size=2, retry_interval=0.01, max_pending=5)
    with caplog.at_level(logging.WARNING, logger="budgetguard"):
        for i in range(50):
            led.record(replace(SAMPLE[0], run_id=f"x{i}"))
        assert led.pending <= 5 and led.dropped >= 45
        led.close(timeout=2)
    assert led.dropped == 50
    assert "dropping records" in caplog.text and "could not be written" in caplog.text


def test_record_after_close_is_dropped_not_raised() -> None:
    sink = MemorySink()
    led = Ledger(sink)
    led.close()
    led.close()
    led.record(SAMPLE[0])
    assert led.dropped == 1 and sink.records == []


def test_malformed_record_is_dropped_without_blocking_others() -> None:
    sink = SQLiteSink(":memory:")
    led = Ledger(sink)
    led.record(SAMPLE[0])
    led.record(replace(SAMPLE[1], input_tokens="many"))  # type: ignore[arg-type]
    led.record(SAMPLE[2])
    led.flush()
    assert [r.run_id for r in led.records()] == ["r1", "r3"]
    assert led.dropped == 1
    led.close()


def test_record_is_thread_safe() -> None:
    sink = MemorySink()
    led = Ledger(sink, batch_size=64)

    def work(t: int) -> None:
        for i in range(500):
            led.record(replace(SAMPLE[0], run_id=f"{t}-{i}"))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [r.run_id for r in sink.records]
    assert len(ids) == 4000 and len(set(ids)) == 4000
    led.close()


# -- one record per run: an expired lease replaces the charge ----------------------------

CALL = rec(
    42, D1 + 5 * HOUR, root_run_id="rootX", scope=u("dora"), tags=("prod",), metadata={"feature": "chat"},
    input_tokens=300, output_tokens=40, cost_usd=0.0012, reserved_usd=0.004, estimated_input_tokens=320,
    estimated_output_tokens=500, latency_s=1.5,
)  # fmt: skip
SWEPT = rec(
    42, D1 + 6 * HOUR, outcome="expired", model_requested="gpt-4o", input_tokens=320, output_tokens=500,
    cost_usd=0.004, reserved_usd=0.004, estimated_input_tokens=320, estimated_output_tokens=500, latency_s=None,
    budgets=("per-user",), error="lease expired before the call was settled; charged the reserved amount",
)  # fmt: skip
MERGED = replace(
    CALL, outcome="expired", input_tokens=320, output_tokens=500, cost_usd=0.004, error=SWEPT.error
)  # what the call was (CALL) and what the store charged (SWEPT)


@pytest.mark.parametrize("kind", SINKS)
@pytest.mark.parametrize(
    ("writes", "expected"),
    [
        ([CALL, SWEPT], MERGED),  # killed after recording, before settling; swept later
        ([SWEPT, CALL], MERGED),  # swept while slow; its late record keeps the sweep's charge
        ([CALL, SWEPT, SWEPT, CALL], MERGED),  # repeats change nothing
        ([SWEPT], SWEPT),  # killed before recording
        ([CALL, CALL], CALL),  # a write retried
    ],
    ids=["call-then-sweep", "sweep-then-call", "repeats", "sweep-only", "call-twice"],
)
def test_one_record_per_run_and_the_sweep_charge_wins(
    kind: str, writes: list[LedgerRecord], expected: LedgerRecord, make_sink: Any
) -> None:
    led = Ledger(make_sink(kind))
    for w in writes:
        led.record(w)
    led.record(SAMPLE[0])
    assert [r for r in led.records() if r.run_id == "r42"] == [expected]
    total = led.totals()[0]
    assert (total.calls, total.input_tokens) == (2, expected.input_tokens + SAMPLE[0].input_tokens)
    led.close()


def test_several_records_in_one_write_follow_the_same_rule() -> None:
    sink = MemorySink()
    sink.write([CALL, SWEPT, SAMPLE[0], SWEPT])
    assert [r for r in sink.records if r.run_id == "r42"] == [MERGED]


def test_a_schema_1_file_is_migrated_in_place(tmp_path: Path) -> None:
    from budgetguard.ledger_sql import SQLITE
    from budgetguard.ledger_sql import to_row as row_of

    path = tmp_path / "v1.sqlite3"
    with sqlite3.connect(path) as conn:  # a ledger as budgetguard 0.1 wrote it (no run_key)
        for statement in SQLITE.migrations()[1]:
            conn.execute(statement)
        conn.execute("PRAGMA application_id = 1111968839")
        conn.execute("PRAGMA user_version = 1")
        old = [CALL, replace(SWEPT, run_id="dup"), replace(CALL, run_id="dup"), SAMPLE[0]]
        columns = ", ".join(["?"] * (len(row_of(CALL)) - 1))
        conn.executemany(f"INSERT INTO calls VALUES (NULL, {columns})", [row_of(r)[:-1] for r in old])
    led = Ledger(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (2,)
        keys = dict(conn.execute("SELECT id, run_key FROM calls"))
    assert keys == {1: "r42", 2: None, 3: None, 4: "r1"}  # a repeated run id: history, kept as it was
    assert led.totals()[0].calls == 4
    led.record(SWEPT)  # the rule applies to a migrated row
    assert [r for r in led.records() if r.run_id == "r42"] == [MERGED]
    assert led.totals()[0].calls == 4
    led.close()


def test_fresh_ledgers_answer_empty(tmp_path: Path) -> None:
    for spec in (tmp_path / "new.jsonl", tmp_path / "new.sqlite3", ":memory:"):
        with Ledger(spec) as led:
            assert led.totals(by="user") == [] and list(led.records()) == []
            assert led.totals()[0].calls == 0


def test_sqlite_records_stream_beyond_one_chunk(tmp_path: Path) -> None:
    with Ledger(SQLiteSink(tmp_path / "many.sqlite3")) as led:
        for i in range(2500):
            led.record(replace(SAMPLE[0], run_id=f"m{i}", ts=D1 + i))
        stream = led.records(since=D1 + 100)
        assert next(stream).run_id == "m100"
        assert sum(1 for _ in stream) == 2399
