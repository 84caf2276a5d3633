"""What one model costs and holds: :class:`ModelInfo` (USD per token, prompt-size tiers,
context window, output limit) and :class:`PriceTier`.

Kept apart from :mod:`budgetguard.pricing` (the table and where prices come from) so the
sources of prices (:mod:`budgetguard.pricing_genai`) build these without importing the table.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from budgetguard.errors import ConfigurationError, UnknownModelError, UsageError

__all__ = ["ModelInfo", "PriceTier"]


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
class PriceTier:
    """Prices for a whole call whose prompt is longer than ``above_input_tokens``.

    Providers such as Google (Gemini 2.5 Pro) and Anthropic (Claude Sonnet 4.5 with the
    1M window) charge every token of such a call at a higher rate, output included.

    Attributes:
        above_input_tokens: The tier applies when a call's input tokens exceed this.
        input_cost_per_token: USD per prompt token in the tier, None if unknown.
        output_cost_per_token: USD per output token in the tier, None if unknown.
        cached_input_cost_per_token: USD per cached prompt token in the tier; None means
            the tier's input price.
    """

    above_input_tokens: int
    input_cost_per_token: float | None
    output_cost_per_token: float | None
    cached_input_cost_per_token: float | None = None

    def __post_init__(self) -> None:
        what = f"tier above {self.above_input_tokens!r} input tokens"
        if isinstance(self.above_input_tokens, bool) or not isinstance(self.above_input_tokens, int) \
                or self.above_input_tokens < 0:
            msg = f"{what}: above_input_tokens must be a non-negative integer"
            raise ConfigurationError(msg)
        for name in ("input_cost_per_token", "output_cost_per_token", "cached_input_cost_per_token"):
            object.__setattr__(self, name, _price(getattr(self, name), f"{what}: {name}"))


@dataclass(frozen=True)
class ModelInfo:
    """Price and limits of one model.

    Attributes:
        name: The model name as the table knows it.
        input_cost_per_token: USD per prompt token, None if unknown.
        output_cost_per_token: USD per output token (reasoning included), None if unknown.
        cached_input_cost_per_token: USD per prompt token read from the provider's
            cache; None means cached tokens cost the full input price.
        context_window: Most tokens of prompt and output cap the model accepts, None if unknown.
        max_output_tokens: Most output tokens per call, None if unknown.
        tiers: Higher prices for long prompts, by ascending ``above_input_tokens``.
        source: Where the price comes from (package and date, file, override); not
            part of equality.

    Raises:
        ConfigurationError: If a price is negative or not finite, a limit is not positive,
            or tiers are not in ascending order.
    """

    name: str
    input_cost_per_token: float | None
    output_cost_per_token: float | None
    cached_input_cost_per_token: float | None = None
    context_window: int | None = None
    max_output_tokens: int | None = None
    tiers: tuple[PriceTier, ...] = ()
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for name in ("input_cost_per_token", "output_cost_per_token", "cached_input_cost_per_token"):
            object.__setattr__(self, name, _price(getattr(self, name), f"{self.name}: {name}"))
        for name in ("context_window", "max_output_tokens"):
            object.__setattr__(self, name, _tokens(getattr(self, name), f"{self.name}: {name}"))
        tiers = tuple(self.tiers)
        starts = [t.above_input_tokens for t in tiers if isinstance(t, PriceTier)]
        if len(starts) != len(tiers) or starts != sorted(set(starts)):
            msg = f"{self.name}: tiers must be PriceTier objects in ascending order of above_input_tokens"
            raise ConfigurationError(msg)
        object.__setattr__(self, "tiers", tiers)

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
        prices: ModelInfo | PriceTier = self
        for tier in self.tiers:  # the last tier the prompt is longer than prices the whole call
            if input_tokens > tier.above_input_tokens:
                prices = tier
        input_price, output_price = prices.input_cost_per_token, prices.output_cost_per_token
        if input_price is None or output_price is None:
            msg = (f"model '{self.name}' has no {'input' if input_price is None else 'output'} "
                   "price; add one with PriceTable.with_overrides()")
            raise UnknownModelError(msg)
        cached_price = prices.cached_input_cost_per_token
        cached_price = input_price if cached_price is None else cached_price
        return ((input_tokens - cached_input_tokens) * input_price
                + cached_input_tokens * cached_price + output_tokens * output_price)
