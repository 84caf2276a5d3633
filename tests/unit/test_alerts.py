"""Unit tests of soft thresholds and denial hooks."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

from budgetguard.alerts import AlertEvent, Alerts
from budgetguard.errors import BudgetExceeded, ConfigurationError

DAY1, DAY2 = 1_793_491_200.0, 1_793_577_600.0
ALICE, BOB = {"user_id": "alice"}, {"user_id": "bob"}


def observe(alerts: Alerts, used: float, *, budget: str = "per-user", scope: Any = ALICE,
            period: float | None = DAY1, limit: float = 100.0, now: float = 0.0) -> list[AlertEvent]:  # fmt: skip
    return alerts.observe(
        budget=budget, scope=scope, used=used, limit=limit, unit="tokens", period_start=period, now=now
    )


def test_fires_once_per_period_and_scope_and_again_next_period() -> None:
    seen: list[AlertEvent] = []
    alerts = Alerts({"per-user": 0.8}, on_threshold=seen.append)
    assert observe(alerts, 50) == []
    (event,) = observe(alerts, 80, now=5.0)
    assert (event.budget, dict(event.scope), event.threshold, event.used, event.limit) == (
        "per-user",
        ALICE,
        0.8,
        80,
        100,
    )
    assert (event.period_start, event.ts, event.unit) == (DAY1, 5.0, "tokens")
    assert observe(alerts, 90) == [] and observe(alerts, 70) == [] and observe(alerts, 85) == []  # no re-fire in period
    assert len(observe(alerts, 81, scope=BOB)) == 1  # another scope has its own key
    assert len(observe(alerts, 81, period=DAY2)) == 1  # next period fires again
    assert observe(alerts, 99, period=DAY2) == []
    assert [e.scope["user_id"] for e in seen] == ["alice", "bob", "alice"]


def test_scope_order_does_not_matter() -> None:
    alerts = Alerts({"*": 0.5})
    assert len(observe(alerts, 60, scope={"a": "1", "b": "2"})) == 1
    assert observe(alerts, 60, scope={"b": "2", "a": "1"}) == []


def test_several_thresholds_fire_in_order_each_once() -> None:
    alerts = Alerts({"per-user": [0.9, 0.5, 0.8]})
    assert [e.threshold for e in observe(alerts, 85)] == [0.5, 0.8]
    assert [e.threshold for e in observe(alerts, 95)] == [0.9]
    assert [e.threshold for e in observe(alerts, 150)] == []


def test_star_applies_to_budgets_without_their_own_entry() -> None:
    alerts = Alerts({"*": 0.5, "strict": 0.9})
    assert alerts.thresholds_for("anything") == (0.5,)
    assert alerts.thresholds_for("strict") == (0.9,)
    assert observe(alerts, 60, budget="strict") == []
    assert len(observe(alerts, 60, budget="other")) == 1
    assert Alerts().thresholds_for("x") == ()
    assert observe(Alerts(), 1000) == []


def test_bucket_without_period_rearms_below_threshold() -> None:
    alerts = Alerts({"pool": 0.8}, hysteresis=0.05)
    assert len(observe(alerts, 85, budget="pool", scope={}, period=None)) == 1
    assert observe(alerts, 90, budget="pool", scope={}, period=None) == []
    assert observe(alerts, 77, budget="pool", scope={}, period=None) == []  # inside the hysteresis band
    assert observe(alerts, 81, budget="pool", scope={}, period=None) == []  # so still not re-armed
    assert observe(alerts, 70, budget="pool", scope={}, period=None) == []  # below 0.75: re-armed
    assert len(observe(alerts, 82, budget="pool", scope={}, period=None)) == 1


def test_periodic_bucket_does_not_rearm_within_its_period() -> None:
    alerts = Alerts({"per-user": 0.8})
    assert len(observe(alerts, 85)) == 1
    observe(alerts, 10)  # e.g. a refund
    assert observe(alerts, 85) == []


def test_no_alert_for_non_positive_limit() -> None:
    alerts = Alerts({"*": 0.5})
    assert observe(alerts, 10, limit=0) == [] and observe(alerts, 10, limit=-1) == []


def test_logs_a_warning_on_the_budgetguard_logger(caplog: pytest.LogCaptureFixture) -> None:
    alerts = Alerts({"per-user": 0.8})
    with caplog.at_level(logging.WARNING, logger="budgetguard"):
        alerts.observe(budget="per-user", scope=ALICE, used=16.5, limit=20, unit="usd", period_start=DAY1, now=1)
    (record,) = caplog.records
    assert record.name == "budgetguard" and record.levelno == logging.WARNING
    assert "budget 'per-user' (user_id=alice) reached 80% of its limit: $16.50 of $20.00 used (82%)" in record.message
    assert "period starting 2026-11-01 00:00 UTC" in record.message


def test_callback_errors_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def boom(_: Any) -> None:
        raise RuntimeError("pager down")

    alerts = Alerts({"*": 0.5}, on_threshold=boom, on_denied=boom)
    with caplog.at_level(logging.ERROR, logger="budgetguard"):
        assert len(observe(alerts, 60)) == 1
        alerts.denied(BudgetExceeded("per-user", scope=ALICE, requested=10, available=1))
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and all(str(r.exc_info[1]) == "pager down" for r in errors if r.exc_info)
    assert "on_threshold callback" in caplog.text and "on_denied callback" in caplog.text


def test_memory_is_bounded() -> None:
    alerts = Alerts({"*": 0.5}, max_keys=10)
    for i in range(100):
        assert len(observe(alerts, 60, scope={"user_id": str(i)})) == 1
    assert len(alerts._fired) == 10
    for i in range(500):
        alerts.denied(BudgetExceeded("b", scope={"user_id": str(i)}), now=0.0)
    assert len(alerts._denials) == 10


def test_concurrent_observers_fire_exactly_once() -> None:
    seen: list[AlertEvent] = []
    alerts = Alerts({"*": 0.5}, on_threshold=seen.append)
    barrier = threading.Barrier(8)

    def work() -> None:
        barrier.wait()
        for used in range(40, 100):
            observe(alerts, used)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 1


def test_denied_calls_callback_every_time_and_rate_limits_the_log(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[BaseException] = []
    alerts = Alerts(on_denied=seen.append, denial_log_interval=60)
    err = BudgetExceeded("per-user", scope=ALICE, requested=500, available=20)
    with caplog.at_level(logging.WARNING, logger="budgetguard"):
        for t in range(5):
            alerts.denied(err, now=float(t))
        alerts.denied(BudgetExceeded("per-user", scope=BOB, requested=5, available=1), now=5.0)
        alerts.denied(err, now=61.0)
    assert len(seen) == 7 and seen[0] is err
    messages = [r.message for r in caplog.records]
    assert len(messages) == 3
    assert messages[0].startswith("budgetguard: call denied: budget 'per-user' (user_id=alice) cannot cover")
    assert "user_id=bob" in messages[1]
    assert "(4 more denied since the last message)" in messages[2]
    alerts.reset()
    assert alerts._denials == {} and alerts._fired == {}


def test_denied_accepts_any_exception() -> None:
    seen: list[BaseException] = []
    Alerts(on_denied=seen.append).denied(ValueError("store down"))
    assert isinstance(seen[0], ValueError)


@pytest.mark.parametrize("bad", [0, -0.5, "80%", float("nan"), float("inf"), True, [0.5, "x"]])
def test_bad_thresholds_are_configuration_errors(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="fraction of the limit greater than 0"):
        Alerts({"per-user": bad})


def test_bad_options_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="hysteresis"):
        Alerts(hysteresis=1.5)
    with pytest.raises(ConfigurationError, match="max_keys"):
        Alerts(max_keys=0)


def test_event_fraction_and_message_for_global_budget() -> None:
    event = AlertEvent("global", {}, 1.0, 120_000, 100_000, "tokens", None, 0.0)
    assert event.fraction == 1.2
    assert event.message == "budget 'global' reached 100% of its limit: 120,000 tokens of 100,000 tokens used (120%)"


@pytest.mark.parametrize(
    ("unit", "used", "limit", "text"),
    [
        ("usd", 0.000125, 0.0001, "$0.000125 of $0.0001 used"),
        ("calls", 21, 20, "21 model calls of 20 model calls used"),
        ("tool_calls", 6, 5, "6 tool calls of 5 tool calls used"),
    ],
)
def test_the_message_names_each_unit_and_tells_cheap_amounts_apart(unit: str, used: float, limit: float, text: str) -> None:
    assert text in AlertEvent("b", {}, 1.0, used, limit, unit, None, 0.0).message
