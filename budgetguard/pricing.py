"""Model prices and context windows.

A :class:`PriceTable` maps model names to :class:`ModelInfo` (USD per token,
context window, output limit). Tables are immutable: :meth:`PriceTable.with_overrides`
and :meth:`PriceTable.merged` return new ones.

The bundled table (``budgetguard/data/model_prices.json``) uses LiteLLM's
``model_prices_and_context_window.json`` format, so one loader reads both it and
a full LiteLLM file. It holds the providers' public list prices (standard tier,
text) as of 2025-08-15, from https://openai.com/api/pricing/,
https://platform.openai.com/docs/models, https://www.anthropic.com/pricing#api,
https://docs.anthropic.com/en/docs/about-claude/models/overview and
https://ai.google.dev/gemini-api/docs/pricing. Prices change: check them, and
override what differs for your account.

Example:
    >>> table = PriceTable.bundled().with_overrides({"my-ft-model": {"input_per_million": 3, "output_per_million": 12}})
    >>> round(table.require_price("gpt-4o-2024-08-06").cost(1_000, 500), 6)
    0.0075
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from types import MappingProxyType
from typing import Any

from cachetools import LRUCache

from budgetguard.errors import ConfigurationError, UnknownModelError, UsageError

__all__ = ["ModelInfo", "PriceTable"]

_MODES = frozenset({"chat", "completion", "responses"})
# Dates and versions providers append to a model's base name; stripped one at a time.
_SUFFIX = re.compile(r"(?:@.*|-v\d+(?::\d+)?|-(?:latest|preview|exp)|-\d{4}-\d{2}-\d{2}|-\d{2}-\d{2}|-\d{3,8})$")
# Provider prefixes that use a dot, not a slash (Amazon Bedrock: "us.anthropic.claude-...").
_DOTTED_PROVIDER = re.compile(r"^(?:[a-z]{2}\.)?(?:anthropic|meta|amazon|cohere|mistral|ai21|openai)\.")
_PREFIX_BOUNDARY = frozenset("-:@_")  # "gpt-4" may prefix "gpt-4-32k", never "gpt-4o" or "gpt-4.5"
_MEMO_LIMIT = 4096
_UNSEEN = object()
_INFO_FIELDS = ("input_cost_per_token", "output_cost_per_token", "cached_input_cost_per_token",
                "context_window", "max_output_tokens")
# Override keys: ModelInfo's own, LiteLLM's, and per-1M conveniences -> (field, divisor).
# Dividing by 1e6 (not multiplying by 1e-6) gives 5 -> 5e-06 exactly, without float noise.
_OVERRIDE_KEYS: dict[str, tuple[str, float]] = {
    **{f: (f, 1.0) for f in _INFO_FIELDS},
    "cache_read_input_token_cost": ("cached_input_cost_per_token", 1.0),
    "max_input_tokens": ("context_window", 1.0),
    "input_per_million": ("input_cost_per_token", 1e6),
    "output_per_million": ("output_cost_per_token", 1e6),
    "cached_input_per_million": ("cached_input_cost_per_token", 1e6),
}


def _price(value: Any, what: str) -> float | None:
    """A non-negative finite price; numeric strings allowed, None stays None."""
    if value is None or value == "":
        return None
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number >= 0):
        msg = f"{what}={value!r} is not a non-negative number"
        raise ConfigurationError(msg)
    return number


def _tokens(value: Any, what: str) -> int | None:
    """A positive token limit; numeric strings and whole floats allowed, None stays None."""
    number = _price(value, what)
    if number is None:
        return None
    if number != int(number) or number <= 0:
        msg = f"{what}={value!r} is not a positive whole number of tokens"
        raise ConfigurationError(msg)
    return int(number)


@dataclass(frozen=True)
class ModelInfo:
    """Price and limits of one model.

    Attributes:
        name: The model name as the table knows it.
        input_cost_per_token: USD per prompt token, None if unknown.
        output_cost_per_token: USD per output token (reasoning included), None if unknown.
        cached_input_cost_per_token: USD per prompt token read from the provider's
            cache; None means cached tokens cost the full input price.
        context_window: Most prompt tokens the model accepts, None if unknown.
        max_output_tokens: Most output tokens per call, None if unknown.

    Raises:
        ConfigurationError: If a price is negative or not finite, or a limit is not positive.
    """

    name: str
    input_cost_per_token: float | None
    output_cost_per_token: float | None
    cached_input_cost_per_token: float | None = None
    context_window: int | None = None
    max_output_tokens: int | None = None

    def __post_init__(self) -> None:
        for field in ("input_cost_per_token", "output_cost_per_token", "cached_input_cost_per_token"):
            object.__setattr__(self, field, _price(getattr(self, field), f"{self.name}: {field}"))
        for field in ("context_window", "max_output_tokens"):
            object.__setattr__(self, field, _tokens(getattr(self, field), f"{self.name}: {field}"))

    def cost(self, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0) -> float:
        """USD cost of a call.

        Args:
            input_tokens: All prompt tokens, cached ones included.
            output_tokens: Output tokens, reasoning included.
            cached_input_tokens: The part of ``input_tokens`` read from the provider's
                cache, priced at ``cached_input_cost_per_token`` when known.

        Returns:
            Cost in USD.

        Raises:
            UsageError: If a count is negative or cached tokens exceed input tokens.
            UnknownModelError: If the input or output price is unknown.

        Example:
            >>> round(ModelInfo("m", 2e-6, 8e-6, 5e-7).cost(1000, 100, cached_input_tokens=400), 6)
            0.0022
        """
        counts = {"input_tokens": input_tokens, "output_tokens": output_tokens,
                  "cached_input_tokens": cached_input_tokens}
        for label, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
                msg = f"{label}={value!r} must be a non-negative number of tokens"
                raise UsageError(msg)
        if cached_input_tokens > input_tokens:
            msg = f"cached_input_tokens={cached_input_tokens} exceeds input_tokens={input_tokens}"
            raise UsageError(msg)
        if self.input_cost_per_token is None or self.output_cost_per_token is None:
            msg = (f"model '{self.name}' has no {'input' if self.input_cost_per_token is None else 'output'} "
                   "price; add one with PriceTable.with_overrides()")
            raise UnknownModelError(msg)
        cached_price = self.cached_input_cost_per_token
        cached_price = self.input_cost_per_token if cached_price is None else cached_price
        return ((input_tokens - cached_input_tokens) * self.input_cost_per_token
                + cached_input_tokens * cached_price + output_tokens * self.output_cost_per_token)


def _parse_litellm(data: Mapping[str, Any], where: str) -> dict[str, ModelInfo]:
    models: dict[str, ModelInfo] = {}
    for name, entry in data.items():
        # "sample_spec" documents the format; "_meta" and other "_" keys are ours.
        if name == "sample_spec" or name.startswith("_") or not isinstance(entry, Mapping):
            continue
        if entry.get("mode") is not None and entry.get("mode") not in _MODES:  # embeddings, images, audio, ...
            continue
        what = f"{where}: model '{name}'"
        info = ModelInfo(
            name,
            _price(entry.get("input_cost_per_token"), f"{what} input_cost_per_token"),
            _price(entry.get("output_cost_per_token"), f"{what} output_cost_per_token"),
            _price(entry.get("cache_read_input_token_cost"), f"{what} cache_read_input_token_cost"),
            _tokens(entry.get("max_input_tokens"), f"{what} max_input_tokens")
            or _tokens(entry.get("max_tokens"), f"{what} max_tokens"),
            _tokens(entry.get("max_output_tokens"), f"{what} max_output_tokens"),
        )
        if info.input_cost_per_token is not None or info.output_cost_per_token is not None:
            models[name] = info
    return models


@lru_cache(maxsize=1)
def _bundled_models() -> Mapping[str, ModelInfo]:
    source = resources.files("budgetguard").joinpath("data/model_prices.json")
    return MappingProxyType(_parse_litellm(json.loads(source.read_text(encoding="utf-8")), "bundled prices"))


class PriceTable:
    """An immutable model -> :class:`ModelInfo` table with forgiving name lookup.

    Args:
        models: Entries by model name.
        default: Info used by :meth:`require_price` for models with no price, so
            unknown models are charged instead of refused.

    Example:
        >>> PriceTable.bundled().get("openai/gpt-4o-mini-2024-07-18").name
        'gpt-4o-mini'
    """

    def __init__(self, models: Mapping[str, ModelInfo] | None = None, *, default: ModelInfo | None = None) -> None:
        self._models: dict[str, ModelInfo] = dict(models or {})
        for name, info in self._models.items():
            if not isinstance(info, ModelInfo):
                msg = f"PriceTable: entry '{name}' is a {type(info).__name__}, not a ModelInfo"
                raise ConfigurationError(msg)
        self._default = default
        self._lower = {name.lower(): info for name, info in self._models.items()}
        # Names resolved by the forgiving lookup (dated, prefixed): an LRU, so a process that
        # sees many model names keeps the recent ones instead of starting over.
        self._memo: LRUCache[str, ModelInfo | None] = LRUCache(_MEMO_LIMIT)
        self._memo_lock = threading.Lock()  # cachetools caches are not thread-safe

    @classmethod
    def bundled(cls) -> PriceTable:
        """The table shipped with budgetguard (list prices as of the module docstring's date)."""
        return cls(_bundled_models())

    @classmethod
    def from_litellm(cls, source: str | os.PathLike[str] | Mapping[str, Any]) -> PriceTable:
        """Load LiteLLM's ``model_prices_and_context_window.json`` format.

        Entries whose ``mode`` is not chat, completion or responses (embeddings,
        images, audio, ...) are skipped, as are entries with neither price; entries
        without a ``mode`` are kept. Numbers may be given as strings. The context
        window is ``max_input_tokens``, else ``max_tokens``.

        Args:
            source: A path to the JSON file, or its already-parsed content.

        Raises:
            ConfigurationError: If the file cannot be read or parsed, or holds a bad value;
                the message names the path and the model.
        """
        if isinstance(source, Mapping):
            return cls(_parse_litellm(source, "LiteLLM prices"))
        path = os.fspath(source)
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError) as exc:
            msg = f"cannot read price file {path}: {exc}"
            raise ConfigurationError(msg) from exc
        if not isinstance(data, Mapping):
            msg = f"price file {path} must hold a JSON object of model -> prices, not {type(data).__name__}"
            raise ConfigurationError(msg)
        return cls(_parse_litellm(data, path))

    def with_overrides(self, overrides: Mapping[str, ModelInfo | Mapping[str, Any]]) -> PriceTable:
        """A new table with some models added or changed.

        A mapping value changes only the fields it gives, on top of what :meth:`get`
        finds for that name. Keys: ModelInfo's fields, LiteLLM's
        (``cache_read_input_token_cost``, ``max_input_tokens``) or per-1M prices
        (``input_per_million``, ``output_per_million``, ``cached_input_per_million``).

        Raises:
            ConfigurationError: For an unknown key, a field given twice, or a bad value.

        Example:
            >>> t = PriceTable.bundled().with_overrides({"gpt-4o": {"input_per_million": 2.0}})
            >>> t.get("gpt-4o").input_cost_per_token
            2e-06
        """
        models = dict(self._models)
        for name, value in overrides.items():
            if isinstance(value, ModelInfo):
                models[name] = replace(value, name=name)
                continue
            if not isinstance(value, Mapping):
                msg = f"override for '{name}' must be a ModelInfo or a mapping, not {type(value).__name__}"
                raise ConfigurationError(msg)
            base = self.get(name)
            current = {f: getattr(base, f) for f in _INFO_FIELDS} if base else dict.fromkeys(_INFO_FIELDS)
            given: set[str] = set()
            for key, raw in value.items():
                if key not in _OVERRIDE_KEYS:
                    msg = f"override for '{name}': unknown key '{key}'; use one of {', '.join(_OVERRIDE_KEYS)}"
                    raise ConfigurationError(msg)
                field, divisor = _OVERRIDE_KEYS[key]
                if field in given:
                    msg = f"override for '{name}' sets {field} twice (through '{key}')"
                    raise ConfigurationError(msg)
                given.add(field)
                number = _price(raw, f"override for '{name}': {key}")
                current[field] = number / divisor if number is not None and divisor != 1.0 else raw
            models[name] = ModelInfo(name, **current)
        return PriceTable(models, default=self._default)

    def merged(self, other: PriceTable) -> PriceTable:
        """A new table with ``other``'s entries (and default, if set) winning."""
        default = other._default if other._default is not None else self._default
        return PriceTable({**self._models, **other._models}, default=default)

    def get(self, model: str) -> ModelInfo | None:
        """Find a model's info, forgiving provider prefixes and dated versions.

        Tries, in order: the exact name; lowercase; without a provider prefix
        (``openai/gpt-4o``, ``us.anthropic.claude-...``); without date or version
        suffixes (``gpt-4o-2024-08-06`` -> ``gpt-4o``, ``claude-3-5-haiku-20241022``
        -> ``claude-3-5-haiku``); then the longest known name that prefixes it at a
        ``-`` boundary. Results are memoized.

        Returns:
            The info, or None when nothing matches.
        """
        if model in self._models:
            return self._models[model]
        with self._memo_lock:
            found = self._memo.get(model, _UNSEEN)
        if found is _UNSEEN:
            found = self._lookup(model)
            with self._memo_lock:
                self._memo[model] = found
        return found  # type: ignore[return-value]

    def _lookup(self, model: str) -> ModelInfo | None:
        name = model.strip().lower()
        if name in self._lower:
            return self._lower[name]
        name = _DOTTED_PROVIDER.sub("", name.rsplit("/", 1)[-1]).replace("gpt-35", "gpt-3.5")  # Azure's spelling
        while True:
            if name in self._lower:
                return self._lower[name]
            shorter = _SUFFIX.sub("", name)
            if shorter == name or not shorter:
                break
            name = shorter
        best = max((k for k in self._lower if name.startswith(k) and name[len(k):len(k) + 1] in _PREFIX_BOUNDARY),
                   key=len, default=None)
        return self._lower[best] if best is not None else None

    def require_price(self, model: str | None) -> ModelInfo:
        """The info to price ``model`` with: its own, else the table's default.

        Raises:
            UnknownModelError: If the model has no input and output price and the
                table has no default; the message says how to add one.
        """
        info = self.get(model) if model else None
        if info is not None and info.input_cost_per_token is not None and info.output_cost_per_token is not None:
            return info
        if self._default is not None:
            return self._default
        label = f"model '{model}'" if model else "a call whose model name is unknown"
        example = model or "your-model"
        msg = (f"no price for {label}, and a USD budget needs one. Add it with "
               f"PriceTable.bundled().with_overrides({{'{example}': {{'input_per_million': ..., "
               "'output_per_million': ...}}), or give PriceTable(default=ModelInfo(...)) to charge "
               "unknown models a fixed price.")
        raise UnknownModelError(msg)

    def context_window(self, model: str | None) -> int | None:
        """Most prompt tokens ``model`` accepts: its own, else the default's, else None."""
        info = self.get(model) if model else None
        if info is not None and info.context_window is not None:
            return info.context_window
        return self._default.context_window if self._default is not None else None

    @property
    def models(self) -> Mapping[str, ModelInfo]:
        """The entries, read-only."""
        return MappingProxyType(self._models)

    @property
    def default(self) -> ModelInfo | None:
        """The fallback info for unpriced models, if any."""
        return self._default

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, model: object) -> bool:
        return isinstance(model, str) and self.get(model) is not None
