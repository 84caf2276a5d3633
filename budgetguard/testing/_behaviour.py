"""How the stub model answers a chat request the way a capable model would: tools and JSON.

Deterministic rules, enough for LangChain's standard chat-model tests and for agent loops:

* **Tools.** When tools are bound, the last message is the user's (not a tool result) and
  ``tool_choice`` is not ``"none"``, the model calls one tool if ``tool_choice`` asks for one
  (a function name, ``"required"``) or the user's text names one (its name, or a word of it
  of four letters or more: "weather" calls ``get_weather``). Its arguments are built from the
  tool's JSON schema (:func:`value_for`).
* **Structured output.** ``response_format`` ``json_schema``: a JSON object built from the
  schema; ``json_object``: an object whose keys are the single-quoted words of the user's
  text (``'setup'``), or ``{"answer": ...}``.
* Otherwise :func:`answer` returns ``None`` and the server writes its usual generated reply.

Argument values: integers are the integers of the user's text in order (``3`` when there are
none), numbers likewise, strings the single-quoted phrases in order (else the property's
description, else its name), booleans ``true``, enums their first value, arrays empty,
objects recursively; ``$ref`` into ``$defs`` and ``anyOf`` (first non-null) are followed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["Answer", "answer", "value_for"]

_QUOTED = re.compile(r"'([^']+)'")
_INTEGER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Answer:
    """What the model decided: reply text, or tool calls (``[{"name", "arguments"}]``)."""

    text: str = ""
    tool_calls: list[dict[str, Any]] | None = None


def answer(body: dict[str, Any], user_text: str) -> Answer | None:
    """The stub model's answer to a chat request, or ``None`` for its generated reply."""
    messages = body.get("messages") or []
    last_role = messages[-1].get("role") if messages and isinstance(messages[-1], dict) else None
    tools = [t.get("function", t) for t in body.get("tools") or [] if isinstance(t, dict)]
    choice = body.get("tool_choice")
    if tools and last_role == "user" and choice != "none":
        tool = _chosen_tool(tools, choice, user_text)
        if tool is not None:
            args = value_for(tool.get("parameters") or {"type": "object"}, _Values(user_text), tool.get("parameters"))
            return Answer(tool_calls=[{"name": tool["name"], "arguments": args}])
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") or {"type": "object"}
        return Answer(json.dumps(value_for(schema, _Values(user_text), schema), ensure_ascii=False))
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        keys = _QUOTED.findall(user_text)
        obj = {k: f"{k} of the answer" for k in keys} if keys else {"answer": user_text}
        return Answer(json.dumps(obj, ensure_ascii=False))
    return None


def _chosen_tool(tools: list[dict[str, Any]], choice: Any, text: str) -> dict[str, Any] | None:
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        return next((t for t in tools if t.get("name") == wanted), None)
    lowered = text.lower()
    for tool in tools:
        name = str(tool.get("name", ""))
        words = [w for w in re.split(r"[_\W]+", name.lower()) if len(w) >= 4]
        if name.lower() in lowered or any(w in lowered for w in words):
            return tool
    return tools[0] if choice in ("required", "any") else None


class _Values:
    """Values taken from the user's text, in order."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._ints: Iterator[str] = iter(_INTEGER.findall(text))
        self._quoted: Iterator[str] = iter(_QUOTED.findall(text))

    def integer(self) -> int:
        return int(next(self._ints, "3"))

    def string(self, fallback: str) -> str:
        return next(self._quoted, fallback)


def value_for(schema: dict[str, Any], values: _Values, root: dict[str, Any] | None, name: str = "value") -> Any:
    """A value that fits ``schema`` (see the module docstring for the rules)."""
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/") and root is not None:
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {})
        return value_for(target, values, root, name)
    if "enum" in schema and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        options = [s for s in schema.get(key) or [] if s.get("type") != "null"]
        if options:
            return value_for(options[0], values, root, name)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        return {key: value_for(sub, values, root, key) for key, sub in props.items()}
    if kind == "integer":
        return values.integer()
    if kind == "number":
        return float(values.integer())
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    return values.string(str(schema.get("description") or name))
