"""Model prices and context windows.

A :class:`PriceTable` maps model names to :class:`ModelInfo` (USD per token, prompt-size
tiers, context window, output limit). Tables are immutable: :meth:`PriceTable.with_overrides`
and :meth:`PriceTable.merged` return new ones.

Where prices come from:

* :meth:`PriceTable.bundled` (the default): Pydantic's ``genai-prices`` snapshot,
  bundled with that package and read offline (see :mod:`budgetguard.pricing_genai`).
  Upgrade the package for newer prices; ``budgetguard prices MODEL`` shows what a model
  costs, its window, and the snapshot and date the price comes from.
* :meth:`PriceTable.from_litellm`: LiteLLM's ``model_prices_and_context_window.json``.
* :meth:`PriceTable.with_overrides`: your own prices, which win over both.

Names match exactly: case, a provider prefix (``openai/``, ``us.anthropic.``) and a
snapshot date (``-2024-08-06``, ``-20241022``, ``@20241022``, ``-latest``) are
forgiven, nothing else, so a newer model is never priced as an older one
(``claude-opus-4-5`` is not ``claude-opus-4``). Each name is resolved once per table
and remembered, so the lookups the guard makes on every call are dictionary reads.

Example:
    >>> table = PriceTable.bundled().with_overrides({"my-ft-model": {"input_per_million": 3, "output_per_million": 12}})
    >>> round(table.require_price("gpt-4o-2024-08-06").cost(1_000, 500), 6)
    0.0075
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from budgetguard.errors import ConfigurationError, UnknownModelError
from budgetguard.model_info import ModelInfo, PriceTier, _price, _tokens

__all__ = ["ModelInfo", "PriceTable", "PriceTier"]

logger = logging.getLogger(__name__)

_MODES = frozenset({"chat", "completion", "responses"})
# Snapshot dates and revision tags (not versions) providers append to a model's name; stripped one at a time.
_SNAPSHOT = re.compile(r"(?:@.*|-v\d+:\d+|-latest|-\d{4}-\d{2}-\d{2}|-\d{8})$")
# Provider prefixes that use a dot, not a slash (Amazon Bedrock: "us.anthropic.claude-...").
_DOTTED_PROVIDER = re.compile(r"^(?:[a-z]{2}\.|global\.)?(?:anthropic|meta|amazon|cohere|mistral|ai21|openai)\.")
_MEMO_LIMIT = 4096  # names come from code, but a table never grows without bound
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


def _parse_litellm(data: Mapping[str, Any], where: str) -> tuple[dict[str, ModelInfo], dict[str, str]]:
    """The priced text models of a LiteLLM price file, and the entries skipped as malformed (name -> why)."""
    models: dict[str, ModelInfo] = {}
    skipped: dict[str, str] = {}
    for name, entry in data.items():
        if name == "sample_spec" or name.startswith("_"):  # the format's own documentation; our notes
            continue
        if not isinstance(entry, Mapping):
            skipped[name] = f"a {type(entry).__name__}, not an object"
            continue
        if entry.get("mode") is not None and entry.get("mode") not in _MODES:  # embeddings, images, audio, ...
            continue
        try:
            info = ModelInfo(
                name,
                _price(entry.get("input_cost_per_token"), "input_cost_per_token"),
                _price(entry.get("output_cost_per_token"), "output_cost_per_token"),
                _price(entry.get("cache_read_input_token_cost"), "cache_read_input_token_cost"),
                _tokens(entry.get("max_input_tokens"), "max_input_tokens")
                or _tokens(entry.get("max_tokens"), "max_tokens"),
                _tokens(entry.get("max_output_tokens"), "max_output_tokens"),
                source=f"LiteLLM prices: {where}",
            )
        except ConfigurationError as exc:  # one bad entry must not cost the other thousands
            skipped[name] = str(exc)
            continue
        if info.input_cost_per_token is not None or info.output_cost_per_token is not None:
            models[name] = info
    return models, skipped


def _exact_lookup(models: Mapping[str, ModelInfo], model: str) -> ModelInfo | None:
    """``model`` in ``models`` up to case, a provider prefix and a snapshot date."""
    lower = {name.lower(): info for name, info in models.items()}
    name = model.strip().lower()
    if name in lower:
        return lower[name]
    name = _DOTTED_PROVIDER.sub("", name.rsplit("/", 1)[-1]).replace("gpt-35", "gpt-3.5")  # Azure's spelling
    while True:
        if name in lower:
            return lower[name]
        shorter = _SNAPSHOT.sub("", name)
        if shorter == name or not shorter:
            return None
        name = shorter


class PriceTable:
    """An immutable model -> :class:`ModelInfo` table; names match exactly (see the module docstring).

    Args:
        models: Entries by model name; they win over ``catalog``.
        default: Info used by :meth:`require_price` for models with no price, so
            unknown models are charged instead of refused.
        catalog: Where to look up a model the entries do not have: a function of the
            model name returning its info or None. :meth:`bundled` passes genai-prices'.

    Example:
        >>> PriceTable.bundled().get("openai/gpt-4o-mini-2024-07-18").input_cost_per_token
        1.5e-07
    """

    def __init__(self, models: Mapping[str, ModelInfo] | None = None, *, default: ModelInfo | None = None,
                 catalog: Callable[[str], ModelInfo | None] | None = None) -> None:
        self._models: dict[str, ModelInfo] = dict(models or {})
        for name, info in self._models.items():
            if not isinstance(info, ModelInfo):
                msg = f"PriceTable: entry '{name}' is a {type(info).__name__}, not a ModelInfo"
                raise ConfigurationError(msg)
        self._default = default
        self._catalog = catalog
        self._skipped: Mapping[str, str] = MappingProxyType({})
        # Every name the guard has asked about, resolved once. A plain dict: the guard reads it on
        # every call, and a dict read needs no lock (two threads resolving one name agree).
        self._resolved: dict[str, ModelInfo | None] = {}

    @classmethod
    def bundled(cls) -> PriceTable:
        """List prices from the ``genai-prices`` snapshot installed with budgetguard (offline)."""
        from budgetguard import pricing_genai

        return cls(catalog=pricing_genai.find)

    @classmethod
    def from_litellm(cls, source: str | os.PathLike[str] | Mapping[str, Any]) -> PriceTable:
        """Load LiteLLM's ``model_prices_and_context_window.json`` format.

        Entries whose ``mode`` is not chat, completion or responses (embeddings,
        images, audio, ...) are left out, as are entries with neither price; entries
        without a ``mode`` are kept. Numbers may be given as strings. The context
        window is ``max_input_tokens``, else ``max_tokens``. A malformed entry (a bad
        number, not an object) is skipped, named in one warning, and listed in
        :attr:`skipped`; the rest of the file loads.

        Args:
            source: A path to the JSON file, or its already-parsed content.

        Raises:
            ConfigurationError: If the file cannot be read or parsed, or is not a JSON
                object; the message names the path.

        Example:
            >>> t = PriceTable.from_litellm({"m": {"input_cost_per_token": 1e-6, "output_cost_per_token": "2e-6"},
            ...                              "bad": {"input_cost_per_token": -1}})  # doctest: +SKIP
            >>> dict(t.skipped)  # doctest: +SKIP
            {'bad': "input_cost_per_token=-1 is not a non-negative number"}
        """
        if isinstance(source, Mapping):
            where, data = "(mapping)", source
        else:
            where = os.fspath(source)
            try:
                with open(where, encoding="utf-8") as handle:
                    data = json.load(handle)
            except (OSError, ValueError) as exc:
                msg = f"cannot read price file {where}: {exc}"
                raise ConfigurationError(msg) from exc
            if not isinstance(data, Mapping):
                msg = f"price file {where} must hold a JSON object of model -> prices, not {type(data).__name__}"
                raise ConfigurationError(msg)
        models, skipped = _parse_litellm(data, where)
        if skipped:
            listed = "; ".join(f"'{name}': {why}" for name, why in list(skipped.items())[:10])
            more = f"; and {len(skipped) - 10} more" if len(skipped) > 10 else ""
            msg = (f"LiteLLM prices {where}: skipped {len(skipped)} malformed "
                   f"entr{'y' if len(skipped) == 1 else 'ies'} ({listed}{more}); loaded {len(models)}. "
                   "Calls to a skipped model are unpriced: fix the file or use PriceTable.with_overrides().")
            logger.warning(msg)
            warnings.warn(msg, UserWarning, stacklevel=2)
        table = cls(models)
        table._skipped = MappingProxyType(skipped)
        return table

    def with_overrides(self, overrides: Mapping[str, ModelInfo | Mapping[str, Any]]) -> PriceTable:
        """A new table with some models added or changed.

        A mapping value changes only the fields it gives, on top of what :meth:`get`
        finds for that name. Keys: ModelInfo's fields, LiteLLM's
        (``cache_read_input_token_cost``, ``max_input_tokens``) or per-1M prices
        (``input_per_million``, ``output_per_million``, ``cached_input_per_million``).
        Setting any price makes the model's price flat: long-prompt tiers found for
        it are dropped, since they were quoted next to the prices you replaced.

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
                models[name] = replace(value, name=name, source=value.source or "override")
                continue
            if not isinstance(value, Mapping):
                msg = f"override for '{name}' must be a ModelInfo or a mapping, not {type(value).__name__}"
                raise ConfigurationError(msg)
            base = self.get(name)
            current: dict[str, Any] = {f: getattr(base, f) for f in _INFO_FIELDS} if base else dict.fromkeys(_INFO_FIELDS)
            given: set[str] = set()
            for key, raw in value.items():
                if key not in _OVERRIDE_KEYS:
                    msg = f"override for '{name}': unknown key '{key}'; use one of {', '.join(_OVERRIDE_KEYS)}"
                    raise ConfigurationError(msg)
                target, divisor = _OVERRIDE_KEYS[key]
                if target in given:
                    msg = f"override for '{name}' sets {target} twice (through '{key}')"
                    raise ConfigurationError(msg)
                given.add(target)
                number = _price(raw, f"override for '{name}': {key}")
                current[target] = number / divisor if number is not None and divisor != 1.0 else raw
            prices_given = any(f.endswith("cost_per_token") for f in given)
            tiers = base.tiers if base is not None and not prices_given else ()
            source = "override" + (f" of {base.source}" if base is not None and base.source else "")
            models[name] = ModelInfo(name, **current, tiers=tiers, source=source)
        return self._like(models, self._default)

    def merged(self, other: PriceTable) -> PriceTable:
        """A new table with ``other``'s entries (and default and catalog, if set) winning."""
        default = other._default if other._default is not None else self._default
        table = self._like({**self._models, **other._models}, default)
        table._catalog = other._catalog if other._catalog is not None else self._catalog
        return table

    def _like(self, models: Mapping[str, ModelInfo], default: ModelInfo | None) -> PriceTable:
        return PriceTable(models, default=default, catalog=self._catalog)

    def get(self, model: str) -> ModelInfo | None:
        """Find a model's info: the table's entries first, then its catalog.

        Tries the exact name, then the same up to case, provider prefix (``openai/gpt-4o``,
        ``us.anthropic.claude-...``) and snapshot date (``gpt-4o-2024-08-06`` ->
        ``gpt-4o``); then asks the catalog. A name with another version is another model:
        ``claude-opus-4-5`` never finds ``claude-opus-4``. Results are remembered.

        Returns:
            The info, or None when nothing matches.
        """
        found = self._resolved.get(model, _UNSEEN)
        if found is _UNSEEN:
            found = self._models.get(model) or _exact_lookup(self._models, model)
            if found is None and self._catalog is not None and model.strip():
                found = self._catalog(model)
            if len(self._resolved) < _MEMO_LIMIT:
                self._resolved[model] = found
        return found  # type: ignore[return-value]

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
        why = f" ({info.source})" if info is not None and info.source else ""
        msg = (f"no price for {label}{why}, and a USD budget needs one. Add it with "
               f"PriceTable.bundled().with_overrides({{'{example}': {{'input_per_million': ..., "
               "'output_per_million': ...}}), give PriceTable(default=ModelInfo(...)) to charge "
               "unknown models a fixed price, or upgrade genai-prices if the model is new "
               "(`budgetguard prices MODEL` shows what is known).")
        raise UnknownModelError(msg)

    def context_window(self, model: str | None) -> int | None:
        """Most prompt and output tokens ``model`` accepts: its own, else the default's, else None."""
        info = self.get(model) if model else None
        if info is not None and info.context_window is not None:
            return info.context_window
        return self._default.context_window if self._default is not None else None

    @property
    def models(self) -> Mapping[str, ModelInfo]:
        """The table's own entries (overrides, a LiteLLM file), read-only; the catalog is not listed."""
        return MappingProxyType(self._models)

    @property
    def skipped(self) -> Mapping[str, str]:
        """Entries :meth:`from_litellm` left out as malformed: model name -> why."""
        return self._skipped

    @property
    def default(self) -> ModelInfo | None:
        """The fallback info for unpriced models, if any."""
        return self._default

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, model: object) -> bool:
        return isinstance(model, str) and self.get(model) is not None
