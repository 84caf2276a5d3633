"""Render ledger totals: terminal table with bar chart, JSON, CSV, and a standalone HTML page.

The JSON and CSV outputs are exactly the rows of :meth:`Ledger.totals` (``Row.to_dict``).
The HTML page is self-contained (inline CSS and SVG, no scripts, nothing fetched), and
every string that comes from the ledger is escaped.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from html import escape
from typing import Any

from budgetguard.ledger import Ledger
from budgetguard.money import format_usd
from budgetguard.ledger_query import AccuracyRow, Row, resolve_dimensions, select_top, time_range

__all__ = [
    "HtmlReport",
    "collect_html",
    "format_cost",
    "format_tokens",
    "render_csv",
    "render_html",
    "render_json",
    "render_table",
]

_BLOCKS = " ▏▎▍▌▋▊▉█"
_METRIC_FIELDS = tuple(n for n in Row.__dataclass_fields__ if n != "group")
HTML_CHARTS = (
    ("day", "by day"),
    ("user", "by user"),
    ("model", "by model"),
    ("feature", "by feature"),
    ("tag", "by tag"),
)


# -- formatting -----------------------------------------------------------------------


def format_cost(value: float | None, decimals: int | None = None) -> str:
    """``$1,234.56``; below a dollar, three significant digits, so cheap calls stay apart.

    ``$0.0123``, ``$0.000038`` (not ``$0.0000``), ``$0.05``; fixed ``decimals`` if given;
    ``-`` when unknown.
    """
    if value is None:
        return "-"
    if decimals is not None:
        return f"${value:,.{decimals}f}"
    return format_usd(value)


def format_tokens(value: float) -> str:
    """Compact token count: ``950``, ``12.3k``, ``4.56M``, ``1.2B``."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            scaled = value / size
            return f"{scaled:.{2 if scaled < 10 else 1 if scaled < 100 else 0}f}{suffix}"
    return f"{value:,.0f}"


def format_ts(ts: float | None, *, date_only: bool = False) -> str:
    """A unix time as UTC text (``-`` when unknown)."""
    if ts is None:
        return "-"
    moment = datetime.fromtimestamp(ts, timezone.utc)
    if date_only or (moment.hour, moment.minute, moment.second) == (0, 0, 0):
        return moment.strftime("%Y-%m-%d")
    return moment.strftime("%Y-%m-%d %H:%M")


def describe_range(since: float | None, until: float | None, summary: Row) -> str:
    """``2026-11-01 → 2026-11-08 (UTC)``; open ends show the first/last recorded call."""
    start = format_ts(since) if since is not None else format_ts(summary.first_ts)
    end = format_ts(until) if until is not None else format_ts(summary.last_ts)
    return f"{start} → {end} (UTC)"


def _count(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _label(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _priced(rows: Sequence[Row]) -> bool:
    return any(r.cost_usd for r in rows)


def _value(row: Row, priced: bool) -> float:
    return (row.cost_usd or 0.0) if priced else float(row.total_tokens)


def _bar(value: float, peak: float, width: int) -> str:
    if peak <= 0 or value <= 0 or width <= 0:
        return ""
    eighths = max(1, round(value / peak * width * 8))
    return _BLOCKS[8] * (eighths // 8) + (_BLOCKS[eighths % 8] if eighths % 8 else "")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


# -- table / json / csv --------------------------------------------------------------


def render_table(
    rows: Sequence[Row],
    summary: Row,
    *,
    by: Sequence[str],
    since: float | None = None,
    until: float | None = None,
    hidden: int = 0,
    width: int = 80,
) -> str:
    """An aligned table with a bar chart of cost (tokens when nothing is priced).

    Args:
        rows: The rows to show (already limited to the top N).
        summary: Totals over the whole range (``Ledger.totals()``), for the header.
        by: The dimension names, as column headings.
        since: Range start shown in the header (unix seconds).
        until: Range end shown in the header.
        hidden: Groups left out by ``--top``, mentioned in the footer.
        width: Target line width; the bar column takes what the others leave.
    """
    header = f"{describe_range(since, until, summary)}\n{_count(summary.calls, 'call')} · " + (
        f"{format_cost(summary.cost_usd)} · {summary.denied:,} denied"
        + (f" · {_count(summary.errors, 'error')}" if summary.errors else "")
    )
    if not rows:
        return header + "\nno calls recorded in this range\n"
    priced = _priced(rows)
    cells = [[_label(r.group.get(name)) for name in by] for r in rows]
    numbers = [[f"{r.calls:,}", format_tokens(r.total_tokens), format_cost(r.cost_usd), f"{r.denied:,}"] for r in rows]
    heads = [*by, "calls", "tokens", "cost", "denied"]
    num_widths = [max(len(h), *(len(n[i]) for n in numbers)) for i, h in enumerate(heads[len(by) :])]
    room = width - sum(num_widths) - 2 * len(heads) - 12  # keep at least 12 columns for bars
    key_widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(by)]
    while sum(key_widths) > room and max(key_widths) > 6:  # shrink the widest key column first
        key_widths[key_widths.index(max(key_widths))] -= 1
    widths = key_widths + num_widths
    bar_width = max(12, width - sum(widths) - 2 * len(widths))
    peak = max(_value(r, priced) for r in rows)
    lines = [header, ""]
    aligns = ["<"] * len(by) + [">"] * 4
    lines.append("  ".join(f"{h:{a}{w}}" for h, a, w in zip(heads, aligns, widths)))
    lines.append("  ".join("─" * w for w in widths) + "  " + "─" * bar_width)
    for row, key, nums in zip(rows, cells, numbers):
        texts = [_clip(k, w) for k, w in zip(key, widths)] + nums
        line = "  ".join(f"{t:{a}{w}}" for t, a, w in zip(texts, aligns, widths))
        lines.append(line + "  " + _bar(_value(row, priced), peak, bar_width))
    if hidden:
        lines.append(f"… {hidden:,} more groups not shown (raise --top to see them)")
    if summary.unpriced_calls:
        lines.append(f"note: {_count(summary.unpriced_calls, 'call')} to models without a price: cost not included")
    return "\n".join(line.rstrip() for line in lines) + "\n"


def render_json(rows: Sequence[Any]) -> str:
    """The rows as a JSON array of flat objects (``Row.to_dict``)."""
    return json.dumps([r.to_dict() for r in rows], indent=2, ensure_ascii=False) + "\n"


def render_csv(rows: Sequence[Any], *, by: Sequence[str] = ()) -> str:
    """The rows as CSV with a header line; ``None`` is an empty cell, booleans ``true``/``false``."""
    names = list(rows[0].to_dict()) if rows else [*by, *_METRIC_FIELDS]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: str(v).lower() if isinstance(v, bool) else v for k, v in row.to_dict().items()})
    return out.getvalue()


# -- html ------------------------------------------------------------------------------


@dataclass
class HtmlReport:
    """Everything the HTML page shows, gathered from one ledger."""

    summary: Row
    since: float | None = None
    until: float | None = None
    charts: dict[str, list[Row]] = field(default_factory=dict)
    hidden: dict[str, int] = field(default_factory=dict)
    accuracy: list[AccuracyRow] = field(default_factory=list)
    title: str = "LLM spend report"
    generated: float = field(default_factory=time.time)


def collect_html(
    ledger: Ledger, *, since: Any = None, until: Any = None, top: int = 15, title: str = "LLM spend report"
) -> HtmlReport:
    """Query ``ledger`` for the HTML page: totals, day/user/model/feature/tag, accuracy."""
    lo, hi = time_range(since, until)
    report = HtmlReport(summary=ledger.totals(since=lo, until=hi)[0], since=lo, until=hi, title=title)
    for name, _ in HTML_CHARTS:
        rows = ledger.totals(by=name, since=lo, until=hi)
        if name == "day":
            report.charts[name] = _fill_days(rows)
        else:
            report.charts[name] = select_top(rows, top)
            report.hidden[name] = max(len(rows) - top, 0)
    report.accuracy = ledger.accuracy(by="model", since=lo, until=hi)
    return report


def _fill_days(rows: list[Row]) -> list[Row]:
    """Insert zero rows for days without calls, so the day chart is a true time axis."""
    if not rows or len(rows) > 400:
        return rows
    found = {r.group["day"]: r for r in rows}
    day = datetime.strptime(rows[0].group["day"], "%Y-%m-%d")
    last = datetime.strptime(rows[-1].group["day"], "%Y-%m-%d")
    filled: list[Row] = []
    while day <= last and len(filled) < 400:
        key = day.strftime("%Y-%m-%d")
        filled.append(found.get(key) or Row(group={"day": key}))
        day += timedelta(days=1)
    return filled


def _hbar_chart(name: str, rows: Sequence[Row], priced: bool) -> str:
    """Horizontal bars, one per group, label on the left and value on the right."""
    width, label_w, value_w, row_h = 640, 190, 80, 26
    plot = width - label_w - value_w
    peak = max((_value(r, priced) for r in rows), default=0.0) or 1.0
    parts = [
        f'<svg class="chart" data-chart="{escape(name)}" role="img" viewBox="0 0 {width} {row_h * len(rows) + 8}" '
        f'xmlns="http://www.w3.org/2000/svg">'
    ]
    for i, row in enumerate(rows):
        label, value = _label(row.group.get(name)), _value(row, priced)
        shown = format_cost(row.cost_usd) if priced else format_tokens(row.total_tokens)
        y, bar_w = i * row_h + 4, max(value / peak * plot, 1.0 if value > 0 else 0.0)
        tip = f"{label}: {shown} · {row.calls:,} calls · {row.total_tokens:,} tokens"
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end" class="label">{escape(_clip(label, 22))}</text>'
            f'<rect class="bar" data-group="{escape(label)}" data-value="{value:.10g}" x="{label_w}" y="{y}" '
            f'width="{bar_w:.2f}" height="{row_h - 8}" rx="3"><title>{escape(tip)}</title></rect>'
            f'<text x="{label_w + bar_w + 6:.2f}" y="{y + 15}" class="value">{escape(shown)}</text>'
        )
    return "".join(parts) + "</svg>"


def _day_chart(rows: Sequence[Row], priced: bool) -> str:
    """Vertical columns over consecutive days, with sparse date labels."""
    width, height, left, bottom = 640, 220, 56, 24
    plot_w, plot_h = width - left - 8, height - bottom - 12
    peak = max((_value(r, priced) for r in rows), default=0.0) or 1.0
    slot = plot_w / max(len(rows), 1)
    every = max(1, math.ceil(len(rows) / 8))
    top_label = format_cost(peak) if priced else format_tokens(peak)
    parts = [
        f'<svg class="chart" data-chart="day" role="img" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
        f'<line x1="{left}" y1="{12 + plot_h}" x2="{width - 8}" y2="{12 + plot_h}" class="axis"/>',
        f'<line x1="{left}" y1="12" x2="{width - 8}" y2="12" class="grid"/>',
        f'<text x="{left - 6}" y="18" text-anchor="end" class="value">{escape(top_label)}</text>',
    ]
    for i, row in enumerate(rows):
        day, value = str(row.group.get("day")), _value(row, priced)
        bar_h, bar_w = value / peak * plot_h, min(slot * 0.7, 48.0)
        x = left + i * slot + (slot - bar_w) / 2
        shown = format_cost(row.cost_usd) if priced else format_tokens(row.total_tokens)
        parts.append(
            f'<rect class="bar" data-group="{escape(day)}" data-value="{value:.10g}" x="{x:.2f}" '
            f'y="{12 + plot_h - bar_h:.2f}" width="{bar_w:.2f}" height="{bar_h:.2f}" rx="2">'
            f"<title>{escape(f'{day}: {shown} · {row.calls:,} calls')}</title></rect>"
        )
        if i % every == 0:
            parts.append(
                f'<text x="{x + bar_w / 2:.2f}" y="{height - 6}" text-anchor="middle" class="label">'
                f"{escape(day[5:])}</text>"
            )
    return "".join(parts) + "</svg>"


_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2937;background:#f6f7f9;margin:0}
main{max-width:980px;margin:0 auto;padding:28px 20px 48px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:18px;margin:0 0 12px}
.sub{color:#6b7280;margin:0 0 24px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:12px;margin-bottom:24px}
.card{background:#fff;border-radius:10px;padding:14px 16px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
.card .k{color:#6b7280;font-size:13px}.card .v{font-size:24px;font-weight:650;margin-top:2px}
.card.warn .v{color:#b45309}
section{background:#fff;border-radius:10px;padding:18px 20px;margin-bottom:18px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
.chart{width:100%;height:auto}.bar{fill:#4f6bed}.bar:hover{fill:#2f4bd0}
.label{font-size:12px;fill:#374151}.value{font-size:12px;fill:#6b7280}
.axis{stroke:#d1d5db}.grid{stroke:#eef0f3;stroke-dasharray:4 4}
table{border-collapse:collapse;width:100%;font-size:14px}
th,td{padding:6px 10px;border-bottom:1px solid #eef0f3;text-align:right}
th:first-child,td:first-child{text-align:left}th{color:#6b7280;font-weight:600}
.note{color:#6b7280;font-size:13px;margin:8px 0 0}.bad{color:#b91c1c;font-weight:600}
"""


def _cards(summary: Row) -> str:
    cards = [
        ("Total cost", format_cost(summary.cost_usd), False),
        ("Calls", f"{summary.calls:,}", False),
        ("Tokens", format_tokens(summary.total_tokens), False),
        ("Denied calls", f"{summary.denied:,}", summary.denied > 0),
        ("Errors", f"{summary.errors:,}", summary.errors > 0),
    ]
    if summary.unpriced_calls:
        cards.append(("Calls without a price", f"{summary.unpriced_calls:,}", True))
    return (
        '<div class="cards" id="totals">'
        + "".join(
            f'<div class="card{" warn" if warn else ""}"><div class="k">{escape(k)}</div>'
            f'<div class="v" data-total="{escape(k)}">{escape(v)}</div></div>'
            for k, v, warn in cards
        )
        + "</div>"
    )


def _accuracy_table(rows: Sequence[AccuracyRow]) -> str:
    if not rows:
        return '<p class="note">No completed calls in this range.</p>'

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}×"

    def under(count: int) -> str:
        return f'<td class="bad">{count:,}</td>' if count else f"<td>{count:,}</td>"

    body = "".join(
        f"<tr><td>{escape(_label(r.group.get('model')))}</td><td>{r.calls:,}</td><td>{r.reserved_tokens:,}</td>"
        f"<td>{r.used_tokens:,}</td><td>{ratio(r.headroom_ratio)}</td>"
        f"<td>{'-' if r.input_error is None else f'{r.input_error:.1%}'}</td>"
        f"{under(r.under_reserved)}</tr>"
        for r in rows
    )
    return (
        '<table id="accuracy"><tr><th>Model</th><th>Calls</th><th>Reserved tokens</th><th>Used tokens</th>'
        "<th>Reserved ÷ used</th><th>Input estimate error</th><th>Under-reserved calls</th></tr>"
        + body
        + '</table><p class="note">Reserved ÷ used above 1 means budgets were held longer than needed; '
        "under-reserved calls used more than was reserved and can overspend a budget.</p>"
    )


def render_html(report: HtmlReport) -> str:
    """A complete, self-contained HTML page for a manager: totals, charts, accuracy."""
    s = report.summary
    sections = []
    for name, heading in HTML_CHARTS:
        rows = report.charts.get(name, [])
        priced = _priced(rows)
        title = f"{'Cost' if priced else 'Tokens'} {heading}"
        if not rows or all(r.group.get(name) is None for r in rows):
            body = f'<p class="note">No {escape(heading[3:])} recorded in this range.</p>'
        else:
            body = _day_chart(rows, priced) if name == "day" else _hbar_chart(name, rows, priced)
            if report.hidden.get(name):
                body += f'<p class="note">Top {len(rows)} shown; {report.hidden[name]:,} more not shown.</p>'
        sections.append(f'<section id="by-{escape(name)}"><h2>{escape(title)}</h2>{body}</section>')
    generated = datetime.fromtimestamp(report.generated, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    empty = "" if s.calls else '<section><p class="note">No calls recorded in this range.</p></section>'
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(report.title)}</title><style>{_CSS}</style></head><body><main>"
        f"<h1>{escape(report.title)}</h1>"
        f'<p class="sub">{escape(describe_range(report.since, report.until, s))} · generated {generated}</p>'
        + _cards(s)
        + empty
        + "".join(sections)
        + f"<section><h2>Estimate accuracy</h2>{_accuracy_table(report.accuracy)}</section>"
        + (
            f'<p class="note">{_count(s.unpriced_calls, "call")} to models without a price: their cost is not '
            "included in the totals.</p>"
            if s.unpriced_calls
            else ""
        )
        + "</main></body></html>\n"
    )


def dimension_names(by: str | Sequence[str]) -> list[str]:
    """The row keys for ``by`` (validates the names)."""
    return [d.name for d in resolve_dimensions(by)]
