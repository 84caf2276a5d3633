"""Overflow policies: decided before the request, in the user's order (sync and async twins)."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda

from budgetguard import (
    Budget,
    BudgetExceeded,
    BudgetGuard,
    ConfigurationError,
    ContextWindowExceeded,
    PriceTable,
    TokenEstimator,
)
from budgetguard.clock import FakeClock
from budgetguard.policies import cap_output, cheaper_model, compress_prompt, wait_for_refill
from budgetguard.testing.fake_models import UsageFakeChatModel

PROMPT = ChatPromptTemplate.from_messages([("system", "You are terse."), ("human", "{q}")])
TINY = PriceTable.bundled().with_overrides(
    {"tiny-ctx": {"input_per_million": 1.0, "output_per_million": 2.0, "context_window": 120}}
)


def model(**kw: Any) -> UsageFakeChatModel:
    kw.setdefault("replies", ["one two three"])
    return UsageFakeChatModel(**kw)


def ptokens(guard: BudgetGuard, messages: Any, name: str = "gpt-4o-mini") -> int:
    return guard.estimator.count_messages(messages, name)


def history(turns: int) -> list:
    msgs: list = [SystemMessage("You are a helpful assistant.")]
    for i in range(turns):
        msgs.append(HumanMessage(f"question {i}: " + "lorem ipsum dolor sit amet " * 4))
        msgs.append(AIMessage(f"answer {i}: " + "consectetur adipiscing elit " * 4))
    msgs.append(HumanMessage("and the latest question?"))
    return msgs


async def test_cap_output_sends_the_call_with_the_affordable_cap(run: Any) -> None:
    need = TokenEstimator().count_messages(PROMPT.format_messages(q="hi"), "gpt-4o-mini")
    guard = BudgetGuard([Budget("g", limit=need + 12)], policies=[cap_output(min_output_tokens=5)])
    llm = model(max_tokens=100, replies=["w " * 30])
    msg = await run.invoke(guard | (PROMPT | llm), {"q": "hi"})
    assert llm.seen_max_tokens == [12]
    assert msg.response_metadata["budgetguard"]["policy"] == "cap_output"
    assert guard.remaining("g") == need + 12 - (10 + 12)


async def test_cap_output_declines_below_the_minimum(run: Any) -> None:
    guard = BudgetGuard([Budget("g", limit=30)], policies=[cap_output(min_output_tokens=64)])
    llm = model(max_tokens=100)
    with pytest.raises(BudgetExceeded) as info:
        await run.invoke(guard | (PROMPT | llm), {"q": "hi"})
    assert llm.calls == 0
    assert info.value.tried == ("cap_output",)
    assert "(tried: cap_output)" in str(info.value)


async def test_cheaper_model_by_object_answers_when_the_expensive_one_cannot(run: Any) -> None:
    big = model(model_name="gpt-4o", max_tokens=50)
    small = model(model_name="gpt-4o-mini", max_tokens=50, replies=["cheap answer"])
    guard = BudgetGuard([Budget("usd", limit=0.0002, unit="usd")], policies=[cheaper_model({"gpt-4o": [small]})])
    msg = await run.invoke(guard | (PROMPT | big), {"q": "hi"})
    assert (big.calls, small.calls) == (0, 1)
    assert msg.content == "cheap answer"
    meta = msg.response_metadata["budgetguard"]
    assert (meta["model"], meta["model_requested"], meta["policy"]) == ("gpt-4o-mini", "gpt-4o", "cheaper_model")
    mini = guard.prices.get("gpt-4o-mini")
    assert guard.remaining("usd") == pytest.approx(0.0002 - mini.cost(10, 2))


async def test_cheaper_model_by_name_copies_the_client(run: Any) -> None:
    big = model(model_name="gpt-4o", max_tokens=50)
    guard = BudgetGuard([Budget("usd", limit=0.0002, unit="usd")], policies=[cheaper_model({"gpt-4o": ["gpt-4o-mini"]})])
    msg = await run.invoke(guard | (PROMPT | big), {"q": "hi"})
    assert msg.response_metadata["budgetguard"]["model"] == "gpt-4o-mini"
    assert big.seen_models == ["gpt-4o-mini"]  # a copy of big, renamed, answered


async def test_cheaper_model_skips_rungs_whose_window_is_too_small(run: Any) -> None:
    long_q = "word " * 200
    big = model(model_name="gpt-4o", max_tokens=10)
    tiny = model(model_name="tiny-ctx", max_tokens=10)
    mini = model(model_name="gpt-4o-mini", max_tokens=10)
    guard = BudgetGuard(
        [Budget("usd", limit=0.0005, unit="usd")],
        prices=TINY,
        policies=[cheaper_model({"gpt-4o": [tiny, mini]})],
    )
    msg = await run.invoke(guard | (PROMPT | big), {"q": long_q})
    assert (tiny.calls, mini.calls) == (0, 1)
    assert msg.response_metadata["budgetguard"]["model"] == "gpt-4o-mini"


async def test_compress_trim_keeps_system_and_latest_turn_and_really_fits(run: Any) -> None:
    llm = model(model_name="tiny-ctx", max_tokens=10)
    guard = BudgetGuard([Budget("g", limit=100_000)], prices=TINY, policies=[compress_prompt("trim")])
    msgs = history(6)
    assert ptokens(guard, msgs, "tiny-ctx") > 120
    await run.invoke(guard | llm, msgs)
    sent = llm.seen_messages[0]
    assert sent[0] == msgs[0] and sent[-1] == msgs[-1]
    assert len(sent) < len(msgs)
    assert ptokens(guard, sent, "tiny-ctx") + 10 <= 120


async def test_compress_summarize_meters_the_summarizer_too(run: Any) -> None:
    llm = model(model_name="tiny-ctx", max_tokens=10, input_tokens=50)
    summarizer = model(model_name="gpt-4o-mini", replies=["they talked about lorem ipsum"], input_tokens=70)
    guard = BudgetGuard(
        [Budget("g", limit=100_000)],
        prices=TINY,
        policies=[compress_prompt("summarize", summarizer=summarizer, summary_max_tokens=40)],
    )
    msgs = history(6)
    msg = await run.invoke(guard | llm, msgs)
    assert summarizer.calls == 1 and summarizer.seen_max_tokens == [40]
    sent = llm.seen_messages[0]
    assert "they talked about lorem ipsum" in sent[1].content
    assert sent[-1] == msgs[-1]
    assert msg.response_metadata["budgetguard"]["policy"] == "compress"
    # both calls settled: summarizer 70 + 5 words, the compressed call 50 + 3
    assert guard.remaining("g") == 100_000 - (70 + 5) - (50 + 3)
    assert guard.store.open_reservations() == 0


async def test_context_window_overflow_without_policies_is_a_typed_error(run: Any) -> None:
    llm = model(model_name="tiny-ctx", max_tokens=10)
    guard = BudgetGuard([Budget("g", limit=100_000)], prices=TINY)
    with pytest.raises(ContextWindowExceeded, match="does not fit its context window"):
        await run.invoke(guard | llm, history(6))
    assert llm.calls == 0


async def test_wait_for_refill_sleeps_the_computed_time(run: Any, clock: FakeClock) -> None:
    guard = BudgetGuard(
        [Budget("g", limit=100, refill_per_second=10)], clock=clock, policies=[wait_for_refill(max_wait=10)]
    )
    llm = model(max_tokens=20, input_tokens=60, replies=["w " * 19 + "w"])
    chain = guard | (PROMPT | llm)
    need = ptokens(guard, PROMPT.format_messages(q="hi")) + 20
    await run.invoke(chain, {"q": "hi"})  # leaves 20
    await run.invoke(chain, {"q": "hi"})
    assert llm.calls == 2
    assert clock.slept == [pytest.approx((need - 20) / 10, abs=0.01)]


async def test_wait_for_refill_respects_max_wait(run: Any, clock: FakeClock) -> None:
    guard = BudgetGuard(
        [Budget("g", limit=100, refill_per_second=1)], clock=clock, policies=[wait_for_refill(max_wait=5)]
    )
    llm = model(max_tokens=20, input_tokens=60, replies=["w " * 19 + "w"])
    chain = guard | (PROMPT | llm)
    await run.invoke(chain, {"q": "hi"})
    with pytest.raises(BudgetExceeded) as info:
        await run.invoke(chain, {"q": "hi"})
    assert clock.slept == []
    assert info.value.tried == ("wait_for_refill",)


async def test_wait_applies_even_to_models_the_guard_cannot_reach(run: Any, clock: FakeClock) -> None:
    guard = BudgetGuard(
        [Budget("g", limit=100, refill_per_second=10)],
        clock=clock,
        policies=[cap_output(min_output_tokens=1000), wait_for_refill(max_wait=10)],
    )
    llm = model(max_tokens=20, input_tokens=60, replies=["w " * 19 + "w"])
    hidden = RunnableLambda(lambda msgs, config: llm.invoke(msgs, config))  # not reachable: no rewrite
    chain = guard | (PROMPT | hidden)
    await run.invoke(chain, {"q": "hi"})
    await run.invoke(chain, {"q": "hi"})
    assert llm.calls == 2 and len(clock.slept) == 1


async def test_policies_apply_in_order_and_combine(run: Any) -> None:
    # compress first (the window), then cap the output to what the budget still affords
    llm = model(model_name="tiny-ctx", max_tokens=60, input_tokens=20, replies=["w " * 40])
    guard = BudgetGuard(
        [Budget("g", limit=70)],
        prices=TINY,
        policies=[compress_prompt("trim"), cap_output(min_output_tokens=5)],
    )
    msg = await run.invoke(guard | llm, history(6))
    sent_tokens = ptokens(guard, llm.seen_messages[0], "tiny-ctx")
    assert sent_tokens + 60 > 70  # compressed for the window, still too dear for the budget
    assert llm.seen_max_tokens == [70 - sent_tokens]
    assert msg.response_metadata["budgetguard"]["policy"] == "compress+cap_output"


async def test_streaming_chooses_the_policy_before_the_first_chunk(run: Any) -> None:
    need = TokenEstimator().count_messages(PROMPT.format_messages(q="hi"), "gpt-4o-mini")
    guard = BudgetGuard([Budget("g", limit=need + 8)], policies=[cap_output(min_output_tokens=2)])
    llm = model(max_tokens=100, replies=["w " * 30])
    chunks = await run.stream(guard | (PROMPT | llm), {"q": "hi"})
    assert llm.seen_max_tokens == [8]
    assert "".join(c.content for c in chunks).split() == ["w"] * 8
    assert guard.store.open_reservations() == 0


async def test_with_fallbacks_on_budget_exceeded_is_the_plain_langchain_alternative(run: Any) -> None:
    guard = BudgetGuard([Budget("g", limit=30)])
    big = model(max_tokens=100)
    small = model(max_tokens=5, replies=["small"])
    chain = guard | (PROMPT | big.with_fallbacks([small], exceptions_to_handle=(BudgetExceeded,)))
    msg = await run.invoke(chain, {"q": "hi"})
    assert msg.content == "small" and big.calls == 0


@pytest.mark.parametrize(
    ("factory", "fragment"),
    [
        (lambda: cap_output(min_output_tokens=0), "min_output_tokens"),
        (lambda: cheaper_model({}), "needs a ladder"),
        (lambda: compress_prompt("squeeze"), "strategy"),
        (lambda: compress_prompt("summarize"), "summarizer"),
        (lambda: wait_for_refill(max_wait=-1), "max_wait"),
    ],
)
def test_bad_policy_configuration(factory: Any, fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        factory()


async def test_a_ladder_model_object_answers_within_what_was_reserved_for_it(run: Any) -> None:
    """A rung with no cap of its own is sent the call's cap: it answered 500 tokens against the
    50 reserved, taking the USD budget below zero."""
    long = " ".join(["w"] * 500)
    big = model(model_name="gpt-4o", max_tokens=50, replies=[long], input_tokens=10)
    small = model(model_name="gpt-4o-mini", replies=[long], input_tokens=10)  # no cap of its own
    guard = BudgetGuard([Budget("usd", limit=0.0001, unit="usd")], policies=[cheaper_model({"gpt-4o": [small]})])
    msg = await run.invoke(guard | big, "hi")
    assert msg.response_metadata["budgetguard"]["model"] == "gpt-4o-mini"
    assert small.seen_max_tokens == [50] and msg.usage_metadata["output_tokens"] == 50
    assert guard.remaining("usd") >= 0


async def test_a_summary_is_charged_to_the_run_of_the_call_it_compresses(run: Any, tmp_path: Any) -> None:
    """The summarizer's own call belongs to the run whose prompt it compresses (it was charged to
    a new run's bucket, so a per-run budget saw less than the run spent)."""
    from budgetguard.ledger import Ledger

    summarizer = model(model_name="gpt-4o-mini", replies=["short summary"], input_tokens=30)
    llm = model(model_name="tiny-ctx", max_tokens=10, input_tokens=20)
    with Ledger(tmp_path / "ledger.sqlite3") as ledger:
        guard = BudgetGuard(
            [Budget("per-run", limit=10_000, per="run")],
            prices=TINY,
            policies=[compress_prompt("summarize", summarizer=summarizer, summary_max_tokens=20)],
            ledger=ledger,
        )
        await run.invoke(guard | llm, history(6))
        records = list(ledger.records())
    assert summarizer.calls == 1 and len(records) == 2
    assert len({r.scope["run"] for r in records}) == 1
    assert guard.remaining("per-run", run=records[0].scope["run"]) == 10_000 - (30 + 2) - (20 + 3)


async def test_policies_act_on_a_model_inside_with_retry(run: Any) -> None:
    """LangChain's wrappers of one runnable (with_retry) are bindings too: the guard reaches the
    model in them and a rewriting policy acts (it fell back to callbacks and was refused)."""
    llm = model(replies=["ok"], input_tokens=10, max_tokens=500)
    guard = BudgetGuard([Budget("g", limit=200)], policies=[cap_output(min_output_tokens=5)])
    chain = guard | (PROMPT | llm).with_retry(stop_after_attempt=2)
    assert chain.covered
    await run.invoke(chain, {"q": "hi"})
    assert llm.calls == 1 and llm.seen_max_tokens[0] < 200


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_a_guarded_chain_inside_runnable_with_message_history(run: Any) -> None:
    """RunnableWithMessageHistory calls its chain from inside a lambda, out of the guard's reach;
    guard the chain it wraps (as the README says) and the policies act, history and all."""
    from langchain_core.chat_history import InMemoryChatMessageHistory
    from langchain_core.prompts import MessagesPlaceholder
    from langchain_core.runnables.history import RunnableWithMessageHistory

    llm = model(replies=["ok"], input_tokens=10, max_tokens=500)
    prompt = ChatPromptTemplate.from_messages([MessagesPlaceholder("history"), ("human", "{q}")])
    histories: dict[str, InMemoryChatMessageHistory] = {}
    guard = BudgetGuard([Budget("g", limit=200)], policies=[cap_output(min_output_tokens=5)])
    chat = RunnableWithMessageHistory(
        guard | (prompt | llm), lambda sid: histories.setdefault(sid, InMemoryChatMessageHistory()),
        input_messages_key="q", history_messages_key="history",
    )  # fmt: skip
    await run.invoke(chat, {"q": "hi"}, {"configurable": {"session_id": "s"}})
    assert llm.calls == 1 and llm.seen_max_tokens[0] < 200
    assert len(histories["s"].messages) == 2
