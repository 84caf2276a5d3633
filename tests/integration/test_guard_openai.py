"""End to end with the real ``langchain_openai`` clients over real HTTP to a local endpoint.

The stub server counts prompt tokens with cl100k the way OpenAI documents, so for a
cl100k model (gpt-4) the guard's estimate must equal what the server reports.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import OpenAI
from openai_helpers import chat, long_history

import budgetguard.lcel
from budgetguard import Budget, BudgetExceeded, BudgetGuard, ContextWindowExceeded
from budgetguard.encodings import load_bundled
from budgetguard.testing import StubOpenAIServer

PROMPT = ChatPromptTemplate.from_messages([("system", "You are a careful assistant."), ("human", "{q}")])


@pytest.fixture(autouse=True, params=["in-place", "callbacks"])
def metering(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs with ChatOpenAI metered in place and through the callback meters."""
    if request.param == "callbacks":
        monkeypatch.setattr(budgetguard.lcel, "reach_models", lambda runnable, engine: runnable)
    return str(request.param)


pytestmark = pytest.mark.usefixtures("fresh_server")


async def test_estimate_equals_the_servers_count_and_reconciles_to_it(
    run: Any, server: StubOpenAIServer, metering: str
) -> None:
    guard = BudgetGuard([Budget("g", limit=10_000)])
    guarded = guard | (PROMPT | chat(server))
    assert guarded.covered is (metering == "in-place")  # the fixture's switch really switches
    msg = await run.invoke(guarded, {"q": "What is a token bucket?"})
    req = server.requests[-1]
    info = msg.response_metadata["budgetguard"]
    assert info["estimated_input_tokens"] == req.prompt_tokens
    assert info["estimated_output_tokens"] == 50
    assert guard.remaining("g") == 10_000 - (req.prompt_tokens + req.completion_tokens)
    assert req.body["max_completion_tokens"] == 50


async def test_o200k_model_is_estimated_exactly_offline(run: Any, server: StubOpenAIServer) -> None:
    # The stub counts every model with cl100k; OpenAI counts gpt-4o-mini with o200k_base, as the guard does.
    o200k = load_bundled("o200k_base")

    def tok(text: str) -> int:
        return len(o200k.encode_ordinary(text))

    expected = 3 + (3 + tok("system") + tok("You are a careful assistant.")) + (3 + tok("user") + tok("Explain leases."))
    guard = BudgetGuard([Budget("g", limit=10_000)])
    msg = await run.invoke(guard | (PROMPT | chat(server, "gpt-4o-mini")), {"q": "Explain leases."})
    assert msg.response_metadata["budgetguard"]["estimated_input_tokens"] == expected


async def test_denied_call_never_reaches_the_server(run: Any, server: StubOpenAIServer) -> None:
    guard = BudgetGuard([Budget("per-user", limit=40, per="user_id")])
    with pytest.raises(BudgetExceeded, match=r"budget 'per-user' \(user_id=alice\) cannot cover this call"):
        await run.invoke(guard | (PROMPT | chat(server)), {"q": "hi"}, {"configurable": {"user_id": "alice"}})
    assert server.request_count == 0


async def test_stream_settles_from_the_usage_chunk(run: Any, server: StubOpenAIServer) -> None:
    guard = BudgetGuard([Budget("g", limit=10_000)])
    chunks = await run.stream(guard | (PROMPT | chat(server, stream_usage=True)), {"q": "stream please"})
    req = server.requests[-1]
    assert req.body["stream_options"] == {"include_usage": True}
    assert "".join(c.content for c in chunks)
    assert guard.remaining("g") == 10_000 - (req.prompt_tokens + req.completion_tokens)


async def test_stream_without_usage_is_counted_from_the_text(run: Any, server: StubOpenAIServer) -> None:
    guard = BudgetGuard([Budget("g", limit=10_000)])
    await run.stream(guard | (PROMPT | chat(server)), {"q": "stream please"})
    req = server.requests[-1]
    assert "stream_options" not in req.body
    # cl100k model: the estimate and the count of the streamed text match the server exactly
    assert guard.remaining("g") == 10_000 - (req.prompt_tokens + req.completion_tokens)


async def test_broken_stream_settles_what_arrived_and_leaks_nothing(run: Any, server: StubOpenAIServer) -> None:
    from budgetguard.testing import ScriptedResponse

    guard = BudgetGuard([Budget("g", limit=10_000)])
    server.enqueue(ScriptedResponse(break_after=3))
    with pytest.raises(openai.APIConnectionError):
        await run.stream(guard | (PROMPT | chat(server)), {"q": "stream please"})
    assert guard.store.open_reservations() == 0
    spent = 10_000 - guard.remaining("g")
    assert server.requests[-1].prompt_tokens < spent < server.requests[-1].prompt_tokens + 50


async def test_rate_limited_call_releases_its_reservation(run: Any, server: StubOpenAIServer) -> None:
    from budgetguard.testing import ScriptedResponse

    guard = BudgetGuard([Budget("g", limit=10_000)])
    server.enqueue(ScriptedResponse(status=429))
    with pytest.raises(openai.RateLimitError):
        await run.invoke(guard | (PROMPT | chat(server)), {"q": "hi"})
    assert guard.remaining("g") == 10_000
    assert guard.store.open_reservations() == 0


async def test_too_long_prompt_is_refused_before_sending(run: Any, server: StubOpenAIServer) -> None:
    guard = BudgetGuard([Budget("g", limit=10_000_000)])
    with pytest.raises(ContextWindowExceeded):
        await run.invoke(guard | chat(server, "gpt-4"), long_history(30))
    assert server.request_count == 0


async def test_completions_llm_is_metered(run: Any, server: StubOpenAIServer) -> None:
    guard = BudgetGuard([Budget("g", limit=10_000)])
    llm = OpenAI(model="gpt-3.5-turbo-instruct", base_url=server.base_url, api_key="sk-test", max_retries=0, max_tokens=20)
    await run.invoke(guard | llm, "Say something")
    req = server.requests[-1]
    assert guard.remaining("g") == 10_000 - (req.prompt_tokens + req.completion_tokens)
