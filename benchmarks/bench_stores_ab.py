"""Paired A/B of the stores' hot path between two checkouts, in one process, rounds interleaved.

Run by hand (not a test)::

    git archive <commit> | tar -x -C /tmp/before      # or: git worktree add /tmp/before <commit>
    .venv/bin/python benchmarks/bench_stores_ab.py /tmp/before . [--rounds 15] [--ops 3000]

How both versions live in one process: each checkout's ``budgetguard/stores`` package is
copied into a temporary directory as a top-level package of its own (``stores_a``,
``stores_b``), with ``budgetguard.stores`` rewritten to that name in its sources (the Lua
scripts travel with it). What the stores import from the rest of budgetguard (the clock,
errors, period rules) comes from this checkout, so those modules must be identical in
both checkouts: the script checks and refuses otherwise.

What is timed: single-threaded reserve+settle pairs of one bucket, leases of 600 s, so
nothing expires (the hot path), on a memory store, a SQLite file each and a
``redis-server`` each (started here, free ports). Rounds alternate A, B, B, A per store
(the machine's speed drifts; other developers share it), round 0 warms up. Printed per
store: the medians of A and B in pairs/s, the median over rounds of B/A within a round,
and that ratio's spread; for Redis also each server's own time per script call
(``EVALSHA`` in ``INFO commandstats``, reserves and settles together, timed rounds only),
which the client's noise does not reach.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib
import re
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def alias_stores(checkout: Path, name: str, into: Path) -> ModuleType:
    """Import ``checkout``'s ``budgetguard.stores`` as the top-level package ``name``."""
    source = checkout / "budgetguard" / "stores"
    target = into / name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    shared: set[str] = set()
    for path in target.glob("*.py"):
        text = path.read_text(encoding="utf-8").replace("budgetguard.stores", name)
        shared |= set(re.findall(r"budgetguard\.(\w+)", text))
        path.write_text(text, encoding="utf-8")
    for module in sorted(shared):
        mine, theirs = ROOT / "budgetguard" / f"{module}.py", checkout / "budgetguard" / f"{module}.py"
        if not filecmp.cmp(mine, theirs, shallow=False):
            sys.exit(f"budgetguard/{module}.py differs between {ROOT} and {checkout}: the stores cannot share it")
    sys.path.insert(0, str(into))
    return importlib.import_module(name)


Setup = Callable[[int], Callable[[], None]]


def pairs(stores: ModuleType, store: Any, tag: str, ops: int) -> Setup:
    """Rounds of ``ops`` reserve+settle pairs on ``store``, with ``stores``' own classes."""
    charges = (stores.Charge(stores.BucketSpec("b", 1e15), 100.0),)
    actuals = [50.0]

    def setup(r: int) -> Callable[[], None]:
        requests = [stores.ReserveRequest(f"{tag}-{r}-{i}", charges, 600.0) for i in range(ops)]  # built untimed
        reserve, settle = store.reserve, store.settle

        def run() -> None:
            for request in requests:
                reserve(request)
                settle(request.id, actuals)

        return run

    return setup


def compare(
    rounds: int, ops: int, a: Setup, b: Setup, after_warm_up: Callable[[], None] = lambda: None
) -> tuple[float, float, list[float]]:
    """Median pairs/s of A and B, and B/A per round; rounds go A B, B A, ... (round 0 warms up)."""
    rates: dict[str, list[float]] = {"A": [], "B": []}
    for r in range(rounds + 1):
        if r == 1:
            after_warm_up()
        order = (("A", a), ("B", b)) if r % 2 == 0 else (("B", b), ("A", a))
        for label, setup in order:
            run = setup(r)
            started = time.perf_counter()
            run()
            if r:
                rates[label].append(ops / (time.perf_counter() - started))
    ratios = [rb / ra for ra, rb in zip(rates["A"], rates["B"], strict=True)]
    return statistics.median(rates["A"]), statistics.median(rates["B"]), ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", type=Path, help="checkout A (e.g. an export of the old commit)")
    ap.add_argument("b", type=Path, help="checkout B")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--ops", type=int, default=3000, help="pairs per round (memory: x10)")
    args = ap.parse_args()
    from redis_server import RedisServer

    with tempfile.TemporaryDirectory() as tmp, RedisServer() as server_a, RedisServer() as server_b:
        servers = {"A": server_a, "B": server_b}
        mods = {"A": alias_stores(args.a.resolve(), "stores_a", Path(tmp)),
                "B": alias_stores(args.b.resolve(), "stores_b", Path(tmp))}

        def build(kind: str, label: str) -> Any:
            mod = mods[label]
            if kind == "memory":
                return mod.MemoryStore()
            if kind == "sqlite":
                return importlib.import_module(f"{mod.__name__}.sqlite").SQLiteStore(Path(tmp) / f"{label}.db")
            return importlib.import_module(f"{mod.__name__}.redis").RedisStore(
                servers[label].url, namespace=f"ab-{label}-{uuid.uuid4().hex[:8]}"
            )

        print(f"python {sys.version.split()[0]}; A = {args.a}, B = {args.b}")
        print(f"{args.rounds} rounds x {args.ops} pairs (memory x10), A and B alternating per round\n")
        for kind in ("memory", "sqlite", "redis"):
            ops = args.ops * 10 if kind == "memory" else args.ops
            store_a, store_b = build(kind, "A"), build(kind, "B")
            clients = {label: redis.Redis.from_url(server.url) for label, server in servers.items()}
            rate_a, rate_b, ratios = compare(
                args.rounds,
                ops,
                pairs(mods["A"], store_a, "a", ops),
                pairs(mods["B"], store_b, "b", ops),
                lambda clients=clients: [client.config_resetstat() for client in clients.values()],
            )
            store_a.close()
            store_b.close()
            quartiles = statistics.quantiles(ratios, n=4)
            print(
                f"{kind:7} A {rate_a:>10,.0f}  B {rate_b:>10,.0f} pairs/s  B/A {statistics.median(ratios):.3f}x "
                f"(rounds {min(ratios):.3f}-{max(ratios):.3f}, quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f})",
                flush=True,
            )
            if kind == "redis":
                us = {label: client.info("commandstats")["cmdstat_evalsha"]["usec_per_call"]
                      for label, client in clients.items()}
                print(f"        server time per script call: A {us['A']:.2f} us, B {us['B']:.2f} us")
            for client in clients.values():
                client.close()


if __name__ == "__main__":
    main()
