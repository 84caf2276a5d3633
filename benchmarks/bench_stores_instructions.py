"""Instructions per reserve+settle pair of each store, for several checkouts (valgrind: no timing noise).

Run by hand (not a test; needs ``valgrind``, takes a few minutes)::

    git archive <commit> | tar -x -C /tmp/before
    .venv/bin/python benchmarks/bench_stores_instructions.py /tmp/before . [--pairs 2000]

The hot path: one bucket, leases of 600 s, so nothing expires. Per checkout and store, a
process imports budgetguard from the checkout and runs a few hundred pairs to warm up, then
``--pairs`` more; it runs twice, the second time without the ``--pairs`` more, and the
difference divided by ``--pairs`` is what one pair costs:

* memory, SQLite: the client process under ``valgrind --tool=cachegrind`` (Python, C, SQLite);
* Redis: ``redis-server`` under cachegrind (the client is not counted), so the figure is
  the server's work per pair: both scripts, the Lua included.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CHILD = """
import sys
sys.path.insert(0, {root!r})
from budgetguard.stores import BucketSpec, Charge, MemoryStore, ReserveRequest
kind, url = {kind!r}, {url!r}
if kind == "memory":
    store = MemoryStore()
elif kind == "sqlite":
    from budgetguard.stores.sqlite import SQLiteStore
    store = SQLiteStore({tmp!r} + "/store.db")
else:
    from budgetguard.stores.redis import RedisStore
    store = RedisStore(url, namespace="instructions")
charges = (Charge(BucketSpec("b", 1e15), 100.0),)
for i in range({pairs}):
    store.reserve(ReserveRequest(f"r{{i}}", charges, 600.0))
    store.settle(f"r{{i}}", [50.0])
store.close()
"""

WARM_UP = 300


def _summary(path: Path) -> int:
    return int(re.search(r"^summary:\s+(\d+)", path.read_text(), re.MULTILINE).group(1))  # type: ignore[union-attr]


def _cachegrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={out}"]


def client_instructions(root: Path, kind: str, pairs: int) -> int:
    """Instructions of a client process that makes ``pairs`` pairs on a memory or SQLite store."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cachegrind.out"
        code = CHILD.format(root=str(root), kind=kind, url="", tmp=tmp, pairs=pairs)
        subprocess.run([*_cachegrind(out), sys.executable, "-c", code], check=True, capture_output=True)
        return _summary(out)


def server_instructions(root: Path, pairs: int) -> int:
    """Instructions of a fresh ``redis-server`` while one client makes ``pairs`` pairs on it."""
    import redis
    from redis_server import find_redis_server, free_port

    binary = find_redis_server()
    if binary is None:
        sys.exit("no redis-server binary found")
    with tempfile.TemporaryDirectory() as tmp:
        out, port = Path(tmp) / "cachegrind.out", free_port()
        args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp]
        server = subprocess.Popen([*_cachegrind(out), binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=port)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            code = CHILD.format(root=str(root), kind="redis", url=f"redis://127.0.0.1:{port}/0", tmp=tmp, pairs=pairs)
            subprocess.run([sys.executable, "-c", code], check=True)
            client.shutdown(nosave=True)
        except redis.ConnectionError:  # the shutdown closes the connection
            pass
        finally:
            client.close()
            server.wait(120)
        return _summary(out)


def per_pair(root: Path, kind: str, pairs: int) -> float:
    def count(n: int) -> int:
        return server_instructions(root, n) if kind == "redis" else client_instructions(root, kind, n)

    return (count(WARM_UP + pairs) - count(WARM_UP)) / pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkouts", type=Path, nargs="+", help="the first is the baseline")
    ap.add_argument("--pairs", type=int, default=2000)
    args = ap.parse_args()
    print(f"instructions per reserve+settle pair ({args.pairs} pairs after {WARM_UP}; Redis: the server's)")
    for kind in ("memory", "sqlite", "redis"):
        base = None
        for root in args.checkouts:
            got = per_pair(root.resolve(), kind, args.pairs)
            base = base or got
            print(f"  {kind:7} {root!s:32} {got:>10,.0f}  {got / base:.3f}x", flush=True)


if __name__ == "__main__":
    main()
