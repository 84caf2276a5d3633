"""However a call ends, it is charged by one rule: the real ``ChatOpenAI`` over real HTTP.

Each test drives the guard the way an application does (a chat UI's stop button, a request
timeout, a cancelled task, Ctrl-C, a cache, a policy) against the project's local
OpenAI-compatible server, and checks what was charged, what the ledger says, and that no
reservation is left held. gpt-4 is counted with cl100k, exactly as the server counts, so the
prompt estimate equals the server's ``prompt_tokens``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.callbacks import BaseCallbackHandler, get_usage_metadata_callback
from langchain_core.globals import set_llm_cache
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.rate_limiters import InMemoryRateLimiter
from langchain_core.runnables import RunnableLambda
from openai_helpers import chat

import budgetguard.lcel
from budgetguard import Budget, BudgetExceeded, BudgetGuard
from budgetguard.ledger import Ledger
from budgetguard.policies import cap_output
from budgetguard.testing import ScriptedResponse, StubOpenAIServer

PROMPT = ChatPromptTemplate.from_messages([("system", "You are a careful assistant."), ("human", "{q}")])
LIMIT = 10_000


pytestmark = pytest.mark.usefixtures("fresh_server")


@pytest.fixture(params=["in-place", "callbacks"])
def metering(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run with ChatOpenAI metered by its metered copy, and by the callback meters (a model
    the guard cannot reach: the tests' switch stops ``guard | chain`` from reaching it)."""
    if request.param == "callbacks":
        monkeypatch.setattr(budgetguard.lcel, "reach_models", lambda runnable, engine: runnable)
    return str(request.param)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger(tmp_path / "ledger.sqlite3") as led:
        yield led


def outcomes(ledger: Ledger) -> list[str]:
    return [r.outcome for r in ledger.records()]


async def settled(guard: BudgetGuard) -> None:
    """Give the event loop a few turns: an async generator the consumer dropped is closed by
    the loop, not at once (a direct ``aclose()`` settles on the spot)."""
    for _ in range(20):
        if guard.store.open_reservations() == 0:
            return
        await asyncio.sleep(0)


# -- interrupted calls: charged the prompt and what was received, settled at once ---------------


@pytest.mark.parametrize("stop_after", [1, 2, 4])
async def test_a_stream_stopped_by_its_consumer_is_charged_the_prompt_and_what_arrived(
    run: Any, server: StubOpenAIServer, metering: str, ledger: Ledger, stop_after: int
) -> None:
    guard = BudgetGuard([Budget("g", limit=LIMIT)], ledger=ledger)
    chunks = await run.stream(guard | (PROMPT | chat(server)), {"q": "stream please"}, stop_after=stop_after)
    await settled(guard)
    assert guard.store.open_reservations() == 0
    received = "".join(str(c.content) for c in chunks)
    if stop_after == 1:
        assert received == ""  # OpenAI's first chunk carries the role and no text
    prompt = server.requests[-1].prompt_tokens
    assert prompt is not None and prompt > 0
    assert guard.remaining("g") == LIMIT - (prompt + guard.estimator.count_text(received, "gpt-4"))
    assert outcomes(ledger) == ["cancelled"]


async def test_a_metered_copy_closed_by_its_consumer_settles_before_aclose_returns(
    server: StubOpenAIServer, ledger: Ledger
) -> None:
    guard = BudgetGuard([Budget("g", limit=LIMIT)], ledger=ledger)
    stream = guard.model(chat(server)).astream("stream please")
    first = await anext(stream)
    assert first.content == ""
    await stream.aclose()
    assert guard.store.open_reservations() == 0  # no loop turns: settled inside aclose()
    assert guard.remaining("g") == LIMIT - server.requests[-1].prompt_tokens
    assert outcomes(ledger) == ["cancelled"]


async def test_a_cancelled_task_is_charged_its_prompt_at_once(
    server: StubOpenAIServer, metering: str, ledger: Ledger
) -> None:
    guard = BudgetGuard([Budget("g", limit=LIMIT)], ledger=ledger)
    server.enqueue(ScriptedResponse(latency=5.0))
    task = asyncio.create_task((guard | (PROMPT | chat(server))).ainvoke({"q": "slow"}))
    while server.request_count == 0:  # until the request has left
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert guard.store.open_reservations() == 0  # not left to its lease
    assert guard.remaining("g") == LIMIT - server.requests[-1].prompt_tokens
    assert outcomes(ledger) == ["cancelled"]


async def test_a_wait_for_timeout_is_charged_its_prompt_at_once(
    server: StubOpenAIServer, metering: str, ledger: Ledger
) -> None:
    guard = BudgetGuard([Budget("g", limit=LIMIT)], ledger=ledger)
    server.enqueue(ScriptedResponse(latency=5.0))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for((guard | (PROMPT | chat(server))).ainvoke({"q": "slow"}), timeout=2.0)
    assert server.request_count == 1
    assert guard.store.open_reservations() == 0
    assert guard.remaining("g") == LIMIT - server.requests[-1].prompt_tokens
    assert outcomes(ledger) == ["cancelled"]


async def test_a_request_timeout_is_charged_its_prompt(
    run: Any, server: StubOpenAIServer, metering: str, ledger: Ledger
) -> None:
    guard = BudgetGuard([Budget("g", limit=LIMIT)], ledger=ledger)
    server.enqueue(ScriptedResponse(latency=5.0))
    with pytest.raises(openai.APITimeoutError):
        await run.invoke(guard | (PROMPT | chat(server, timeout=1.5)), {"q": "slow"})
    assert guard.store.open_reservations() == 0
    assert guard.remaining("g") == LIMIT - server.requests[-1].prompt_tokens
    assert outcomes(ledger) == ["cancelled"]


def test_ctrl_c_during_a_sync_call_is_charged_its_prompt(
    server: StubOpenAIServer, metering: str, ledger: Ledger
) -> None:
    guard = BudgetGuard([Budget("g", limit=LIMIT)], ledger=ledger)
    server.enqueue(ScriptedResponse(latency=5.0))
    main = threading.main_thread().ident
    assert main == threading.get_ident()  # a real SIGINT reaches the main thread only

    def interrupt() -> None:
        while server.request_count == 0:
            threading.Event().wait(0.01)
        signal.pthread_kill(main, signal.SIGINT)  # type: ignore[arg-type]

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        (guard | (PROMPT | chat(server))).invoke({"q": "slow"})
    assert guard.store.open_reservations() == 0
    assert guard.remaining("g") == LIMIT - server.requests[-1].prompt_tokens
    assert outcomes(ledger) == ["cancelled"]


async def test_a_call_cancelled_before_it_was_sent_is_charged_nothing(server: StubOpenAIServer, ledger: Ledger) -> None:
    # The model's own rate limiter holds the call back; cancelled there, nothing reached the server.
    limiter = InMemoryRateLimiter(requests_per_second=0.01, check_every_n_seconds=0.01, max_bucket_size=1)
    guard = BudgetGuard([Budget("g", limit=LIMIT)], ledger=ledger)
    task = asyncio.create_task((guard | (PROMPT | chat(server, rate_limiter=limiter))).ainvoke({"q": "hi"}))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert server.request_count == 0
    assert (guard.remaining("g"), guard.store.open_reservations()) == (LIMIT, 0)
    assert outcomes(ledger) == ["cancelled"]


async def test_interrupted_reserved_charges_the_whole_reservation(
    run: Any, server: StubOpenAIServer, ledger: Ledger
) -> None:
    guard = BudgetGuard([Budget("g", limit=LIMIT)], ledger=ledger, interrupted="reserved")
    await run.stream(guard | (PROMPT | chat(server)), {"q": "stream please"}, stop_after=2)
    await settled(guard)
    assert guard.remaining("g") == LIMIT - (server.requests[-1].prompt_tokens + 50)
    assert outcomes(ledger) == ["cancelled"]


async def test_a_provider_error_mid_stream_is_charged_what_arrived(
    run: Any, server: StubOpenAIServer, metering: str, ledger: Ledger
) -> None:
    guard = BudgetGuard([Budget("g", limit=LIMIT)], ledger=ledger)
    server.enqueue(ScriptedResponse(break_after=3))
    with pytest.raises(openai.APIConnectionError):
        await run.stream(guard | (PROMPT | chat(server)), {"q": "stream please"})
    assert guard.store.open_reservations() == 0
    spent = LIMIT - guard.remaining("g")
    assert server.requests[-1].prompt_tokens < spent < server.requests[-1].prompt_tokens + 50
    assert outcomes(ledger) == ["error"]


async def test_a_call_the_provider_rejects_is_charged_nothing(
    run: Any, server: StubOpenAIServer, metering: str, ledger: Ledger
) -> None:
    guard = BudgetGuard([Budget("g", limit=LIMIT)], ledger=ledger)
    server.enqueue(ScriptedResponse(status=429))
    with pytest.raises(openai.RateLimitError):
        await run.invoke(guard | (PROMPT | chat(server)), {"q": "hi"})
    assert (guard.remaining("g"), guard.store.open_reservations()) == (LIMIT, 0)
    assert outcomes(ledger) == ["error"]


# -- one chat-model run per call, whatever the guard does to it ------------------------------------


class _Starts(BaseCallbackHandler):
    def __init__(self) -> None:
        self.starts: list[dict[str, Any]] = []

    def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        self.starts.append(kwargs.get("metadata") or {})


def _capped_guard(server: StubOpenAIServer) -> tuple[BudgetGuard, Any]:
    """A guard whose budget makes cap_output rewrite the call (the request is changed)."""
    guard = BudgetGuard([Budget("g", limit=60)], policies=[cap_output(min_output_tokens=5)], ledger=False)
    return guard, guard | (PROMPT | chat(server, max_tokens=500))


async def test_usage_callbacks_count_what_the_provider_counted(run: Any, server: StubOpenAIServer) -> None:
    guard, chain = _capped_guard(server)
    with get_usage_metadata_callback() as usage:
        msg = await run.invoke(chain, {"q": "hi"})
    assert msg.response_metadata["budgetguard"]["policy"] == "cap_output"
    req = server.requests[-1]
    assert usage.usage_metadata["gpt-4"]["total_tokens"] == req.prompt_tokens + req.completion_tokens


async def test_a_rewritten_call_is_one_chat_model_run_with_the_models_own_trace_fields(
    run: Any, server: StubOpenAIServer
) -> None:
    guard, chain = _capped_guard(server)
    starts = _Starts()
    await run.invoke(chain, {"q": "hi"}, {"callbacks": [starts]})
    assert len(starts.starts) == 1
    assert (starts.starts[0]["ls_provider"], starts.starts[0]["ls_model_name"]) == ("openai", "gpt-4")
    assert server.requests[-1].body["max_completion_tokens"] < 500  # the run sent the rewritten call


async def test_astream_events_has_one_chat_model_start_per_call(server: StubOpenAIServer) -> None:
    guard, chain = _capped_guard(server)
    events = [e async for e in chain.astream_events({"q": "hi"}, version="v2")]
    kinds = [e["event"] for e in events]
    assert kinds.count("on_chat_model_start") == 1 and kinds.count("on_chat_model_end") == 1
    streamed = "".join(str(e["data"]["chunk"].content) for e in events if e["event"] == "on_chat_model_stream")
    end = next(e for e in events if e["event"] == "on_chat_model_end")
    assert streamed == end["data"]["output"].content  # every token once


# -- composition: `guard | prompt | llm | parser` guards the whole chain ---------------------------


async def test_guard_piped_into_more_steps_guards_all_of_them(run: Any, server: StubOpenAIServer) -> None:
    guard = BudgetGuard([Budget("g", limit=100)], ledger=False)
    chain = guard | PROMPT | chat(server, max_tokens=500) | StrOutputParser()
    for _ in range(3):
        with pytest.raises(BudgetExceeded):
            await run.invoke(chain, {"q": "hi"})
    assert server.request_count == 0 and guard.remaining("g") == 100
    small = guard | PROMPT | chat(server, max_tokens=20) | StrOutputParser()
    assert isinstance(await run.invoke(small, {"q": "hi"}), str)
    req = server.requests[-1]
    assert guard.remaining("g") == 100 - (req.prompt_tokens + req.completion_tokens)


# -- LangChain's cache: a cached answer is never refused and costs nothing --------------------------


@pytest.fixture
def global_cache() -> Iterator[InMemoryCache]:
    cache = InMemoryCache()
    set_llm_cache(cache)
    yield cache
    set_llm_cache(None)


async def test_a_cached_answer_is_served_when_the_budget_could_not_pay_for_a_real_call(
    run: Any, server: StubOpenAIServer, global_cache: InMemoryCache, ledger: Ledger
) -> None:
    guard = BudgetGuard([Budget("g", limit=120)], ledger=ledger)
    chain = guard | (PROMPT | chat(server))
    first = await run.invoke(chain, {"q": "What is a token bucket?"})
    left = guard.remaining("g")
    assert left < server.requests[-1].prompt_tokens + 50  # a real call no longer fits
    again = await run.invoke(chain, {"q": "What is a token bucket?"})
    assert again.content == first.content
    assert server.request_count == 1 and guard.remaining("g") == left
    with pytest.raises(BudgetExceeded):  # not in the cache: refused, never sent
        await run.invoke(chain, {"q": "Something new"})
    assert server.request_count == 1 and guard.store.open_reservations() == 0
    assert outcomes(ledger) == ["ok", "cached", "denied"]


async def test_a_reserved_call_answered_from_a_models_cache_is_refunded_in_full(
    run: Any, server: StubOpenAIServer, ledger: Ledger
) -> None:
    guard = BudgetGuard([Budget("g", limit=LIMIT)], ledger=ledger)
    chain = guard | (PROMPT | chat(server, cache=InMemoryCache()))
    await run.invoke(chain, {"q": "hi"})
    left = guard.remaining("g")
    await run.invoke(chain, {"q": "hi"})
    assert (server.request_count, guard.remaining("g")) == (1, left)
    assert outcomes(ledger) == ["ok", "cached"]


# -- a refusal on the callback path is not logged as a callback error ------------------------------


def test_a_refusal_through_callbacks_is_not_logged_as_a_callback_error(
    server: StubOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    guard = BudgetGuard([Budget("g", limit=10)], ledger=False)
    llm = chat(server)
    hidden = guard | (PROMPT | RunnableLambda(lambda p, config: llm.invoke(p, config)))
    with caplog.at_level(logging.WARNING), pytest.raises(BudgetExceeded):
        hidden.invoke({"q": "hi"})
    assert server.request_count == 0
    assert "callback" not in caplog.text, caplog.text


# -- review findings: paths where a call could be metered twice or left held ----------------------


@pytest.mark.parametrize("disable", [True, "tool_calling"])
async def test_streaming_a_model_that_does_not_stream_is_metered_once(
    run: Any, server: StubOpenAIServer, ledger: Ledger, disable: Any
) -> None:
    # LangChain's stream() falls back to invoke() on such a model: the same call, metered once.
    from langchain_core.tools import tool

    @tool
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    guard = BudgetGuard([Budget("g", limit=LIMIT)], ledger=ledger)
    llm = chat(server, disable_streaming=disable).bind_tools([add])
    chunks = await run.stream(guard | llm, "add 2 and 3")
    assert chunks and server.request_count == 1
    req = server.requests[-1]
    assert guard.remaining("g") == LIMIT - (req.prompt_tokens + req.completion_tokens)
    assert guard.store.open_reservations() == 0 and outcomes(ledger) == ["ok"]


async def test_a_call_that_cannot_be_routed_releases_its_reservation(run: Any) -> None:
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration, ChatResult

    from budgetguard.errors import ConfigurationError
    from budgetguard.policies import cheaper_model

    class Deployment(BaseChatModel):
        """A provider whose model is named by a deployment: no field a ladder name could set."""

        deployment: str = "prod-4o"

        @property
        def _llm_type(self) -> str:
            return "deployment"

        @property
        def _identifying_params(self) -> dict[str, Any]:
            return {"model_name": "gpt-4o"}

        def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any) -> ChatResult:
            usage = {"input_tokens": 5, "output_tokens": 1, "total_tokens": 6}
            return ChatResult(generations=[ChatGeneration(message=AIMessage("ok", usage_metadata=usage))])

    guard = BudgetGuard([Budget("usd", limit=0.002, unit="usd")], policies=[cheaper_model({"gpt-4o": ["gpt-4o-mini"]})],
                        ledger=False)  # fmt: skip
    with pytest.raises(ConfigurationError, match="cannot switch Deployment to model 'gpt-4o-mini'"):
        await run.invoke(guard | Deployment(), "hi " * 300)
    assert guard.store.open_reservations() == 0  # nothing was sent: released, not left to its lease
    assert guard.remaining("usd") == pytest.approx(0.002)


async def test_guard_piped_into_a_model_first_guards_what_follows_too(run: Any, server: StubOpenAIServer) -> None:
    """``guard | llm | parser | llm2``: ``guard | llm`` is the model's metered copy, and piping
    more steps into it guards them too (llm2 went unguarded)."""
    guard = BudgetGuard([Budget("g", limit=100)], ledger=False)
    chain = guard | chat(server, max_tokens=10) | StrOutputParser() | chat(server, max_tokens=500)
    with pytest.raises(BudgetExceeded):
        await run.invoke(chain, "hi")
    assert server.request_count == 1  # the first call, then the second refused before sending
    req = server.requests[0]
    assert guard.remaining("g") == 100 - (req.prompt_tokens + req.completion_tokens)
