"""The real ``ChatOpenAI`` client pointed at a test module's private OpenAI-compatible server."""

from __future__ import annotations

from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI

from budgetguard.testing import StubOpenAIServer

__all__ = ["chat", "long_history"]


def chat(server: StubOpenAIServer, model: str = "gpt-4", **kw: Any) -> ChatOpenAI:
    """``ChatOpenAI`` on ``server``, no retries, 50 output tokens unless told otherwise."""
    kw.setdefault("max_tokens", 50)
    return ChatOpenAI(model=model, base_url=server.base_url, api_key="sk-test", max_retries=0, **kw)


def long_history(turns: int) -> list[BaseMessage]:
    """A review conversation of ``turns`` long turns (about 300 tokens each), then a question."""
    msgs: list[BaseMessage] = [SystemMessage("You review logs.")]
    for i in range(turns):
        msgs += [HumanMessage(f"turn {i} " + "log line with details " * 60), AIMessage("noted " * 50)]
    msgs.append(HumanMessage("What is the root cause?"))
    return msgs
