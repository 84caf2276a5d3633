"""The bundled price source: Pydantic's ``genai-prices`` snapshot, read offline.

``genai-prices`` keeps list prices, context windows, cached-input prices and
prompt-size tiers for OpenAI, Anthropic, Google, Mistral and some forty other
providers, with curated rules for which names mean which model (dated snapshots,
aliases, provider spellings). Its package bundles a snapshot, so nothing is fetched.

:func:`find` turns one of its models into a :class:`~budgetguard.pricing.ModelInfo`,
once per model name (memoized), with two rules of budgetguard's own:

* **A newer version is never priced as an older one.** A name found through one of
  genai-prices' prefix or pattern rules (not its exact list of names) must carry the
  same version numbers as the model it found: ``claude-opus-4-10`` does not become
  ``claude-opus-4-1``. Snapshot dates, ``-latest`` and revision tags (``-001``,
  Bedrock's ``-v1:0``, Vertex's ``@...``) do not count as versions.
* **A price that holds all day.** Of a model's dated prices, the one in effect today
  is used. Where the price depends on the hour (DeepSeek: standard by day, discounted
  at night), the higher one is charged at every hour, since the price is resolved
  once per process. Models billed per request or per character (Perplexity's Sonar,
  text-to-speech) get no price: a USD budget then asks for one.

Cache writes, audio, images, web searches and batch discounts are not priced.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from decimal import Decimal
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from budgetguard.model_info import ModelInfo, PriceTier

__all__ = ["SOURCE", "find", "model_names"]

try:
    SOURCE = f"genai-prices {version('genai-prices')}"
    """The package and version the bundled prices come from."""
except PackageNotFoundError:  # pragma: no cover - a dependency; only a broken install lacks it
    SOURCE = "genai-prices (not installed)"

# Per-call charges budgetguard cannot express as per-token prices.
_PER_CALL_UNITS = ("requests_kcount", "input_mchars")
# A Bedrock/Vertex-style provider prefix written with dots: "us.anthropic.", "global.openai.".
_DOTTED_PROVIDER = re.compile(r"^(?:[a-z]+\.)+(?=[a-z])")
# Suffixes that name a snapshot or revision, not a version: dates ("-20241022", "-2024-08-06",
# "-05-20", "-0613"), revisions ("-001", "-v1:0", "@..."), "-latest".
_NOT_A_VERSION = re.compile(r"(?:@.*|-v\d+:\d+|-latest|-\d{8}|-\d{4}-\d{2}-\d{2}|-\d{2}-\d{2}|-\d{3,4})$")


def _version(name: str) -> tuple[int, ...]:
    """The version numbers in a model name: ``claude-opus-4-5-20251101`` -> (4, 5); ``claude-opus-4-0`` -> (4,)."""
    name = _DOTTED_PROVIDER.sub("", name.lower().rsplit("/", 1)[-1])
    while (shorter := _NOT_A_VERSION.sub("", name)) != name and shorter:
        name = shorter
    numbers = [int(n) for n in re.findall(r"\d+", name)]
    while numbers and numbers[-1] == 0:  # "claude-opus-4" is "claude-opus-4-0"
        numbers.pop()
    return tuple(numbers)


def _exact_names(clause: Any) -> set[str]:
    """The names a genai-prices match rule lists one by one (``equals``), lowercased."""
    if hasattr(clause, "equals"):
        return {clause.equals.lower()}
    children = getattr(clause, "or_", None) or getattr(clause, "and_", None) or ()
    return set().union(*(_exact_names(c) for c in children))


def _same_model(ref: str, model: Any) -> bool:
    ref = ref.lower()
    if ref == model.id.lower() or ref in _exact_names(model.match):
        return True  # a name genai-prices lists for this model: its curators' call
    return _version(ref) == _version(model.id)


def _per_token(price: Any, input_tokens: int) -> float | None:
    """USD per token for a call with ``input_tokens`` (a genai-prices price is USD per 1M tokens)."""
    if price is None:
        return None
    if hasattr(price, "tiers"):  # TieredPrices: crossing a tier's start prices the whole call at that tier
        applicable = price.base
        for tier in price.tiers:
            if input_tokens > tier.start:
                applicable = tier.price
        price = applicable
    return float(Decimal(price) / 1_000_000)


def _price_today(model: Any, today: datetime) -> tuple[Any, str]:
    """The model's price that holds all day today, and a note on where it comes from."""
    if not isinstance(model.prices, list):
        return model.prices, ""
    all_day, note = model.prices[0].prices, ""
    for conditional in reversed(model.prices):  # later entries take precedence, as in genai-prices
        constraint = conditional.constraint
        if constraint is None:
            all_day, note = conditional.prices, ""
            break
        start = getattr(constraint, "start_date", None)
        if start is not None and constraint.active(today):
            all_day, note = conditional.prices, f", since {start.isoformat()}"
            break
    # Prices for some hours of the day (DeepSeek's: standard by day, half off at night): the price
    # is resolved once per process, so the higher one is charged at every hour, never the lower.
    hourly = [c.prices for c in model.prices if hasattr(c.constraint, "start_time")]
    if not hourly:
        return all_day, note
    highest = max([all_day, *hourly], key=lambda p: (p.input_mtok or 0) + (p.output_mtok or 0))
    return highest, note + ", the higher of its time-of-day prices"


def _model_info(ref: str, provider: Any, model: Any) -> ModelInfo:
    today = datetime.now(timezone.utc)
    price, since = _price_today(model, today)
    source = f"{SOURCE}: {provider.id}/{model.id}, its list price for {today.date().isoformat()}{since}"
    if any(getattr(price, unit, None) is not None for unit in _PER_CALL_UNITS):
        return ModelInfo(ref, None, None, context_window=model.context_window,
                         source=f"{source}; billed per request or character, which budgetguard does not price")
    keys = ("input_mtok", "output_mtok", "cache_read_mtok")
    starts = sorted({t.start for k in keys for t in getattr(getattr(price, k, None), "tiers", ())})
    tiers = tuple(PriceTier(start, *(_per_token(getattr(price, k, None), start + 1) for k in keys)) for start in starts)
    input_price, output_price, cached_price = (_per_token(getattr(price, k, None), 0) for k in keys)
    return ModelInfo(ref, input_price, output_price, cached_price, context_window=model.context_window,
                     tiers=tiers, source=source)


def _candidates(ref: str) -> list[tuple[str, str | None]]:
    """(model name, provider id) pairs to ask genai-prices about, most specific first.

    ``openrouter/openai/gpt-4.1`` -> the whole name, then ``openai/gpt-4.1`` at provider
    ``openrouter``, then ``gpt-4.1`` at provider ``openai``, then ``gpt-4.1`` anywhere.
    A Bedrock name (``us.anthropic.claude-...-v1:0``) is tried at genai-prices' ``aws``
    provider, as is, without its region, and then bare (``claude-...``) anywhere.
    """
    parts = ref.split("/")
    pairs: list[tuple[str, str | None]] = [(ref, None)]
    pairs += [("/".join(parts[i:]), parts[i - 1]) for i in range(1, len(parts))]
    last = parts[-1]
    bare = _DOTTED_PROVIDER.sub("", last)
    if bare != last:
        pairs += [(last, "aws"), (last.split(".", 1)[1], "aws"), (re.sub(r"-v\d+:\d+$", "", bare), None)]
    elif len(parts) > 1:
        pairs.append((last, None))
    return pairs


@lru_cache(maxsize=4096)
def find(model: str) -> ModelInfo | None:
    """The bundled price of ``model``, or None when genai-prices has no such model.

    Args:
        model: A model name as a LangChain model reports it, with or without a
            provider prefix (``openai/gpt-4o``) or date (``gpt-4o-2024-08-06``).

    Returns:
        The info, named ``model``; its ``source`` names the snapshot, the model it
        matched and the date of the price.

    Example:
        >>> info = find("claude-opus-4-5")
        >>> (info.input_cost_per_token, info.output_cost_per_token)
        (5e-06, 2.5e-05)
    """
    from genai_prices import (  # imported on first lookup: ~0.2 s, off `import budgetguard`
        Usage,
        calc_price,
    )

    name = model.strip()
    for ref, provider_id in _candidates(name):
        try:
            found = calc_price(Usage(input_tokens=0, output_tokens=0), ref, provider_id=provider_id)
        except LookupError:
            continue
        if _same_model(ref, found.model):
            return _model_info(model, found.provider, found.model)
        return None  # found, but as another version: never price it as that one
    return None


def model_names(providers: list[str]) -> list[str]:
    """The current (not deprecated) models of some genai-prices providers, as ``provider/model``, sorted.

    Args:
        providers: genai-prices provider ids, e.g. ``["openai", "anthropic"]``.
    """
    from genai_prices.data_snapshot import get_snapshot

    wanted = {p.lower() for p in providers}
    return sorted(f"{p.id}/{m.id}" for p in get_snapshot().providers if p.id in wanted
                  for m in p.models if not m.deprecated)
