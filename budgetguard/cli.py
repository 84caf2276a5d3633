"""The ``budgetguard`` command: ``demo``, ``report``, ``status`` and ``prices``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

__all__ = ["main"]


def _load_guard(path: str) -> Any:
    from budgetguard.errors import ConfigurationError

    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        msg = f"expected MODULE:ATTRIBUTE naming a BudgetGuard (e.g. myapp.guards:guard), got {path!r}"
        raise ConfigurationError(msg)
    sys.path.insert(0, "")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        msg = f"cannot load {path!r}: {exc}"
        raise ConfigurationError(msg) from exc
    return obj() if callable(obj) and not hasattr(obj, "budgets") else obj


def _status(args: argparse.Namespace) -> int:
    from budgetguard.errors import BudgetGuardError
    from budgetguard.money import format_usd
    from budgetguard.stores.memory import MemoryStore

    try:
        guard = _load_guard(args.guard)
        scope = dict(s.split("=", 1) for s in args.scope)
        if isinstance(guard.store, MemoryStore):
            # This process built its own, empty memory store: it cannot see what the app has spent.
            print(f"budgetguard status: {args.guard} keeps its budgets in memory (the default store), so this "
                  "command sees only its own, new store: every bucket below is as full as at start, whatever "
                  "your application's processes have spent. To read live budgets from here, give the guard "
                  "a shared store: store='sqlite:///budgets.db' or store='redis://host:6379/0'.", file=sys.stderr)
        print(f"{'budget':<16} {'scope':<22} {'remaining':>14} {'limit':>12}  next reset / refill")
        for budget in guard.budgets.values():
            key = budget.scope_name
            if key is not None and key not in scope:
                print(f"{budget.name:<16} {'(pass --scope ' + key + '=...)':<22}")
                continue
            sc = {key: scope[key]} if key else {}
            left = guard.remaining(budget.name, **sc)
            fmt = format_usd if budget.unit == "usd" else (lambda v: f"{v:,.0f}")
            notes = []
            bounds = budget.period_bounds(guard.clock.now())
            if bounds:
                notes.append("resets " + datetime.fromtimestamp(bounds[1], timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
            if budget.refill_per_second and left < budget.limit:
                notes.append(f"full in {(budget.limit - left) / budget.refill_per_second:,.0f} s")
            scope_txt = ", ".join(f"{k}={v}" for k, v in sc.items()) or "(global)"
            print(f"{budget.name:<16} {scope_txt:<22} {fmt(left):>14} {fmt(budget.limit):>12}  {'; '.join(notes)}")
    except (BudgetGuardError, ValueError) as exc:
        print(f"budgetguard status: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``budgetguard`` command."""
    from budgetguard.cli_prices import add_prices_parser
    from budgetguard.cli_report import add_report_parser

    parser = argparse.ArgumentParser(prog="budgetguard", description="Budgets for LangChain model calls.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="an offline tour: a guarded chain against a local stand-in model")
    demo.add_argument("--ledger", help="ledger file to write (a temporary file by default)")
    add_report_parser(sub)
    status = sub.add_parser("status", help="what each budget has left, from the guard's store")
    status.add_argument("guard", help="MODULE:ATTRIBUTE of your BudgetGuard (or a function returning one)")
    status.add_argument("--scope", action="append", default=[], metavar="KEY=VALUE", help="e.g. user_id=alice")
    add_prices_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from budgetguard.demo import run_demo

        return run_demo(sys.stdout, ledger_path=args.ledger)
    if args.command == "report":
        from budgetguard.cli_report import run_report

        return run_report(args)
    if args.command == "prices":
        from budgetguard.cli_prices import run_prices

        return run_prices(args)
    return _status(args)


if __name__ == "__main__":
    sys.exit(main())
