"""Tests of the report renderers and the ``budgetguard report`` command."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

import budgetguard.ledger as ledger_module
from budgetguard.cli_report import add_report_parser, build_parser, run_report
from budgetguard.ledger import Ledger, LedgerRecord, SQLiteSink
from budgetguard.ledger_query import Row
from budgetguard.report import HtmlReport, collect_html, format_cost, format_tokens, render_html, render_table

D1 = 1793491200.0  # 2026-11-01T00:00:00Z
REPO = Path(ledger_module.__file__).resolve().parents[1]
EVIL = "<script>alert(1)</script>"


def rec(n: int, day: int, user: str | None, model: str | None, cost: float | None, **kw: Any) -> LedgerRecord:
    fields: dict[str, Any] = {
        "ts": D1 + day * 86400 + n * 60,
        "run_id": f"r{n}",
        "root_run_id": f"root{n // 2}",
        "parent_run_id": None,
        "scope": {"user_id": user} if user else {},
        "tags": (),
        "metadata": {},
        "model_requested": model or "gpt-4o",
        "model_used": model,
        "policy": None,
        "outcome": "ok" if model else "denied",
        "estimated_input_tokens": 1200,
        "estimated_output_tokens": 400,
        "input_tokens": 1000 if model else 0,
        "output_tokens": 300 if model else 0,
        "cached_input_tokens": 0,
        "reasoning_tokens": 0,
        "cost_usd": cost,
        "reserved_usd": None if cost is None else cost * 1.5,
        "latency_s": 1.0,
        "budgets": ("per-user",),
    }
    fields.update(kw)
    return LedgerRecord(**fields)


RECORDS = [
    rec(1, 0, "alice", "gpt-4o", 0.05, tags=("prod",), metadata={"feature": "summarizer"}),
    rec(2, 0, "bob", "gpt-4o-mini", 0.002, tags=("prod", "beta"), metadata={"feature": "chat"}),
    rec(3, 0, EVIL, "gpt-4o", 0.04, tags=(EVIL,), metadata={"feature": EVIL}),
    rec(4, 1, "alice", None, 0.0, metadata={"feature": "chat"}, error="over budget"),
    rec(5, 1, "bob", "local-llama", None, tags=("beta",)),
    rec(6, 2, None, "gpt-4o", 0.5, tags=("batch",), metadata={"feature": "summarizer"}),
    rec(7, 2, "alice", "gpt-4o-mini", 0.001, outcome="error", metadata={"feature": "chat"}),
]


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.sqlite3"
    with Ledger(SQLiteSink(path)) as led:
        for r in RECORDS:
            led.record(r)
    return path


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = run_report(build_parser().parse_args(args))
    out, err = capsys.readouterr()
    return code, out, err


def python_rows(path: Path, **kw: Any) -> list[dict[str, Any]]:
    with Ledger(SQLiteSink(path, create=False)) as led:
        return [r.to_dict() for r in led.totals(**kw)]


# -- formatting and the terminal table ------------------------------------------------------


def test_formatters() -> None:
    assert (format_cost(None), format_cost(0), format_cost(0.01234), format_cost(1234.5)) == (
        "-",
        "$0.00",
        "$0.0123",
        "$1,234.50",
    )
    assert [format_cost(v) for v in (0.5, 0.05, 0.002, 0.0000375, 0.000037456, -0.0123, 0.99951)] == [
        "$0.50", "$0.05", "$0.002", "$0.0000375", "$0.0000375", "-$0.0123", "$1.00"]
    assert format_cost(0.0000375, 4) == "$0.0000"  # fixed decimals when asked for
    assert (format_tokens(950), format_tokens(12_345), format_tokens(4_560_000), format_tokens(2e9)) == (
        "950",
        "12.3k",
        "4.56M",
        "2.00B",
    )


def test_table_fits_80_columns_with_proportional_bars(ledger_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(["--ledger", str(ledger_path), "--by", "user", "--width", "80"], capsys)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines), [len(line) for line in lines]
    assert lines[0] == "2026-11-01 00:01 → 2026-11-03 00:07 (UTC)"
    assert lines[1] == "7 calls · $0.593 · 1 denied · 1 error"
    body = {line.split()[0]: line for line in lines[5:] if line and not line.startswith(("note", "…"))}
    assert set(body) == {"alice", "bob", "<script>alert(1)</script>", "(none)"}
    bars = {user: line.count("█") for user, line in body.items()}
    assert bars["(none)"] == max(bars.values()) > bars["alice"] > bars["bob"]
    assert "note: 1 call to models without a price: cost not included" in out


def test_table_uses_tokens_when_nothing_is_priced() -> None:
    rows = [Row(group={"model": "a"}, calls=1, total_tokens=1000), Row(group={"model": "b"}, calls=1, total_tokens=500)]
    text = render_table(rows, Row(calls=2, total_tokens=1500), by=["model"])
    a, b = (line for line in text.splitlines() if line.startswith(("a ", "b ")))
    assert a.count("█") == 2 * b.count("█") and "-" in a
    assert "no calls recorded in this range" in render_table([], Row(), by=["model"])


def test_table_top_mentions_hidden_groups(ledger_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(["--ledger", str(ledger_path), "--by", "model", "--top", "2"], capsys)
    assert code == 0
    assert "… 1 more groups not shown" in out  # gpt-4o, gpt-4o-mini, local-llama: the denied call is gpt-4o's
    assert [line.split()[0] for line in out.splitlines()[5:7]] == ["gpt-4o", "gpt-4o-mini"]


def test_a_denied_call_keeps_its_model(ledger_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # rec 4 asked for gpt-4o and was refused before it was sent: it counts under gpt-4o, not "(none)".
    code, out, _ = cli(["--ledger", str(ledger_path), "--by", "model"], capsys)
    assert code == 0 and "(none)" not in out
    gpt4o = next(line for line in out.splitlines() if line.startswith("gpt-4o "))
    assert gpt4o.split()[1:5] == ["4", "3.90k", "$0.59", "1"]  # calls, tokens, cost, denied
    rows = python_rows(ledger_path, by="model")
    assert {r["model"]: r["denied"] for r in rows} == {"gpt-4o": 1, "gpt-4o-mini": 0, "local-llama": 0}
    assert python_rows(ledger_path, by="model_requested")[0]["model_requested"] == "gpt-4o"


def test_cheap_calls_are_told_apart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 100-token calls to gpt-4o-mini cost fractions of a cent; four decimals printed all of them as $0.0000.
    path = tmp_path / "cheap.sqlite3"
    with Ledger(SQLiteSink(path)) as led:
        led.record(rec(1, 0, "alice", "gpt-4o-mini", 0.0000375))
        led.record(rec(2, 0, "bob", "gpt-4o-mini", 0.000075))
        led.record(rec(3, 0, "carol", "gpt-4o-mini", 0.0000031))
    code, out, _ = cli(["--ledger", str(path), "--by", "user"], capsys)
    assert code == 0
    costs = {line.split()[0]: line.split()[3] for line in out.splitlines()[5:8]}
    assert costs == {"alice": "$0.0000375", "bob": "$0.000075", "carol": "$0.0000031"}
    assert out.splitlines()[1] == "3 calls · $0.000116 · 0 denied"

# -- json / csv equal the Python query ------------------------------------------------------


@pytest.mark.parametrize(
    ("by", "extra", "query"),
    [
        ("day", [], {"by": ["day"]}),
        ("user", [], {"by": ["user"]}),
        ("model", ["--since", "2026-11-02"], {"by": ["model"], "since": "2026-11-02"}),
        ("tag", ["--until", "2026-11-03"], {"by": ["tag"], "until": "2026-11-03"}),
        ("feature", ["--top", "2"], {"by": ["feature"], "top": 2}),
        ("run", [], {"by": ["run"]}),
        ("outcome", [], {"by": ["outcome"]}),
        ("scope:user_id", [], {"by": ["scope:user_id"]}),
        ("meta:feature", [], {"by": ["meta:feature"]}),
        ("user,model", [], {"by": ["user", "model"]}),
    ],
)
def test_json_and_csv_equal_python_query(
    ledger_path: Path, capsys: pytest.CaptureFixture[str], by: str, extra: list[str], query: dict[str, Any]
) -> None:
    expected = python_rows(ledger_path, **query)
    assert expected
    code, out, _ = cli(["--ledger", str(ledger_path), "--by", by, "--format", "json", *extra], capsys)
    assert code == 0 and json.loads(out) == expected
    code, out, _ = cli(["--ledger", str(ledger_path), "--by", by, "--format", "csv", *extra], capsys)
    assert code == 0
    parsed = list(csv.DictReader(io.StringIO(out)))
    assert [list(row) for row in parsed] == [list(map(str, row)) for row in expected]
    as_text = [{k: "" if v is None else str(v) for k, v in row.items()} for row in expected]
    assert parsed == as_text


def test_cli_as_a_subprocess_matches_python_query(ledger_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "BUDGETGUARD_LEDGER": str(ledger_path)}
    cmd = [sys.executable, "-m", "budgetguard.cli_report", "--by", "user", "--since", "2026-11-01", "--format", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == python_rows(ledger_path, by="user", since="2026-11-01")
    done = subprocess.run(
        [*cmd[:3], "--since", "not-a-date"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and "cannot read since 'not-a-date'" in done.stderr


# -- errors -------------------------------------------------------------------------------


def test_missing_corrupt_and_foreign_ledgers_fail_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"\x00\x01not sqlite" * 100)
    foreign = tmp_path / "app.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER)")
    cases = {
        tmp_path / "missing.sqlite3": "no ledger at",
        garbage: "not a budgetguard ledger",
        foreign: "not a budgetguard ledger",
        tmp_path: "is not a file",
    }
    for path, message in cases.items():
        code, out, err = cli(["--ledger", str(path)], capsys)
        assert code == 1 and out == "", path
        assert err.startswith("budgetguard report: ") and message in err and err.count("\n") == 1, err


def test_bad_arguments_exit_2(ledger_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args, message in (
        (["--since", "last week"], "cannot read since 'last week': use a datetime"),
        (["--until", "2026-02-30"], "cannot read until"),
        (["--by", "colour"], "unknown ledger dimension 'colour'"),
        (["--top", "0"], "--top must be at least 1"),
    ):
        code, out, err = cli(["--ledger", str(ledger_path), *args], capsys)
        assert code == 2 and out == "" and message in err and err.count("\n") == 1, err


def test_empty_ledger_and_empty_range_exit_0(
    tmp_path: Path, ledger_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.sqlite3"
    SQLiteSink(empty).close()
    code, out, err = cli(["--ledger", str(empty)], capsys)
    assert code == 0 and "no calls recorded in this range" in out and err == ""
    code, out, err = cli(["--ledger", str(ledger_path), "--since", "2030-01-01", "--format", "json"], capsys)
    assert code == 0 and json.loads(out) == [] and "no calls recorded in this range" in err
    code, out, _ = cli(["--ledger", str(ledger_path), "--since", "2030-01-01", "--format", "csv"], capsys)
    assert code == 0 and out.startswith("day,calls,input_tokens,")


def test_html_write_failure_exits_1(ledger_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(["--ledger", str(ledger_path), "--html", str(tmp_path / "no" / "such" / "dir.html")], capsys)
    assert code == 1 and "cannot write the HTML report" in err and err.count("\n") == 1


def test_add_report_parser_wires_into_a_main_cli(ledger_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main = argparse.ArgumentParser(prog="budgetguard")
    sub = main.add_subparsers(dest="command")
    add_report_parser(sub)
    args = main.parse_args(["report", "--ledger", str(ledger_path), "--by", "model", "--format", "json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out) == python_rows(ledger_path, by="model")


# -- html -----------------------------------------------------------------------------------


class PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.bars: dict[str, list[dict[str, str]]] = {}
        self.totals: dict[str, str] = {}
        self.tags: set[str] = set()
        self.links: list[str] = []
        self.accuracy_rows = 0
        self._chart: str | None = None
        self._total: str | None = None
        self._in_accuracy = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.add(tag)
        self.links += [a[k] for k in ("src", "href") if k in a]
        if tag == "svg":
            self._chart = a.get("data-chart")
            self.bars[self._chart or "?"] = []
        elif tag == "rect" and "bar" in a.get("class", "").split() and self._chart:
            self.bars[self._chart].append(a)
        elif "data-total" in a:
            self._total = a["data-total"]
        elif tag == "table" and a.get("id") == "accuracy":
            self._in_accuracy = True
        elif tag == "tr" and self._in_accuracy:
            self.accuracy_rows += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._chart = None
        if tag == "table":
            self._in_accuracy = False

    def handle_data(self, data: str) -> None:
        if self._total:
            self.totals[self._total] = data
            self._total = None


def test_html_has_one_bar_per_group_and_the_totals(
    ledger_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "report.html"
    code, out, err = cli(["--ledger", str(ledger_path), "--html", str(out_file)], capsys)
    assert code == 0 and out == "" and "HTML report written to" in err
    page = out_file.read_text(encoding="utf-8")
    parser = PageParser()
    parser.feed(page)
    groups = {chart: [b["data-group"] for b in bars] for chart, bars in parser.bars.items()}
    assert sorted(groups["day"]) == ["2026-11-01", "2026-11-02", "2026-11-03"]
    assert sorted(groups["user"]) == sorted(["alice", "bob", EVIL, "(none)"])
    assert sorted(groups["model"]) == sorted(["gpt-4o", "gpt-4o-mini", "local-llama"])  # denied: its model
    assert sorted(groups["feature"]) == sorted(["summarizer", "chat", EVIL, "(none)"])
    assert sorted(groups["tag"]) == sorted(["prod", "beta", "batch", EVIL, "(none)"])
    user_values = {b["data-group"]: float(b["data-value"]) for b in parser.bars["user"]}
    assert user_values == pytest.approx({"alice": 0.051, "bob": 0.002, EVIL: 0.04, "(none)": 0.5})
    assert parser.totals == {
        "Total cost": "$0.593", "Calls": "7", "Tokens": "7.80k", "Denied calls": "1", "Errors": "1",
        "Calls without a price": "1",
    }  # fmt: skip
    assert parser.accuracy_rows == 1 + 3  # header + gpt-4o, gpt-4o-mini, local-llama
    assert "script" not in parser.tags and EVIL not in page and "&lt;script&gt;" in page
    assert parser.links == [] and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_html_of_an_empty_range_says_so(ledger_path: Path) -> None:
    with Ledger(SQLiteSink(ledger_path, create=False)) as led:
        page = render_html(collect_html(led, since="2030-01-01"))
    assert "No calls recorded in this range." in page and 'class="bar"' not in page
    assert "<svg" not in render_html(HtmlReport(summary=Row()))


def test_html_renders_in_a_browser(ledger_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not shutil.which("chromium"):
        reason = "chromium is not installed (Debian: apt-get install chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI must run the browser check", pytrace=False)
        pytest.skip(reason)
    out_file, shot = tmp_path / "report.html", tmp_path / "report.png"
    assert cli(["--ledger", str(ledger_path), "--html", str(out_file)], capsys)[0] == 0
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1000,1800",
           f"--screenshot={shot}", out_file.as_uri()]  # fmt: skip
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert shot.exists() and shot.stat().st_size > 20_000
