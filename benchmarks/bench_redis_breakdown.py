"""Where a RedisStore reserve and settle spend their time, next to raw ``EVALSHA 'return 1'``.

Run by hand (starts its own redis-server on a free port; needs the test helper)::

    /work/venv/bin/python benchmarks/bench_redis_breakdown.py [--rounds 5] [--ops 2000]

For each operation it prints, as medians over rounds (rounds alternate between the
operations, so the machine's drift hits all of them):

* ``wall``: microseconds per call as the caller sees it;
* ``cpu``: this process's CPU time per call (``time.process_time``): the client's Python
  (building arguments, redis-py's command path, parsing the reply);
* ``server``: the server's microseconds per call from ``INFO commandstats`` (``EVALSHA``),
  i.e. the script's own time inside Redis;
* ``rest``: wall minus cpu minus server: the network stack, wake-ups, waiting for a core.

Operations: raw EVALSHA of ``return 1`` (through redis-py's ``evalsha`` as in
``bench_stores.py``'s baseline, and hand-framed on a held connection, the way a store built
from a URL sends its scripts), a 1-bucket reserve, its settle, a 3-bucket reserve (the
buckets of ``bench_stores.py``) and limits' moving-window ``hit`` (``EVALSHA`` too, so its
server time is measured the same way).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from budgetguard.stores import BucketSpec, Charge, ReserveRequest  # noqa: E402

Op = Callable[[int], object]


def _evalsha_stats(client: object) -> tuple[int, int]:
    stats = client.info("commandstats")  # type: ignore[attr-defined]
    s = stats.get("cmdstat_evalsha", {"calls": 0, "usec": 0})
    return int(s["calls"]), int(s["usec"])


Setup = Callable[[int], tuple[Op, Callable[[], None] | None]]


def measure(client: object, ops: int, setup: Setup, r: int) -> tuple[float, float, float]:
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


def main() -> None:
    import redis
    from limits import RateLimitItemPerSecond
    from limits.storage import RedisStorage
    from limits.strategies import MovingWindowRateLimiter
    from redis_server import RedisServer

    from budgetguard.stores.redis import RedisStore

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ops", type=int, default=2000)
    args = parser.parse_args()

    one = (Charge(BucketSpec("b", 1e15), 100.0),)
    three = (
        Charge(BucketSpec("global", 1e15), 100.0),
        Charge(BucketSpec("per-user\x1fuser_id=alice", 1e15, 1000.0), 100.0),
        Charge(BucketSpec("per-model\x1fmodel=gpt", 1e15, 0.0, 0.0, 4e9), 100.0),
    )
    with RedisServer() as server:
        store = RedisStore(server.url, namespace="bench")
        client = redis.Redis.from_url(server.url)
        sha = client.script_load("return 1")
        limiter = MovingWindowRateLimiter(RedisStorage(server.url))
        item = RateLimitItemPerSecond(10**9)
        limiter.hit(item, "alice")

        def raw(r: int) -> tuple[Op, None]:
            evalsha = client.evalsha
            return (lambda i: evalsha(sha, 0)), None

        held = client.connection_pool.get_connection()  # the store's way: no checkout per call
        framed = [b"*3\r\n$7\r\nEVALSHA\r\n$40\r\n" + sha.encode() + b"\r\n$1\r\n0\r\n"]

        def raw_held(r: int) -> tuple[Op, None]:
            send, read = held.send_packed_command, held.read_response

            def run(i: int) -> None:
                send(framed)
                read()

            return run, None

        def reserve1(r: int) -> tuple[Op, None]:
            requests = [ReserveRequest(f"p-{r}-{i}", one, 600.0) for i in range(args.ops)]
            reserve = store.reserve
            return (lambda i: reserve(requests[i])), None

        def settle1(r: int) -> tuple[Op, None]:  # settles the leases reserve1 opened in this round
            settle = store.settle
            actuals = [50.0]
            return (lambda i: settle(f"p-{r}-{i}", actuals)), None

        def reserve3(r: int) -> tuple[Op, Callable[[], None]]:
            client.delete("{bench}:state", "{bench}:expiries")
            requests = [ReserveRequest(f"t-{r}-{i}", three, 600.0) for i in range(args.ops)]
            reserve = store.reserve
            return (lambda i: reserve(requests[i])), lambda: client.delete("{bench}:state", "{bench}:expiries")

        def hit(r: int) -> tuple[Op, None]:
            h = limiter.hit
            return (lambda i: h(item, "alice")), None

        names = [
            "raw EVALSHA 'return 1'",
            "raw, held conn, framed",
            "reserve, 1 bucket",
            "settle, 1 bucket",
            "reserve, 3 buckets",
            "limits hit",
        ]
        setups = [raw, raw_held, reserve1, settle1, reserve3, hit]
        samples: list[list[tuple[float, float, float]]] = [[] for _ in setups]
        for r in range(args.rounds + 1):
            for k, setup in enumerate(setups):
                m = measure(client, args.ops, setup, r)
                if r:
                    samples[k].append(m)
        client.connection_pool.release(held)
        store.close()
        client.close()

    print(f"median of {args.rounds} rounds x {args.ops} calls, us per call")
    print(f"{'operation':26} {'wall':>7} {'cpu':>7} {'server':>7} {'rest':>7}")
    for name, s in zip(names, samples, strict=True):
        wall, cpu, srv = (statistics.median(x[j] for x in s) for j in range(3))
        print(f"{name:26} {wall:7.1f} {cpu:7.1f} {srv:7.1f} {wall - cpu - srv:7.1f}")
    pair = statistics.median(a[0] + b[0] for a, b in zip(samples[2], samples[3], strict=True))
    for k, what in ((0, "raw wall"), (1, "raw held-connection wall")):
        print(f"pair ratio ({what} / pair wall): {statistics.median(x[0] for x in samples[k]) / pair:.2f}x")
    print(f"3-bucket ratio (hit wall / reserve wall): "
          f"{statistics.median(h[0] / t[0] for h, t in zip(samples[5], samples[4], strict=True)):.2f}x")


if __name__ == "__main__":
    main()
