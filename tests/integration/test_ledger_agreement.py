"""Store and ledger agree after workers are SIGKILLed at any point of a call.

Four worker processes share one store and one ledger. Three of them are killed during
their fifth call (four calls completed before it), each at another point:

* ``in_call``: while the model is answering (reserved, nothing recorded);
* ``recorded``: right after its record reached the ledger, before the store settled it;
* ``settled``: right after the store settled it.

(Killed before its reservation, a call leaves nothing anywhere.) The fourth finishes its
calls. Then the sweeper's own window: a fifth worker (``abandoned``) is killed during its
call, and once its lease has run out a sixth (``swept``) makes a call whose reserve sweeps
it, and is killed right after the store committed that sweep, before the ``expired``
records are written. Once the sixth's own lease has run out, one more guarded call
reports the swept leases the store still keeps (its journal), records them and
acknowledges them, and sweeps the sixth's lease. Then the ledger's tokens must equal the
store's spend, every reservation must be in the ledger exactly once, and the store must
report nothing more. On SQLite (store and ledger, sync and async workers) and on a Redis
store with a PostgreSQL ledger.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

import budgetguard.ledger as ledger_module
from budgetguard import Budget, BudgetGuard
from budgetguard.ledger import open_ledger
from budgetguard.stores.redis import RedisStore
from budgetguard.testing.fake_models import UsageFakeChatModel

REPO = Path(ledger_module.__file__).resolve().parents[1]
LEASE = 2.0
LIMIT = 10**9
KILLED_AFTER = 4  # completed calls of the killed worker before the fatal one
SURVIVOR_CALLS = 12

WORKER = textwrap.dedent(
    """
    import asyncio, sys, time
    from budgetguard import Budget, BudgetGuard
    from budgetguard.ledger import Ledger
    from budgetguard.ledger_sinks import sink_for
    from budgetguard.stores.redis import RedisStore
    from budgetguard.testing.fake_models import UsageFakeChatModel

    store, namespace, ledger_spec, name, calls, kill_at, point, mode, lease, limit = sys.argv[1:11]
    calls, kill_at = int(calls), int(kill_at)
    state = {"call": 0}

    def stop_here(where, call=None):
        if point == where and (state["call"] if call is None else call) == kill_at:
            print("READY", flush=True)
            time.sleep(120)  # the parent SIGKILLs us here

    class HookSink:  # the real sink, and a stop right after the fatal call's record is stored
        def __init__(self, inner):
            self.inner = inner
        def write(self, records):
            self.inner.write(records)
            for r in records:
                if r.metadata.get("worker") == name:
                    stop_here("recorded", r.metadata.get("call"))
        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    if store.startswith("redis://"):
        store = RedisStore(store, namespace=namespace)
    guard = BudgetGuard([Budget("g", limit=int(limit))], store=store, ledger=Ledger(HookSink(sink_for(ledger_spec))),
                        lease_seconds=float(lease))
    settle, asettle = guard.store.settle, guard.store.asettle
    def settle_then_maybe_stop(reservation_id, actuals):
        done = settle(reservation_id, actuals)
        stop_here("settled")
        return done
    async def asettle_then_maybe_stop(reservation_id, actuals):
        done = await asettle(reservation_id, actuals)
        stop_here("settled")
        return done
    guard.store.settle, guard.store.asettle = settle_then_maybe_stop, asettle_then_maybe_stop
    reserve, areserve = guard.store.reserve, guard.store.areserve
    def reserve_then_maybe_stop(request):  # a stop right after a reserve that swept leases
        result = reserve(request)
        if result.expired:
            stop_here("swept")
        return result
    async def areserve_then_maybe_stop(request):
        result = await areserve(request)
        if result.expired:
            stop_here("swept")
        return result
    guard.store.reserve, guard.store.areserve = reserve_then_maybe_stop, areserve_then_maybe_stop
    model = UsageFakeChatModel(model_name="gpt-4", input_tokens=7, replies=["one two three"],
                               on_call=lambda: stop_here("in_call"))

    async def main():
        if point == "swept":
            sys.stdin.readline()  # the parent says when the lease to sweep has run out
        for i in range(calls):
            state["call"] = i
            config = {"metadata": {"worker": name, "call": i}}
            if mode == "async":
                await (guard | model).ainvoke("hello", config)
            else:
                (guard | model).invoke("hello", config)
            print("done", i, flush=True)

    asyncio.run(main())
    """
)


def start_worker(target: tuple[str, str, str], name: str, calls: int, kill_at: int, point: str, mode: str) -> Any:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [*target, name, str(calls), str(kill_at), point, mode, str(LEASE), str(LIMIT)]
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, *args],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def sweep_and_read(target: tuple[str, str, str]) -> tuple[float, Any, list[Any]]:
    """Sweep with one more guarded call; return (store spend, ledger totals, records)."""
    store_url, namespace, ledger = target
    store: Any = RedisStore(store_url, namespace=namespace) if store_url.startswith("redis://") else store_url
    guard = BudgetGuard([Budget("g", limit=LIMIT)], store=store, ledger=ledger, lease_seconds=LEASE)
    model = UsageFakeChatModel(model_name="gpt-4", input_tokens=7, replies=["sweep"])
    (guard | model).invoke("hello", {"metadata": {"worker": "sweeper"}})
    guard.ledger.close()
    assert guard.store.sweep() == ()  # the call recorded and acknowledged every swept lease
    spent = LIMIT - guard.remaining("g")
    with open_ledger(ledger) as reader:
        return spent, reader.totals()[0], list(reader.records())


POINTS = ("in_call", "recorded", "settled")


def kill_three_of_four(target: tuple[str, str, str], mode: str) -> dict[str, int]:
    """Run the four workers, kill three; return how many calls each victim had completed."""
    completed = {}
    victims = {point: start_worker(target, point, KILLED_AFTER + 10, KILLED_AFTER, point, mode) for point in POINTS}
    survivor = start_worker(target, "survivor", SURVIVOR_CALLS, -1, "never", mode)
    try:
        for point, victim in victims.items():
            completed[point] = kill_when_ready(victim, point)
        out, err = survivor.communicate(timeout=120)
        assert survivor.returncode == 0, err
        assert out.count("done") == SURVIVOR_CALLS
    finally:
        stop(*victims.values(), survivor)
    return completed


def kill_when_ready(worker: Any, name: str) -> int:
    """Wait for a worker to stop where it was told to, SIGKILL it; return its completed calls."""
    assert worker.stdout is not None
    done = 0
    while (line := worker.stdout.readline()) and line.strip() != "READY":
        done += line.startswith("done")
    assert line.strip() == "READY", (name, worker.stderr.read() if worker.stderr else "")
    worker.send_signal(signal.SIGKILL)
    worker.wait(30)
    return done


def stop(*workers: Any) -> None:
    for proc in workers:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def kill_a_sweeper(target: tuple[str, str, str], mode: str) -> None:
    """Kill one worker in its call, and another right after its reserve swept that call's
    lease (the sweep committed in the store, its ``expired`` record not yet written)."""
    abandoned = start_worker(target, "abandoned", 1, 0, "in_call", mode)
    swept = start_worker(target, "swept", 1, 0, "swept", mode)  # waits for "go"
    try:
        kill_when_ready(abandoned, "abandoned")
        time.sleep(LEASE + 0.2)  # its lease runs out; nobody else is calling
        assert swept.stdin is not None
        swept.stdin.write("go\n")
        swept.stdin.flush()
        kill_when_ready(swept, "swept")
    finally:
        stop(abandoned, swept)


def check_agreement(target: tuple[str, str, str], completed: dict[str, int], mode: str) -> None:
    kill_a_sweeper(target, mode)
    time.sleep(LEASE + 0.2)  # the killed calls' leases run out
    spent, totals, records = sweep_and_read(target)
    assert totals.total_tokens == spent  # the ledger holds exactly what the store charged
    assert completed == dict.fromkeys(POINTS, KILLED_AFTER)
    run_ids = [r.run_id for r in records]
    reservations = SURVIVOR_CALLS + 3 * (KILLED_AFTER + 1) + 2 + 1  # + abandoned, swept, the sweeper's call
    assert len(run_ids) == len(set(run_ids)) == reservations
    # Killed after the settle: all its calls are in the ledger as they ended.
    assert [r.outcome for r in records if r.metadata.get("worker") == "settled"] == ["ok"] * (KILLED_AFTER + 1)
    # Killed before: the sweep charged each fatal reservation at its reserved amount, and the
    # ledger says so once; killed after recording, the charge replaced the call's own record,
    # which keeps what described the call.
    for point in ("in_call", "recorded"):
        assert [r.outcome for r in records if r.metadata.get("worker") == point] == ["ok"] * KILLED_AFTER + (
            ["expired"] if point == "recorded" else []
        )
    expired = [r for r in records if r.outcome == "expired"]
    assert len(expired) == 4
    # No record of their own: the in_call victim's fatal call, the abandoned call (its sweep
    # was committed by a worker that died before recording it: the store kept reporting it
    # until the last call recorded it) and that worker's own call.
    assert len([r for r in expired if not r.metadata]) == 3
    for swept in expired:
        assert swept.input_tokens + swept.output_tokens == swept.estimated_input_tokens + swept.estimated_output_tokens
    described = [r.metadata for r in expired if r.metadata]
    assert described == [{"worker": "recorded", "call": KILLED_AFTER}]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_at_any_point_leaves_sqlite_store_and_ledger_in_agreement(mode: str, tmp_path: Path) -> None:
    target = (f"sqlite:///{tmp_path / 'store.db'}", "", str(tmp_path / "ledger.sqlite3"))
    check_agreement(target, kill_three_of_four(target, mode), mode)


@pytest.mark.redis
@pytest.mark.postgres
def test_sigkill_at_any_point_leaves_redis_store_and_postgres_ledger_in_agreement(
    redis_server: Any, postgres_server: Any
) -> None:
    name = f"agree_{uuid.uuid4().hex[:10]}"
    target = (redis_server.url, name, postgres_server.create_database(name))
    check_agreement(target, kill_three_of_four(target, "sync"), "sync")


async def test_a_call_swept_while_it_runs_is_recorded_once_at_what_the_store_charged(
    run: Any, clock: Any, tmp_path: Path
) -> None:
    """A slow call outlives its lease; another process sweeps it, then the call ends.

    The store charged the sweep (the late settle changes nothing), so the ledger must hold
    one record for the call, with the sweep's charge and the call's own description.
    """
    store, ledger = f"sqlite:///{tmp_path / 'store.db'}", str(tmp_path / "ledger.sqlite3")
    slow = BudgetGuard([Budget("g", limit=LIMIT)], store=store, ledger=ledger, lease_seconds=30, clock=clock)
    other = BudgetGuard([Budget("g", limit=LIMIT)], store=store, ledger=ledger, lease_seconds=30, clock=clock)
    quick = UsageFakeChatModel(model_name="gpt-4", input_tokens=7, replies=["quick"])

    def outlive_the_lease() -> None:
        clock.advance(31)
        (other | quick).invoke("hello", {"metadata": {"worker": "other"}})  # its reserve sweeps

    model = UsageFakeChatModel(model_name="gpt-4", input_tokens=7, replies=["one two"], on_call=outlive_the_lease)
    await run.invoke(slow | model, "hello", {"metadata": {"worker": "slow"}})
    for guard in (slow, other):
        guard.ledger.close()
    with open_ledger(ledger) as reader:
        records = list(reader.records())
        total = reader.totals()[0].total_tokens
    assert total == LIMIT - slow.remaining("g")
    (swept,) = [r for r in records if r.metadata.get("worker") == "slow"]
    assert swept.outcome == "expired" and len(records) == 2
    assert swept.input_tokens + swept.output_tokens == swept.estimated_input_tokens + swept.estimated_output_tokens
