"""Benchmark the ledger: cost of ``Ledger.record()`` on the call path, and SQLite throughput.

Run from the repository root::

    PYTHONPATH=. python benchmarks/bench_ledger.py [--calls 200000] [--sustained 100000]

Measures, in one process and one run:

* ``record()`` median nanoseconds per call, against a no-op method called the same way
  (the baseline is the cost of a Python method call itself); once with the writer idle
  (batch size and interval large, so only the enqueue is timed) and once with the
  background writer draining into SQLite at the same time (GIL contention included);
* sustained records/second into a SQLite file: record N records, then ``flush()``;
* raw ``SQLiteSink.write`` throughput in batches of 256 (no queue, no thread).
"""

from __future__ import annotations

import argparse
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from budgetguard.ledger import Ledger, LedgerRecord, SQLiteSink

CHUNK = 1000


def make_records(n: int) -> list[LedgerRecord]:
    return [
        LedgerRecord(
            ts=1793491200.0 + i * 0.01,
            run_id=f"run-{i}",
            root_run_id=f"root-{i // 4}",
            parent_run_id=f"root-{i // 4}",
            scope={"user_id": f"user-{i % 50}"},
            tags=("prod", "bench"),
            metadata={"feature": ("chat", "search", "summarizer")[i % 3]},
            model_requested="gpt-4o",
            model_used="gpt-4o-mini" if i % 10 == 0 else "gpt-4o",
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
        for i in range(n)
    ]


class NoOp:
    def record(self, rec: LedgerRecord) -> None:
        pass


def per_call_ns(target: Any, records: list[LedgerRecord]) -> float:
    """Median over chunks of CHUNK calls of the time per call, in ns."""
    record = target.record
    samples = []
    for start in range(0, len(records) - CHUNK + 1, CHUNK):
        chunk = records[start : start + CHUNK]
        t0 = time.perf_counter_ns()
        for rec in chunk:
            record(rec)
        samples.append((time.perf_counter_ns() - t0) / CHUNK)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200_000, help="records for the per-call timing")
    parser.add_argument("--sustained", type=int, default=100_000, help="records for the throughput runs")
    args = parser.parse_args()
    records = make_records(max(args.calls, args.sustained))
    results: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        noop = per_call_ns(NoOp(), records[: args.calls])

        idle = Ledger(SQLiteSink(Path(tmp) / "idle.sqlite3"), batch_size=10**9, flush_interval=3600, max_pending=10**9)
        idle_ns = per_call_ns(idle, records[: args.calls])
        idle.close()

        busy = Ledger(SQLiteSink(Path(tmp) / "busy.sqlite3"), max_pending=10**9)
        busy_ns = per_call_ns(busy, records[: args.calls // 4])
        busy.close()
        assert busy.dropped == 0

        led = Ledger(SQLiteSink(Path(tmp) / "sustained.sqlite3"))
        t0 = time.perf_counter()
        for rec in records[: args.sustained]:
            led.record(rec)
        led.flush()
        sustained = args.sustained / (time.perf_counter() - t0)
        assert led.totals()[0].calls == args.sustained
        led.close()

        sink = SQLiteSink(Path(tmp) / "raw.sqlite3")
        t0 = time.perf_counter()
        for start in range(0, args.sustained, 256):
            sink.write(records[start : start + 256])
        raw = args.sustained / (time.perf_counter() - t0)
        sink.close()

    results += [
        ("no-op method call (baseline), median ns/call", f"{noop:,.0f}"),
        ("`Ledger.record()`, writer idle, median ns/call", f"{idle_ns:,.0f} (+{idle_ns - noop:,.0f} over baseline)"),
        (
            f"`Ledger.record()`, writer draining to SQLite meanwhile ({args.calls // 4:,} calls), median ns/call",
            f"{busy_ns:,.0f} (+{busy_ns - noop:,.0f})",
        ),
        (f"sustained `record()` + `flush()` into SQLite, {args.sustained:,} records", f"{sustained:,.0f} records/s"),
        ("raw `SQLiteSink.write`, batches of 256", f"{raw:,.0f} records/s"),
    ]
    print(
        f"python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, {platform.machine()}, "
        f"{platform.system()}; per-call timings: {args.calls:,} calls in chunks of {CHUNK}\n"
    )
    print("| measurement | result |\n| --- | --- |")
    for name, value in results:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
