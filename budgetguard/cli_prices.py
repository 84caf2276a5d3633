"""The ``budgetguard prices`` subcommand: what a model costs, its window, and where the price comes from.

``budgetguard prices gpt-4o claude-opus-4-5`` shows each model as a USD budget would
price it (the same lookup the guard makes); ``budgetguard prices`` lists the models of
some providers. ``--litellm FILE`` reads a LiteLLM price file instead of the bundled
genai-prices snapshot.

Exit codes: 0 when every model named has a price, 1 when one has none (the reason and
the fix are on stderr) or the price file cannot be read, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from budgetguard.errors import ConfigurationError, UnknownModelError
from budgetguard.pricing import ModelInfo, PriceTable

__all__ = ["add_prices_parser", "format_model", "run_prices"]

PROG = "budgetguard prices"
_DEFAULT_PROVIDERS = "openai,anthropic,google"


def add_prices_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``prices`` subcommand to ``subparsers``; its default ``func`` is :func:`run_prices`."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "prices",
        help="a model's prices, context window, and the source and date of the price",
        description="Show what models cost per 1M tokens, as a USD budget prices them.",
    )
    parser.add_argument("models", nargs="*", metavar="MODEL", help="model names, e.g. gpt-4o or openai/gpt-4o")
    parser.add_argument("--provider", default=_DEFAULT_PROVIDERS, metavar="IDS",
                        help=f"without MODEL: list these genai-prices providers' models (default: {_DEFAULT_PROVIDERS})")
    parser.add_argument("--litellm", metavar="FILE", help="use a LiteLLM model_prices_and_context_window.json")
    parser.set_defaults(func=run_prices)
    return parser


def _per_million(price: float | None) -> str:
    """USD per 1M tokens with cents, and more digits only where a price has them ($0.075)."""
    if price is None:
        return "-"
    whole, _, fraction = f"{price * 1e6:,.6f}".rstrip("0").partition(".")  # 6 places: below float noise
    return f"${whole}.{fraction.ljust(2, '0')}"


def _cached(price: float | None) -> str:
    return "- (charged as input)" if price is None else f"{_per_million(price)} per 1M tokens"


def format_model(name: str, info: ModelInfo) -> str:
    """A model's prices per 1M tokens, tiers, context window and source, as indented lines."""
    lines = [name,
             f"  input          {_per_million(info.input_cost_per_token)} per 1M tokens",
             f"  cached input   {_cached(info.cached_input_cost_per_token)}",
             f"  output         {_per_million(info.output_cost_per_token)} per 1M tokens"]
    for tier in info.tiers:
        lines.append(f"  prompts over {tier.above_input_tokens:,} tokens: the whole call at input "
                     f"{_per_million(tier.input_cost_per_token)}, cached "
                     f"{_per_million(tier.cached_input_cost_per_token or tier.input_cost_per_token)}, output "
                     f"{_per_million(tier.output_cost_per_token)} per 1M")
    window = f"{info.context_window:,} tokens" if info.context_window else "unknown (not checked before calls)"
    lines.append(f"  context window {window}")
    if info.max_output_tokens:
        lines.append(f"  max output     {info.max_output_tokens:,} tokens")
    lines.append(f"  source         {info.source or 'given in code'}")
    return "\n".join(lines)


def _listing(table: PriceTable, providers: list[str]) -> list[tuple[str, ModelInfo]]:
    from budgetguard import pricing_genai

    if table.models:  # a LiteLLM file: its own entries
        return sorted(table.models.items())
    names = pricing_genai.model_names(providers)
    return [(n, info) for n in names if (info := table.get(n)) is not None and info.input_cost_per_token is not None]


def run_prices(args: argparse.Namespace) -> int:
    """Print prices for parsed ``args``; return the exit code."""
    try:
        return _run(args)
    except BrokenPipeError:  # e.g. piped into `head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _run(args: argparse.Namespace) -> int:
    try:
        table = PriceTable.from_litellm(args.litellm) if args.litellm else PriceTable.bundled()
    except ConfigurationError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    if not args.models:
        from budgetguard import pricing_genai

        rows = _listing(table, [p.strip() for p in args.provider.split(",") if p.strip()])
        source = f"LiteLLM prices: {args.litellm}" if args.litellm else f"{pricing_genai.SOURCE} (bundled snapshot)"
        print(f"Prices per 1M tokens from {source}; `{PROG} MODEL` for one model's tiers and source.")
        print(f"{'model':<50} {'input':>10} {'cached':>10} {'output':>10} {'window':>11}")
        for name, info in rows:
            window = f"{info.context_window:,}" if info.context_window else "-"
            print(f"{name:<50} {_per_million(info.input_cost_per_token):>10} "
                  f"{_per_million(info.cached_input_cost_per_token):>10} "
                  f"{_per_million(info.output_cost_per_token):>10} {window:>11}")
        return 0
    status = 0
    for i, name in enumerate(args.models):
        if i:
            print()
        try:
            print(format_model(name, table.require_price(name)))
        except UnknownModelError as exc:
            known = table.get(name)
            if known is not None:  # known, but not priced per token: still show what is known
                print(format_model(name, known))
            print(f"{PROG}: {exc}", file=sys.stderr)
            status = 1
    return status
