"""Paired A/B of ``guard | chain`` overhead between two checkouts of budgetguard.

Run by hand (not a test)::

    git worktree add /tmp/before <commit>
    /work/venv/bin/python benchmarks/bench_ab.py /tmp/before . [--pairs 4] [--rounds 6]

Each pair runs one process per checkout, one after the other. A process builds
``bench_overhead``'s chains from its own checkout and times ``base`` and ``guard`` in
alternating chunks of 270 calls (after 30 untimed ones); its figure is the median over
chunks of guard's median / base's median in the same round. Alternating whole processes
makes machine drift hit both checkouts alike; the final line is the median over pairs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, logging, statistics, sys, time, warnings
root = sys.argv[1]
sys.path.insert(0, root); sys.path.insert(0, root + "/benchmarks")
warnings.simplefilter("ignore"); logging.getLogger("budgetguard").setLevel(logging.ERROR)
import bench_overhead as b
env = b.build()
out = {"base": [], "guard": []}
for r in range(int(sys.argv[2])):
    for case in ("base", "guard") if r % 2 == 0 else ("guard", "base"):
        fn = env["sync"][case]
        b.reset_model(env)
        xs = b.inputs(300)
        for x in xs[:30]:
            fn(x)
        pc, ts = time.perf_counter_ns, []
        for x in xs[30:]:
            t0 = pc(); fn(x); ts.append(pc() - t0)
        out[case].append(statistics.median(ts) / 1000)
print(json.dumps(out))
"""


def run(root: Path, rounds: int) -> tuple[float, float, float]:
    """(base us, guard us, paired ratio) of one process on ``root``."""
    done = subprocess.run([sys.executable, "-c", CHILD, str(root), str(rounds)],
                          capture_output=True, text=True, check=True)
    d = json.loads(done.stdout)
    ratio = statistics.median(g / b for g, b in zip(d["guard"], d["base"], strict=True))
    return statistics.median(d["base"]), statistics.median(d["guard"]), ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", type=Path, help="checkout A (e.g. a worktree of the old commit)")
    ap.add_argument("b", type=Path, help="checkout B")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    ratios: dict[str, list[float]] = {"A": [], "B": []}
    for _ in range(args.pairs):
        for label, root in (("A", args.a.resolve()), ("B", args.b.resolve())):
            base, guard, ratio = run(root, args.rounds)
            ratios[label].append(ratio)
            print(f"{label} {root}: base {base:.1f} us, guard {guard:.1f} us, guard/base {ratio:.3f}x", flush=True)
    for label, values in ratios.items():
        print(f"{label}: median guard/base over {args.pairs} processes {statistics.median(values):.3f}x")


if __name__ == "__main__":
    main()
