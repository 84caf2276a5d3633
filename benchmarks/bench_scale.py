"""``guard | chain`` at 1 to 1,000 calls in flight, on every store, next to the bare chain.

Run by hand (not a test; starts its own redis-server and stub OpenAI server)::

    .venv/bin/python benchmarks/bench_scale.py [--levels 1,50,200,1000] [--rounds 3]

The chain is ``ChatPromptTemplate | ChatOpenAI`` (the real client, over HTTP, with
``max_retries=0`` and an httpx pool as large as the level) against the project's stub
server (``budgetguard.testing.StubOpenAIServer``), which waits 50 ms before answering each
request. The server runs in a process of its own, so its CPU is not this process's. The
guarded chain is ``guard | chain`` with a global and a per-user budget (100 users) and no
ledger, on each store: ``memory://``, a SQLite file, Redis from a URL, and Redis through
the application's own clients (``redis.Redis`` and ``redis.asyncio.Redis`` on redis-py's
default pools; ``redis-client``), both on a private redis-server.

At each level N, ``N`` tasks on one event loop make ``calls`` ``ainvoke``s in all, each
task one after the other. A round runs every case once (the order rotated each round, so
machine drift hits all alike); a store's throughput ratio is its calls/s over the bare
chain's in the same round, and the figure is the median over rounds. Before each case the
objects earlier cases left alive are frozen out of the garbage collector's scans.
For each case it reports:

* ``in flight``: the most HTTP requests outstanding at once (an httpx event hook counts
  a request from its sending to its response), lowest and highest over rounds; N means
  nothing serialized the calls;
* ``calls/s`` (median) and the ratio to bare (median, and its range over rounds);
* ``CPU/call``: this process's CPU time per call (every thread: the event loop, SQLite's
  worker threads), median over rounds;
* ``CPU ratio``: bare's CPU per call over the case's in the same round (median, range): the
  throughput ratio a CPU-bound run shows when both get the same share of the machine, so
  it does not move with other processes' load as calls/s does;
* ``guard CPU``: what ``guard |`` adds per call with this store, measured apart and
  precisely (one call at a time, ``prompt | UsageFakeChatModel`` with and without the
  guard, alternating chunks): the guard's own work plus the store's reserve and settle;
* ``expected``: bare's CPU per call over bare's plus the guard's, the ratio that CPU alone
  predicts when the run is CPU-bound (this process gets about one of the 2 cores);
* ``stub``/``redis``: the stub server's and redis-server's CPU per call.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

LATENCY = 0.05
USERS = 100
CASES = ("bare", "memory", "sqlite", "redis", "redis-client")


def serve(port_queue: Any, stop: Any) -> None:
    """Child process: the stub server, until ``stop`` is set."""
    from budgetguard.testing import StubOpenAIServer

    with StubOpenAIServer(latency=LATENCY, reply_tokens=20, prompt_caching=False) as server:
        port_queue.put((server.port, os.getpid()))
        stop.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class InFlight:
    """Counts HTTP requests between sending and response (httpx event hooks)."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0

    async def request(self, _request: Any) -> None:
        self.now += 1
        self.most = max(self.most, self.now)

    async def response(self, _response: Any) -> None:
        self.now -= 1


def make_chain(base_url: str, level: int, counter: InFlight) -> Any:
    import httpx
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_openai import ChatOpenAI

    client = httpx.AsyncClient(
        limits=httpx.Limits(max_connections=level + 10, max_keepalive_connections=level + 10),
        timeout=120.0,
        event_hooks={"request": [counter.request], "response": [counter.response]},
    )
    llm = ChatOpenAI(
        model="gpt-4o-mini", base_url=base_url, api_key="sk-bench", max_retries=0, max_tokens=40,
        http_async_client=client,
    )
    prompt = ChatPromptTemplate.from_messages([("system", "You answer briefly."), ("human", "{q}")])
    return prompt | llm, client


def make_store(case: str, tmp: Path, redis_url: str) -> tuple[Any, Any]:
    """The store of a case, and a coroutine function that closes it (and its clients)."""
    from budgetguard.stores import MemoryStore

    if case == "memory":
        store: Any = MemoryStore()
    elif case == "sqlite":
        from budgetguard.stores.sqlite import SQLiteStore

        store = SQLiteStore(tmp / f"bench-{uuid.uuid4().hex[:8]}.db")
    else:
        from budgetguard.stores.redis import RedisStore

        namespace = f"bench-{uuid.uuid4().hex[:8]}"
        if case == "redis":
            store = RedisStore(redis_url, namespace=namespace)
        else:  # the application's own clients, on redis-py's default pools
            import redis

            sync_client, async_client = redis.Redis.from_url(redis_url), redis.asyncio.Redis.from_url(redis_url)
            store = RedisStore(sync_client, async_client=async_client, namespace=namespace)

            async def close_all() -> None:
                await store.aclose()
                await async_client.aclose()
                sync_client.close()

            return store, close_all
    return store, store.aclose


async def guard_cpu(case: str, tmp: Path, redis_url: str, chunks: int = 7, per_chunk: int = 200) -> float:
    """CPU seconds ``guard |`` adds per call on this store (sequential ainvokes, fake model)."""
    import gc

    from langchain_core.prompts import ChatPromptTemplate

    from budgetguard import Budget, BudgetGuard
    from budgetguard.testing.fake_models import UsageFakeChatModel

    prompt = ChatPromptTemplate.from_messages([("system", "You answer briefly."), ("human", "{q}")])
    bare = prompt | UsageFakeChatModel(model_name="gpt-4o-mini", max_tokens=40, input_tokens=20)
    store, close = make_store(case, tmp, redis_url)
    guard = BudgetGuard(
        [Budget("global", limit=1e12), Budget("per-user", limit=1e10, per="user_id")], store=store, ledger=False
    )
    guarded = guard | bare
    costs: dict[str, list[float]] = {"bare": [], "guard": []}
    for chunk in range(chunks + 1):
        for name, chain in (("bare", bare), ("guard", guarded)) if chunk % 2 else (("guard", guarded), ("bare", bare)):
            gc.collect()
            cpu0 = time.process_time()
            for i in range(per_chunk):
                await chain.ainvoke({"q": f"Question {i}"}, {"configurable": {"user_id": f"u{i % USERS}"}})
            if chunk:  # the first chunk warms
                costs[name].append((time.process_time() - cpu0) / per_chunk)
    await close()
    return statistics.median(costs["guard"]) - statistics.median(costs["bare"])


async def run_case(
    case: str, level: int, calls: int, base_url: str, tmp: Path, redis_url: str, pids: dict[str, int]
) -> dict[str, float]:
    import gc

    from budgetguard import Budget, BudgetGuard

    counter = InFlight()
    chain, client = make_chain(base_url, level, counter)
    close = None
    if case != "bare":
        store, close = make_store(case, tmp, redis_url)
        guard = BudgetGuard(
            [Budget("global", limit=1e12), Budget("per-user", limit=1e10, per="user_id")], store=store, ledger=False
        )
        chain = guard | chain
    # Warm: connections, the guard's caches, the store's scripts and tables.
    await asyncio.gather(*(chain.ainvoke({"q": "warm up"}, {"configurable": {"user_id": "u0"}}) for _ in range(min(level, 20))))
    counter.most = 0
    # What earlier cases left alive is frozen out of the collector's scans, so each case
    # pays for its own objects only (whichever ran before it).
    gc.collect()
    gc.freeze()
    next_call = iter(range(calls))
    errors = 0

    async def worker() -> None:
        nonlocal errors
        for i in next_call:
            try:
                await chain.ainvoke({"q": f"Question {i}: what is a token bucket?"}, {"configurable": {"user_id": f"u{i % USERS}"}})
            except Exception:  # noqa: BLE001 - counted and reported
                errors += 1

    server0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    wall0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(level)))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    gc.unfreeze()
    server = {name: (cpu_seconds(pid) - server0[name]) / calls for name, pid in pids.items()}
    await client.aclose()
    if close is not None:
        await close()
    return {
        "rate": calls / wall,
        "cpu": cpu / calls,
        "most": counter.most,
        "errors": errors,
        "stub_cpu": server["stub"],
        "redis_cpu": server.get("redis", 0.0) if case.startswith("redis") else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,50,200,1000")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.getLogger("budgetguard").setLevel(logging.ERROR)
    from redis_server import RedisServer

    ctx = multiprocessing.get_context("spawn")
    ports, stop = ctx.Queue(), ctx.Event()
    stub = ctx.Process(target=serve, args=(ports, stop), daemon=True)
    stub.start()
    port, stub_pid = ports.get(timeout=60)
    base_url = f"http://127.0.0.1:{port}/v1"
    print(f"load average at start: {os.getloadavg()[0]:.2f} (2 cores); python {sys.version.split()[0]}")
    with RedisServer() as redis_server, tempfile.TemporaryDirectory() as tmp:
        assert redis_server.process is not None
        pids = {"stub": stub_pid, "redis": redis_server.process.pid}
        overhead = {case: asyncio.run(guard_cpu(case, Path(tmp), redis_server.url)) for case in CASES[1:]}
        print("guard CPU per call, one call at a time: " + ", ".join(f"{c} {v * 1e6:.0f} us" for c, v in overhead.items()))
        for level in (int(x) for x in args.levels.split(",")):
            calls = {1: 40}.get(level, max(400, level))
            results: dict[str, list[dict[str, float]]] = {c: [] for c in CASES}
            ratios: dict[str, list[float]] = {c: [] for c in CASES if c != "bare"}
            cpu_ratios: dict[str, list[float]] = {c: [] for c in CASES if c != "bare"}
            for r in range(args.rounds):
                order = CASES[r % len(CASES) :] + CASES[: r % len(CASES)]  # each case in each position in turn
                round_results = {}
                for case in order:
                    round_results[case] = asyncio.run(
                        run_case(case, level, calls, base_url, Path(tmp), redis_server.url, pids)
                    )
                    results[case].append(round_results[case])
                for case, store_ratios in ratios.items():
                    store_ratios.append(round_results[case]["rate"] / round_results["bare"]["rate"])
                    cpu_ratios[case].append(round_results["bare"]["cpu"] / round_results[case]["cpu"])
            print(f"\nN = {level} in flight, {calls} calls per case, {args.rounds} rounds, load {os.getloadavg()[0]:.2f}")
            print(
                f"  {'case':<12} {'in flight':>9} {'errors':>6} {'calls/s':>8} {'ratio [range]':>20} {'CPU/call':>9} "
                f"{'CPU ratio [range]':>20} {'guard CPU':>9} {'expected':>8} {'stub':>7} {'redis':>6}"
            )
            bare_cpu = statistics.median(x["cpu"] for x in results["bare"])
            for case in CASES:
                xs = results[case]
                cpu = statistics.median(x["cpu"] for x in xs)
                if case in ratios:
                    rs, cs = ratios[case], cpu_ratios[case]
                    ratio = f"{statistics.median(rs):.3f} [{min(rs):.2f}-{max(rs):.2f}]"
                    cpu_ratio = f"{statistics.median(cs):.3f} [{min(cs):.2f}-{max(cs):.2f}]"
                    extra = f"{overhead[case] * 1e6:.0f} us"
                    expected = f"{bare_cpu / (bare_cpu + overhead[case]):.3f}"
                else:
                    ratio, cpu_ratio, extra, expected = "1", "1", "", ""
                redis_cpu = f"{statistics.median(x['redis_cpu'] for x in xs) * 1e6:.0f} us" if case.startswith("redis") else ""
                print(
                    f"  {case:<12} {min(x['most'] for x in xs):>4}-{max(x['most'] for x in xs):<4} "
                    f"{sum(x['errors'] for x in xs):>6} {statistics.median(x['rate'] for x in xs):>8.1f} {ratio:>20} "
                    f"{cpu * 1e6:>6.0f} us {cpu_ratio:>20} {extra:>9} {expected:>8} "
                    f"{statistics.median(x['stub_cpu'] for x in xs) * 1e6:>4.0f} us {redis_cpu:>6}"
                )
    stop.set()
    stub.join(10)
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
