"""Read what a model call really used from LangChain results.

Where usage is looked for, first hit wins:

1. ``usage_metadata`` of each generation's message (LangChain's standard field:
   ``input_tokens``, ``output_tokens``, ``input_token_details.cache_read``,
   ``output_token_details.reasoning``);
2. ``llm_output["token_usage"]`` (OpenAI style: ``prompt_tokens``,
   ``completion_tokens``, ``prompt_tokens_details.cached_tokens``,
   ``completion_tokens_details.reasoning_tokens``), then ``llm_output["usage"]``
   (Anthropic style: ``input_tokens``, ``output_tokens``, ``cache_read_input_tokens``);
3. ``token_usage`` / ``usage`` in each generation's ``generation_info`` or its
   message's ``response_metadata``.

``langchain_openai`` reports the same usage both in (1) and (2); taking the first
source that has any keeps it from being counted twice. With ``n > 1`` it attaches
the whole call's usage to every choice, so identical usage on all choices of one
prompt is counted once; differing usage is summed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import BaseMessage
from langchain_core.outputs import LLMResult

from budgetguard.errors import UsageError

__all__ = ["Usage", "usage_from_message", "usage_from_result"]

# (input, output) key pairs of provider-native usage dicts: OpenAI chat, Anthropic and
# OpenAI Responses, Bedrock Converse.
_NATIVE_KEYS = (("prompt_tokens", "completion_tokens"), ("input_tokens", "output_tokens"),
                ("inputTokens", "outputTokens"))
_CONTAINER_KEYS = ("token_usage", "usage")


_COUNT_FIELDS = ("input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens")


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens a call used, as the provider reported them.

    Attributes:
        input_tokens: All prompt tokens, cached ones included.
        output_tokens: All output tokens, reasoning included.
        cached_input_tokens: The part of ``input_tokens`` read from the provider's cache.
        reasoning_tokens: The part of ``output_tokens`` spent on hidden reasoning.

    Raises:
        UsageError: If a count is not a non-negative integer, or cached tokens
            exceed input tokens.
    """

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0

    def __post_init__(self) -> None:
        for name in _COUNT_FIELDS:  # a fixed tuple: dataclasses.fields() is slow on the hot path
            value = getattr(self, name)
            if type(value) is not int or value < 0:  # bools are rejected too
                msg = f"usage {name}={value!r} is not a non-negative integer"
                raise UsageError(msg)
        if self.cached_input_tokens > self.input_tokens:
            msg = f"usage reports {self.cached_input_tokens} cached input tokens of only {self.input_tokens}"
            raise UsageError(msg)

    @property
    def total(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.input_tokens + other.input_tokens, self.output_tokens + other.output_tokens,
                     self.cached_input_tokens + other.cached_input_tokens,
                     self.reasoning_tokens + other.reasoning_tokens)


def _int(value: Any, where: str, *path: Any) -> int:
    """A reported count: ints, whole floats and digit strings; None counts as 0.

    ``where`` and the keys in ``path`` name the field in the error (``usage_metadata['input_tokens']``);
    the name is only put together when the value is bad.
    """
    if type(value) is int and value >= 0:  # the common case, first
        return value
    if value is None:
        return 0
    number: float | None = None
    if (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and math.isfinite(value) and value.is_integer()
    ):
        number = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    if number is None or number < 0:
        field = where + "".join(f"[{key!r}]" for key in path)
        msg = f"{field}={value!r} is not a non-negative integer"
        raise UsageError(msg)
    return int(number)


def _details(details: Any, suffix: str, where: str, name: str) -> int:
    """Sum the detail counts whose key ends with ``suffix`` ("flex_cache_read" and "cache_read" alike)."""
    if not details or not isinstance(details, Mapping):
        return 0
    return sum(_int(v, where, name, k) for k, v in details.items() if str(k).endswith(suffix))


def _from_standard(meta: Mapping[str, Any], where: str) -> Usage | None:
    """LangChain ``usage_metadata``."""
    if meta.get("input_tokens") is None and meta.get("output_tokens") is None:
        return None
    return Usage(_int(meta.get("input_tokens"), where, "input_tokens"),
                 _int(meta.get("output_tokens"), where, "output_tokens"),
                 _details(meta.get("input_token_details"), "cache_read", where, "input_token_details"),
                 _details(meta.get("output_token_details"), "reasoning", where, "output_token_details"))


def _from_native(raw: Mapping[str, Any], where: str) -> Usage | None:
    """A provider's own usage dict (OpenAI, Anthropic, Bedrock)."""
    for in_key, out_key in _NATIVE_KEYS:
        if raw.get(in_key) is None and raw.get(out_key) is None:
            continue
        inputs = _int(raw.get(in_key), where, in_key)
        outputs = _int(raw.get(out_key), where, out_key)
        cached = reasoning = 0
        for key in ("prompt_tokens_details", "input_tokens_details"):
            cached += _int((raw.get(key) or {}).get("cached_tokens"), where, key, "cached_tokens")
        for key in ("completion_tokens_details", "output_tokens_details"):
            reasoning += _int((raw.get(key) or {}).get("reasoning_tokens"), where, key, "reasoning_tokens")
        # Anthropic's input_tokens leaves out cache reads and writes; both are prompt tokens.
        anthropic_read = _int(raw.get("cache_read_input_tokens"), where, "cache_read_input_tokens")
        anthropic_write = _int(raw.get("cache_creation_input_tokens"), where, "cache_creation_input_tokens")
        return Usage(inputs + anthropic_read + anthropic_write, outputs, cached + anthropic_read, reasoning)
    return None


def _from_metadata(meta: Any, where: str) -> Usage | None:
    """``token_usage`` / ``usage`` inside llm_output, generation_info or response_metadata."""
    if not isinstance(meta, Mapping):
        return None
    for key in _CONTAINER_KEYS:
        raw = meta.get(key)
        if isinstance(raw, Mapping):
            found = _from_native(raw, f"{where}[{key!r}]")
            if found is not None:
                return found
    return None


def _combine(per_choice: list[Usage]) -> Usage | None:
    if not per_choice:
        return None
    first = per_choice[0]
    if all(u == first for u in per_choice):  # one call's usage repeated on each of its n choices
        return first
    total = first
    for usage in per_choice[1:]:
        total += usage
    return total


def _sum(usages: Iterable[Usage | None]) -> Usage | None:
    total: Usage | None = None
    for usage in usages:
        if usage is not None:
            total = usage if total is None else total + usage
    return total


def usage_from_message(msg: BaseMessage) -> Usage | None:
    """Usage reported on one message.

    Args:
        msg: Usually an ``AIMessage``; ``usage_metadata`` is read first, then
            ``response_metadata["token_usage"]`` / ``["usage"]``.

    Returns:
        The usage, or None when the message reports none.

    Raises:
        UsageError: If a count is negative, NaN, a bool or a non-numeric string;
            the message names the field and value.

    Example:
        >>> from langchain_core.messages import AIMessage
        >>> usage_from_message(AIMessage("hi", usage_metadata={"input_tokens": 9, "output_tokens": 1,
        ...                                                   "total_tokens": 10}))
        Usage(input_tokens=9, output_tokens=1, cached_input_tokens=0, reasoning_tokens=0)
    """
    meta = getattr(msg, "usage_metadata", None)
    if type(meta) is dict or isinstance(meta, Mapping):  # a dict, nearly always: skip the ABC check
        found = _from_standard(meta, "usage_metadata")
        if found is not None:
            return found
    return _from_metadata(getattr(msg, "response_metadata", None), "response_metadata")


def usage_from_result(result: LLMResult) -> Usage | None:
    """Usage of a finished call, from the ``LLMResult`` LangChain hands to ``on_llm_end``.

    Args:
        result: The call's result (chat or completion model, streamed or not).

    Returns:
        Usage summed over the result's prompts (see the module docstring for the
        sources and their order), or None when nothing reports usage.

    Raises:
        UsageError: If reported usage is malformed; the message names the field and value.
    """
    standard = _sum(
        _combine([u for g in gens if (u := _standard_of(g)) is not None]) for gens in result.generations
    )
    if standard is not None:
        return standard
    native = _from_metadata(result.llm_output, "llm_output")
    if native is not None:
        return native
    return _sum(_combine([u for g in gens if (u := _native_of(g)) is not None]) for gens in result.generations)


def _standard_of(generation: Any) -> Usage | None:
    meta = getattr(getattr(generation, "message", None), "usage_metadata", None)
    return _from_standard(meta, "usage_metadata") if isinstance(meta, Mapping) else None


def _native_of(generation: Any) -> Usage | None:
    found = _from_metadata(getattr(generation, "generation_info", None), "generation_info")
    message = getattr(generation, "message", None)
    if found is None and message is not None:
        found = _from_metadata(getattr(message, "response_metadata", None), "response_metadata")
    return found
