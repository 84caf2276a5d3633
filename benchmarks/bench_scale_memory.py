"""Memory of the memory store after a million distinct users, then after they go idle.

Run by hand (not a test)::

    .venv/bin/python benchmarks/bench_scale_memory.py [--users 1000000] [--before /tmp/before]

Each checkout runs in a child process of its own (``--before`` adds an older checkout,
e.g. ``git worktree add /tmp/before eb38150``, run the same way for comparison). A child
builds a :class:`MemoryStore` on a fake clock and the buckets a guard would use for
``Budget("global", refill_per_second=...)`` and ``Budget("per-user", per="user_id",
limit=20_000, refill_per_second=2)``; then

1. ``--users`` distinct user ids each make one call (reserve 1,000 tokens, settle 600),
   one call per millisecond of fake time (so a user's bucket is full again 300 s later:
   users who called more than 300 s ago are full while the run goes on);
2. the clock moves past every bucket's refill and the application stays idle: no call, no
   sweep; the store's background pass (``forget_every``, 0.5 s here instead of the default
   60 s, so the run does not wait a minute; a checkout without one just waits 2 s) forgets
   on its own;
3. then one more call (which forgets up to 8 due buckets, as every call does), then
   ``store.sweep()`` (which forgets every due bucket at once).

At each point it prints the Python heap in use (``tracemalloc``, MB above the start, from
a traced run), the process's resident set (RSS, MB above the start, from an untraced run:
tracemalloc's own tables would count in it), the buckets held and how long the step took.
A last point calls glibc's ``malloc_trim(0)``: RSS may hold memory that was freed but not
yet returned to the system.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import ctypes, gc, json, sys, time, tracemalloc
sys.path.insert(0, sys.argv[1])
users, trace = int(sys.argv[2]), sys.argv[3] == "trace"
from budgetguard.clock import FakeClock
from budgetguard.stores import BucketSpec, Charge, MemoryStore, ReserveRequest

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

clock = FakeClock()
try:
    store = MemoryStore(clock, forget_every=0.5)
except TypeError:  # a checkout from before the background pass
    store = MemoryStore(clock)
GLOBAL = BucketSpec("global", 1e12, refill_per_second=1e6)
points = []
def heap_mb():
    return tracemalloc.get_traced_memory()[0] / 2**20 if trace else 0.0

def point(name, seconds=None):
    gc.collect()
    points.append({"at": name, "heap_mb": round(heap_mb() - heap0, 2), "rss_mb": round(rss_mb() - rss0, 1),
                   "buckets": len(store._buckets), "seconds": seconds})

def call(i):
    user = BucketSpec(f"per-user\x1fuser_id=user-{i:07d}", 20_000.0, refill_per_second=2.0)
    rid = f"r{i}"
    store.reserve(ReserveRequest(rid, (Charge(GLOBAL, 1000.0), Charge(user, 1000.0))))
    store.settle(rid, [600.0, 600.0])

call(-1)  # warm: every code path and module loaded before the start is taken
gc.collect()
if trace:
    tracemalloc.start()
heap0, rss0 = heap_mb(), rss_mb()
points.append({"at": "start", "heap_mb": 0.0, "rss_mb": 0.0, "buckets": len(store._buckets), "seconds": None})
started = time.perf_counter()
for i in range(users):
    call(i)
    clock.advance(0.001)
point(f"after {users:,} users", round(time.perf_counter() - started, 1))
clock.advance(3600)  # idle past every refill
started = time.perf_counter()
while len(store._buckets) > 2 and time.perf_counter() - started < (60 if hasattr(store, "forget_due") else 2):
    time.sleep(0.05)
point("idle past refill (no call)", round(time.perf_counter() - started, 2))
call(users)
point("idle past refill, then 1 call")
started = time.perf_counter()
store.sweep()
point("then sweep()", round(time.perf_counter() - started, 2))
ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed memory until asked
point("then malloc_trim(0)")
print(json.dumps(points))
"""


def run(checkout: Path, users: int, mode: str) -> list[dict[str, object]]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(checkout), str(users), mode], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--before", type=Path, help="an older checkout to run the same way")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} (2 cores)")
    runs = [("this checkout", ROOT)] + ([("before", args.before)] if args.before else [])
    for label, checkout in runs:
        print(f"\n{label} ({checkout}), {args.users:,} users:")
        print(f"  {'point':<32} {'heap MB':>9} {'RSS MB':>8} {'buckets':>9} {'seconds':>8}")
        # Heap from a traced run; RSS and seconds from an untraced one (tracemalloc's own
        # tables would count in RSS, and slow the run).
        traced, plain = run(checkout, args.users, "trace"), run(checkout, args.users, "plain")
        for t, p in zip(traced, plain, strict=True):
            secs = "" if p["seconds"] is None else p["seconds"]
            print(f"  {p['at']:<32} {t['heap_mb']:>9} {p['rss_mb']:>8} {p['buckets']:>9,} {secs:>8}")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
