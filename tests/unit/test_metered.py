"""Models metered in place: when ``guard | chain`` uses them, and what they keep of the model."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnableParallel, RunnablePassthrough

from budgetguard import Budget, BudgetGuard, MissingScopeError
from budgetguard.ledger import Ledger
from budgetguard.metered import metered_by
from budgetguard.testing.fake_models import UsageFakeChatModel

PROMPT = ChatPromptTemplate.from_messages([("system", "You are terse."), ("human", "{q}")])


def model(**kw: Any) -> UsageFakeChatModel:
    kw.setdefault("max_tokens", 20)
    kw.setdefault("replies", ["one two three"])
    return UsageFakeChatModel(**kw)


def test_a_chain_it_sees_through_gets_no_callback_meters() -> None:
    guard = BudgetGuard([Budget("g", limit=1000)], ledger=False)
    llm = model()
    chain = guard | (RunnablePassthrough.assign(q=lambda x: x["q"]).pick("q") | (lambda q: {"q": q}) | PROMPT | llm)
    assert not chain.covered  # lambdas could call a model the guard cannot see
    chain = guard | (RunnableParallel(a=PROMPT | llm, b=PROMPT | llm) | RunnablePassthrough())
    assert chain.covered
    config = chain._merge_configs({"configurable": {}})
    assert not config.get("callbacks")  # nothing for LangChain to dispatch to


def test_the_metered_copy_is_still_the_models_class_and_the_original_is_untouched() -> None:
    guard = BudgetGuard([Budget("g", limit=1000)], ledger=False)
    llm = model(input_tokens=10)
    chain = guard | (PROMPT | llm)
    copy = chain.bound.steps[1]
    assert copy is not llm
    assert isinstance(copy, UsageFakeChatModel)
    assert type(copy).__name__ == "UsageFakeChatModel"
    assert copy.get_name() == llm.get_name()
    assert (metered_by(copy), metered_by(llm)) == (guard, None)
    assert type(llm) is UsageFakeChatModel
    chain.invoke({"q": "hi"})
    assert guard.remaining("g") == 1000 - 13
    (PROMPT | llm).invoke({"q": "hi"})  # the user's own model, used outside the guard
    assert guard.remaining("g") == 1000 - 13
    assert llm.calls == 2  # copies share the fake's records


def test_tools_and_structured_output_bind_on_the_metered_copy() -> None:
    guard = BudgetGuard([Budget("g", limit=1000)], ledger=False)
    chain = guard | (PROMPT | model(input_tokens=10).bind(stop=["\n"]))
    assert chain.covered
    assert chain.invoke({"q": "hi"}).content == "one two three"
    assert guard.remaining("g") == 1000 - 13


def test_missing_scope_raises_before_anything_runs() -> None:
    guard = BudgetGuard([Budget("u", limit=1000, per="user_id")], ledger=False)
    llm = model()
    with pytest.raises(MissingScopeError):
        (guard | (PROMPT | llm)).invoke({"q": "hi"})
    assert llm.calls == 0


def test_nested_guards_each_charge_their_own_budgets() -> None:
    inner = BudgetGuard([Budget("team", limit=1000, per="team")], ledger=False)
    outer = BudgetGuard([Budget("org", limit=5000)], ledger=False)
    chain = outer | (inner | (PROMPT | model(input_tokens=10)))
    assert not chain.covered  # the inner guard is opaque to the outer one: callbacks there
    assert chain.bound.covered
    chain.invoke({"q": "hi"}, {"configurable": {"team": "red"}})
    assert (inner.remaining("team", team="red"), outer.remaining("org")) == (1000 - 13, 5000 - 13)


def test_the_ledger_groups_the_calls_of_one_invocation_under_its_run_id(tmp_path: Any) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    guard = BudgetGuard([Budget("g", limit=10_000)], ledger=ledger)
    llm = model(input_tokens=10)
    chain = guard | (RunnableParallel(a=PROMPT | llm, b=PROMPT | llm))
    run_id = uuid.uuid4()
    chain.invoke({"q": "hi"}, {"run_id": run_id})
    chain.invoke({"q": "hi"})
    ledger.flush()
    assert ledger.run_cost(str(run_id)).calls == 2
    rows = list(ledger.records())
    assert len(rows) == 4 and len({r.run_id for r in rows}) == 4  # each model run has its own id
    ledger.close()


def test_a_failed_call_releases_its_reservation() -> None:
    guard = BudgetGuard([Budget("g", limit=1000)], ledger=False)
    chain = guard | (PROMPT | model(fail_with=ConnectionError("down")))
    with pytest.raises(ConnectionError):
        chain.invoke({"q": "hi"})
    assert (guard.remaining("g"), guard.store.open_reservations()) == (1000, 0)


def test_stream_events_v3_is_metered_through_the_callback_meters() -> None:
    guard = BudgetGuard([Budget("g", limit=1000)], ledger=False)
    chain = guard | model(input_tokens=10)
    assert metered_by(chain) is guard  # guard | chat_model is the model's metered copy
    stream = chain.stream_events("hi", version="v3")
    assert "one two three" in str(stream.output.content)
    assert guard.remaining("g") == 1000 - 13
    assert guard.store.open_reservations() == 0


async def test_a_model_called_in_a_thread_by_the_default_async_path_is_metered_once() -> None:
    # UsageFakeChatModel has no native async path: LangChain runs _generate in a thread.
    guard = BudgetGuard([Budget("g", limit=1000)], ledger=False)
    chain = guard | (PROMPT | model(input_tokens=10))
    await chain.ainvoke({"q": "hi"})
    await chain.abatch([{"q": "a"}, {"q": "b"}])
    assert guard.remaining("g") == 1000 - 3 * 13


def test_a_lambda_calling_a_model_still_gets_metered_through_callbacks() -> None:
    guard = BudgetGuard([Budget("g", limit=1000)], ledger=False)
    llm = model(input_tokens=10)
    chain = guard | (PROMPT | RunnableLambda(lambda p, config: llm.invoke(p, config)))
    assert not chain.covered
    chain.invoke({"q": "hi"})
    assert guard.remaining("g") == 1000 - 13


def test_a_copy_works_out_its_parameters_once_and_bound_arguments_every_call(tmp_path: Any) -> None:
    import gc

    from budgetguard import metered

    ledger = Ledger(tmp_path / "ledger.db")
    guard = BudgetGuard([Budget("g", limit=10_000)], ledger=ledger)
    llm = model(input_tokens=10, max_tokens=20)
    chain = guard | (PROMPT | llm)
    copy = chain.bound.steps[1]
    chain.invoke({"q": "hi"})
    params, name, shape = metered._SHAPES[id(copy)][1:]
    assert (params["max_tokens"], shape.per_completion, shape.output_capped) == (20, 20, True)
    chain.invoke({"q": "hi again"})
    assert metered._SHAPES[id(copy)][1] is params  # reused, not rebuilt
    for cap in (5, 7):  # bound arguments: worked out for the call, never cached
        (guard | (PROMPT | llm.bind(max_tokens=cap))).invoke({"q": "hi"})
    ledger.flush()
    assert [r.estimated_output_tokens for r in ledger.records()] == [20, 20, 5, 7]
    ledger.close()
    key = id(copy)
    del chain, copy
    gc.collect()
    assert key not in metered._SHAPES  # dropped with its model


async def test_generate_called_directly_on_a_metered_copy_is_still_metered() -> None:
    from langchain_core.messages import HumanMessage

    guard = BudgetGuard([Budget("g", limit=1000)], ledger=False)
    copy = guard.model(model(input_tokens=10))
    copy.generate([[HumanMessage("hi")]])
    await copy.agenerate([[HumanMessage("hi")]])
    copy.invoke("hi")  # through invoke: metered once, not twice
    assert guard.remaining("g") == 1000 - 3 * 13
    assert guard.store.open_reservations() == 0


async def test_a_guarded_run_inside_a_run_of_the_same_guard_is_metered_once(mode: str) -> None:
    """``guard | agent`` whose tool runs ``guard | sub_chain``: the inner run's meters replace
    the inherited ones, so each call is reserved once (it was reserved twice and left held)."""
    from langchain_core.messages import HumanMessage

    guard = BudgetGuard([Budget("g", limit=10_000)], ledger=False)
    llm = model(input_tokens=10)
    inner = guard | RunnableLambda(lambda x: llm.invoke(x))
    outer = guard | RunnableLambda(lambda x, config: inner.invoke(x, config))
    copy = guard.model(llm)
    direct = guard | RunnableLambda(lambda x, config: copy.generate([[HumanMessage(x)]], callbacks=config["callbacks"]))
    for runnable in (outer, direct):
        await (asyncio.to_thread(runnable.invoke, "hi") if mode == "sync" else runnable.ainvoke("hi"))
    assert llm.calls == 2
    assert (guard.remaining("g"), guard.store.open_reservations()) == (10_000 - 2 * 13, 0)


def test_a_stream_stopped_after_partial_usage_is_charged_at_least_what_arrived() -> None:
    """Anthropic-style streams report the prompt's count first and the output's last: stopped in
    between, the output received still counts (it was charged only the 1 output token reported)."""
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessageChunk
    from langchain_core.outputs import ChatGenerationChunk

    words = [f"word{i} " for i in range(200)]

    class AnthropicLike(BaseChatModel):
        model_name: str = "gpt-4"

        @property
        def _llm_type(self) -> str:
            return "anthropic-like"

        @property
        def _identifying_params(self) -> dict[str, Any]:
            return {"model_name": self.model_name}

        def _generate(self, *a: Any, **k: Any) -> Any:
            raise NotImplementedError

        def _stream(self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any) -> Any:
            first = {"input_tokens": 10, "output_tokens": 1, "total_tokens": 11}
            yield ChatGenerationChunk(message=AIMessageChunk("", usage_metadata=first))
            for w in words:
                yield ChatGenerationChunk(message=AIMessageChunk(w))
            last = {"input_tokens": 0, "output_tokens": 399, "total_tokens": 399}
            yield ChatGenerationChunk(message=AIMessageChunk("", usage_metadata=last))

    guard = BudgetGuard([Budget("g", limit=100_000)], ledger=False)
    got = ""
    stream = (guard | AnthropicLike()).stream("hi")
    for i, chunk in enumerate(stream):
        got += chunk.content
        if i == 150:
            break
    stream.close()
    received = guard.estimator.count_text(got, "gpt-4")
    assert received > 100
    assert guard.remaining("g") == 100_000 - (10 + received)
