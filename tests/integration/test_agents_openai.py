"""Budgets inside LangChain agents: real ``create_agent`` graphs, ``ChatOpenAI`` over HTTP.

The agent has a tool; the project's OpenAI-compatible server answers the first turn with a
call of that tool (the user's text names it) and the turn after the tool's result with text,
as a real model does. An in-memory checkpointer keeps each thread. gpt-4 is counted with
cl100k, as the server counts, so the guard's charges can be compared with the server's.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware, ModelFallbackMiddleware, SummarizationMiddleware
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.memory import InMemorySaver
from openai_helpers import chat as openai_chat

from budgetguard import Budget, BudgetExceeded, BudgetGuard, FakeClock
from budgetguard.ledger import Ledger
from budgetguard.policies import (
    cap_output,
    cheaper_model,
    compress_prompt,
    wait_for_refill,
)
from budgetguard.testing import ScriptedResponse, StubOpenAIServer

QUESTION = "What is the weather in Paris?"


@dataclass
class Ctx:
    """The agent's runtime context: who is asking."""

    user_id: str


@tool
def get_weather(city: str) -> str:
    """Get the weather of a city."""
    return f"It is sunny in {city}."


REPLY_TOKENS = 25
pytestmark = pytest.mark.usefixtures("fresh_server")


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger(tmp_path / "ledger.sqlite3") as led:
        yield led


def chat(server: StubOpenAIServer, model: str = "gpt-4", **kw: Any) -> ChatOpenAI:
    kw.setdefault("max_tokens", 60)
    return openai_chat(server, model, **kw)


def agent_for(llm: Any, middleware: list[Any], **kw: Any) -> Any:
    return create_agent(llm, tools=[get_weather], middleware=middleware, context_schema=Ctx,
                        checkpointer=InMemorySaver(), **kw)  # fmt: skip


def spent(server: StubOpenAIServer) -> int:
    return sum((r.prompt_tokens or 0) + (r.completion_tokens or 0) for r in server.requests if r.status == 200)


def thread(tid: str = "t1", **configurable: Any) -> dict[str, Any]:
    return {"configurable": {"thread_id": tid, **configurable}}


ALICE = Ctx("alice")


async def cancel_once_sent(server: StubOpenAIServer, agent: Any) -> None:
    """Run the agent as a task and cancel it once its first request has reached the server."""
    server.enqueue(ScriptedResponse(latency=5.0))
    task = asyncio.create_task(agent.ainvoke({"messages": [HumanMessage(QUESTION)]}, thread(), context=ALICE))
    while server.request_count == 0:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def ask(mode: str, agent: Any, text: str, config: dict[str, Any], ctx: Ctx | None = ALICE) -> Any:
    inputs = {"messages": [HumanMessage(text)]}
    if mode == "sync":
        return await asyncio.to_thread(agent.invoke, inputs, config, context=ctx)
    return await agent.ainvoke(inputs, config, context=ctx)


# -- every model call of the loop, exactly ----------------------------------------------------


async def test_every_model_call_of_the_loop_is_charged_what_the_server_counted(
    mode: str, server: StubOpenAIServer, ledger: Ledger
) -> None:
    guard = BudgetGuard([Budget("per-user", limit=10_000, per="user_id")], ledger=ledger)
    agent = agent_for(chat(server), [guard.middleware()])
    out = await ask(mode, agent, QUESTION, thread())
    assert [m.type for m in out["messages"]] == ["human", "ai", "tool", "ai"]
    assert len(server.requests) == 2
    assert guard.remaining("per-user", user_id="alice") == 10_000 - spent(server)
    records = list(ledger.records())
    assert [r.outcome for r in records] == ["ok", "ok"]
    assert {r.metadata.get("thread_id") for r in records} == {"t1"}
    assert len({r.root_run_id for r in records}) == 1 and records[0].root_run_id is not None
    assert {r.scope["user_id"] for r in records} == {"alice"}  # from the runtime context
    assert guard.store.open_reservations() == 0


async def test_scope_from_configurable_and_metadata_when_there_is_no_context(
    mode: str, server: StubOpenAIServer
) -> None:
    guard = BudgetGuard([Budget("per-user", limit=10_000, per="user_id"), Budget("org", limit=10_000, per="org")])
    agent = agent_for(chat(server), [guard.middleware()])
    config = {"configurable": {"thread_id": "t2", "user_id": "bob"}, "metadata": {"org": "acme"}}
    await ask(mode, agent, QUESTION, config, ctx=None)
    assert guard.remaining("per-user", user_id="bob") == guard.remaining("org", org="acme") == 10_000 - spent(server)


async def test_stream_mode_messages_emits_each_token_once(server: StubOpenAIServer) -> None:
    guard = BudgetGuard([Budget("g", limit=10_000)], ledger=False)
    agent = agent_for(chat(server, stream_usage=True), [guard.middleware()])
    pieces: dict[str, str] = {}
    async for chunk, meta in agent.astream(
        {"messages": [HumanMessage(QUESTION)]}, thread("s1"), context=Ctx("a"), stream_mode="messages"
    ):
        if isinstance(chunk, AIMessageChunk) and meta.get("langgraph_node") == "model":
            pieces[chunk.id] = pieces.get(chunk.id, "") + str(chunk.content)
    final = (await agent.aget_state(thread("s1"))).values["messages"][-1]
    assert pieces[final.id] == final.content  # every token once, not twice
    assert guard.remaining("g") == 10_000 - spent(server)


# -- overflow policies act inside the loop ---------------------------------------------------------


async def test_cheaper_model_answers_inside_the_loop(mode: str, server: StubOpenAIServer) -> None:
    guard = BudgetGuard(
        [Budget("usd", limit=0.004, unit="usd")], policies=[cheaper_model({"gpt-4o": ["gpt-4o-mini"]})], ledger=False
    )
    agent = agent_for(chat(server, "gpt-4o", max_tokens=1000), [guard.middleware()])
    out = await ask(mode, agent, QUESTION, thread())
    assert [r.model for r in server.requests] == ["gpt-4o-mini", "gpt-4o-mini"]
    assert out["messages"][-1].response_metadata["budgetguard"]["policy"] == "cheaper_model"


async def test_cap_output_lowers_the_requests_output_cap(mode: str, server: StubOpenAIServer) -> None:
    guard = BudgetGuard([Budget("g", limit=400)], policies=[cap_output(min_output_tokens=10)], ledger=False)
    agent = agent_for(chat(server, max_tokens=2000), [guard.middleware()])
    await ask(mode, agent, QUESTION, thread())
    caps = [r.body["max_completion_tokens"] for r in server.requests]
    assert all(cap < 2000 for cap in caps) and len(caps) == 2
    assert guard.remaining("g") == 400 - spent(server)


async def test_compress_prompt_shortens_the_requests_messages(mode: str, server: StubOpenAIServer) -> None:
    guard = BudgetGuard([Budget("g", limit=10_000_000)], policies=[compress_prompt("trim")], ledger=False)
    agent = agent_for(chat(server, "gpt-4"), [guard.middleware()], system_prompt="You review logs.")
    history: list[Any] = []
    for i in range(30):
        history += [HumanMessage(f"turn {i} " + "log line with details " * 60), AIMessage("noted " * 50)]
    config = thread("long")
    agent.update_state(config, {"messages": history})
    out = await ask(mode, agent, "What is the weather in Paris?", config)
    assert [r.status for r in server.requests] == [200, 200]  # no context-length 400
    sent = server.requests[0].body["messages"]
    assert sent[0]["content"] == "You review logs." and len(sent) < len(history) + 2
    assert out["messages"][-1].type == "ai"


async def test_wait_for_refill_waits_inside_the_loop(mode: str, server: StubOpenAIServer) -> None:
    clock = FakeClock()
    guard = BudgetGuard(
        [Budget("g", limit=400, refill_per_second=10)],
        clock=clock,
        policies=[wait_for_refill(max_wait=60)],
        ledger=False,
    )
    agent = agent_for(chat(server, max_tokens=150), [guard.middleware()])
    await ask(mode, agent, QUESTION, thread("w1"))
    await ask(mode, agent, QUESTION, thread("w2"))
    assert clock.slept and sum(clock.slept) <= 60
    assert guard.store.open_reservations() == 0


# -- on denial: raise, or end the run and resume after refill --------------------------------------


async def test_a_denial_raises_by_default_and_sends_nothing(mode: str, server: StubOpenAIServer) -> None:
    guard = BudgetGuard([Budget("g", limit=50)], ledger=False)
    agent = agent_for(chat(server), [guard.middleware()])
    with pytest.raises(BudgetExceeded):
        await ask(mode, agent, QUESTION, thread())
    assert server.request_count == 0 and guard.store.open_reservations() == 0


async def test_end_gracefully_then_resume_the_thread_after_refill(mode: str, server: StubOpenAIServer) -> None:
    clock = FakeClock()
    guard = BudgetGuard([Budget("per-user", limit=400, per="user_id", refill_per_second=1)], clock=clock, ledger=False)
    agent = agent_for(chat(server), [guard.middleware(on_denied="end")])
    drain = guard.model(chat(server, max_tokens=10))  # alice's other work drains her bucket
    await asyncio.to_thread(drain.invoke, "word " * 330, {"configurable": {"user_id": "alice"}})
    assert server.request_count == 1
    config = thread("g1")
    out = await ask(mode, agent, QUESTION, config)
    last = out["messages"][-1]
    assert isinstance(last, AIMessage) and not last.tool_calls
    info = last.response_metadata["budgetguard"]
    assert info["denied"] and info["budget"] == "per-user" and info["retry_after"] > 0
    assert "per-user" in last.content and "refills enough to continue in" in last.content
    assert server.request_count == 1  # refused before sending
    clock.advance(400)  # refilled to the full 400 (the thread has grown since the refusal)
    out = await ask(mode, agent, "Please go on with the weather.", config)
    assert [m.type for m in out["messages"]] == ["human", "ai", "human", "ai", "tool", "ai"]  # history kept
    assert out["messages"][1].response_metadata["budgetguard"]["denied"]
    assert "denied" not in out["messages"][-1].response_metadata["budgetguard"]
    assert server.request_count == 3
    assert "Please go on" in server.requests[1].body["messages"][-1]["content"]


# -- call and tool budgets ---------------------------------------------------------------------------


async def test_a_run_may_make_at_most_n_model_calls(mode: str, server: StubOpenAIServer) -> None:
    guard = BudgetGuard([Budget("calls", limit=1, unit="calls", per="run")], ledger=False)
    agent = agent_for(chat(server), [guard.middleware(on_denied="end")])
    out = await ask(mode, agent, QUESTION, thread("c1"))
    assert server.request_count == 1  # the loop's second call is refused
    assert out["messages"][-1].response_metadata["budgetguard"]["budget"] == "calls"
    out = await ask(mode, agent, "Hello again", thread("c1"))  # a new run: a new bucket
    assert server.request_count == 2


async def test_a_run_may_spend_at_most_a_few_cents(mode: str, server: StubOpenAIServer, ledger: Ledger) -> None:
    guard = BudgetGuard([Budget("run-usd", limit=0.004, unit="usd", per="run")], ledger=ledger)
    agent = agent_for(chat(server, "gpt-4o-mini", max_tokens=60), [guard.middleware()])
    await ask(mode, agent, QUESTION, thread("r1"))
    await ask(mode, agent, QUESTION, thread("r2"))
    assert server.request_count == 4
    runs: dict[str, float] = {}
    for record in ledger.records():
        runs[record.scope["run"]] = runs.get(record.scope["run"], 0.0) + (record.cost_usd or 0.0)
    assert len(runs) == 2  # one bucket per run, each charged its own two calls
    for run_id, cost in runs.items():
        assert cost > 0 and guard.remaining("run-usd", run=run_id) == pytest.approx(0.004 - cost)


async def test_tool_call_budget_per_tool(mode: str, server: StubOpenAIServer) -> None:
    guard = BudgetGuard([Budget("weather", limit=1, unit="tool_calls", tool="get_weather", per="thread_id")])
    agent = agent_for(chat(server), [guard.middleware(on_denied="end")])
    await ask(mode, agent, QUESTION, thread("tb"))
    out = await ask(mode, agent, QUESTION, thread("tb"))
    refused = [m for m in out["messages"] if isinstance(m, ToolMessage) and m.status == "error"]
    assert len(refused) == 1 and "weather" in refused[0].content
    assert out["messages"][-1].type == "ai"  # the model was told, and answered
    assert guard.remaining("weather", thread_id="tb") == 0
    # a tool budget's scope is needed by tool calls only: guarding a plain chain needs no thread id
    assert (guard | chat(server)).invoke("hi").content
    strict = BudgetGuard([Budget("weather", limit=0.5, unit="tool_calls", tool="get_weather")])
    with pytest.raises(BudgetExceeded, match="tool calls"):
        await ask(mode, agent_for(chat(server), [strict.middleware()]), QUESTION, thread("tc"))


# -- cancelled runs hold nothing ----------------------------------------------------------------------


async def test_a_cancelled_agent_run_holds_nothing(server: StubOpenAIServer, ledger: Ledger) -> None:
    guard = BudgetGuard([Budget("g", limit=10_000)], ledger=ledger)
    agent = agent_for(chat(server), [guard.middleware()])
    await cancel_once_sent(server, agent)
    assert guard.store.open_reservations() == 0
    assert guard.remaining("g") == 10_000 - server.requests[0].prompt_tokens
    assert [r.outcome for r in ledger.records()] == ["cancelled"]


async def test_a_cancelled_run_of_a_guarded_agent_holds_nothing(server: StubOpenAIServer) -> None:
    # guard | agent meters from the outside, through callbacks: the cancellation that skips
    # on_llm_error is settled when the agent's outermost run ends cancelled.
    guard = BudgetGuard([Budget("g", limit=10_000)], ledger=False)
    guarded = guard | agent_for(chat(server), [])
    await cancel_once_sent(server, guarded)
    assert guard.store.open_reservations() == 0
    assert guard.remaining("g") == 10_000 - server.requests[0].prompt_tokens


# -- with LangChain's own middlewares ---------------------------------------------------------------


async def test_model_fallback_middleware_catches_the_refusal(mode: str, server: StubOpenAIServer) -> None:
    guard = BudgetGuard([Budget("usd", limit=0.004, unit="usd")], ledger=False)
    fallback = ModelFallbackMiddleware(chat(server, "gpt-4o-mini"))
    agent = agent_for(chat(server, "gpt-4o", max_tokens=1000), [fallback, guard.middleware()])
    await ask(mode, agent, QUESTION, thread())
    assert [r.model for r in server.requests] == ["gpt-4o-mini", "gpt-4o-mini"]
    assert guard.store.open_reservations() == 0


async def test_a_fallback_listed_inside_the_guard_is_metered_too(
    mode: str, server: StubOpenAIServer, ledger: Ledger
) -> None:
    # The wrong order: the fallback middleware is inner, so it sends its own model after the
    # guard's copy was refused. That call goes through the meters the middleware attached.
    guard = BudgetGuard([Budget("usd", limit=0.004, unit="usd"), Budget("tok", limit=100_000)], ledger=ledger)
    fallback = ModelFallbackMiddleware(chat(server, "gpt-4o-mini"))
    agent = agent_for(chat(server, "gpt-4o", max_tokens=1000), [guard.middleware(), fallback])
    await ask(mode, agent, QUESTION, thread())
    assert [r.model for r in server.requests] == ["gpt-4o-mini", "gpt-4o-mini"]
    assert guard.remaining("tok") == 100_000 - spent(server)
    records = [r for r in ledger.records() if r.outcome != "denied"]
    assert [(r.model_used, r.outcome) for r in records] == [("gpt-4o-mini", "ok")] * 2
    assert {r.scope.get("user_id") for r in records} == {None}  # global budgets only
    assert len({r.root_run_id for r in records}) == 1
    assert guard.store.open_reservations() == 0


async def test_models_made_per_call_leave_no_copies_behind(mode: str, server: StubOpenAIServer) -> None:
    class FreshModel(AgentMiddleware):  # dynamic model selection: a new model object per call
        def wrap_model_call(self, request: Any, handler: Any) -> Any:
            return handler(request.override(model=chat(server, "gpt-4o-mini")))

        async def awrap_model_call(self, request: Any, handler: Any) -> Any:
            return await handler(request.override(model=chat(server, "gpt-4o-mini")))

    guard = BudgetGuard([Budget("g", limit=10_000)], ledger=False)
    middleware = guard.middleware()
    agent = agent_for(chat(server), [FreshModel(), middleware])
    await ask(mode, agent, QUESTION, thread())
    assert [r.model for r in server.requests] == ["gpt-4o-mini", "gpt-4o-mini"]
    assert guard.remaining("g") == 10_000 - spent(server)
    gc.collect()
    assert len(middleware._copies) == 0


async def test_a_model_of_another_guard_is_charged_by_both(mode: str, server: StubOpenAIServer) -> None:
    outer = BudgetGuard([Budget("team", limit=10_000)], ledger=False)
    inner = BudgetGuard([Budget("per-user", limit=10_000, per="user_id")], ledger=False)
    agent = agent_for(inner.model(chat(server)), [outer.middleware()])
    await ask(mode, agent, QUESTION, thread())
    assert len(server.requests) == 2
    assert outer.remaining("team") == 10_000 - spent(server)
    assert inner.remaining("per-user", user_id="alice") == 10_000 - spent(server)


async def test_calls_of_an_outer_guarded_run_share_its_run_budget_however_they_are_metered(
    mode: str, server: StubOpenAIServer, ledger: Ledger
) -> None:
    class AskFirst(AgentMiddleware):  # like LLMToolSelectorMiddleware: asks another model first
        def __init__(self, other: Any) -> None:
            super().__init__()
            self.other = other

        def wrap_model_call(self, request: Any, handler: Any) -> Any:
            self.other.invoke([HumanMessage("Which tools matter?")])
            return handler(request)

        async def awrap_model_call(self, request: Any, handler: Any) -> Any:
            await self.other.ainvoke([HumanMessage("Which tools matter?")])
            return await handler(request)

    guard = BudgetGuard([Budget("per-run", limit=10_000, per="run")], ledger=ledger)
    inner = AskFirst(chat(server, "gpt-4o-mini"))  # met by the callback meters, not a metered copy
    guarded = guard | agent_for(chat(server), [guard.middleware(), inner])
    await ask(mode, guarded, QUESTION, thread())
    records = list(ledger.records())
    assert len(records) == len(server.requests) == 4
    assert len({r.scope["run"] for r in records}) == 1 and len({r.root_run_id for r in records}) == 1
    assert sum(r.input_tokens + r.output_tokens for r in records) == spent(server)


async def test_a_call_given_up_inside_the_guard_is_settled_when_the_model_call_returns(
    server: StubOpenAIServer, ledger: Ledger
) -> None:
    class GiveUp(AgentMiddleware):  # sends to another model, times it out, answers itself
        async def awrap_model_call(self, request: Any, handler: Any) -> Any:
            try:
                async with asyncio.timeout(1.0):
                    return await handler(request.override(model=chat(server, "gpt-4o-mini")))
            except TimeoutError:
                return AIMessage("The model took too long.")

    guard = BudgetGuard([Budget("g", limit=100_000)], ledger=ledger)
    agent = agent_for(chat(server), [guard.middleware(), GiveUp()])
    server.enqueue(ScriptedResponse(latency=5.0))
    out = await agent.ainvoke({"messages": [HumanMessage(QUESTION)]}, thread(), context=ALICE)
    assert out["messages"][-1].content == "The model took too long."
    assert guard.store.open_reservations() == 0  # not left to its lease
    assert [r.outcome for r in ledger.records()] == ["cancelled"]
    assert guard.remaining("g") == 100_000 - server.requests[0].prompt_tokens


async def test_a_cancelled_fallback_call_inside_the_guard_holds_nothing(
    server: StubOpenAIServer, ledger: Ledger
) -> None:
    guard = BudgetGuard([Budget("usd", limit=0.004, unit="usd"), Budget("tok", limit=100_000)], ledger=ledger)
    fallback = ModelFallbackMiddleware(chat(server, "gpt-4o-mini"))
    agent = agent_for(chat(server, "gpt-4o", max_tokens=1000), [guard.middleware(), fallback])
    await cancel_once_sent(server, agent)
    assert guard.store.open_reservations() == 0
    assert guard.remaining("tok") == 100_000 - server.requests[0].prompt_tokens
    assert [r.outcome for r in ledger.records() if r.outcome != "denied"] == ["cancelled"]


async def test_summarization_middlewares_summary_call_is_metered(mode: str, server: StubOpenAIServer) -> None:
    guard = BudgetGuard([Budget("per-user", limit=100_000, per="user_id")], ledger=False)
    summarizer = SummarizationMiddleware(
        guard.model(chat(server, "gpt-4o-mini")), trigger=("messages", 4), keep=("messages", 2)
    )
    agent = agent_for(chat(server), [summarizer, guard.middleware()])
    config = thread("sum")
    earlier = [HumanMessage(f"note {i}") if i % 2 == 0 else AIMessage(f"ok {i}") for i in range(6)]
    agent.update_state(config, {"messages": earlier})
    await ask(mode, agent, QUESTION, config)
    assert "gpt-4o-mini" in [r.model for r in server.requests]  # the summary call went out
    assert guard.remaining("per-user", user_id="alice") == 100_000 - spent(server)  # ... and was charged


# -- `guard | agent` keeps working ------------------------------------------------------------------


async def test_guard_piped_into_an_agent_meters_it_from_outside(mode: str, server: StubOpenAIServer) -> None:
    guard = BudgetGuard([Budget("per-user", limit=10_000, per="user_id")], ledger=False)
    agent = agent_for(chat(server), [])
    guarded = guard | agent
    assert guarded.get_graph() is not None  # drawing it needs no scope
    assert guarded.get_input_jsonschema() == agent.get_input_jsonschema()
    config = {"configurable": {"thread_id": "p1", "user_id": "carol"}}
    await ask(mode, guarded, QUESTION, config, ctx=None)
    assert guard.remaining("per-user", user_id="carol") == 10_000 - spent(server)
    assert [m.type for m in guarded.get_state(config).values["messages"]] == ["human", "ai", "tool", "ai"]


async def test_middleware_and_outer_guard_together_charge_once(mode: str, server: StubOpenAIServer) -> None:
    guard = BudgetGuard([Budget("g", limit=10_000)], ledger=False)
    guarded = guard | agent_for(chat(server), [guard.middleware()])
    await ask(mode, guarded, QUESTION, thread())
    assert guard.remaining("g") == 10_000 - spent(server)


def test_system_messages_and_tools_are_estimated_as_sent(server: StubOpenAIServer) -> None:
    guard = BudgetGuard([Budget("g", limit=10_000)], ledger=False)
    agent = agent_for(chat(server), [guard.middleware()], system_prompt="You are a weather bot.")
    out = agent.invoke({"messages": [HumanMessage(QUESTION)]}, thread(), context=Ctx("a"))
    first = out["messages"][1].response_metadata["budgetguard"]
    assert first["estimated_input_tokens"] == server.requests[0].prompt_tokens  # system + tools + question
    assert server.requests[0].body["messages"][0] == {"role": "system", "content": "You are a weather bot."}


async def test_a_run_resumed_after_an_interrupt_keeps_its_run_budget(server: StubOpenAIServer) -> None:
    """before_agent does not run again on resume: every call of the resumed part got a fresh
    per-run bucket. Now the resumed invocation is one run (LangGraph's own view: a new
    invocation), with one bucket for all its calls."""
    from langchain.agents.middleware import HumanInTheLoopMiddleware
    from langgraph.types import Command

    @tool
    def get_time(city: str) -> str:
        """Get the time in a city."""
        return "noon"

    guard = BudgetGuard([Budget("run-calls", limit=2, unit="calls", per="run")], ledger=False)
    agent = create_agent(chat(server), tools=[get_weather, get_time], checkpointer=InMemorySaver(),
                         middleware=[HumanInTheLoopMiddleware(interrupt_on={"get_weather": True}),
                                     guard.middleware(on_denied="end")])  # fmt: skip
    config = thread("hitl")
    await agent.ainvoke({"messages": [HumanMessage(QUESTION)]}, config)  # call 1 asks for the tool: interrupted
    assert server.request_count == 1
    server.enqueue(
        ScriptedResponse(tool_calls=[{"name": "get_time", "arguments": {"city": "Paris"}}]),
        ScriptedResponse(tool_calls=[{"name": "get_time", "arguments": {"city": "Lyon"}}]),
        ScriptedResponse(reply="done"),
    )
    out = await agent.ainvoke(Command(resume={"decisions": [{"type": "approve"}]}), config)
    assert server.request_count == 3  # the resumed run: two calls, then its third is refused
    assert out["messages"][-1].response_metadata["budgetguard"]["budget"] == "run-calls"
