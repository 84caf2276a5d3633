"""The ``budgetguard report`` subcommand: spend from the ledger as a table, JSON, CSV or HTML.

Wiring into a main CLI::

    subparsers = parser.add_subparsers(dest="command")
    add_report_parser(subparsers)          # sets defaults(func=run_report)
    args = parser.parse_args()
    sys.exit(args.func(args))

Exit codes: 0 on success (also when the range holds no calls), 1 when the ledger is
missing, unreadable or corrupt or the HTML file cannot be written, 2 for bad arguments
(dates, dimensions). Errors are one line on stderr, never a traceback.

Standalone: ``python -m budgetguard.cli_report [options]`` (same options as ``report``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from budgetguard.ledger import LEDGER_ENV, LedgerError, default_ledger_path, open_ledger
from budgetguard.ledger_query import TIME_FORMATS, resolve_dimensions, select_top, time_range
from budgetguard.report import collect_html, render_csv, render_html, render_json, render_table

__all__ = ["add_report_parser", "build_parser", "main", "run_report"]

PROG = "budgetguard report"
DESCRIPTION = (
    "Show what LLM calls cost, from the budgetguard ledger: grouped totals as an aligned table "
    "with a bar chart (default), JSON or CSV, and optionally a self-contained HTML page."
)
EPILOG = (
    "Dates are UTC and the range is half-open: --since 2026-11-01 --until 2026-11-08 covers "
    f"Nov 1 to Nov 7. Accepted: {TIME_FORMATS}. "
    f"The ledger defaults to ${LEDGER_ENV} or the user data dir."
)


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--ledger",
        metavar="PATH|URL",
        help=f"ledger file (SQLite or JSONL) or postgresql:// URL (default: ${LEDGER_ENV} or {default_ledger_path()})",
    )
    parser.add_argument("--since", metavar="D", help="start of the range, inclusive (e.g. 2026-11-01, 7d, today)")
    parser.add_argument("--until", metavar="D", help="end of the range, exclusive")
    parser.add_argument(
        "--by",
        default="day",
        metavar="DIM",
        help="group by day|month|user|model|model_requested|tag|feature|run|outcome|policy|budget|scope|"
        "scope:KEY|meta:KEY; comma-separate for several (default: day)",
    )
    parser.add_argument(
        "--format",
        choices=("table", "json", "csv"),
        default=None,
        help="output on stdout (default: table; with --html only when given)",
    )
    parser.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report to FILE")
    parser.add_argument("--top", metavar="N", type=int, help="only the N costliest groups")
    parser.add_argument("--width", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand to ``subparsers`` (from ``add_subparsers()``).

    The returned parser has ``func=run_report`` as a default.
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "report",
        help="show spend from the ledger (table, JSON, CSV, HTML)",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    _configure(parser)
    parser.set_defaults(func=run_report)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser with the ``report`` options (for ``python -m``)."""
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG)
    _configure(parser)
    parser.set_defaults(func=run_report)
    return parser


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def run_report(args: argparse.Namespace) -> int:
    """Run the report for parsed ``args``; return the process exit code."""
    try:
        lo, hi = time_range(args.since, args.until)
        by = [part.strip() for part in str(args.by).split(",") if part.strip()]
        names = [d.name for d in resolve_dimensions(by)]
    except LedgerError as exc:
        return _fail(str(exc), 2)
    if args.top is not None and args.top < 1:
        return _fail(f"--top must be at least 1, got {args.top}", 2)
    try:
        ledger = open_ledger(args.ledger or None)
    except LedgerError as exc:
        return _fail(str(exc), 1)
    try:
        return _report(ledger, args, names, lo, hi)
    except LedgerError as exc:
        return _fail(str(exc), 1)
    except BrokenPipeError:  # e.g. piped into `head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    finally:
        ledger.close()


def _report(ledger: Any, args: argparse.Namespace, names: list[str], lo: float | None, hi: float | None) -> int:
    fmt = args.format or ("table" if not args.html else None)
    if fmt is not None:
        rows = ledger.totals(by=names, since=lo, until=hi)
        shown = select_top(rows, args.top)
        if fmt == "json":
            sys.stdout.write(render_json(shown))
        elif fmt == "csv":
            sys.stdout.write(render_csv(shown, by=names))
        else:
            summary = ledger.totals(since=lo, until=hi)[0]
            width = args.width or _terminal_width()
            text = render_table(
                shown, summary, by=names, since=lo, until=hi, hidden=len(rows) - len(shown), width=width
            )
            sys.stdout.write(text)
        if not rows and fmt != "table":
            print(f"{PROG}: no calls recorded in this range", file=sys.stderr)
    if args.html:
        page = render_html(collect_html(ledger, since=lo, until=hi, top=args.top or 15))
        try:
            Path(args.html).expanduser().write_text(page, encoding="utf-8")
        except OSError as exc:
            return _fail(f"cannot write the HTML report to {args.html}: {exc.strerror or exc}", 1)
        print(f"{PROG}: HTML report written to {args.html}", file=sys.stderr)
    return 0


def _terminal_width() -> int:
    try:
        columns = os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError):
        columns = 80
    return max(60, min(columns, 120))


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m budgetguard.cli_report``."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
