"""Store throughput: reserve+settle pairs per second, single thread, next to baselines.

Run by hand (starts its own redis-server on a free port; needs the test helper)::

    /work/venv/bin/python benchmarks/bench_stores.py [--rounds 7] [--ops 4000]

Each figure is the median of ``--rounds`` rounds of ``--ops`` operations, all in one run:

* memory   pairs/s                                   target >= 100k pairs/s
* sqlite   pairs/s  vs raw ``BEGIN IMMEDIATE; UPDATE; COMMIT`` per second on the same
  kind of file (WAL, synchronous=NORMAL)             (the 0.4x target is retired: issue 13)
* redis    pairs/s  vs raw redis-py EVALSHA of ``return 1`` on the same server
                                                     target >= 0.45x
* redis    3-bucket reserves/s vs ``limits`` MovingWindowRateLimiter.hit on the same
  server                                             target >= 1.0x
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from budgetguard.periods import PeriodRule  # noqa: E402
from budgetguard.stores import BucketSpec, Charge, MemoryStore, ReserveRequest  # noqa: E402

Setup = Callable[[int], Callable[[int], None]]


def rates(rounds: int, ops: int, *setups: Setup) -> list[float]:
    """Median ops/s of each setup; rounds alternate between them (the machine's speed drifts).

    ``setup(round)`` prepares a round and returns ``run(i)``, which is timed ``ops`` times.
    Round 0 of each only warms up.
    """
    samples: list[list[float]] = [[] for _ in setups]
    for r in range(rounds + 1):
        for k, setup in enumerate(setups):
            run = setup(r)
            started = time.perf_counter()
            for i in range(ops):
                run(i)
            elapsed = time.perf_counter() - started
            if r:
                samples[k].append(ops / elapsed)
    return [statistics.median(s) for s in samples]


def pairs(store: object, tag: str, charges: tuple[Charge, ...]) -> Setup:
    reserve, settle = store.reserve, store.settle  # type: ignore[attr-defined]
    actuals = [c.amount / 2 for c in charges]

    def setup(r: int) -> Callable[[int], None]:
        def run(i: int) -> None:
            rid = f"{tag}-{r}-{i}"
            reserve(ReserveRequest(rid, charges, 600.0))
            settle(rid, actuals)

        return run

    return setup


def bench_memory(rounds: int, ops: int) -> float:
    store = MemoryStore()
    return rates(rounds, ops * 10, pairs(store, "m", (Charge(BucketSpec("b", 1e15), 100.0),)))[0]


def bench_sqlite(rounds: int, ops: int, workdir: Path) -> tuple[float, float]:
    from budgetguard.stores.sqlite import SQLiteStore

    store = SQLiteStore(workdir / "store.db")  # WAL, synchronous=NORMAL (the defaults)
    conn = sqlite3.connect(workdir / "raw.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v REAL) WITHOUT ROWID")
    conn.execute("INSERT INTO t VALUES ('b', 0)")

    def raw_setup(r: int) -> Callable[[int], None]:
        execute = conn.execute

        def run(i: int) -> None:
            execute("BEGIN IMMEDIATE")
            execute("UPDATE t SET v = v + 1 WHERE k = ?", ("b",))
            execute("COMMIT")

        return run

    ours, raw = rates(rounds, ops, pairs(store, "s", (Charge(BucketSpec("b", 1e15), 100.0),)), raw_setup)
    store.close()
    conn.close()
    return ours, raw


class _Recorder:
    """Stands in for a store's write cursor: records each statement, then runs it."""

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self.cursor = cursor
        self.connection = cursor.connection
        self.log: list[tuple[str, tuple[object, ...]]] = []

    def execute(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Cursor:
        self.log.append((sql, tuple(params)))
        return self.cursor.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> sqlite3.Cursor:
        rows = list(rows)
        self.log.extend((sql, tuple(r)) for r in rows)
        return self.cursor.executemany(sql, rows)


Log = list[tuple[str, tuple[object, ...]]]


def _wal_size(path: Path) -> int:
    wal = Path(f"{path}-wal")
    return wal.stat().st_size if wal.exists() else 0


def _pair_times(ops: int, reserve: Callable[[int], object], settle: Callable[[int], object]) -> list[float]:
    """Mean us per reserve and per settle over ``ops`` pairs."""
    clock = time.perf_counter
    spent = [0.0, 0.0]
    for i in range(ops):
        started = clock()
        reserve(i)
        middle = clock()
        settle(i)
        spent[0] += middle - started
        spent[1] += clock() - middle
    return [seconds / ops * 1e6 for seconds in spent]


def _wal_pages(
    path: Path, pairs: int, reserve: Callable[[int], object], settle: Callable[[int], object]
) -> list[float]:
    """WAL pages (frames) the commit of a reserve and of a settle wrote, on average.

    Keep ``pairs`` small: once 1000 frames are written, a checkpoint lets the WAL restart
    from its beginning and its size stops telling how much was written.
    """
    with sqlite3.connect(path) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    grew = [0, 0]
    for i in range(pairs):
        before = _wal_size(path)
        reserve(i)
        middle = _wal_size(path)
        settle(i)
        grew[0] += middle - before
        grew[1] += _wal_size(path) - middle
    return [g / pairs / (page_size + 24) for g in grew]


def _replay(execute: Callable[..., sqlite3.Cursor], logs: list[Log], ops: int) -> list[list[float]]:
    """Run the statements of ``logs`` in turn, ``ops`` times; us per run of each statement."""
    clock = time.perf_counter
    spent = [[0.0] * len(log) for log in logs]
    for _ in range(ops):
        for log, acc in zip(logs, spent, strict=True):
            for k, (sql, params) in enumerate(log):
                started = clock()
                execute(sql, params).fetchall()
                acc[k] += clock() - started
    return [[seconds / ops * 1e6 for seconds in acc] for acc in spent]


def _record(store: Any, charges: tuple[Charge, ...]) -> list[Log]:
    """The statements (with parameters) of one reserve and of one settle of ``store``."""
    recorder = _Recorder(store._cursor())
    store._local.cursor = recorder
    store.reserve(ReserveRequest("warm", charges, 600.0))
    store.settle("warm", [50.0])
    recorder.log.clear()
    store.reserve(ReserveRequest("probe", charges, 600.0))
    logs = [recorder.log]
    recorder.log = []
    store.settle("probe", [50.0])
    logs.append(recorder.log)
    store._local.cursor = recorder.cursor
    return logs


def _bare(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, cached_statements=64)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")  # as the store's connections
    return conn


def sqlite_breakdown(rounds: int, ops: int, workdir: Path) -> None:
    """Where a reserve and a settle spend their time, next to the raw transaction.

    Prints, per operation: the store's time, the statements it ran with the time each
    takes when replayed bare on the store's file (so the rest is Python: the store's
    code, the bucket arithmetic, the lease encoding), and the WAL pages its commit wrote.
    Each round times the store, its statements replayed and the raw transaction in turn;
    the figures are medians over rounds of per-round means.
    """
    from budgetguard.stores.sqlite import SQLiteStore

    path = workdir / "breakdown.db"
    store = SQLiteStore(path)
    charges = (Charge(BucketSpec("b", 1e15), 100.0),)
    logs = _record(store, charges)
    replay = _bare(path)
    replay_cursor = replay.cursor()
    raw = _bare(workdir / "bare.db")
    raw.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v REAL) WITHOUT ROWID")
    raw.execute("INSERT INTO t VALUES ('b', 0)")
    raw_log: Log = [("BEGIN IMMEDIATE", ()), ("UPDATE t SET v = v + 1 WHERE k = ?", ("b",)), ("COMMIT", ())]

    actuals = [50.0]
    samples: list[tuple[list[float], list[list[float]], list[float]]] = []
    for r in range(rounds + 1):
        requests = [ReserveRequest(f"d-{r}-{i}", charges, 600.0) for i in range(ops)]  # built before timing
        ours = _pair_times(
            ops,
            lambda i, requests=requests: store.reserve(requests[i]),
            lambda i, requests=requests: store.settle(requests[i].id, actuals),
        )
        bare = _replay(replay_cursor.execute, logs, ops)  # the store reuses one cursor too
        baseline = _replay(raw.execute, [raw_log], ops)[0]
        if r:  # round 0 warms up
            samples.append((ours, bare, baseline))
    pages = _wal_pages(
        path,
        100,
        lambda i: store.reserve(ReserveRequest(f"w-{i}", charges, 600.0)),
        lambda i: store.settle(f"w-{i}", actuals),
    )
    raw_pages = _wal_pages(workdir / "bare.db", 100, lambda i: _replay(raw.execute, [raw_log], 1), lambda i: None)[0]
    store.close()
    replay.close()
    raw.close()

    def median(pick: Callable[[tuple[list[float], list[list[float]], list[float]]], float]) -> float:
        return statistics.median(pick(sample) for sample in samples)

    raw_us = [median(lambda s, k=k: s[2][k]) for k in range(len(raw_log))]
    print(f"\nsqlite breakdown, us per operation (median of {rounds} rounds x {ops}; statements replayed bare)")
    print(f"  raw transaction: {sum(raw_us):.1f} us, {raw_pages:.2f} WAL pages per commit")
    for (sql, _), us in zip(raw_log, raw_us, strict=True):
        print(f"    {us:5.1f}  {sql}")
    pair_store = pair_statements = 0.0
    for n, (name, log) in enumerate(zip(("reserve", "settle"), logs, strict=True)):
        store_us = median(lambda s, n=n: s[0][n])
        each = [median(lambda s, n=n, k=k: s[1][n][k]) for k in range(len(log))]
        pair_store += store_us
        pair_statements += sum(each)
        print(
            f"  {name}: {store_us:.1f} us = {len(log)} statements {sum(each):.1f} + Python {store_us - sum(each):.1f}; "
            f"{pages[n]:.2f} WAL pages per commit"
        )
        for (sql, _), us in zip(log, each, strict=True):
            print(f"    {us:5.1f}  {sql[:110]}")
    print(
        f"  pair: {pair_store:.1f} us = statements {pair_statements:.1f} + Python {pair_store - pair_statements:.1f}; "
        f"raw / pair {sum(raw_us) / pair_store:.2f}x, with no Python at all {sum(raw_us) / pair_statements:.2f}x"
    )
    print("  (a COMMIT's time includes its share of WAL checkpoints, one per 1000 pages written)")


def bench_redis(rounds: int, ops: int) -> tuple[float, float, float, float]:
    import redis
    from limits import RateLimitItemPerSecond
    from limits.storage import RedisStorage
    from limits.strategies import MovingWindowRateLimiter
    from redis_server import RedisServer

    from budgetguard.stores.redis import RedisStore

    with RedisServer() as server:
        store = RedisStore(server.url, namespace="bench")
        client = redis.Redis.from_url(server.url)
        sha = client.script_load("return 1")

        def raw_setup(r: int) -> Callable[[int], None]:
            evalsha = client.evalsha
            return lambda i: evalsha(sha, 0)

        ours, raw = rates(rounds, ops, pairs(store, "r", (Charge(BucketSpec("b", 1e15), 100.0),)), raw_setup)

        three = (
            Charge(BucketSpec("global", 1e15), 100.0),
            Charge(BucketSpec("per-user\x1fuser_id=alice", 1e15, 1000.0), 100.0),
            Charge(BucketSpec("per-model\x1fmodel=gpt", 1e15, 0.0, PeriodRule("day")), 100.0),
        )

        def three_setup(r: int) -> Callable[[int], None]:
            client.delete("{bench}:state", "{bench}:expiries")  # start each round with no open leases
            reserve = store.reserve
            return lambda i: reserve(ReserveRequest(f"t-{r}-{i}", three, 600.0))

        limiter = MovingWindowRateLimiter(RedisStorage(server.url))
        item = RateLimitItemPerSecond(10**9)

        def limits_setup(r: int) -> Callable[[int], None]:
            hit = limiter.hit
            return lambda i: hit(item, "alice")

        three_rate, limits_rate = rates(rounds, ops, three_setup, limits_setup)
        store.close()
        client.close()
        return ours, raw, three_rate, limits_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ops", type=int, default=4000)
    parser.add_argument("--only", choices=["memory", "sqlite", "redis"], action="append")
    parser.add_argument(
        "--sqlite-breakdown", action="store_true", help="also print where a SQLite reserve and settle spend time"
    )
    args = parser.parse_args()
    only = set(args.only or ["memory", "sqlite", "redis"])
    print(f"python {sys.version.split()[0]}, sqlite {sqlite3.sqlite_version}, {os.cpu_count()} cores")
    print(f"median of {args.rounds} rounds x {args.ops} ops (memory: x10)\n")
    print(f"{'what':46} {'rate/s':>10} {'baseline/s':>11} {'ratio':>6} {'target':>7}")

    def line(what: str, rate: float, base: float | None = None, target: str = "") -> None:
        ratio = f"{rate / base:.2f}x" if base else ""
        print(
            f"{what:46} {rate:>10,.0f} {'' if base is None else f'{base:,.0f}':>11} {ratio:>6} {target:>7}", flush=True
        )

    if "memory" in only:
        line("memory reserve+settle pairs", bench_memory(args.rounds, args.ops), target=">=100k")
    if "sqlite" in only:
        with tempfile.TemporaryDirectory() as tmp:
            ours, raw = bench_sqlite(args.rounds, args.ops, Path(tmp))
        line("sqlite pairs vs raw BEGIN IMMEDIATE/UPDATE/COMMIT", ours, raw)
        if args.sqlite_breakdown:
            with tempfile.TemporaryDirectory() as tmp:
                sqlite_breakdown(args.rounds, args.ops, Path(tmp))
    if "redis" in only:
        ours, raw, three, lim = bench_redis(args.rounds, args.ops)
        line("redis pairs vs raw EVALSHA 'return 1'", ours, raw, ">=0.45x")
        line("redis 3-bucket reserve vs limits moving-window hit", three, lim, ">=1.0x")


if __name__ == "__main__":
    main()
