"""SQLiteStore with its one-bucket SQL path on and off, paired (issue 13, item 6).

The SQL path was removed after this measurement; run it against a checkout that still has
it (commit eeb1387: period rules, SQL path, ``_one_bucket_paths`` switch)::

    git worktree add /tmp/sqlpath eeb1387
    CHECKOUT=/tmp/sqlpath PYTHONPATH=/tmp/sqlpath python benchmarks/bench_sqlite_paths.py 15 3000

Four stores take turns round by round (on, off, off, on), so the two "on" and the two
"off" medians also show how far two identical setups drift apart on a shared machine.
"""
import os
import statistics
import sys
import tempfile
from pathlib import Path

root = Path(os.environ["CHECKOUT"])
sys.path.insert(0, str(root / "benchmarks")); sys.path.insert(0, str(root / "tests"))
import budgetguard  # noqa: E402
from bench_stores import pairs, rates  # noqa: E402

assert str(root) in budgetguard.__file__, f"run with PYTHONPATH={root}: imported {budgetguard.__file__}"
from budgetguard.stores import BucketSpec, Charge  # noqa: E402
from budgetguard.stores.sqlite import SQLiteStore  # noqa: E402


class General(SQLiteStore):
    _one_bucket_paths = False


rounds, ops = int(sys.argv[1]), int(sys.argv[2])
with tempfile.TemporaryDirectory() as tmp:
    ch = (Charge(BucketSpec("b", 1e15), 100.0),)
    a1, b1, a2, b2 = SQLiteStore(Path(tmp) / "a1.db"), General(Path(tmp) / "b1.db"), SQLiteStore(Path(tmp) / "a2.db"), General(Path(tmp) / "b2.db")
    r = rates(rounds, ops, pairs(a1, "a1", ch), pairs(b1, "b1", ch), pairs(b2, "b2", ch), pairs(a2, "a2", ch))
    sql, gen = statistics.mean([r[0], r[3]]), statistics.mean([r[1], r[2]])
    print(f"SQL path on: {r[0]:,.0f} / {r[3]:,.0f}; off: {r[1]:,.0f} / {r[2]:,.0f} pairs/s (medians of {rounds} rounds x {ops})")
    print(f"gain {sql / gen - 1:+.1%}; A/A spread: on {r[0]/r[3]-1:+.1%}, off {r[1]/r[2]-1:+.1%}")
