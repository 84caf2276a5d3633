"""The guard writes one complete ledger record per metered call, and drives alerts."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.prompts import ChatPromptTemplate

from budgetguard import Budget, BudgetExceeded, BudgetGuard, PriceTable
from budgetguard.alerts import Alerts
from budgetguard.clock import FakeClock
from budgetguard.ledger import Ledger, MemorySink
from budgetguard.policies import cheaper_model, compress_prompt
from budgetguard.stores.base import BucketSpec, Charge, ReserveRequest
from budgetguard.testing.fake_models import UsageFakeChatModel

PROMPT = ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{q}")])
CFG = {"configurable": {"user_id": "alice"}, "metadata": {"feature": "summarizer"}, "tags": ["beta"]}


def setup(**kw: Any) -> tuple[BudgetGuard, Ledger]:
    ledger = Ledger(MemorySink())
    kw.setdefault("budgets", [Budget("per-user", limit=10_000, per="user_id")])
    return BudgetGuard(ledger=ledger, **kw), ledger


def records(ledger: Ledger) -> list:
    ledger.flush()
    return list(ledger.records())


async def test_a_plain_call_is_recorded_completely(run: Any) -> None:
    guard, ledger = setup()
    await run.invoke(guard | (PROMPT | UsageFakeChatModel(input_tokens=40, max_tokens=30)), {"q": "hi"}, CFG)
    [rec] = records(ledger)
    est = guard.estimator.count_messages(PROMPT.format_messages(q="hi"), "gpt-4o-mini")
    info = guard.prices.get("gpt-4o-mini")
    assert (rec.outcome, rec.model_requested, rec.model_used, rec.policy) == ("ok", "gpt-4o-mini", "gpt-4o-mini", None)
    assert dict(rec.scope) == {"user_id": "alice"}
    assert rec.metadata.get("feature") == "summarizer" and "beta" in rec.tags
    assert (rec.estimated_input_tokens, rec.estimated_output_tokens) == (est, 30)
    assert (rec.input_tokens, rec.output_tokens) == (40, 1)
    assert rec.cost_usd == pytest.approx(info.cost(40, 1))
    assert rec.reserved_usd == pytest.approx(info.cost(est, 30))
    assert rec.budgets == ("per-user",) and rec.latency_s is not None and rec.root_run_id
    assert rec.prompt is None and rec.completion is None  # no text unless opted in


async def test_a_streamed_call_is_recorded_with_its_usage(run: Any) -> None:
    guard, ledger = setup()
    await run.stream(guard | (PROMPT | UsageFakeChatModel(input_tokens=40, max_tokens=30, replies=["a b c"])), {"q": "hi"}, CFG)
    [rec] = records(ledger)
    assert (rec.outcome, rec.input_tokens, rec.output_tokens) == ("ok", 40, 3)


async def test_denied_and_failed_calls_are_recorded(run: Any) -> None:
    guard, ledger = setup(budgets=[Budget("per-user", limit=10, per="user_id")])
    with pytest.raises(BudgetExceeded):
        await run.invoke(guard | (PROMPT | UsageFakeChatModel(max_tokens=30)), {"q": "hi"}, CFG)
    guard2, ledger2 = setup()
    with pytest.raises(RuntimeError):
        await run.invoke(guard2 | (PROMPT | UsageFakeChatModel(max_tokens=30, fail_with=RuntimeError("x"))), {"q": "hi"}, CFG)
    [denied] = records(ledger)
    [failed] = records(ledger2)
    assert (denied.outcome, denied.model_used, denied.input_tokens) == ("denied", None, 0)
    assert "cannot cover this call" in denied.error
    assert (failed.outcome, failed.input_tokens, failed.error) == ("error", 0, "x")


async def test_fallback_and_compression_are_recorded_with_their_policy(run: Any) -> None:
    guard, ledger = setup(
        budgets=[Budget("usd", limit=0.0002, unit="usd")],
        policies=[cheaper_model({"gpt-4o": [UsageFakeChatModel(model_name="gpt-4o-mini", max_tokens=50)]})],
    )
    await run.invoke(guard | (PROMPT | UsageFakeChatModel(model_name="gpt-4o", max_tokens=50)), {"q": "hi"})
    [rec] = records(ledger)
    assert (rec.outcome, rec.model_requested, rec.model_used, rec.policy) == (
        "fell_back",
        "gpt-4o",
        "gpt-4o-mini",
        "cheaper_model",
    )
    tiny = PriceTable.bundled().with_overrides({"tiny-ctx": {"input_per_million": 1, "output_per_million": 2, "context_window": 120}})
    guard, ledger = setup(budgets=[Budget("g", limit=100_000)], prices=tiny, policies=[compress_prompt("trim")])
    msgs = [SystemMessage("sys")] + [HumanMessage("q " * 30), AIMessage("a " * 30)] * 4 + [HumanMessage("last?")]
    await run.invoke(guard | UsageFakeChatModel(model_name="tiny-ctx", max_tokens=10), msgs)
    [rec] = records(ledger)
    assert (rec.outcome, rec.policy) == ("compressed", "compress")


def test_an_expired_lease_is_recorded_once_by_the_process_that_sweeps_it() -> None:
    clock = FakeClock()
    guard, ledger = setup(budgets=[Budget("g", limit=10_000)], clock=clock, lease_seconds=30)
    # a "crashed worker": reserved through the same store, never settled
    spec = BucketSpec("g", 10_000)
    dead = '{"model":"gpt-4o-mini","scopes":{},"budgets":["g"],"est":[100,50],"tags":[]}'
    assert guard.store.reserve(ReserveRequest("dead-run", (Charge(spec, 150),), 30, dead)).ok
    clock.advance(31)
    (guard | (PROMPT | UsageFakeChatModel(input_tokens=5, max_tokens=5))).invoke({"q": "hi"})
    recs = {r.run_id: r for r in records(ledger)}
    assert recs["dead-run"].outcome == "expired"
    assert (recs["dead-run"].input_tokens, recs["dead-run"].output_tokens) == (100, 50)
    assert guard.remaining("g") == 10_000 - 150 - (5 + 1)


async def test_soft_threshold_alert_fires_once_per_period(run: Any) -> None:
    events: list = []
    clock = FakeClock(start=1_767_225_600.0)
    guard, _ = setup(
        budgets=[Budget("daily", limit=100, period="day")],
        clock=clock,
        alerts=Alerts({"daily": 0.5}, on_threshold=events.append),
    )
    chain = guard | (PROMPT | UsageFakeChatModel(input_tokens=20, max_tokens=5, replies=["a"]))
    for _ in range(3):
        await run.invoke(chain, {"q": "hi"})  # 21, 42, 63 used: crosses 50% once
    assert [(e.budget, e.threshold) for e in events] == [("daily", 0.5)]
    clock.advance(86_400)
    for _ in range(3):
        await run.invoke(chain, {"q": "hi"})
    assert len(events) == 2  # once more in the next period


async def test_denial_hook_fires(run: Any) -> None:
    denied: list = []
    guard, _ = setup(budgets=[Budget("g", limit=5)], alerts=Alerts(on_denied=denied.append))
    with pytest.raises(BudgetExceeded):
        await run.invoke(guard | (PROMPT | UsageFakeChatModel(max_tokens=5)), {"q": "hi"})
    assert len(denied) == 1 and isinstance(denied[0], BudgetExceeded)
