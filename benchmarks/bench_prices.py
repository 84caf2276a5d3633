"""Paired A/B of the price lookups the guard makes on every call, between two checkouts.

Run by hand (not a test)::

    git archive eb38150 | tar -x -C /tmp/before     # or a worktree of the old commit
    .venv/bin/python benchmarks/bench_prices.py /tmp/before . [--pairs 5]

Per call the guard asks its ``PriceTable`` for ``context_window(model)`` (the window
check), ``require_price(model)`` (a USD budget's reservation and settle) and ``get(model)``
(the ledger's cost). A child process per checkout builds ``PriceTable.bundled()``, looks
each name up once (the one-time resolution is not timed), then times chunks of 20,000
rounds of the three lookups for one name and reports the median ns per round. Processes
of the two checkouts alternate, so machine drift hits both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

NAMES = ("gpt-4o-mini", "gpt-4o-mini-2024-07-18", "openai/gpt-4.1")

CHILD = r"""
import json, statistics, sys, time, warnings
sys.path.insert(0, sys.argv[1]); warnings.simplefilter("ignore")
from budgetguard.pricing import PriceTable
table = PriceTable.bundled()
out = {}
for name in sys.argv[2].split(","):
    table.require_price(name); table.context_window(name); table.get(name)  # resolved once, untimed
    get, price, window, pc, chunks = table.get, table.require_price, table.context_window, time.perf_counter_ns, []
    for _ in range(15):
        t0 = pc()
        for _ in range(20_000):
            window(name); price(name); get(name)
        chunks.append((pc() - t0) / 20_000)
    out[name] = statistics.median(chunks)
print(json.dumps(out))
"""


def run(root: Path) -> dict[str, float]:
    """Median ns per round of the three lookups, by model name, in one process on ``root``."""
    done = subprocess.run([sys.executable, "-c", CHILD, str(root), ",".join(NAMES)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", type=Path, help="checkout A (e.g. the old commit)")
    ap.add_argument("b", type=Path, help="checkout B")
    ap.add_argument("--pairs", type=int, default=5)
    args = ap.parse_args()
    results: dict[str, dict[str, list[float]]] = {"A": {n: [] for n in NAMES}, "B": {n: [] for n in NAMES}}
    for _ in range(args.pairs):
        for label, root in (("A", args.a.resolve()), ("B", args.b.resolve())):
            for name, ns in run(root).items():
                results[label][name].append(ns)
            print(f"{label} {root}: " + ", ".join(f"{n} {v[-1]:.0f} ns" for n, v in results[label].items()), flush=True)
    for name in NAMES:
        a, b = (statistics.median(results[x][name]) for x in ("A", "B"))
        print(f"{name:<26} A {a:6.0f} ns  B {b:6.0f} ns  B/A {b / a:.2f}x  (median of {args.pairs} processes)")


if __name__ == "__main__":
    main()
