"""Instructions per call of the ``bench_overhead`` cases, counted by valgrind (no timing noise).

Run by hand (not a test; needs ``valgrind``, takes a few minutes)::

    /work/venv/bin/python benchmarks/bench_instructions.py [--calls 300] [--cases base,guard,floor,minimal]

Each case runs in its own process under ``valgrind --tool=cachegrind`` twice: once with a
warm-up only (300 calls) and once with ``--calls`` more. The difference divided by
``--calls`` is the machine instructions one call executes (Python, C and Rust alike),
and the ratio to ``base`` is the instruction-count counterpart of ``bench_overhead``'s
time ratio. Where the two ratios differ, the extra code runs at a different rate
(instructions per second) than the chain around it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = """
import logging, sys, warnings
sys.path.insert(0, {root!r}); sys.path.insert(0, {here!r})
warnings.simplefilter("ignore")
logging.getLogger("budgetguard").setLevel(logging.ERROR)
import bench_overhead as b
env = b.build()
fn = env["sync"][{case!r}]
for x in b.inputs(300):
    fn(x)
b.reset_model(env)
for x in b.inputs({calls}):
    fn(x)
"""


def instructions(case: str, calls: int) -> int:
    """Instructions valgrind counts for one child process."""
    code = CHILD.format(root=str(HERE.parent), here=str(HERE), case=case, calls=calls)
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            ["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={tmp}/cg.out",
             sys.executable, "-c", code],
            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "0"},
        )
    found = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{out.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--cases", default="base,guard,floor,minimal")
    args = ap.parse_args()
    cases = args.cases.split(",")
    jobs = [(c, n) for c in cases for n in (0, args.calls)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        counts = dict(zip(jobs, pool.map(lambda job: instructions(*job), jobs), strict=True))
    per_call = {c: (counts[c, args.calls] - counts[c, 0]) / args.calls for c in cases}
    print(f"{args.calls} calls per case after 300 warm-up calls; machine instructions per call (valgrind):")
    for c in cases:
        print(f"  {c:<10} {per_call[c]:>12,.0f}   {per_call[c] / per_call['base']:.3f}x base")


if __name__ == "__main__":
    main()
