"""Store throughput: reserve+settle pairs per second, single thread, next to baselines.

Run by hand (starts its own redis-server on a free port; needs the test helper)::

    /work/venv/bin/python benchmarks/bench_stores.py [--rounds 7] [--ops 4000]

Each figure is the median of ``--rounds`` rounds of ``--ops`` operations, all in one run:

* memory   pairs/s                                   target >= 100k pairs/s
* sqlite   pairs/s  vs raw ``BEGIN IMMEDIATE; UPDATE; COMMIT`` per second on the same
  kind of file (WAL, synchronous=NORMAL)             target >= 0.4x
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

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
    """Stands in for a store's connection: records each statement, then runs it."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.log: list[tuple[str, tuple[object, ...]]] = []

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def execute(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Cursor:
        self.log.append((sql, tuple(params)))
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> sqlite3.Cursor:
        rows = list(rows)
        self.log.extend((sql, tuple(r)) for r in rows)
        return self.conn.executemany(sql, rows)

    def close(self) -> None:
        self.conn.close()


Log = list[tuple[str, tuple[object, ...]]]


def _wal_size(path: Path) -> int:
    wal = Path(f"{path}-wal")
    return wal.stat().st_size if wal.exists() else 0


def _pair_profile(
    path: Path, ops: int, reserve: Callable[[int], object], settle: Callable[[int], object]
) -> list[float]:
    """Mean us per reserve and per settle, then WAL pages each commit wrote."""
    clock = time.perf_counter
    times: list[list[float]] = [[], []]
    for i in range(ops):
        started = clock()
        reserve(i)
        middle = clock()
        settle(i)
        times[0].append(middle - started)
        times[1].append(clock() - middle)
    with sqlite3.connect(path) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    grew = [0, 0]
    for i in range(ops, ops + 200):
        before = _wal_size(path)
        reserve(i)
        middle = _wal_size(path)
        settle(i)
        grew[0] += middle - before
        grew[1] += _wal_size(path) - middle
    return [statistics.fmean(t) * 1e6 for t in times] + [g / 200 / (page_size + 24) for g in grew]


def _replay(conn: sqlite3.Connection, logs: list[Log], ops: int) -> list[list[float]]:
    """Run the statements of ``logs`` in turn, ``ops`` times; us per run of each statement."""
    execute, clock = conn.execute, time.perf_counter
    spent = [[0.0] * len(log) for log in logs]
    for _ in range(ops):
        for log, acc in zip(logs, spent):
            for k, (sql, params) in enumerate(log):
                started = clock()
                execute(sql, params).fetchall()
                acc[k] += clock() - started
    return [[seconds / ops * 1e6 for seconds in acc] for acc in spent]


def sqlite_breakdown(ops: int, workdir: Path) -> None:
    """Where a reserve and a settle spend their time, next to the raw transaction.

    Prints, per operation: the store's time (median), the statements it ran with the
    time each takes when replayed bare on a copy of the store's file (so the rest is
    Python: the store's code, the bucket arithmetic, the lease encoding), and the WAL
    pages its commit wrote.
    """
    from budgetguard.stores.sqlite import SQLiteStore

    path = workdir / "breakdown.db"
    store = SQLiteStore(path)
    charges = (Charge(BucketSpec("b", 1e15), 100.0),)
    recorder = _Recorder(store._connection())
    store._local.conn = recorder  # type: ignore[assignment]
    store.reserve(ReserveRequest("warm", charges, 600.0))
    store.settle("warm", [50.0])
    recorder.log.clear()
    store.reserve(ReserveRequest("probe", charges, 600.0))
    logs = [recorder.log]
    recorder.log = []
    store.settle("probe", [50.0])
    logs.append(recorder.log)
    store._local.conn = recorder.conn

    requests = [ReserveRequest(f"d-{i}", charges, 600.0) for i in range(ops + 200)]
    actuals = [50.0]
    ours = _pair_profile(
        path, ops, lambda i: store.reserve(requests[i]), lambda i: store.settle(requests[i].id, actuals)
    )
    store.close()

    bare_path = workdir / "bare.db"
    bare = sqlite3.connect(bare_path, isolation_level=None, cached_statements=64)
    bare.execute("PRAGMA journal_mode = WAL")
    bare.execute("PRAGMA synchronous = NORMAL")
    bare.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v REAL) WITHOUT ROWID")
    bare.execute("INSERT INTO t VALUES ('b', 0)")
    raw_log: Log = [("BEGIN IMMEDIATE", ()), ("UPDATE t SET v = v + 1 WHERE k = ?", ("b",)), ("COMMIT", ())]
    raw_pages = _pair_profile(bare_path, ops, lambda i: _replay(bare, [raw_log], 1), lambda i: None)[2]
    raw_statements = _replay(bare, [raw_log], ops)[0]
    bare.close()

    replay = sqlite3.connect(path, isolation_level=None, cached_statements=64)
    replay.execute("PRAGMA synchronous = NORMAL")  # as the store's connections (WAL is the file's)
    _replay(replay, logs, 100)  # warm up
    statements = _replay(replay, logs, ops)
    replay.close()

    print(f"\nsqlite breakdown, us per operation (mean of {ops}; statements replayed bare on the store's file)")
    print(f"  raw transaction: {sum(raw_statements):.1f} us, {raw_pages:.2f} WAL pages per commit")
    for sql, us in zip(raw_log, raw_statements):
        print(f"    {us:5.1f}  {sql[0]}")
    for name, log, spent, store_us, pages in zip(("reserve", "settle"), logs, statements, ours[:2], ours[2:]):
        total = sum(spent)
        print(
            f"  {name}: {store_us:.1f} us = {len(log)} statements {total:.1f} + Python {store_us - total:.1f}; "
            f"{pages:.2f} WAL pages per commit"
        )
        for (sql, _), us in zip(log, spent):
            print(f"    {us:5.1f}  {sql[:110]}")
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
            Charge(BucketSpec("per-model\x1fmodel=gpt", 1e15, 0.0, 0.0, 4e9), 100.0),
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
        line("sqlite pairs vs raw BEGIN IMMEDIATE/UPDATE/COMMIT", ours, raw, ">=0.4x")
        if args.sqlite_breakdown:
            with tempfile.TemporaryDirectory() as tmp:
                sqlite_breakdown(args.ops, Path(tmp))
    if "redis" in only:
        ours, raw, three, lim = bench_redis(args.rounds, args.ops)
        line("redis pairs vs raw EVALSHA 'return 1'", ours, raw, ">=0.45x")
        line("redis 3-bucket reserve vs limits moving-window hit", three, lim, ">=1.0x")


if __name__ == "__main__":
    main()
