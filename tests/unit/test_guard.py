"""`guard | chain`: estimate, reserve, settle, for every call style (sync and async twins)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnableParallel

import budgetguard.lcel
from budgetguard import (
    Budget,
    BudgetExceeded,
    BudgetGuard,
    ConfigurationError,
    MissingScopeError,
    UnknownModelError,
    UsageError,
)
from budgetguard.clock import FakeClock
from budgetguard.testing.fake_models import UsageFakeChatModel, UsageFakeLLM



@pytest.fixture(autouse=True, params=["in-place", "callbacks"])
def metering(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs with the models metered in place and through the callback meters."""
    if request.param == "callbacks":
        monkeypatch.setattr(budgetguard.lcel, "reach_models", lambda runnable, engine: runnable)
    return str(request.param)


PROMPT = ChatPromptTemplate.from_messages([("system", "You are terse."), ("human", "{q}")])
ALICE = {"configurable": {"user_id": "alice"}}


def model(**kw: Any) -> UsageFakeChatModel:
    kw.setdefault("max_tokens", 20)
    kw.setdefault("replies", ["one two three"])
    return UsageFakeChatModel(**kw)


def prompt_tokens(guard: BudgetGuard, q: str = "hi", model_name: str = "gpt-4o-mini") -> int:
    return guard.estimator.count_messages(PROMPT.format_messages(q=q), model_name)


def test_guard_or_chain_returns_a_runnable_like_the_chain(metering: str) -> None:
    guard = BudgetGuard([Budget("g", limit=1000)])
    chain = PROMPT | model() | StrOutputParser()
    guarded = guard | chain
    assert guarded.covered is (metering == "in-place")  # the fixture's switch really switches
    assert guarded.get_name() == chain.get_name()
    assert guarded.get_input_jsonschema() == chain.get_input_jsonschema()
    assert guarded.get_output_jsonschema() == chain.get_output_jsonschema()
    assert guarded.invoke({"q": "hi"}) == "one two three"


async def test_reserves_before_the_call_and_settles_to_actual(run: Any) -> None:
    guard = BudgetGuard([Budget("g", limit=1000)])
    during: list[float] = []
    llm = model(input_tokens=10, on_call=lambda: during.append(guard.remaining("g")))
    chain = guard | (PROMPT | llm | StrOutputParser())
    assert await run.invoke(chain, {"q": "hi"}) == "one two three"
    assert during == [1000 - (prompt_tokens(guard) + 20)]  # estimate + max_tokens held in flight
    assert guard.remaining("g") == 1000 - (10 + 3)  # settled with the reported usage
    assert guard.store.open_reservations() == 0


async def test_denied_call_is_never_sent_and_says_why(run: Any) -> None:
    guard = BudgetGuard([Budget("per-user", limit=25, per="user_id", refill_per_second=0.5)])
    llm = model()
    with pytest.raises(BudgetExceeded) as info:
        await run.invoke(guard | (PROMPT | llm), {"q": "hi"}, ALICE)
    err = info.value
    need = prompt_tokens(guard) + 20
    assert llm.calls == 0
    assert (err.budget, err.scope, err.unit, err.requested, err.available) == (
        "per-user",
        {"user_id": "alice"},
        "tokens",
        need,
        25,
    )
    assert err.model == "gpt-4o-mini"
    assert need > 25 and err.retry_after is None  # more than the bucket can ever hold
    assert str(err) == (
        f"budget 'per-user' (user_id=alice) cannot cover this call to gpt-4o-mini: needs {need} tokens, "
        "25 tokens available; no refill within its period can cover it"
    )
    assert guard.remaining("per-user", user_id="alice") == 25


async def test_per_user_buckets_are_separate(run: Any) -> None:
    guard = BudgetGuard([Budget("per-user", limit=1000, per="user_id")])
    chain = guard | (PROMPT | model(input_tokens=100))
    await run.invoke(chain, {"q": "hi"}, ALICE)
    await run.invoke(chain, {"q": "hi"}, {"metadata": {"user_id": "bob"}})
    await run.invoke(chain, {"q": "hi"}, ALICE)
    assert guard.remaining("per-user", user_id="alice") == 1000 - 2 * 103
    assert guard.remaining("per-user", user_id="bob") == 1000 - 103
    assert guard.remaining("per-user", user_id="carol") == 1000


async def test_missing_scope_key_is_a_typed_error_before_any_call(run: Any) -> None:
    guard = BudgetGuard([Budget("per-user", limit=1000, per="user_id"), Budget("g", limit=1000)])
    llm = model()
    with pytest.raises(MissingScopeError, match="user_id"):
        await run.invoke(guard | (PROMPT | llm), {"q": "hi"}, {"configurable": {"session": "x"}})
    assert llm.calls == 0
    assert guard.remaining("g") == 1000


async def test_refill_and_retry_after_with_a_fake_clock(run: Any, clock: FakeClock) -> None:
    guard = BudgetGuard([Budget("g", limit=100, refill_per_second=2)], clock=clock)
    chain = guard | (PROMPT | model(input_tokens=60, max_tokens=20, replies=["x " * 19 + "x"]))
    need = prompt_tokens(guard) + 20
    await run.invoke(chain, {"q": "hi"})  # uses 80
    with pytest.raises(BudgetExceeded) as info:
        await run.invoke(chain, {"q": "hi"})
    assert info.value.retry_after == pytest.approx((need - 20) / 2)
    clock.advance(info.value.retry_after)
    await run.invoke(chain, {"q": "hi"})


async def test_calendar_period_resets_the_bucket(run: Any) -> None:
    clock = FakeClock(start=1_767_225_600.0 + 23 * 3600)  # 2026-01-01 23:00 UTC
    guard = BudgetGuard([Budget("daily", limit=50, period="day")], clock=clock)
    chain = guard | (PROMPT | model(input_tokens=40))
    await run.invoke(chain, {"q": "hi"})
    with pytest.raises(BudgetExceeded) as info:
        await run.invoke(chain, {"q": "hi"})
    assert info.value.retry_after == pytest.approx(3600)
    clock.advance(3600)
    await run.invoke(chain, {"q": "hi"})
    assert guard.remaining("daily") == 50 - 43


async def test_meters_every_model_in_nested_parallel_and_lambda_chains(run: Any) -> None:
    guard = BudgetGuard([Budget("g", limit=10_000)])
    a, b, c = model(input_tokens=1), model(input_tokens=2), model(input_tokens=3)

    def inner(x: dict, config: Any) -> str:
        return c.invoke(x["a"].content, config).content

    chain = RunnableParallel(a=PROMPT | a, b=PROMPT | b) | RunnableLambda(inner)
    await run.invoke(guard | chain, {"q": "hi"})
    assert (a.calls, b.calls, c.calls) == (1, 1, 1)
    assert guard.remaining("g") == 10_000 - (1 + 2 + 3 + 3 * 3)


async def test_batch_meters_each_input_with_its_own_scope(run: Any) -> None:
    guard = BudgetGuard([Budget("per-user", limit=1000, per="user_id")])
    chain = guard | (PROMPT | model(input_tokens=10))
    configs = [ALICE, {"configurable": {"user_id": "bob"}}, ALICE]
    await run.batch(chain, [{"q": "a"}, {"q": "b"}, {"q": "c"}], configs)
    assert guard.remaining("per-user", user_id="alice") == 1000 - 26
    assert guard.remaining("per-user", user_id="bob") == 1000 - 13


async def test_stream_settles_from_the_final_usage_chunk(run: Any) -> None:
    guard = BudgetGuard([Budget("g", limit=1000)])
    chunks = await run.stream(guard | (PROMPT | model(input_tokens=10) | StrOutputParser()), {"q": "hi"})
    assert "".join(chunks) == "one two three"
    assert guard.remaining("g") == 1000 - 13
    assert guard.store.open_reservations() == 0


async def test_stream_without_usage_counts_what_was_streamed(run: Any) -> None:
    guard = BudgetGuard([Budget("g", limit=1000)])
    llm = model(report_usage=False)
    await run.stream(guard | (PROMPT | llm), {"q": "hi"})
    streamed = guard.estimator.count_text("one two three", "gpt-4o-mini")
    assert guard.remaining("g") == 1000 - (prompt_tokens(guard) + streamed)


async def test_stream_stopped_early_settles_what_was_streamed(run: Any) -> None:
    guard = BudgetGuard([Budget("g", limit=1000)])
    llm = model(replies=["alpha beta gamma delta"])
    got = await run.stream(guard | (PROMPT | llm), {"q": "hi"}, stop_after=1)
    assert [c.content for c in got] == ["alpha"]
    # An abandoned inner async generator is closed by the loop's finalizer: give it turns.
    for _ in range(100):
        if guard.store.open_reservations() == 0:
            break
        await asyncio.sleep(0)
    assert guard.store.open_reservations() == 0
    streamed = guard.estimator.count_text("alpha", "gpt-4o-mini")
    assert guard.remaining("g") == 1000 - (prompt_tokens(guard) + streamed)


async def test_broken_stream_settles_what_arrived(run: Any) -> None:
    guard = BudgetGuard([Budget("g", limit=1000)])
    llm = model(replies=["alpha beta gamma"], fail_after_chunks=2)
    with pytest.raises(ConnectionError):
        await run.stream(guard | (PROMPT | llm), {"q": "hi"})
    streamed = guard.estimator.count_text("alpha beta", "gpt-4o-mini")
    assert guard.remaining("g") == 1000 - (prompt_tokens(guard) + streamed)
    assert guard.store.open_reservations() == 0


async def test_failed_call_releases_its_reservation(run: Any) -> None:
    guard = BudgetGuard([Budget("g", limit=1000)])
    with pytest.raises(RuntimeError, match="provider down"):
        await run.invoke(guard | (PROMPT | model(fail_with=RuntimeError("provider down"))), {"q": "hi"})
    assert guard.remaining("g") == 1000
    assert guard.store.open_reservations() == 0


async def test_cache_hit_costs_nothing(run: Any) -> None:
    guard = BudgetGuard([Budget("g", limit=1000)])
    llm = model(input_tokens=10, cache=InMemoryCache())
    chain = guard | (PROMPT | llm)
    await run.invoke(chain, {"q": "same"})
    await run.invoke(chain, {"q": "same"})
    assert llm.calls == 1
    assert guard.remaining("g") == 1000 - 13


async def test_usd_budget_prices_the_model(run: Any) -> None:
    guard = BudgetGuard([Budget("usd", limit=1.0, unit="usd")])
    await run.invoke(guard | (PROMPT | model(input_tokens=1000)), {"q": "hi"})
    info = guard.prices.get("gpt-4o-mini")
    assert info is not None
    assert guard.remaining("usd") == pytest.approx(1.0 - info.cost(1000, 3))


async def test_usd_budget_on_an_unpriced_model_is_a_typed_error(run: Any) -> None:
    guard = BudgetGuard([Budget("usd", limit=1.0, unit="usd")])
    llm = model(model_name="my-private-model")
    with pytest.raises(UnknownModelError, match="my-private-model"):
        await run.invoke(guard | (PROMPT | llm), {"q": "hi"})
    assert llm.calls == 0
    assert guard.remaining("usd") == 1.0


async def test_text_llm_is_metered_from_token_usage(run: Any) -> None:
    guard = BudgetGuard([Budget("g", limit=1000)])
    llm = UsageFakeLLM(input_tokens=7, max_tokens=10)
    await run.invoke(guard | llm, "complete this")
    assert llm.calls == 1
    assert guard.remaining("g") == 1000 - (7 + 3)


async def test_the_answer_carries_the_guards_decision(run: Any) -> None:
    guard = BudgetGuard([Budget("g", limit=1000)])
    msg = await run.invoke(guard | (PROMPT | model(input_tokens=10)), {"q": "hi"})
    info = msg.response_metadata["budgetguard"]
    assert info["model"] == "gpt-4o-mini"
    assert info["reserved"] == {"g": prompt_tokens(guard) + 20}
    assert (info["input_tokens"], info["output_tokens"]) == (10, 3)


async def test_malformed_usage_is_a_typed_error_and_charges_the_reservation(run: Any) -> None:
    guard = BudgetGuard([Budget("g", limit=1000)])
    llm = model(usage_override={"input_tokens": -5, "output_tokens": 3, "total_tokens": -2})
    with pytest.raises(UsageError, match="malformed usage"):
        await run.invoke(guard | (PROMPT | llm), {"q": "hi"})
    assert guard.remaining("g") == 1000 - (prompt_tokens(guard) + 20)
    assert guard.store.open_reservations() == 0


async def test_borrowing_from_a_pool_in_one_reservation(run: Any) -> None:
    guard = BudgetGuard(
        [
            Budget("per-user", limit=30, per="user_id", borrow_from="pool"),
            Budget("pool", limit=1000),
        ]
    )
    chain = guard | (PROMPT | model(input_tokens=10))
    await run.invoke(chain, {"q": "hi"}, ALICE)
    assert guard.remaining("per-user", user_id="alice") == 17
    await run.invoke(chain, {"q": "hi"}, ALICE)  # needs more than alice has: the pool lends
    assert guard.remaining("per-user", user_id="alice") == 4
    assert guard.remaining("pool") == 1000


async def test_output_cap_bound_on_the_model_is_what_is_reserved(run: Any) -> None:
    guard = BudgetGuard([Budget("g", limit=1000)])
    during: list[float] = []
    llm = model(max_tokens=None, on_call=lambda: during.append(guard.remaining("g")))
    await run.invoke(guard | (PROMPT | llm.bind(max_tokens=7)), {"q": "hi"})
    assert during == [1000 - (prompt_tokens(guard) + 7)]


def test_threads_sharing_one_guard_never_overspend() -> None:
    guard = BudgetGuard([Budget("g", limit=2000)])
    # The model uses what was reserved: a call that used more could overdraw the bucket by
    # the difference whenever calls overlap (the ledger's write before each settle widens
    # the overlap), which is estimation, not what this test is about.
    used_in = prompt_tokens(guard)
    chain = guard | (PROMPT | model(input_tokens=used_in, max_tokens=20, replies=["w " * 19 + "w"]))
    need = used_in + 20
    ok, denied = [], []

    def worker() -> None:
        for _ in range(5):
            try:
                chain.invoke({"q": "hi"})
                ok.append(1)
            except BudgetExceeded:
                denied.append(1)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ok) + len(denied) == 80
    assert guard.remaining("g") == 2000 - need * len(ok)
    assert guard.remaining("g") >= 0
    assert len(ok) == 2000 // need


async def test_asyncio_tasks_sharing_one_guard_never_overspend() -> None:
    guard = BudgetGuard([Budget("g", limit=2000)])
    chain = guard | (PROMPT | model(input_tokens=30, max_tokens=20, replies=["w " * 19 + "w"]))
    results = await asyncio.gather(*(chain.ainvoke({"q": "hi"}) for _ in range(80)), return_exceptions=True)
    ok = [r for r in results if not isinstance(r, BaseException)]
    assert all(isinstance(r, BudgetExceeded) for r in results if isinstance(r, BaseException))
    assert guard.remaining("g") == 2000 - 50 * len(ok)


async def test_astream_events_works_through_the_guard() -> None:
    guard = BudgetGuard([Budget("g", limit=1000)])
    chain = guard | (PROMPT | model(input_tokens=10))
    kinds = [e["event"] async for e in chain.astream_events({"q": "hi"}, version="v2")]
    assert "on_chat_model_end" in kinds
    assert guard.remaining("g") == 1000 - 13


@pytest.mark.parametrize(
    ("budgets", "fragment"),
    [
        ([], "at least one Budget"),
        ([Budget("a", limit=1), Budget("a", limit=2)], "two budgets are named 'a'"),
        ([Budget("a", limit=1, borrow_from="nope")], "no budget has that name"),
        (
            [Budget("a", limit=1, borrow_from="b", per="user_id"), Budget("b", limit=1, per="team")],
            "must be a global budget",
        ),
        ([Budget("a", limit=1, borrow_from="b"), Budget("b", limit=1, unit="usd")], "same unit"),
    ],
)
def test_bad_guard_configuration(budgets: list, fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        BudgetGuard(budgets)


def test_remaining_of_an_unknown_budget_names_the_known_ones() -> None:
    guard = BudgetGuard([Budget("g", limit=1)])
    with pytest.raises(ConfigurationError, match="no budget named 'x'.*'g'"):
        guard.remaining("x")


def test_jupyter_style_sync_invoke_inside_a_running_loop_is_still_enforced() -> None:
    guard = BudgetGuard([Budget("g", limit=5)])
    llm = model()

    async def main() -> None:
        with pytest.raises(BudgetExceeded):
            (guard | (PROMPT | llm)).invoke({"q": "hi"})  # sync call on the loop thread

    asyncio.run(main())
    assert llm.calls == 0


def test_tickets_and_calls_copy_and_pickle() -> None:
    """Records a user may log, copy or hand to another process: nothing in them is uncopyable."""
    import copy
    import dataclasses
    import pickle
    import uuid

    from langchain_core.messages import HumanMessage

    from budgetguard.settlement import Ending

    guard = BudgetGuard(
        [Budget("g", limit=1000), Budget("u", limit=50, per="user_id", borrow_from="pool"), Budget("pool", limit=99)],
        ledger=False,
    )
    call = guard.new_call(
        run_id=uuid.uuid4(), model="gpt-4o-mini", params={"max_tokens": 5}, messages=[HumanMessage("hi")],
        prompts=None, scopes=guard.scopes_for(ALICE), tags=None, metadata=None, parent_run_id=None, root_run_id=None,
    )  # fmt: skip
    ticket = guard.reserve(call)
    assert [ln.budget.name for ln in ticket.lines] == ["g", "u"] and ticket.lines[1].lender is not None
    for record in (call, ticket, *ticket.lines):  # Budget compares by identity: compare as dicts
        fields = dataclasses.asdict(record)
        assert dataclasses.asdict(pickle.loads(pickle.dumps(record))) == fields
        assert dataclasses.asdict(copy.deepcopy(record)) == fields
    guard.end(ticket, Ending(None, RuntimeError("not sent"), sent=False))
    assert guard.store.open_reservations() == 0


async def test_a_settle_the_store_cannot_take_keeps_the_answer(
    run: Any, clock: FakeClock, caplog: Any, tmp_path: Any
) -> None:
    """The provider answered; the store failed on the settle. The caller gets the answer (it got
    StoreUnavailable: the paid-for answer was lost), the reservation is charged when its lease
    expires, and the ledger agrees with the store."""
    from budgetguard.errors import StoreUnavailable
    from budgetguard.ledger import Ledger
    from budgetguard.stores import MemoryStore

    class Blip(MemoryStore):
        failures = 1

        def settle(self, rid: str, actuals: Any) -> bool:
            if self.failures:
                self.failures -= 1
                raise StoreUnavailable("connection reset")
            return super().settle(rid, actuals)

        async def asettle(self, rid: str, actuals: Any) -> bool:
            return self.settle(rid, actuals)

    with Ledger(tmp_path / "ledger.sqlite3") as ledger:
        guard = BudgetGuard([Budget("g", limit=10_000)], store=Blip(clock=clock), clock=clock, ledger=ledger,
                            lease_seconds=60)  # fmt: skip
        chain = guard | (PROMPT | model(replies=["fine answer"], input_tokens=10, max_tokens=20))
        with caplog.at_level("ERROR", logger="budgetguard"):
            msg = await run.invoke(chain, {"q": "hi"})
        assert msg.content == "fine answer" and "could not settle" in caplog.text
        assert guard.store.open_reservations() == 1
        clock.advance(61)
        await run.invoke(chain, {"q": "hi"})  # its reservation sweeps the first call's lease
        assert guard.store.open_reservations() == 0
        spent = 10_000 - guard.remaining("g")
        assert spent == (prompt_tokens(guard) + 20) + (10 + 2)  # the first at its reservation
        records = list(ledger.records())
        assert sorted(r.outcome for r in records) == ["expired", "ok"]
        assert sum(r.input_tokens + r.output_tokens for r in records) == spent
