"""Where a RedisStore reserve and settle spend their time, next to raw ``EVALSHA``; and how
many pairs a second it serves to 1, 16 and 64 concurrent clients, next to ``redis-benchmark``.

Run by hand (starts its own redis-server on a free port; needs the test helper and the
``redis-benchmark`` binary)::

    .venv/bin/python benchmarks/bench_redis_breakdown.py [--rounds 5] [--ops 2000] [--seconds 3]

**Part 1, one call at a time.** For each operation it prints, as medians over rounds
(rounds alternate between the operations, so the machine's drift hits all of them):

* ``wall``: microseconds per call as the caller sees it;
* ``cpu``: this process's CPU time per call (``time.process_time``): the client's Python;
* ``server``: the server's microseconds per call from ``INFO commandstats`` (``EVALSHA``),
  i.e. the script's own time inside Redis;
* ``rest``: wall minus cpu minus server: the network stack, wake-ups, waiting for a core.

Operations, sync (a store built from a URL: one framed write on its thread's connection):
raw ``EVALSHA 'return 1'`` through redis-py's ``evalsha`` and hand-framed on a held
connection; the **reserve script** and the **settle script** sent raw the store's own way
(the store's script object, with request payloads built before the timing: what is left
is the round trip and the script); ``reserve`` and ``settle`` of one bucket through the
store; a 3-bucket reserve (one with a ``day`` period rule); limits' moving-window ``hit``.
Async (one event loop, the store's pipeline): the reserve and settle scripts sent raw
through the store's pipeline, and ``areserve`` / ``asettle``. The target: each store call
costs at most 1.5x the CPU of its raw script sent the same way.

**Part 2, concurrent clients.** Reserve+settle pairs per second (one bucket, 1 bucket per
pair) for 1, 16 and 64 clients: async tasks on one event loop (one pipelined connection),
and threads (one connection each); then ``redis-benchmark -c N EVAL "return 1" 0`` on the
same server: the server's and the network's ceiling for one-round-trip scripts. A pair is
two round trips, so ``2 x pairs/s`` is the figure to set beside its EVAL rate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from budgetguard.periods import PeriodRule
from budgetguard.stores import BucketSpec, Charge, ReserveRequest

Op = Callable[[int], object]
Setup = Callable[[int], tuple[Op, Callable[[], None] | None]]
ONE = (Charge(BucketSpec("b", 1e15, 1000.0), 100.0),)
THREE = (
    Charge(BucketSpec("global", 1e15), 100.0),
    Charge(BucketSpec("per-user\x1fuser_id=alice", 1e15, 1000.0), 100.0),
    Charge(BucketSpec("per-model\x1fmodel=gpt", 1e15, 0.0, PeriodRule("day")), 100.0),
)


def _evalsha_stats(client: Any) -> tuple[int, int]:
    s = client.info("commandstats").get("cmdstat_evalsha", {"calls": 0, "usec": 0})
    return int(s["calls"]), int(s["usec"])


def measure(client: Any, ops: int, setup: Setup, r: int) -> tuple[float, float, float]:
    """wall, cpu and server us per call of one round of ``ops`` calls."""
    run, after = setup(r)
    calls0, usec0 = _evalsha_stats(client)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(ops):
        run(i)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    calls1, usec1 = _evalsha_stats(client)
    if after is not None:
        after()
    return wall / ops * 1e6, cpu / ops * 1e6, (usec1 - usec0) / max(calls1 - calls0, 1)


def sync_cases(store: Any, client: Any, ops: int) -> dict[str, Setup]:
    from limits import RateLimitItemPerSecond
    from limits.storage import RedisStorage
    from limits.strategies import MovingWindowRateLimiter

    url = f"redis://127.0.0.1:{client.connection_pool.connection_kwargs['port']}/0"
    sha = client.script_load("return 1")
    limiter = MovingWindowRateLimiter(RedisStorage(url))
    item = RateLimitItemPerSecond(10**9)
    limiter.hit(item, "alice")
    held = client.connection_pool.get_connection()  # the store's way: no checkout per call
    framed = [b"*3\r\n$7\r\nEVALSHA\r\n$40\r\n" + sha.encode() + b"\r\n$1\r\n0\r\n"]
    scripts, keys = store._sync_scripts(), store._keys

    def raw(r: int) -> tuple[Op, None]:
        evalsha = client.evalsha
        return (lambda i: evalsha(sha, 0)), None

    def raw_held(r: int) -> tuple[Op, None]:
        send, read = held.send_packed_command, held.read_response

        def run(i: int) -> None:
            send(framed)
            read()

        return run, None

    def raw_reserve(r: int) -> tuple[Op, None]:
        payloads = [store._reserve_payload(ReserveRequest(f"rr-{r}-{i}", ONE, 600.0)) for i in range(ops)]
        script = scripts.reserve
        return (lambda i: script(*keys, payloads[i])), None

    def raw_settle(r: int) -> tuple[Op, None]:  # settles what raw_reserve opened in this round
        payloads = [store._settle_payload(f"rr-{r}-{i}", [50.0]) for i in range(ops)]
        script = scripts.settle
        return (lambda i: script(*keys, payloads[i])), None

    def reserve1(r: int) -> tuple[Op, None]:
        requests = [ReserveRequest(f"p-{r}-{i}", ONE, 600.0) for i in range(ops)]
        reserve = store.reserve
        return (lambda i: reserve(requests[i])), None

    def settle1(r: int) -> tuple[Op, None]:  # settles the leases reserve1 opened in this round
        settle = store.settle
        actuals = [50.0]
        return (lambda i: settle(f"p-{r}-{i}", actuals)), None

    def reserve3(r: int) -> tuple[Op, Callable[[], None]]:
        requests = [ReserveRequest(f"t-{r}-{i}", THREE, 600.0) for i in range(ops)]
        reserve = store.reserve

        def after() -> None:
            for i in range(ops):
                store.settle(f"t-{r}-{i}", [100.0, 100.0, 100.0])

        return (lambda i: reserve(requests[i])), after

    def hit(r: int) -> tuple[Op, None]:
        h = limiter.hit
        return (lambda i: h(item, "alice")), None

    return {
        "raw EVALSHA 'return 1'": raw,
        "raw 'return 1', held conn": raw_held,
        "raw reserve script": raw_reserve,
        "reserve, 1 bucket": reserve1,
        "raw settle script": raw_settle,
        "settle, 1 bucket": settle1,
        "reserve, 3 buckets": reserve3,
        "limits hit": hit,
    }


def async_cases(store: Any, ops: int) -> dict[str, Callable[[int], Any]]:
    """Each case: round -> coroutine function of i (run one at a time on the store's loop)."""

    def scripts() -> Any:
        return store._async_scripts()

    def raw_reserve(r: int) -> Any:
        payloads = [store._reserve_payload(ReserveRequest(f"ar-{r}-{i}", ONE, 600.0)) for i in range(ops)]
        script = scripts().reserve
        return lambda i: script(*store._keys, payloads[i])

    def raw_settle(r: int) -> Any:
        payloads = [store._settle_payload(f"ar-{r}-{i}", [50.0]) for i in range(ops)]
        script = scripts().settle
        return lambda i: script(*store._keys, payloads[i])

    def areserve(r: int) -> Any:
        requests = [ReserveRequest(f"ap-{r}-{i}", ONE, 600.0) for i in range(ops)]
        return lambda i: store.areserve(requests[i])

    def asettle(r: int) -> Any:
        return lambda i: store.asettle(f"ap-{r}-{i}", [50.0])

    return {
        "raw reserve script": raw_reserve,
        "areserve, 1 bucket": areserve,
        "raw settle script": raw_settle,
        "asettle, 1 bucket": asettle,
    }


async def measure_async(client: Any, ops: int, make: Callable[[int], Any], r: int) -> tuple[float, float, float]:
    run = make(r)
    calls0, usec0 = _evalsha_stats(client)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(ops):
        await run(i)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    calls1, usec1 = _evalsha_stats(client)
    return wall / ops * 1e6, cpu / ops * 1e6, (usec1 - usec0) / max(calls1 - calls0, 1)


def table(title: str, names: list[str], samples: dict[str, list[tuple[float, float, float]]]) -> dict[str, float]:
    print(f"\n{title}")
    print(f"  {'operation':28} {'wall':>7} {'cpu':>7} {'server':>7} {'rest':>7}")
    cpu = {}
    for name in names:
        s = samples[name]
        wall, c, srv = (statistics.median(x[j] for x in s) for j in range(3))
        cpu[name] = c
        print(f"  {name:28} {wall:7.1f} {c:7.1f} {srv:7.1f} {wall - c - srv:7.1f}")
    return cpu


async def pairs_async(store: Any, clients: int, seconds: float, tag: str) -> float:
    stop = time.perf_counter() + seconds
    done = 0

    async def client(k: int) -> None:
        nonlocal done
        i = 0
        while time.perf_counter() < stop:
            rid = f"{tag}-{k}-{i}"
            await store.areserve(ReserveRequest(rid, ONE, 600.0))
            await store.asettle(rid, [50.0])
            i += 1
        done += i

    started = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    return done / (time.perf_counter() - started)


def pairs_threads(store: Any, clients: int, seconds: float, tag: str) -> float:
    stop = time.perf_counter() + seconds
    counts = [0] * clients

    def client(k: int) -> None:
        i = 0
        while time.perf_counter() < stop:
            rid = f"{tag}-{k}-{i}"
            store.reserve(ReserveRequest(rid, ONE, 600.0))
            store.settle(rid, [50.0])
            i += 1
        counts[k] = i

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - started)


def redis_benchmark(port: int, clients: int, requests: int) -> float:
    binary = shutil.which("redis-benchmark") or "/usr/bin/redis-benchmark"
    out = subprocess.run(
        [binary, "-p", str(port), "-c", str(clients), "-n", str(requests), "-q", "EVAL", "return 1", "0"],
        check=True, capture_output=True, text=True,
    ).stdout
    found = re.findall(r"([\d.]+) requests per second", out)
    return float(found[-1])


def main() -> None:
    import redis
    from redis_server import RedisServer

    from budgetguard.stores.redis import RedisStore

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=3.0, help="per concurrency level and kind of client")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f} (2 cores)")

    with RedisServer() as server:
        print(server.binary, subprocess.run([server.binary, "--version"], check=True, capture_output=True, text=True).stdout.split()[2])
        store = RedisStore(server.url, namespace="bench")
        client = redis.Redis.from_url(server.url)

        # Part 1, sync.
        cases = sync_cases(store, client, args.ops)
        samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in cases}
        for r in range(args.rounds + 1):
            for name, setup in cases.items():
                m = measure(client, args.ops, setup, r)
                if r:  # round 0 warms
                    samples[name].append(m)
        sync_cpu = table(
            f"sync, one call at a time: median of {args.rounds} rounds x {args.ops} calls, us per call",
            list(cases), samples,
        )

        # Part 1, async.
        async def part1_async() -> dict[str, list[tuple[float, float, float]]]:
            acases = async_cases(store, args.ops)
            out: dict[str, list[tuple[float, float, float]]] = {name: [] for name in acases}
            await store.asnapshot(ONE[0].bucket)  # the loop's client and pipeline
            for r in range(args.rounds + 1):
                for name, make in acases.items():
                    m = await measure_async(client, args.ops, make, r)
                    if r:
                        out[name].append(m)
            await store.aclose()
            return out

        asamples = asyncio.run(part1_async())
        async_cpu = table("async (the store's pipeline), one call at a time, us per call", list(asamples), asamples)
        print("\nclient CPU of a store call over its raw script sent the same way (target <= 1.5x):")
        for label, cpu, pairs in (
            ("sync ", sync_cpu, (("reserve, 1 bucket", "raw reserve script"), ("settle, 1 bucket", "raw settle script"))),
            ("async", async_cpu, (("areserve, 1 bucket", "raw reserve script"), ("asettle, 1 bucket", "raw settle script"))),
        ):
            for call, raw in pairs:
                print(f"  {label} {call:20} {cpu[call]:6.1f} us / {cpu[raw]:6.1f} us = {cpu[call] / cpu[raw]:.2f}x")

        # Part 2: concurrent clients, one run.
        print(f"\nreserve+settle pairs per second, {args.seconds:g} s per figure, load {os.getloadavg()[0]:.2f}")
        print(f"  {'clients':>7} {'async pairs/s':>14} {'thread pairs/s':>15} {'redis-benchmark EVAL/s':>23} "
              f"{'2 x async / EVAL':>17}")
        for n in (1, 16, 64):
            apairs = asyncio.run(pairs_async(RedisStore(server.url, namespace="bench"), n, args.seconds, f"a{n}"))
            threaded = RedisStore(server.url, namespace="bench")
            tpairs = pairs_threads(threaded, n, args.seconds, f"t{n}")
            threaded.close()
            evals = redis_benchmark(server.port, n, 100_000)
            print(f"  {n:>7} {apairs:>14,.0f} {tpairs:>15,.0f} {evals:>23,.0f} {2 * apairs / evals:>17.2f}")
        client.close()
        store.close()
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
