"""Budget definitions: validation, scopes, calendar periods."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

import uuid

from budgetguard import Budget, BudgetExceeded, BudgetGuard, ConfigurationError, InvalidScopeError, MissingScopeError
from budgetguard.testing.fake_models import UsageFakeChatModel


def ts(*args: int, tz: str = "UTC") -> float:
    return datetime(*args, tzinfo=ZoneInfo(tz)).timestamp()


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"limit": 0}, "greater than 0"),
        ({"limit": -5}, "greater than 0"),
        ({"limit": math.nan}, "finite"),
        ({"limit": math.inf}, "finite"),
        ({"limit": "100"}, "must be a number"),
        ({"limit": True}, "must be a number"),
        ({"limit": 10, "unit": "eur"}, "unknown unit 'eur'"),
        ({"limit": 10, "period": "fortnight"}, "unknown period 'fortnight'"),
        ({"limit": 10, "refill_per_second": -1}, "must not be negative"),
        ({"limit": 10, "borrow_from": "b"}, "borrow_from must name another budget"),
        ({"limit": 10, "per": ""}, "per must be"),
        ({"limit": 10, "timezone": "Mars/Olympus"}, "unknown timezone"),
    ],
)
def test_bad_budget_is_a_typed_error_naming_the_problem(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        Budget("b", **kwargs)


def test_configuration_error_is_also_a_value_error() -> None:
    with pytest.raises(ValueError):
        Budget("b", limit=-1)


def test_scope_from_configurable_then_metadata() -> None:
    b = Budget("per-user", limit=10, per="user_id")
    assert b.scope_for({"configurable": {"user_id": "alice"}}) == {"user_id": "alice"}
    assert b.scope_for({"metadata": {"user_id": "bob"}}) == {"user_id": "bob"}
    both = {"configurable": {"user_id": "alice"}, "metadata": {"user_id": "bob"}}
    assert b.scope_for(both) == {"user_id": "alice"}


def test_missing_scope_key_is_typed_and_says_how_to_pass_it() -> None:
    b = Budget("per-user", limit=10, per="user_id")
    with pytest.raises(MissingScopeError, match=r"configurable.*user_id"):
        b.scope_for({"configurable": {"other": 1}})


def test_callable_per_computes_the_key() -> None:
    def tenant(config: dict) -> str:
        return config["metadata"]["org"].upper()

    b = Budget("per-tenant", limit=10, per=tenant)  # a named function names its scope
    assert b.scope_for({"metadata": {"org": "acme"}}) == {"tenant": "ACME"}


def test_a_scope_function_is_named_by_the_user() -> None:
    b = Budget("per-org", limit=10, per=("org_id", lambda config: config["configurable"]["org"]))
    assert b.scope_name == "org_id"
    assert b.scope_for({"configurable": {"org": "acme"}}) == {"org_id": "acme"}
    guard = BudgetGuard([b], ledger=False)
    assert guard.remaining("per-org", org_id="acme") == 10


def test_an_unnamed_scope_function_is_refused_with_advice() -> None:
    with pytest.raises(ConfigurationError, match=r"per=\('org_id', fn\)"):
        Budget("per-org", limit=10, per=lambda config: "x")


def test_a_scope_function_that_cannot_find_its_key_is_a_missing_scope() -> None:
    b = Budget("per-org", limit=10, per=("org_id", lambda config: config["configurable"]["org"]))
    with pytest.raises(MissingScopeError, match=r"per-org.*'org_id'.*KeyError"):
        b.scope_for({"configurable": {}})
    with pytest.raises(MissingScopeError, match="gives no 'org_id'"):
        Budget("b", limit=1, per=("org_id", lambda config: None)).scope_for({})


def test_scope_values_have_one_text_form() -> None:
    b = Budget("per-user", limit=10, per="user_id")
    user = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert b.scope_for({"configurable": {"user_id": 42}}) == b.scope_for({"configurable": {"user_id": "42"}})
    assert b.scope_for({"configurable": {"user_id": user}}) == {"user_id": str(user)}
    assert b.scope_from_kwargs({"user_id": 42}) == {"user_id": "42"}


@pytest.mark.parametrize("value", [{"id": 1}, ["a"], 1.5, True, object()])
def test_a_scope_value_that_is_not_a_string_int_or_uuid_is_refused_before_sending(value: object) -> None:
    guard = BudgetGuard([Budget("per-user", limit=1000, per="user_id")], ledger=False)
    llm = UsageFakeChatModel(max_tokens=5)
    with pytest.raises(InvalidScopeError, match="string, an integer or a UUID"):
        (guard | llm).invoke("hi", {"configurable": {"user_id": value}})
    with pytest.raises(InvalidScopeError):
        guard.remaining("per-user", user_id=value)
    assert llm.calls == 0 and guard.store.open_reservations() == 0


def test_global_budget_has_empty_scope_and_plain_key() -> None:
    b = Budget("global", limit=10)
    assert b.scope_for({}) == {}
    assert b.bucket_key({}) == "global"


def test_bucket_keys_of_different_scopes_differ() -> None:
    b = Budget("u", limit=10, per="user_id")
    assert b.bucket_key({"user_id": "a"}) != b.bucket_key({"user_id": "a:b"})


@pytest.mark.parametrize(
    ("period", "now", "start", "end"),
    [
        ("minute", ts(2026, 3, 4, 10, 5, 30), ts(2026, 3, 4, 10, 5), ts(2026, 3, 4, 10, 6)),
        ("hour", ts(2026, 3, 4, 10, 5, 30), ts(2026, 3, 4, 10), ts(2026, 3, 4, 11)),
        ("day", ts(2026, 3, 4, 10, 5, 30), ts(2026, 3, 4), ts(2026, 3, 5)),
        ("week", ts(2026, 3, 4, 10), ts(2026, 3, 2), ts(2026, 3, 9)),  # Wed → Monday
        ("month", ts(2026, 12, 31, 23, 59), ts(2026, 12, 1), ts(2027, 1, 1)),
        ("month", ts(2028, 2, 29, 12), ts(2028, 2, 1), ts(2028, 3, 1)),
    ],
)
def test_calendar_period_bounds_in_utc(period: str, now: float, start: float, end: float) -> None:
    assert Budget("b", limit=1, period=period).period_bounds(now) == (start, end)


def test_period_in_a_timezone_follows_its_dst_change() -> None:
    b = Budget("b", limit=1, period="day", timezone="Europe/Berlin")
    # 2026-03-29 is 23 hours long in Berlin (clocks go forward).
    start, end = b.period_bounds(ts(2026, 3, 29, 12, tz="Europe/Berlin"))
    assert start == ts(2026, 3, 29, tz="Europe/Berlin")
    assert end - start == 23 * 3600


def test_period_bounds_cache_moves_with_time() -> None:
    b = Budget("b", limit=1, period="minute")
    first = b.period_bounds(ts(2026, 1, 1, 0, 0, 10))
    second = b.period_bounds(ts(2026, 1, 1, 0, 1, 10))
    assert second[0] == first[1]


def test_budget_exceeded_message_matches_the_documented_shape() -> None:
    err = BudgetExceeded(
        "per-user", scope={"user_id": "alice"}, unit="tokens", requested=1234, available=800, retry_after=216.2
    )
    assert str(err) == (
        "budget 'per-user' (user_id=alice) cannot cover this call: needs 1,234 tokens, "
        "800 tokens available; refills enough in 217 s"
    )
    never = BudgetExceeded("g", unit="usd", requested=3.5, available=1.25, retry_after=None)
    assert "no refill within its period can cover it" in str(never)
    assert "$3.50" in str(never)


def test_budget_exceeded_pickles_with_its_fields() -> None:
    import pickle

    err = BudgetExceeded("b", scope={"k": "v"}, requested=5, available=1, retry_after=3, model="m", tried=("wait",))
    back = pickle.loads(pickle.dumps(err))
    assert (back.budget, back.scope, back.retry_after, back.tried, str(back)) == (
        "b",
        {"k": "v"},
        3,
        ("wait",),
        str(err),
    )


def test_utc_default_timezone() -> None:
    b = Budget("b", limit=1, period="day")
    start, _ = b.period_bounds(datetime(2026, 5, 5, 23, 30, tzinfo=timezone.utc).timestamp())
    assert start == ts(2026, 5, 5)


def test_a_usd_refusal_tells_cheap_amounts_apart() -> None:
    err = BudgetExceeded("usd", unit="usd", requested=0.0000375, available=0.0000122, retry_after=None)
    assert "needs $0.0000375, $0.0000122 available" in str(err)


def test_a_call_keeps_the_run_it_names_wherever_it_names_it() -> None:
    guard = BudgetGuard([Budget("per-run", limit=1, per="run")], ledger=False)
    for config in ({"configurable": {"run": "r1"}}, {"metadata": {"run": "r1"}}):
        assert guard.scopes_for(config, run="this-call") == {"per-run": {"run": "r1"}}
    assert guard.scopes_for({}, {"run": "r1"}, run="this-call") == {"per-run": {"run": "r1"}}
    assert guard.scopes_for({}, run="this-call") == {"per-run": {"run": "this-call"}}
