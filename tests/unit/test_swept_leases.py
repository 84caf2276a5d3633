"""A guard records the swept leases its store reports, then acknowledges them (sync and async).

The store keeps a swept lease in its journal until acknowledged (the stores' contract
suite checks that); these tests check the guard's half: the ``expired`` record is stored
before the acknowledgement, a process that dies in between leaves the lease for the next
call to record, and an acknowledgement never stands between a call and its answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any

import pytest

import budgetguard.flow
import budgetguard.recording
from budgetguard import Budget, BudgetGuard
from budgetguard.clock import FakeClock
from budgetguard.errors import StoreUnavailable
from budgetguard.ledger import Ledger, MemorySink
from budgetguard.stores import Charge, MemoryStore, ReserveRequest
from budgetguard.testing.fake_models import UsageFakeChatModel

META = json.dumps({"model": "gpt-4", "est": [30, 10], "budgets": ["g"]})


def abandoned_lease(guard: BudgetGuard, clock: FakeClock) -> None:
    """A lease of 40 tokens whose process died, due now."""
    spec = guard._spec(guard.budgets["g"], {})
    assert guard.store.reserve(ReserveRequest("dead", (Charge(spec, 40.0),), 1.0, META)).ok
    clock.advance(2)


def make_guard(clock: FakeClock, store: Any = None, ledger: Any = None) -> BudgetGuard:
    store = store if store is not None else MemoryStore(clock=clock)
    ledger = Ledger(MemorySink()) if ledger is None else ledger
    return BudgetGuard([Budget("g", limit=10_000)], store=store, ledger=ledger, clock=clock)


def model() -> UsageFakeChatModel:
    return UsageFakeChatModel(model_name="gpt-4", input_tokens=7, replies=["one two"])


async def acknowledged() -> None:
    """Let the async driver's acknowledgements (tasks of their own) finish."""
    await asyncio.gather(*budgetguard.flow._ACKNOWLEDGING)


def expired_records(guard: BudgetGuard) -> list[Any]:
    return [r for r in guard.ledger.records() if r.outcome == "expired"]


async def test_a_call_records_the_swept_lease_then_acknowledges_it(run: Any, clock: FakeClock) -> None:
    guard = make_guard(clock)
    abandoned_lease(guard, clock)
    await run.invoke(guard | model(), "hello")
    await acknowledged()
    (record,) = expired_records(guard)
    assert (record.run_id, record.input_tokens + record.output_tokens) == ("dead", 40)
    assert guard.store.sweep() == ()  # acknowledged: never reported again
    assert guard.ledger.totals()[0].total_tokens == 10_000 - guard.remaining("g")


class Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs in that process."""


async def test_a_process_that_dies_before_recording_a_sweep_leaves_it_to_the_next_call(
    run: Any, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger(MemorySink())
    store = MemoryStore(clock=clock)
    dying, next_one = make_guard(clock, store, ledger), make_guard(clock, store, ledger)
    abandoned_lease(dying, clock)

    def killed(*args: Any) -> None:
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(budgetguard.recording, "record_expired", killed)
        with pytest.raises(Killed):
            await run.invoke(dying | model(), "hello")  # its reserve swept "dead", then it died
    assert expired_records(dying) == []
    assert [e.id for e in store.sweep()] == ["dead"]  # the store still reports it
    await run.invoke(next_one | model(), "hello")
    await acknowledged()
    assert [r.run_id for r in expired_records(next_one)] == ["dead"]
    assert store.sweep() == ()


async def test_a_guard_without_a_ledger_acknowledges_too(run: Any, clock: FakeClock) -> None:
    guard = make_guard(clock, ledger=False)
    abandoned_lease(guard, clock)
    await run.invoke(guard | model(), "hello")
    await acknowledged()
    assert guard.store.sweep() == ()


class RefusesAcknowledgements(MemoryStore):
    def acknowledge(self, ids: Sequence[str]) -> None:
        raise StoreUnavailable("store down for acknowledgements")


async def test_a_refused_acknowledgement_is_logged_and_the_lease_recorded_again_once(
    run: Any, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    guard = make_guard(clock, RefusesAcknowledgements(clock=clock))
    abandoned_lease(guard, clock)
    with caplog.at_level(logging.WARNING, logger="budgetguard"):
        assert await run.invoke(guard | model(), "hello") is not None  # the call is not failed
        await acknowledged()
    assert "could not acknowledge 1 recorded expired lease" in caplog.text
    await run.invoke(guard | model(), "hello")  # reported again: recorded again
    await acknowledged()
    assert [r.run_id for r in expired_records(guard)] == ["dead"]  # one record per run
    assert guard.ledger.totals()[0].total_tokens == 10_000 - guard.remaining("g")


class SlowAcknowledgements(MemoryStore):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.release = asyncio.Event()

    async def aacknowledge(self, ids: Sequence[str]) -> None:
        await self.release.wait()
        self.acknowledge(ids)


async def test_an_async_call_does_not_wait_for_its_acknowledgement(clock: FakeClock) -> None:
    """An await there would let a cancellation end the call between its reservation and its
    ticket, leaving the reservation to be charged in full when its lease ran out."""
    store = SlowAcknowledgements(clock)
    guard = make_guard(clock, store)
    abandoned_lease(guard, clock)
    llm = model()
    await asyncio.wait_for((guard | llm).ainvoke("hello"), timeout=5)
    assert llm.calls == 1 and store.open_reservations() == 0
    assert [e.id for e in store.sweep()] == ["dead"]  # still acknowledging
    store.release.set()
    await acknowledged()
    assert store.sweep() == ()
