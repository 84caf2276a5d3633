"""Benchmark the ledger: what a durable record costs a model call, and what group commit buys.

Run from the repository root (starts its own redis-server and PostgreSQL, as the tests do)::

    .venv/bin/python benchmarks/bench_ledger.py [--rounds 7] [--ops 1500] [--threads 8]

All in one run, the setups of each table alternating round by round (the machine's speed
drifts), medians over ``--rounds`` rounds after a warm-up round:

0. A guarded call (``guard | model``, a fake in-process model, the memory store), with no
   ledger and with a SQLite file or PostgreSQL ledger: what a user's call pays.
1. Store reserve+settle pairs per second, single thread, without a ledger and with the
   ledger write between them, in the guard's order (reserve, record, settle):
   SQLite store with a SQLite ledger file (one machine); Redis store with a SQLite ledger
   file (each machine its own) and with a PostgreSQL ledger (shared). The cost per call
   is the difference of the times per pair.
2. ``Ledger.record()`` alone, one thread: into memory (an in-memory SQLite ledger), a
   SQLite file (WAL, ``synchronous=NORMAL``: a commit survives the process) and PostgreSQL
   (``fsync`` and ``synchronous_commit`` on: a commit survives the machine).
3. Group commit: records per second with 1 and ``--threads`` threads recording at once,
   and how many records each write carried.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench_stores import pairs, rates  # noqa: E402  (same interleaving, same reserve+settle loop)

from budgetguard.ledger import Ledger, LedgerRecord  # noqa: E402
from budgetguard.ledger_postgres import PostgresSink  # noqa: E402
from budgetguard.ledger_sinks import MemorySink, SQLiteSink  # noqa: E402
from budgetguard.stores import BucketSpec, Charge, ReserveRequest  # noqa: E402

Setup = Callable[[int], Callable[[int], None]]
CHARGES = (Charge(BucketSpec("b", 1e15), 100.0),)
TEMPLATE = LedgerRecord(
    ts=1793491200.0,
    run_id="template",
    root_run_id="root-1",
    parent_run_id="root-1",
    scope={"user_id": "user-7"},
    tags=("prod",),
    metadata={"feature": "chat"},
    model_requested="gpt-4o",
    model_used="gpt-4o",
    policy=None,
    outcome="ok",
    estimated_input_tokens=1200,
    estimated_output_tokens=500,
    input_tokens=1100,
    output_tokens=320,
    cached_input_tokens=0,
    reasoning_tokens=0,
    cost_usd=0.00595,
    reserved_usd=0.008,
    latency_s=0.8,
    budgets=("per-user", "global"),
)


def records(tag: str, n: int) -> list[LedgerRecord]:
    """``n`` realistic records with distinct run ids (built before timing)."""
    return [replace(TEMPLATE, run_id=f"{tag}-{i}", ts=TEMPLATE.ts + i) for i in range(n)]


def pairs_with_ledger(store: Any, ledger: Ledger, tag: str, ops: int) -> Setup:
    """Reserve, record (stored on return), settle: what the guard does per call."""
    reserve, settle, record = store.reserve, store.settle, ledger.record
    actuals = [c.amount / 2 for c in CHARGES]

    def setup(r: int) -> Callable[[int], None]:
        recs = records(f"{tag}-{r}", ops)

        def run(i: int) -> None:
            rec = recs[i]
            reserve(ReserveRequest(rec.run_id, CHARGES, 600.0))
            record(rec)
            settle(rec.run_id, actuals)

        return run

    return setup


def record_only(ledger: Ledger, tag: str, ops: int) -> Setup:
    def setup(r: int) -> Callable[[int], None]:
        recs = records(f"{tag}-{r}", ops)
        record = ledger.record
        return lambda i: record(recs[i])

    return setup


def latencies(ledger: Ledger, tag: str, n: int) -> tuple[float, float]:
    """Median and 99th percentile of single ``record()`` calls, µs (a SQLite file's WAL
    checkpoints, which ``fsync``, land on a few calls: the mean above includes them)."""
    times = []
    clock = time.perf_counter
    for rec in records(tag, n):
        started = clock()
        ledger.record(rec)
        times.append((clock() - started) * 1e6)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99)]


class CountingSink:
    """Forwards to a sink and counts its writes (how many records share a commit)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.writes, self.records = inner, 0, 0

    def write(self, recs: Sequence[LedgerRecord]) -> None:
        self.inner.write(recs)
        self.writes += 1
        self.records += len(recs)

    def close(self) -> None:
        self.inner.close()


def concurrent_rate(make_sink: Callable[[], Any], threads: int, per_thread: int, tag: str) -> tuple[float, float]:
    """Records/s with ``threads`` threads recording at once, and records per sink write."""
    sink = CountingSink(make_sink())
    ledger = Ledger(sink)
    batches = [records(f"{tag}-{t}", per_thread) for t in range(threads)]
    barrier = threading.Barrier(threads + 1)

    def work(recs: list[LedgerRecord]) -> None:
        barrier.wait()
        for rec in recs:
            ledger.record(rec)

    workers = [threading.Thread(target=work, args=(b,)) for b in batches]
    for w in workers:
        w.start()
    barrier.wait()
    started = time.perf_counter()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    ledger.close()
    assert ledger.dropped == 0
    return threads * per_thread / elapsed, sink.records / max(sink.writes, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ops", type=int, default=1500, help="pairs or records per round")
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    rounds, ops = args.rounds, args.ops

    from postgres_server import PostgresServer
    from redis_server import RedisServer

    from budgetguard.stores.redis import RedisStore
    from budgetguard.stores.sqlite import SQLiteStore

    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as redis, PostgresServer() as pg:
        work = Path(tmp)
        pg_url = pg.create_database("bench")

        def pair_row(name: str, bare: float, with_ledger: float) -> None:
            cost = (1 / with_ledger - 1 / bare) * 1e6
            rows.append((f"{name}: pairs/s without a ledger", f"{bare:,.0f} ({1e6 / bare:,.0f} µs/pair)"))
            rows.append(
                (
                    f"{name}: pairs/s with the ledger write",
                    f"{with_ledger:,.0f} ({with_ledger / bare:.2f}x; +{cost:,.0f} µs per call)",
                )
            )

        # 0. a guarded call
        from budgetguard import Budget, BudgetGuard
        from budgetguard.testing.fake_models import UsageFakeChatModel

        def guarded(ledger: Any) -> Setup:
            guard = BudgetGuard([Budget("g", limit=1e15)], ledger=ledger)
            chain = guard | UsageFakeChatModel(model_name="gpt-4", input_tokens=12, replies=["fine"])
            return lambda r: lambda i: chain.invoke("hello")

        calls = max(ops // 3, 100)
        none, in_file, in_pg = rates(
            rounds,
            calls,
            guarded(False),
            guarded(Ledger(SQLiteSink(work / "guard.sqlite3"))),
            guarded(Ledger(PostgresSink(pg_url, schema="guard"))),
        )
        for name, rate in (("no ledger", none), ("a SQLite ledger file", in_file), ("a PostgreSQL ledger", in_pg)):
            extra = "" if rate is none else f" ({(1 / rate - 1 / none) * 1e6:+,.0f} µs per call)"
            rows.append((f"`guard | model` invoke, memory store, {name}", f"{1e6 / rate:,.0f} µs/call{extra}"))

        # 1. store pairs, without and with the ledger write
        store = SQLiteStore(work / "store.db")
        file_ledger = Ledger(SQLiteSink(work / "pairs.sqlite3"))
        bare, with_ledger = rates(
            rounds, ops, pairs(store, "s", CHARGES), pairs_with_ledger(store, file_ledger, "sl", ops)
        )
        pair_row("SQLite store + SQLite ledger", bare, with_ledger)
        store.close()
        file_ledger.close()

        rstore = RedisStore(redis.url, namespace="bench")
        file_ledger = Ledger(SQLiteSink(work / "redis-pairs.sqlite3"))
        pg_ledger = Ledger(PostgresSink(pg_url, schema="pairs"))
        bare, with_file, with_pg = rates(
            rounds,
            ops,
            pairs(rstore, "r", CHARGES),
            pairs_with_ledger(rstore, file_ledger, "rl", ops),
            pairs_with_ledger(rstore, pg_ledger, "rp", ops),
        )
        pair_row("Redis store + SQLite ledger", bare, with_file)
        rows.append(
            (
                "Redis store + PostgreSQL ledger: pairs/s with the ledger write",
                f"{with_pg:,.0f} ({with_pg / bare:.2f}x; +{(1 / with_pg - 1 / bare) * 1e6:,.0f} µs per call)",
            )
        )
        rstore.close()
        file_ledger.close()
        pg_ledger.close()

        # 2. record() alone, one thread
        ledgers = {
            "memory (in-memory SQLite)": Ledger(MemorySink()),
            "SQLite file": Ledger(SQLiteSink(work / "alone.sqlite3")),
            "PostgreSQL": Ledger(PostgresSink(pg_url, schema="alone")),
        }
        alone = rates(rounds, ops, *(record_only(led, f"a{n}", ops) for n, led in enumerate(ledgers.values())))
        for (name, led), rate in zip(ledgers.items(), alone):
            median, p99 = latencies(led, f"lat{name}", ops * 2)
            rows.append(
                (
                    f"`Ledger.record()` alone into {name}, one thread",
                    f"{1e6 / rate:,.1f} µs/record (each: median {median:,.1f} µs, p99 {p99:,.0f} µs)",
                )
            )
            led.close()

        # 3. group commit: 1 thread and many, alternating, three times each
        fresh = itertools.count()
        for name, make in (
            ("SQLite file", lambda: SQLiteSink(work / f"group{next(fresh)}.sqlite3")),
            ("PostgreSQL", lambda: PostgresSink(pg_url, schema=f"group{next(fresh)}")),
        ):
            single, several, shared = [], [], []
            for r in range(3):
                single.append(concurrent_rate(make, 1, ops, f"g1-{r}")[0])
                rate, per_write = concurrent_rate(make, args.threads, ops, f"gn-{r}")
                several.append(rate)
                shared.append(per_write)
            one, many = statistics.median(single), statistics.median(several)
            rows.append(
                (
                    f"{name}: records/s, 1 thread vs {args.threads} threads at once",
                    f"{one:,.0f} vs {many:,.0f} ({many / one:.1f}x; {statistics.median(shared):.1f} records per write)",
                )
            )

    load = os.getloadavg()
    print(
        f"python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, {platform.machine()}, "
        f"{os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"{rounds} rounds of {ops} ops, medians\n"
    )
    print("| measurement | result |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
