"""The Redis store's key layout keeps the guarantees the per-bucket keys gave.

Buckets and leases are fields of one hash (``{ns}:state``) next to the expiry zset
(``{ns}:expiries``); reserve skips the expiry probe until a stored lower bound (``next``)
of the earliest expiry has passed. These tests check what that layout must not lose:
keys with one hash tag (Redis Cluster), hashed scope values, duplicate ids refused,
replays recognised, and no expired lease ever missed by the skipped probe. And the
journal of swept leases (``{ns}:journal`` and ``j:`` fields): gone once acknowledged, and
free for a reserve while empty (its size is a field of the one ``HMGET``).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from budgetguard.errors import StoreUnavailable
from budgetguard.stores import BucketSpec, Charge, ExpiredLease, ReserveRequest
from budgetguard.stores._retry import RetryPolicy
from budgetguard.stores.base import JOURNAL_REPORT
from budgetguard.stores.redis import RedisStore

pytestmark = pytest.mark.redis


@pytest.fixture
def store(redis_server: Any) -> Iterator[RedisStore]:
    s = RedisStore(redis_server.url, namespace=f"layout-{uuid.uuid4().hex[:12]}")
    yield s
    s.close()


@pytest.fixture
def raw(redis_server: Any) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def req(rid: str, *charges: Charge, lease: float = 600.0) -> ReserveRequest:
    return ReserveRequest(rid, charges, lease)


def test_three_keys_with_one_hash_tag_and_hashed_fields(store: RedisStore, raw: redis.Redis) -> None:
    ns = store.namespace
    hostile = BucketSpec("user:1\r\n{x}:state", 10.0, refill_per_second=0.001)
    assert store.reserve(req("r1", Charge(hostile, 1.0), Charge(BucketSpec("b", 5.0), 2.0))).ok
    keys = sorted(k.decode() for k in raw.scan_iter(match=f"{{{ns}}}*"))
    assert keys == [f"{{{ns}}}:expiries", f"{{{ns}}}:state"]  # {ns}:full: written by a settle
    hex_key = hashlib.sha256(hostile.key.encode()).hexdigest()
    assert store.bucket_field(hostile.key) == "b:" + hex_key
    fields = {f.decode() for f in raw.hkeys(f"{{{ns}}}:state")}
    assert {"b:" + hex_key, "k:" + hex_key, "r:r1", "next"} <= fields
    assert raw.hget(f"{{{ns}}}:state", "k:" + hex_key) == hostile.key.encode()  # readable, never parsed
    assert store.open_reservations() == 1
    assert store.settle("r1", [1.0, 2.0])
    assert store.open_reservations() == 0
    assert "r:r1" not in {f.decode() for f in raw.hkeys(f"{{{ns}}}:state")}
    keys = sorted(k.decode() for k in raw.scan_iter(match=f"{{{ns}}}*"))
    assert keys == [f"{{{ns}}}:full", f"{{{ns}}}:state"]  # no lease left; the refilling bucket's time
    assert raw.zrange(f"{{{ns}}}:full", 0, -1) == [hex_key.encode()]  # "b" never refills: not there


def test_duplicate_id_is_refused_even_when_denied_and_a_replay_is_recognised(store: RedisStore) -> None:
    spec = BucketSpec("dup", 10.0)
    assert store.reserve(req("d", Charge(spec, 10.0))).ok
    with pytest.raises(ValueError, match="already open"):
        store.reserve(req("d", Charge(spec, 1.0)))  # would be denied too: the id wins
    # A retry of a request whose reply was lost carries the same nonce: recognised (3),
    # even though the bucket can no longer cover it.
    payload = store._reserve_payload(req("replayed", Charge(BucketSpec("replay", 5.0), 5.0)))
    script = store._sync_scripts().reserve
    assert script(*store._keys, payload) == 1
    assert script(*store._keys, payload) == 3
    assert store.snapshot(BucketSpec("replay", 5.0)).level == 0.0  # charged once


def test_a_shorter_lease_after_a_longer_one_is_not_missed(store: RedisStore) -> None:
    spec = BucketSpec("bound", 100.0)
    assert store.reserve(req("long", Charge(spec, 1.0), lease=600.0)).ok
    assert store.reserve(req("short", Charge(spec, 2.0), lease=0.2)).ok  # lowers the bound
    time.sleep(0.3)
    result = store.reserve(req("later", Charge(spec, 1.0)))
    assert result.expired == (ExpiredLease("short", (2.0,), ""),)
    assert store.open_reservations() == 2


def test_a_lost_bound_only_costs_a_probe(store: RedisStore, raw: redis.Redis) -> None:
    spec = BucketSpec("lost", 100.0)
    assert store.reserve(req("gone", Charge(spec, 3.0), lease=0.2)).ok
    raw.hdel(f"{{{store.namespace}}}:state", "next")  # e.g. a hand edit
    time.sleep(0.3)
    assert store.reserve(req("after", Charge(spec, 1.0))).expired == (ExpiredLease("gone", (3.0,), ""),)
    assert raw.hget(f"{{{store.namespace}}}:state", "next") is not None


def test_an_expired_lease_frees_its_id(store: RedisStore) -> None:
    spec = BucketSpec("reuse", 10.0)
    assert store.reserve(req("same", Charge(spec, 4.0), lease=0.2)).ok
    time.sleep(0.3)
    result = store.reserve(req("same", Charge(spec, 1.0)))  # swept first, as MemoryStore does
    assert result.ok
    assert result.expired == (ExpiredLease("same", (4.0,), ""),)
    assert store.settle("same", [1.0])
    assert store.snapshot(spec).spent == 5.0


def test_sweeps_past_the_limit_continue_on_the_next_call(store: RedisStore) -> None:
    spec = BucketSpec("many", 10_000.0)
    for i in range(520):
        assert store.reserve(req(f"m{i}", Charge(spec, 1.0), lease=0.3)).ok
    time.sleep(0.4)
    first = store.reserve(req("x", Charge(spec, 1.0)))  # sweeps 500
    assert store.snapshot(spec).spent == 500.0
    second = store.reserve(req("y", Charge(spec, 1.0)))  # the other 20
    assert store.snapshot(spec).spent == 520.0
    assert len(first.expired) == len(second.expired) == JOURNAL_REPORT  # the journal's oldest
    reported: set[str] = set()
    while batch := store.sweep():
        reported |= {e.id for e in batch}
        store.acknowledge([e.id for e in batch])
    assert reported == {f"m{i}" for i in range(520)}


@pytest.mark.parametrize("size", [0, 31, 32, 255, 256, 65_535, 65_536])
@pytest.mark.parametrize("tail", ["", "ü💸"])
def test_strings_of_every_msgpack_length_class_round_trip(store: RedisStore, size: int, tail: str) -> None:
    text = "x" * (size - len(tail.encode()) if size > 8 else size) + tail  # `size` bytes (or a few more)
    rid = f"id-{size}-" + "i" * min(size, 300)
    spec = BucketSpec("strings-" + text[:40], 10.0)
    assert store.reserve(ReserveRequest(rid, (Charge(spec, 1.0),), 0.1, text)).ok
    time.sleep(0.2)
    assert store.sweep() == (ExpiredLease(rid, (1.0,), text),)


def test_more_specs_than_a_msgpack_fixint(store: RedisStore) -> None:
    specs = [BucketSpec(f"wide-{i}", 10.0) for i in range(140)]
    charges = tuple(Charge(spec, 1.0, specs[-1] if i == 0 else None) for i, spec in enumerate(specs[:-1]))
    assert store.reserve(req("wide", *charges)).ok
    assert store.snapshot(specs[138]).level == 9.0
    assert store.settle("wide", [0.5] * len(charges))
    assert store.snapshot(specs[138]).spent == 0.5


def test_a_url_store_keeps_one_connection_per_thread(redis_server: Any) -> None:
    store = RedisStore(redis_server.url, namespace=f"conn-{uuid.uuid4().hex[:12]}")
    spec = BucketSpec("threads", 1000.0)

    def work(tag: str) -> None:
        for i in range(20):
            assert store.reserve(req(f"{tag}-{i}", Charge(spec, 1.0))).ok
            assert store.settle(f"{tag}-{i}", [1.0])

    threads = [threading.Thread(target=work, args=(f"t{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    work("main")
    assert store.snapshot(spec).spent == 100.0
    direct = store._direct
    assert direct is not None
    conns = list(direct._every)
    assert 1 <= len(conns) <= 5  # the main thread's and the live threads' (ended threads' may be gone)
    store.close()
    assert all(not c.is_connected for c in conns)
    assert store.snapshot(spec).spent == 100.0  # a closed store reconnects on next use
    store.close()


def test_a_reply_left_unread_by_a_timeout_never_answers_a_later_call(redis_server: Any, raw: redis.Redis) -> None:
    store = RedisStore(
        redis_server.url,
        namespace=f"timeout-{uuid.uuid4().hex[:12]}",
        socket_timeout=0.2,
        retry=RetryPolicy(attempts=1),
    )
    try:
        assert store.snapshot(BucketSpec("a", 10.0)).level == 10.0  # connected
        raw.execute_command("CLIENT", "PAUSE", 600, "ALL")
        with pytest.raises(StoreUnavailable):
            store.snapshot(BucketSpec("a", 10.0))  # its reply comes once the pause ends
        time.sleep(0.6)
        assert store.snapshot(BucketSpec("b", 20.0)).level == 20.0  # its own reply, not a's
        assert store.reserve(req("after-pause", Charge(BucketSpec("b", 20.0), 5.0))).ok
        assert store.settle("after-pause", [5.0])
    finally:
        raw.execute_command("CLIENT", "UNPAUSE")
        store.close()


def test_a_url_store_recovers_its_scripts_after_a_script_flush(store: RedisStore, raw: redis.Redis) -> None:
    spec = BucketSpec("flushed", 10.0)
    assert store.reserve(req("f1", Charge(spec, 1.0))).ok
    raw.script_flush()  # as after a restart: NOSCRIPT, then SCRIPT LOAD on our connection
    assert store.settle("f1", [1.0])
    assert store.reserve(req("f2", Charge(spec, 1.0))).ok
    assert store.snapshot(spec).level == 8.0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_makes_its_own_connection(store: RedisStore) -> None:
    spec = BucketSpec("fork", 100.0)
    assert store.reserve(req("parent-1", Charge(spec, 1.0))).ok  # the parent's connection exists
    assert store._direct is not None
    parent_conn = store._direct._local.conn
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            ok = store.reserve(req("child", Charge(spec, 2.0))).ok and store.settle("child", [2.0])
            if ok and store._direct._local.conn is not parent_conn:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.settle("parent-1", [1.0])  # the parent's connection was left alone
    assert store.reserve(req("parent-2", Charge(spec, 4.0))).ok
    assert store.settle("parent-2", [4.0])
    assert store.snapshot(spec).spent == 7.0


def test_lua_period_bounds_are_python_bounds_bit_for_bit(store: RedisStore, raw: redis.Redis) -> None:
    """lib.lua's period_bounds mirrors PeriodRule.bounds: every unit, DST zones, odd offsets,
    times on and around offset changes and period boundaries."""
    import random
    from zoneinfo import ZoneInfo

    from budgetguard.periods import PeriodRule
    from budgetguard.stores.redis import _lua, _mp_float, _mp_rule

    body = (
        "local out, i = {}, 1\n"
        "local values = {cmsgpack.unpack(ARGV[1])}\n"
        "while i < #values do\n"
        "  local s, e = period_bounds(values[i], values[i + 1])\n"
        "  out[#out + 1] = fmt(s) .. ' ' .. fmt(e)\n"
        "  i = i + 2\n"
        "end\n"
        "return out\n"
    )
    rng = random.Random(13)
    now = 1_767_225_600.0
    cases: list[tuple[PeriodRule, float]] = []
    for zone in ("UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "America/Santiago", "Asia/Kolkata"):
        for unit in ("minute", "hour", "day", "week", "month"):
            rule = PeriodRule.in_zone(unit, ZoneInfo(zone), now)
            changes = list(rule.offsets[1::2]) or [now]
            for _ in range(12):
                t = rng.choice(changes) + rng.choice([0.0, -1.0, 1.0, 0.5, -3600.0, 3599.999]) + rng.randrange(-3, 3) * 86400
                cases.append((rule, t))
                cases.append((rule, now + rng.random() * 5e7 - 2.5e7))
    cases += [(PeriodRule("hour", (1234.567,)), now + 0.25), (PeriodRule("month", (-43200.0,)), 951_782_400.0)]
    payload = b"".join(_mp_rule(rule) + _mp_float(t) for rule, t in cases)
    got = raw.eval(_lua("lib.lua") + "\n" + body, 2, store._state_key, store._expiry_key, payload)
    assert [tuple(float(x) for x in g.split()) for g in got] == [rule.bounds(t) for rule, t in cases]


def test_a_lease_written_before_period_rules_is_still_settled(store: RedisStore, raw: redis.Redis) -> None:
    """Format 1 (no format value; per charge 14 values with period bounds): read as a lease
    without period rules, so an upgrade settles what the old version left open."""
    spec = BucketSpec("old-lease", 100.0)
    assert store.reserve(req("warm", Charge(spec, 30.0))).ok  # the bucket: 70 left
    field = store.bucket_field(spec.key)
    write = (
        "redis.call('HSET', KEYS[1], 'r:old', cmsgpack.pack('nonce', 'meta-old',"
        " ARGV[1], 100.0, 0.0, false, false, 30.0, 0.0, false, false, false, false, false, false, false))\n"
        "redis.call('ZADD', KEYS[2], 4e9, 'old')"
    )
    raw.eval(write, 2, store._state_key, store._expiry_key, field)
    assert store.open_reservations() == 2
    assert store.settle("old", [10.0])  # refunds 20 of its 30
    assert store.settle("warm", [30.0])
    state = store.snapshot(spec)
    assert (state.level, state.spent) == (90.0, 40.0)
    assert store.open_reservations() == 0


def test_a_full_unheld_bucket_is_deleted_with_its_readable_key(redis_server: Any, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    from redis_fake_time import close, fake_server_time

    clock = fake_server_time(monkeypatch, redis_server.url)
    store = RedisStore(redis_server.url, namespace=f"forget-{uuid.uuid4().hex[:12]}")
    spec = BucketSpec("user\x1fuser_id=a", 100.0, refill_per_second=1.0)
    other = BucketSpec("other", 1e9)
    hex_key = hashlib.sha256(spec.key.encode()).hexdigest()

    def fields() -> set[str]:
        return {f.decode() for f in raw.hkeys(store._state_key) if f.startswith((b"b:", b"k:"))}

    try:
        assert store.reserve(req("a1", Charge(spec, 30.0))).ok
        assert store.reserve(req("a2", Charge(spec, 10.0))).ok
        assert store.settle("a1", [30.0])  # still held by a2
        clock.advance(120)  # refilled to full while a2 is open
        assert store.reserve(req("o1", Charge(other, 1.0))).ok
        assert store.settle("o1", [1.0])  # a settle forgets due buckets: not a held one
        assert {"b:" + hex_key, "k:" + hex_key} <= fields()
        assert store.settle("a2", [20.0])  # unheld; its excess leaves it 10 short of full
        assert {"b:" + hex_key, "k:" + hex_key} <= fields()
        clock.advance(9)
        store.sweep()
        assert "b:" + hex_key in fields()  # a second short: kept
        clock.advance(1)
        store.sweep()
        assert {"b:" + hex_key, "k:" + hex_key}.isdisjoint(fields())
        assert store.snapshot(spec).level == 100.0
        assert raw.zscore(store._full_key, hex_key) is None
    finally:
        store.close()
        close(clock)


# -- the journal of swept leases -------------------------------------------------------------


def test_the_journal_shares_the_hash_tag_and_is_gone_once_acknowledged(
    store: RedisStore, raw: redis.Redis, redis_server: Any
) -> None:
    ns, spec = store.namespace, BucketSpec("j", 100.0)
    assert store.reserve(req("dead\n{x}", Charge(spec, 3.0), lease=0.2)).ok
    time.sleep(0.3)
    swept = (ExpiredLease("dead\n{x}", (3.0,), ""),)
    assert store.reserve(req("next", Charge(spec, 1.0))).expired == swept
    keys = sorted(k.decode() for k in raw.scan_iter(match=f"{{{ns}}}*"))
    assert keys == [f"{{{ns}}}:expiries", f"{{{ns}}}:journal", f"{{{ns}}}:state"]
    assert raw.zrange(f"{{{ns}}}:journal", 0, -1) == [b"dead\n{x}"]
    assert raw.hget(f"{{{ns}}}:state", "journal") == b"1"
    assert raw.hexists(f"{{{ns}}}:state", "j:dead\n{x}")
    other = RedisStore(redis_server.url, namespace=ns)  # another process sees it too
    try:
        assert other.sweep() == swept
        other.acknowledge(["dead\n{x}"])
        other.acknowledge(["dead\n{x}"])
    finally:
        other.close()
    assert store.reserve(req("after", Charge(spec, 1.0))).expired == ()
    assert not raw.exists(f"{{{ns}}}:journal")
    fields = {f.decode() for f in raw.hkeys(f"{{{ns}}}:state")}
    assert "journal" not in fields and not any(f.startswith("j:") for f in fields)
    assert store.snapshot(spec).spent == 3.0


def commands(raw: redis.Redis) -> dict[str, int]:
    """Calls per command on the server so far (scripts' calls included)."""
    return {name.removeprefix("cmdstat_"): int(stat["calls"]) for name, stat in raw.info("commandstats").items()}


def test_an_empty_journal_costs_a_reserve_no_command(store: RedisStore, raw: redis.Redis) -> None:
    """Reserve reads the journal's size with the fields it reads anyway (one HMGET): the
    journal's own commands run only while it holds something."""
    spec = BucketSpec("hot", 1e9)

    def journal_calls(n: int, tag: str) -> int:
        before = commands(raw)
        for i in range(n):
            assert store.reserve(req(f"{tag}{i}", Charge(spec, 1.0))).ok
            assert store.settle(f"{tag}{i}", [1.0])
        after = commands(raw)
        return sum(after.get(c, 0) - before.get(c, 0) for c in ("zrange", "zcard"))

    assert store.reserve(req("open", Charge(spec, 1.0))).ok  # a new namespace: the first probe sets the bound
    assert journal_calls(20, "a") == 0
    assert store.reserve(req("dies", Charge(spec, 1.0), lease=0.2)).ok
    time.sleep(0.3)
    assert store.reserve(req("sweeps", Charge(spec, 1.0))).expired != ()
    assert journal_calls(20, "b") >= 20  # unacknowledged: every reserve reads it
    store.acknowledge(["dies"])
    assert journal_calls(20, "c") == 0


def test_a_stale_journal_size_is_set_right(store: RedisStore, raw: redis.Redis) -> None:
    raw.hset(store._state_key, "journal", 3)  # e.g. a hand edit: no entries behind it
    assert store.reserve(req("r", Charge(BucketSpec("s", 10.0), 1.0))).expired == ()
    assert not raw.hexists(store._state_key, "journal")



def test_one_round_trip_to_reserve_and_one_to_settle(store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    import redis.asyncio.connection

    sent: list[str] = []  # one entry per write to a connection: a round trip

    def counting(cls: Any, name: str) -> None:
        original = getattr(cls, name)
        if asyncio.iscoroutinefunction(original):
            async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
                sent.append(name)
                return await original(self, *args, **kwargs)
        else:
            def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
                sent.append(name)
                return original(self, *args, **kwargs)
        monkeypatch.setattr(cls, name, wrapper)

    spec, pool = BucketSpec("u", 100.0, 1.0), BucketSpec("pool", 1_000.0)
    three = (Charge(spec, 5.0, lender=pool), Charge(BucketSpec("g", 1e6), 5.0))

    async def warm() -> None:  # scripts loaded, the loop's pipeline connected
        assert (await store.areserve(req("warm-async", *three))).ok

    assert store.reserve(req("warm", *three)).ok and store.settle("warm", [1.0, 1.0])
    counting(redis.connection.AbstractConnection, "send_packed_command")
    counting(redis.asyncio.connection.AbstractConnection, "send_packed_command")
    assert store.reserve(req("a", *three)).ok and len(sent) == 1
    assert store.settle("a", [2.0, 2.0]) and len(sent) == 2

    async def both() -> None:
        await warm()
        sent.clear()
        assert (await store.areserve(req("b", *three))).ok and len(sent) == 1
        assert await store.asettle("b", [2.0, 2.0]) and len(sent) == 2

    asyncio.run(both())
