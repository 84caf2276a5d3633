"""Overflow policies acting on the real ``ChatOpenAI`` client over HTTP (metered copies).

Policies that rewrite a request act where the guard sends the call itself: in the metered
copy of each chat model ``guard | chain`` reaches. (Models it cannot reach are metered
through callbacks, where only ``wait_for_refill`` applies: see ``test_policies.py``.)
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.prompts import ChatPromptTemplate
from openai_helpers import chat, long_history
from pydantic import BaseModel

from budgetguard import Budget, BudgetGuard
from budgetguard.policies import cheaper_model, compress_prompt
from budgetguard.testing import StubOpenAIServer

PROMPT = ChatPromptTemplate.from_messages([("system", "You are a careful assistant."), ("human", "{q}")])


pytestmark = pytest.mark.usefixtures("fresh_server")


async def test_too_long_prompt_is_compressed_and_no_400_is_ever_received(run: Any, server: StubOpenAIServer) -> None:
    guard = BudgetGuard([Budget("g", limit=10_000_000)], policies=[compress_prompt("trim")])
    history = long_history(30)
    msg = await run.invoke(guard | chat(server, "gpt-4"), history)
    assert [r.status for r in server.requests] == [200]
    sent = server.requests[-1]
    assert sent.prompt_tokens + 50 <= 8192
    assert sent.body["messages"][0]["content"] == "You review logs."
    assert sent.body["messages"][-1]["content"] == "What is the root cause?"
    assert msg.response_metadata["budgetguard"]["policy"] == "compress"


async def test_too_long_prompt_is_routed_to_a_larger_context_model(run: Any, server: StubOpenAIServer) -> None:
    guard = BudgetGuard([Budget("g", limit=10_000_000)], policies=[cheaper_model({"gpt-4": ["gpt-4o-mini"]})])
    msg = await run.invoke(guard | chat(server, "gpt-4"), long_history(30))
    assert [(r.model, r.status) for r in server.requests] == [("gpt-4o-mini", 200)]
    assert msg.response_metadata["budgetguard"]["model"] == "gpt-4o-mini"


class Answer(BaseModel):
    """A structured answer."""

    text: str


async def test_cheaper_model_keeps_tools_and_structured_output(run: Any, server: StubOpenAIServer) -> None:
    guard = BudgetGuard([Budget("usd", limit=0.002, unit="usd")], policies=[cheaper_model({"gpt-4o": ["gpt-4o-mini"]})])
    server.default_reply = '{"text": "fine"}'

    def lookup(city: str) -> str:
        """Look up the weather of a city."""
        return city

    tooled = guard | (PROMPT | chat(server, "gpt-4o", max_tokens=400).bind_tools([lookup]))
    await run.invoke(tooled, {"q": "weather?"})
    req = server.requests[-1]
    assert req.model == "gpt-4o-mini"
    assert req.body["tools"][0]["function"]["name"] == "lookup"

    structured = guard | (PROMPT | chat(server, "gpt-4o", max_tokens=400).with_structured_output(Answer))
    out = await run.invoke(structured, {"q": "answer?"})
    req = server.requests[-1]
    assert req.model == "gpt-4o-mini"
    assert "response_format" in req.body or "tools" in req.body
    assert out == Answer(text="fine")
    server.default_reply = None


async def test_budget_too_small_for_the_expensive_model_is_served_by_the_cheaper_one(
    run: Any, server: StubOpenAIServer
) -> None:
    guard = BudgetGuard([Budget("usd", limit=0.003, unit="usd")], policies=[cheaper_model({"gpt-4o": ["gpt-4o-mini"]})])
    await run.invoke(guard | (PROMPT | chat(server, "gpt-4o", max_tokens=1000)), {"q": "hi"})
    assert [r.model for r in server.requests] == ["gpt-4o-mini"]
