"""Time on every store (issue 13): whose clock decides, and what a skewed client can get.

Each store kind is set up as the processes of one deployment that share a backend:

* memory: one store on the host clock; clients are guards whose clocks differ;
* SQLite: one store per client on one file, each with the client's clock, all with the
  same host clock (``host_clock``);
* Redis: one store per client on one namespace; the server's clock is a fake that the
  test moves (``tests/redis_fake_time.py``: the production scripts, reading that clock).

Clients build their bucket specs the way the guard does (``guard._spec``), from their own
clocks. The host clock starts 100 s before an hour boundary; the skewed clients run
300 s ahead and behind. The tests count what is granted.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from budgetguard import Budget, BudgetGuard
from budgetguard.clock import FakeClock
from budgetguard.stores import Charge, MemoryStore, ReserveRequest, Store

HOUR = 3600.0
BOUNDARY = 1_767_229_200.0  # 2026-01-01 01:00 UTC
KINDS = ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)]


class OffsetClock(FakeClock):
    """A client's clock: the host's plus a fixed skew."""

    def __init__(self, host: FakeClock, offset: float) -> None:
        super().__init__()
        self.host, self.offset = host, offset

    def now(self) -> float:
        return self.host.now() + self.offset


@dataclass
class Deployment:
    """Clients of one backend, each with its own clock, and the host clock that moves them."""

    kind: str
    host: FakeClock
    open_store: Callable[[FakeClock], Store]
    stores: list[Store] = field(default_factory=list)

    def client(self, budgets: list[Budget], offset: float = 0.0) -> BudgetGuard:
        clock = self.host if offset == 0 else OffsetClock(self.host, offset)
        store = self.open_store(clock)
        self.stores.append(store)
        return BudgetGuard(budgets, store=store, clock=clock, ledger=False)


@pytest.fixture(params=KINDS)
def deployment(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Deployment]:
    kind = str(request.param)
    start = BOUNDARY - 100
    cleanup: Callable[[], None] = lambda: None
    if kind == "memory":
        host = FakeClock(start)
        shared = MemoryStore(clock=host)

        def open_store(clock: FakeClock) -> Store:
            return shared

    elif kind == "sqlite":
        from budgetguard.stores.sqlite import SQLiteStore

        host = FakeClock(start)

        def open_store(clock: FakeClock) -> Store:
            return SQLiteStore(tmp_path / "shared.db", clock=clock, host_clock=host)

    else:
        from redis_fake_time import close, fake_server_time

        from budgetguard.stores.redis import RedisStore

        server = request.getfixturevalue("redis_server")
        host = fake_server_time(monkeypatch, server.url, start)
        namespace = f"time-{uuid.uuid4().hex[:12]}"

        def open_store(clock: FakeClock) -> Store:
            return RedisStore(server.url, namespace=namespace)

        cleanup = lambda: close(host)
    deployment = Deployment(kind, host, open_store)
    try:
        yield deployment
    finally:
        for store in deployment.stores:
            store.close()
        cleanup()


def take(guard: BudgetGuard, budget: str, amount: float, rid: str, lease: float = 600.0) -> bool:
    """Reserve ``amount`` with the spec this client's clock builds, and settle it at that."""
    spec = guard._spec(guard.budgets[budget], {})
    if not guard.store.reserve(ReserveRequest(rid, (Charge(spec, amount),), lease)).ok:
        return False
    assert guard.store.settle(rid, [amount])
    return True


def drain(guard: BudgetGuard, budget: str, step: float, tag: str) -> float:
    """Take ``step`` at a time until refused; what was granted."""
    granted = 0.0
    for i in range(1000):
        if not take(guard, budget, step, f"{tag}-{i}-{uuid.uuid4().hex[:6]}"):
            return granted
        granted += step
    raise AssertionError("never refused")


# -- item 1: excess lands in the period current when it is settled -------------------------


@pytest.mark.parametrize("late", [125.0, 5 * HOUR + 7])
def test_excess_settled_periods_later_lands_in_the_current_period(deployment: Deployment, late: float) -> None:
    """A ``minute`` budget of 10,000; a call reserves 15 and reports 3,005 ``late`` seconds on."""
    guard = deployment.client([Budget("m", limit=10_000, period="minute")])
    spec = guard._spec(guard.budgets["m"], {})
    assert guard.store.reserve(ReserveRequest("slow", (Charge(spec, 15.0),), 86_400.0)).ok
    deployment.host.advance(late)
    assert guard.store.settle("slow", [3005.0])
    # The 15 reserved belonged to the old minute; the excess 2,990 to this one.
    assert guard.remaining("m") == 10_000 - 2990
    deployment.host.advance(5)
    assert guard.remaining("m") == 10_000 - 2990
    deployment.host.advance(60)
    assert guard.remaining("m") == 10_000


def test_an_expired_lease_swept_periods_later_is_charged_to_the_current_period(deployment: Deployment) -> None:
    guard = deployment.client([Budget("m", limit=1000, period="minute")])
    spec = guard._spec(guard.budgets["m"], {})
    assert guard.store.reserve(ReserveRequest("dead", (Charge(spec, 40.0),), 90.0)).ok
    deployment.host.advance(200)
    assert [e.id for e in guard.store.sweep()] == ["dead"]
    # Charged at the reserved amount, taken in an old minute: nothing more in this one.
    assert guard.remaining("m") == 1000


# -- item 2: no client clock gets more than the limit per real period ------------------------


def test_a_client_ahead_gets_nothing_more_in_the_same_real_hour(deployment: Deployment) -> None:
    """100 s before the hour a correct client drains the budget; clients 300 s ahead (already
    in the next hour by their clocks) and 300 s behind get nothing until the real hour ends."""
    budgets = [Budget("h", limit=1000, period="hour")]
    correct = deployment.client(budgets)
    ahead = deployment.client(budgets, +300)
    behind = deployment.client(budgets, -300)
    assert drain(correct, "h", 100, "correct") == 1000
    assert drain(ahead, "h", 100, "ahead") == 0
    assert drain(behind, "h", 100, "behind") == 0
    deployment.host.advance(99)
    assert drain(ahead, "h", 100, "ahead-2") == 0
    deployment.host.advance(2)  # the real hour ended: one full bucket, whoever asks first
    granted = drain(ahead, "h", 100, "ahead-3") + drain(behind, "h", 100, "behind-2") + drain(correct, "h", 100, "c")
    assert granted == 1000


def test_refill_follows_real_time_whoever_asks(deployment: Deployment) -> None:
    """Refill 1/s up to 100: clients 600 s apart take turns every 10 s for 1,200 s; the total
    granted is at most the capacity plus 1,200 s of refill."""
    budgets = [Budget("r", limit=100, refill_per_second=1.0)]
    correct = deployment.client(budgets)
    ahead = deployment.client(budgets, +300)
    behind = deployment.client(budgets, -300)
    granted = drain(behind, "r", 10, "b0") + drain(ahead, "r", 10, "a0")
    assert granted == 100  # the one ahead gets no refill for time that has not passed
    for turn in range(120):
        deployment.host.advance(10)
        client = (correct, ahead, behind)[turn % 3]
        granted += drain(client, "r", 5, f"t{turn}")
    assert granted <= 100 + 1200


def test_a_client_ahead_never_sweeps_a_live_lease(deployment: Deployment) -> None:
    budgets = [Budget("g", limit=1000)]
    correct = deployment.client(budgets)
    ahead = deployment.client(budgets, +300)
    spec = correct._spec(correct.budgets["g"], {})
    assert correct.store.reserve(ReserveRequest("live", (Charge(spec, 98.0),), 60.0)).ok
    deployment.host.advance(1)
    assert ahead.store.sweep() == ()
    assert take(ahead, "g", 2, "other")  # a reserve sweeps too
    assert correct.store.settle("live", [98.0])  # still open: settled once, at its real cost
    assert correct.remaining("g") == 1000 - 100


# -- item 3: retry_after counts what the lender can lend ----------------------------------


def test_retry_after_counts_the_lender_and_the_call_fits_when_it_says(deployment: Deployment) -> None:
    budgets = [
        Budget("u", limit=600, refill_per_second=1.0, borrow_from="pool"),
        Budget("pool", limit=1500),
    ]
    guard = deployment.client(budgets)
    user, pool = guard._spec(guard.budgets["u"], {}), guard._spec(guard.budgets["pool"], {})
    assert take(guard, "u", 596, "u")
    assert take(guard, "pool", 1204, "p")
    result = guard.store.reserve(ReserveRequest("big", (Charge(user, 302.0, pool),), 600.0))
    assert result.denial is not None
    assert result.denial.retry_after == pytest.approx(2.0, abs=1e-9)  # not 298 s, the bucket alone
    deployment.host.advance(1.9)
    assert not guard.store.reserve(ReserveRequest("early", (Charge(user, 302.0, pool),), 600.0)).ok
    deployment.host.advance(0.1 + 1e-6)
    assert guard.store.reserve(ReserveRequest("fits", (Charge(user, 302.0, pool),), 600.0)).ok


def test_wait_for_refill_waits_for_the_lender_too(deployment: Deployment) -> None:
    """The policy sleeps the computed wait (on the guard's clock, here the host's) and the
    call goes: ``cost - 12`` s, where the bucket's refill alone would take ``cost`` s, past
    ``max_wait``."""
    from budgetguard.policies import wait_for_refill
    from budgetguard.testing.fake_models import UsageFakeChatModel

    question = "word " * 50
    probe = BudgetGuard([Budget("x", limit=1e9)], ledger=False)
    reply = (probe | UsageFakeChatModel(model_name="gpt-4", max_tokens=5)).invoke(question)
    estimated = reply.response_metadata["budgetguard"]["estimated_input_tokens"]
    # A model that reports what the guard estimates: every call costs what it reserves.
    model = UsageFakeChatModel(model_name="gpt-4", replies=["a b c d e"], input_tokens=estimated, max_tokens=5)
    cost = estimated + 5.0
    assert cost > 30
    budgets = [
        Budget("u", limit=cost + 2, refill_per_second=1.0, per="user_id", borrow_from="pool"),
        Budget("pool", limit=cost + 10),
    ]
    guard = deployment.client(budgets)
    guard.policies = (wait_for_refill(max_wait=cost - 5),)
    chain = guard | model
    alice: Any = {"configurable": {"user_id": "alice"}}
    chain.invoke(question, alice)  # alice keeps 2
    chain.invoke(question, alice)  # takes her 2, borrows cost - 2: the pool keeps 12
    clock = deployment.host
    before = len(clock.slept)
    chain.invoke(question, alice)  # her refill and the pool's 12 cover it in cost - 12 s
    assert clock.slept[before:] == [pytest.approx(cost - 12, abs=0.01)]
    assert model.calls == 3
