"""Response bodies and stream chunks in the shapes OpenAI sends them."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

__all__ = [
    "OMIT",
    "Choice",
    "chat_choice",
    "chat_events",
    "completion_base",
    "completion_body",
    "context_length_message",
    "last_user_text",
    "legacy_choice",
    "legacy_events",
    "merge",
    "retry_headers",
    "tool_calls",
    "usage_body",
]

OMIT: Any = object()  # "send no usage at all"


class Choice(NamedTuple):
    text: str
    finish_reason: str
    tool_calls: list[dict[str, Any]] | None
    completion_tokens: int


def merge(base: Any, override: Any) -> Any:
    """``override`` merged into ``base``, recursively for dicts."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: merge(base.get(k), v) for k, v in override.items()}}
    return override


def last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            return str(content or "")
    return ""


def usage_body(prompt: int, completion: int, cached: int, reasoning: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def chat_choice(i: int, choice: Choice) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": choice.text or (None if choice.tool_calls else ""),
        "refusal": None,
        "annotations": [],
    }
    if choice.tool_calls:
        message["tool_calls"] = choice.tool_calls
    return {"index": i, "message": message, "logprobs": None, "finish_reason": choice.finish_reason}


def legacy_choice(i: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"text": text, "index": i, "logprobs": None, "finish_reason": finish_reason}


def chat_events(
    base: dict[str, Any], choices: list[Choice], pieces: Callable[[str], Iterator[str]], usage: Any
) -> Iterator[dict[str, Any]]:
    """``chat.completion.chunk`` events: role first, text a few tokens at a time, tool calls,
    finish reasons, then (unless ``usage is OMIT``) a ``choices: []`` chunk with the usage."""
    base = {**base, "object": "chat.completion.chunk"}
    extra = {} if usage is OMIT else {"usage": None}

    def chunk(i: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**base, "choices": [choice], **extra}

    for i, choice in enumerate(choices):
        yield chunk(i, {"role": "assistant", "content": "", "refusal": None})
        for piece in pieces(choice.text):
            yield chunk(i, {"content": piece})
        for j, call in enumerate(choice.tool_calls or []):
            yield chunk(i, {"tool_calls": [{"index": j, **call}]})
    for i, choice in enumerate(choices):
        yield chunk(i, {}, choice.finish_reason)
    if usage is not OMIT:
        yield {**base, "choices": [], "usage": usage}


def legacy_events(
    base: dict[str, Any], choices: list[Choice], pieces: Callable[[str], Iterator[str]], usage: Any
) -> Iterator[dict[str, Any]]:
    """``text_completion`` stream events, then the usage chunk unless ``usage is OMIT``."""
    extra = {} if usage is OMIT else {"usage": None}
    for i, choice in enumerate(choices):
        for piece in pieces(choice.text):
            yield {**base, "choices": [legacy_choice(i, piece, None)], **extra}
        yield {**base, "choices": [legacy_choice(i, "", choice.finish_reason)], **extra}
    if usage is not OMIT:
        yield {**base, "choices": [], "usage": usage}


def completion_base(model: str, chat: bool) -> dict[str, Any]:
    """The fields every completion body and chunk shares."""
    return {
        "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_stub",
    }


def completion_body(base: dict[str, Any], choices: list[Choice], usage: Any) -> dict[str, Any]:
    """A non-streamed chat or legacy completion body (``usage is OMIT`` leaves usage out)."""
    if base["object"] == "chat.completion":
        out = [chat_choice(i, c) for i, c in enumerate(choices)]
    else:
        out = [legacy_choice(i, c.text, c.finish_reason) for i, c in enumerate(choices)]
    return {**base, "choices": out} if usage is OMIT else {**base, "choices": out, "usage": usage}


def tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``[{"name", "arguments": dict | str, "id"?}]`` as OpenAI's ``tool_calls`` entries."""
    out = []
    for i, call in enumerate(calls):
        args = call.get("arguments", {})
        function = {
            "name": call["name"],
            "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False),
        }
        out.append(
            {"id": call.get("id") or f"call_stub_{i}", "type": "function", "function": function}
        )
    return out


def context_length_message(window: int, prompt: int, limit: int, chat: bool) -> str:
    """OpenAI's context_length_exceeded messages (chat, then legacy completions wording)."""
    asked = prompt + limit
    if chat:
        return (
            f"This model's maximum context length is {window} tokens. However, you requested "
            f"{asked} tokens ({prompt} in the messages, {limit} in the completion). "
            "Please reduce the length of the messages or completion."
        )
    return (
        f"This model's maximum context length is {window} tokens, however you requested "
        f"{asked} tokens ({prompt} in your prompt; {limit} for the completion). "
        "Please reduce your prompt; or completion length."
    )


def retry_headers(seconds: float | None) -> dict[str, str]:
    """``retry-after`` (whole seconds, rounded up) and the precise ``retry-after-ms``."""
    if seconds is None:
        return {}
    return {"retry-after": str(math.ceil(seconds)), "retry-after-ms": str(int(seconds * 1000))}
