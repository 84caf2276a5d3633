"""Redis store: buckets and leases on a Redis server that many machines share.

Every operation is one round trip: a Lua script (``lua/*.lua``, registered once and run
with EVALSHA) that reads the server's clock, sweeps due leases and applies the same
rules as :mod:`.base`. Time comes from Redis (``TIME``), so client clocks do not matter:
clients send each bucket's period as a rule (:class:`~budgetguard.periods.PeriodRule`),
and the script finds the current period on the server's clock.

Connections (see :mod:`._redis_io`): sync calls of a store built from a URL go on one
connection per thread; async calls, from a URL or through a client passed in, go through
one pipeline per event loop, which sends the commands of concurrent tasks together on one
connection. A store built from a URL takes its connections from a
``BlockingConnectionPool``: when ``max_connections`` are in use a call waits up to
``pool_timeout`` for one, then raises :class:`~budgetguard.errors.StoreUnavailable`.

Key layout (four keys with one hash tag, so every script works on Redis Cluster)::

    {ns}:state    hash: b:<hex> bucket (msgpack: level, updated_at, period_start, spent,
                                holds: the open leases holding it)
                        k:<hex> the bucket's readable key (debugging)
                        r:<id>  open reservation (lease, msgpack)
                        next    lower bound of the earliest lease expiry
                        j:<id>  journal entry: a swept lease not yet acknowledged
                                (msgpack: meta, charged amounts)
                        journal how many entries the journal holds (absent: none)
    {ns}:expiries zset: reservation id by lease expiry (server time)
    {ns}:full     zset: bucket <hex> by when it is full again, for buckets no lease holds
    {ns}:journal  zset: swept reservation id by when it was swept (absent when empty)

The journal (see :mod:`.base`): a sweep moves each lease it charges into the journal in
the same script; reserve reads the ``journal`` field with the fields it reads anyway, and
reports the oldest entries only when it is set. :meth:`RedisStore.acknowledge` drops them.

A bucket that is full and that no lease holds grants what a new one grants: each settle
forgets up to 8 buckets whose time in ``{ns}:full`` has come (a sweep up to 1,000), and
one is made again, full, when next used. So the hash holds the buckets in use, not one
per scope value ever seen. (Redis 7.4 expires hash fields itself, ``HEXPIREAT``; the
zset works on the Redis 7.0 this is tested on, and the scripts that move a bucket's time
are the ones that write the zset.)

``<hex>`` is the sha256 of the bucket key, so no scope value (``:``, ``{``, newlines, ...)
can reach into another field. Buckets are fields of one hash rather than keys of their
own because a script then reads every bucket and lease it needs with one ``HMGET`` and
writes them back with one ``HSET`` (every ``redis.call`` costs microseconds); nothing is
lost on Redis Cluster, where the common hash tag put all of a namespace's keys in one
slot anyway. Keys carry no TTL: run Redis with ``maxmemory-policy noeviction`` (or a
``volatile-*`` policy) so that budgets are never evicted.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import os
import struct
import threading
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import redis
import redis.asyncio
from redis import exceptions as rexc
from redis.backoff import NoBackoff
from redis.retry import Retry

from budgetguard.errors import ConfigurationError, StoreUnavailable
from budgetguard.periods import PeriodRule
from budgetguard.stores._redis_io import (
    AsyncPipeline,
    AsyncScript,
    Direct,
    DirectScript,
    Script,
)
from budgetguard.stores._redis_io import text as _text
from budgetguard.stores._retry import RetryPolicy, redact_url
from budgetguard.stores.base import (
    BucketSpec,
    BucketState,
    Charge,
    Denial,
    ExpiredLease,
    ReserveRequest,
    ReserveResult,
)
from budgetguard.stores.redis_url import check_redis_url

__all__ = ["RedisStore"]

T = TypeVar("T")

_OK = ReserveResult(True)

# Errors that mean "Redis cannot serve us now"; the first group is worth a quick retry.
_TRANSIENT_REPLIES = ("LOADING", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "BUSY")
_FATAL_REPLIES = ("OOM", "MISCONF", "NOPERM", "NOAUTH", "WRONGPASS")
# What redis-py's BlockingConnectionPool raises (a plain ConnectionError) after its timeout.
_POOL_TIMED_OUT = "No connection available."


@functools.cache
def _lua(name: str) -> str:
    return resources.files("budgetguard.stores").joinpath("lua", name).read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class _Scripts:
    """The scripts registered on one client (sync or async)."""

    reserve: Script
    settle: Script
    snapshot: Script
    sweep: Script
    acknowledge: Script


def _register(client: Any, kind: type[Script] = Script) -> _Scripts:
    # Each script is lib.lua (the shared arithmetic), sweeping.lua for the scripts that sweep
    # or report the journal, then its own body.
    # KEYS: the namespace's four keys (snapshot: the state hash only).
    scripts = (
        (("lib.lua", "sweeping.lua", "reserve.lua"), 4),
        (("lib.lua", "settle.lua"), 4),
        (("lib.lua", "snapshot.lua"), 1),
        (("lib.lua", "sweeping.lua", "sweep.lua"), 4),
        (("lib.lua", "sweeping.lua", "acknowledge.lua"), 4),
    )
    return _Scripts(*(kind(client, "\n".join(map(_lua, files)), numkeys) for files, numkeys in scripts))


def _expired(items: Sequence[Any]) -> tuple[ExpiredLease, ...]:
    out = []
    for i in range(0, len(items), 3):
        amounts = _text(items[i + 2])
        out.append(
            ExpiredLease(
                _text(items[i]), tuple(float(a) for a in amounts.split(",")) if amounts else (), _text(items[i + 1])
            )
        )
    return tuple(out)


# The scripts' arguments are sequences of MessagePack values, which the script decodes
# with one cmsgpack.unpack call (in C, about a third of what cjson takes for the same
# request). Only what they need is written here: str, float64, small ints and false.
_F64 = struct.Struct(">Bd").pack
_CHARGE = struct.Struct(">BBdB").pack  # spec index (< 128), float64 amount, no lender
_FALSE = b"\xc2"


def _mp_float(value: float) -> bytes:
    return _F64(0xCB, value)


def _mp_int(value: int) -> bytes:
    return bytes((value,)) if 0 <= value < 0x80 else b"\xce" + value.to_bytes(4, "big")


def _mp_str(text: str, errors: str = "strict") -> bytes:
    data = text.encode("utf-8", errors)
    n = len(data)
    if n < 0x20:
        return bytes((0xA0 | n,)) + data
    if n < 0x100:
        return bytes((0xD9, n)) + data
    if n < 0x10000:
        return b"\xda" + n.to_bytes(2, "big") + data
    return b"\xdb" + n.to_bytes(4, "big") + data


def _mp_rule(rule: PeriodRule | None) -> bytes:
    """A period rule as the array ``[unit, offsets...]`` (``false`` for none)."""
    if rule is None:
        return _FALSE
    n = 1 + len(rule.offsets)
    head = bytes((0x90 | n,)) if n < 16 else b"\xdc" + n.to_bytes(2, "big")
    return b"".join((head, _mp_str(rule.unit), *(_F64(0xCB, float(x)) for x in rule.offsets)))


class RedisStore:
    """Buckets and leases on Redis, shared by every process that points at it.

    Args:
        url_or_client: A ``redis://``, ``rediss://`` or ``unix://`` URL, or a
            ``redis.Redis`` client (its own timeouts and retries then apply), or a
            ``redis.asyncio.Redis`` client for an async-only store.
        async_client: The ``redis.asyncio.Redis`` client for the async methods. When the
            store is built from a URL, one is created lazily per event loop; when only a
            sync client is given, the async methods run it in a worker thread.
        namespace: Prefix (and Redis Cluster hash tag) of every key; stores with different
            namespaces on one server never see each other's buckets.
        socket_timeout: Seconds to wait for a reply (URL only): a hung server then raises
            :class:`~budgetguard.errors.StoreUnavailable` instead of hanging the call.
        socket_connect_timeout: Seconds to wait for a connection (URL only).
        max_connections: Connections each of the store's pools (one sync, one per event
            loop) may open (URL only). Async calls of one loop use one at a time, however
            many run at once; sync calls use one per thread, outside the pool.
        pool_timeout: Seconds a call waits for a free connection when ``max_connections``
            are in use, before :class:`~budgetguard.errors.StoreUnavailable` (URL only).
        retry: How transient errors (connection lost, server loading) are retried.
        client_options: More keyword arguments for the connection pool's ``from_url``
            (``redis.BlockingConnectionPool`` and its ``redis.asyncio`` twin).

    A client passed in keeps its own pool. Async calls take one of its connections at a
    time; sync calls take one per concurrent call, so a pool smaller than the threads that
    share it runs out. A ``BlockingConnectionPool`` then makes them wait; redis-py's default
    ``ConnectionPool`` refuses, which this store reports as
    :class:`~budgetguard.errors.StoreUnavailable` saying so.

    Raises:
        ConfigurationError: A bad namespace or argument type.

    Example:
        >>> store = RedisStore("redis://localhost:6379/0", namespace="myapp")  # doctest: +SKIP
    """

    def __init__(
        self,
        url_or_client: str | redis.Redis | redis.asyncio.Redis,
        *,
        async_client: redis.asyncio.Redis | None = None,
        namespace: str = "budgetguard",
        socket_timeout: float = 5.0,
        socket_connect_timeout: float = 2.0,
        max_connections: int = 50,
        pool_timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(namespace, str) or not namespace or any(c in namespace for c in "{}\r\n"):
            msg = f"namespace must be a non-empty string without braces or newlines, got {namespace!r}"
            raise ConfigurationError(msg)
        self.namespace = namespace
        self.retry = retry or RetryPolicy()
        self._url: str | None = None
        self._client: redis.Redis | None = None
        self._aclient: redis.asyncio.Redis | None = async_client
        if isinstance(url_or_client, str):
            check_redis_url(url_or_client)  # a bad port or database fails here, not on the first call
            self._url = url_or_client
            self._options = {
                "socket_timeout": socket_timeout,
                "socket_connect_timeout": socket_connect_timeout,
                # budgetguard retries itself (RetryPolicy); redis-py's default would back
                # off for seconds before we could report the outage.
                "retry": Retry(NoBackoff(), 0),
                "max_connections": max_connections,
                "timeout": pool_timeout,
                **(client_options or {}),
            }
            self.where = redact_url(url_or_client)
        elif isinstance(url_or_client, redis.asyncio.Redis):
            if async_client is not None:
                msg = "pass the asyncio client either as url_or_client or as async_client, not both"
                raise ConfigurationError(msg)
            self._aclient = url_or_client
            self.where = _describe_client(url_or_client)
        elif isinstance(url_or_client, redis.Redis):
            self._client = url_or_client
            self.where = _describe_client(url_or_client)
        else:
            msg = f"RedisStore needs a redis:// URL or a redis.Redis client, got {type(url_or_client).__name__}"
            raise ConfigurationError(msg)
        if self._aclient is not None and not isinstance(self._aclient, redis.asyncio.Redis):
            msg = f"async_client must be a redis.asyncio.Redis, got {type(self._aclient).__name__}"
            raise ConfigurationError(msg)
        prefix = "{" + namespace + "}:"
        self._state_key = prefix + "state"
        self._expiry_key = prefix + "expiries"
        self._full_key = prefix + "full"
        self._journal_key = prefix + "journal"
        # The scripts' KEYS (snapshot: the first).
        self._keys = (self._state_key, self._expiry_key, self._full_key, self._journal_key)
        self._hex_cache: dict[str, str] = {}
        self._spec_cache: dict[BucketSpec, bytes] = {}
        self._lock = threading.Lock()
        self._scripts: _Scripts | None = None
        self._direct: Direct | None = None
        # Per event loop: an asyncio client (URL mode) and a pipeline cannot cross loops.
        self._loops: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[redis.asyncio.Redis, _Scripts, AsyncPipeline]
        ] = weakref.WeakKeyDictionary()
        # Nonces let a retried reserve recognise its own lease if the reply was lost.
        self._nonce_prefix = os.urandom(6).hex()
        self._nonces = itertools.count()

    # -- clients --------------------------------------------------------------------

    @property
    def client(self) -> redis.Redis:
        """The sync client (created on first use when built from a URL)."""
        if self._client is None:
            if self._url is None:
                msg = (
                    "this RedisStore was built from an asyncio client only; use the async methods or pass a redis.Redis"
                )
                raise ConfigurationError(msg)
            with self._lock:
                if self._client is None:
                    pool = redis.BlockingConnectionPool.from_url(self._url, **self._options)
                    self._client = redis.Redis.from_pool(pool)
        return self._client

    def _sync_scripts(self) -> _Scripts:
        scripts = self._scripts
        if scripts is None:
            client = self.client
            if self._url is not None:  # our own client: one connection per thread (see Direct)
                with self._lock:
                    if self._direct is None:
                        self._direct = Direct(client)
                    scripts = self._scripts = _register(self._direct, DirectScript)
            else:
                scripts = self._scripts = _register(client)
        return scripts

    def _async_scripts(self) -> _Scripts | None:
        if self._aclient is None and self._url is None:
            return None  # sync client only: async methods use a worker thread
        loop = asyncio.get_running_loop()
        pair = self._loops.get(loop)
        if pair is None:
            client = self._aclient
            if client is None:
                assert self._url is not None
                pool = redis.asyncio.BlockingConnectionPool.from_url(self._url, **self._options)
                client = redis.asyncio.Redis.from_pool(pool)
            pipeline = AsyncPipeline(client)
            pair = (client, _register(pipeline, AsyncScript), pipeline)
            self._loops[loop] = pair
        return pair[1]

    # -- errors ---------------------------------------------------------------------

    @staticmethod
    def _is_unavailable(exc: BaseException) -> bool:
        if isinstance(exc, (rexc.ConnectionError, rexc.TimeoutError, OSError)):
            return True
        return isinstance(exc, rexc.ResponseError) and str(exc).startswith(_TRANSIENT_REPLIES + _FATAL_REPLIES)

    @staticmethod
    def _is_transient(exc: BaseException) -> bool:
        if isinstance(exc, (rexc.AuthenticationError, rexc.AuthorizationError)):
            return False
        if isinstance(exc, (rexc.ConnectionError, rexc.TimeoutError, OSError)):
            return True
        return isinstance(exc, rexc.ResponseError) and str(exc).startswith(_TRANSIENT_REPLIES)

    def _describe(self, exc: BaseException) -> StoreUnavailable:
        where = f"Redis store {self.where} (namespace {self.namespace!r})"
        text = str(exc) or type(exc).__name__
        if isinstance(exc, (rexc.AuthenticationError, rexc.AuthorizationError)) or text.startswith(
            ("NOAUTH", "WRONGPASS", "NOPERM")
        ):
            hint = "check the username and password in the URL and the user's ACL (it needs EVALSHA, SCRIPT LOAD)"
        elif isinstance(exc, rexc.MaxConnectionsError) or text == _POOL_TIMED_OUT:
            hint = self._pool_hint(exc)
        elif isinstance(exc, rexc.TimeoutError):
            hint = (
                "the server did not answer within socket_timeout; check its load (SLOWLOG, a long-running "
                "script, a full disk) and the network, or raise socket_timeout"
            )
        elif text.startswith("OOM"):
            hint = "Redis reached maxmemory; free memory or raise maxmemory (and keep maxmemory-policy noeviction)"
        elif text.startswith("MISCONF"):
            hint = "Redis cannot persist its data (see its log); fix the disk or its save settings"
        elif text.startswith(_TRANSIENT_REPLIES):
            hint = "the server is loading, failing over or busy; it should recover shortly"
        else:
            hint = "check that redis-server is running and reachable from this host (host, port, TLS, firewall)"
        return StoreUnavailable(f"{where} is unavailable: {text}; {hint}")

    def _pool_hint(self, exc: BaseException) -> str:
        if self._url is not None:
            return (
                f"all max_connections={self._options['max_connections']} connections stayed in use for "
                f"pool_timeout={self._options['timeout']} s; raise them (RedisStore(url, max_connections=..., "
                "pool_timeout=...))"
            )
        if isinstance(exc, rexc.MaxConnectionsError):  # redis-py's default pool refuses at its limit
            return (
                "every connection of the client's pool was in use (its max_connections); build the client on a "
                "BlockingConnectionPool so that calls wait for one (redis.Redis.from_pool(redis.BlockingConnectionPool"
                ".from_url(url, max_connections=..., timeout=...))), raise max_connections, or give RedisStore the URL"
            )
        return "every connection of the client's pool stayed in use past its timeout; raise its max_connections or timeout"

    def _run(self, fn: Callable[[], T]) -> T:
        return self.retry.call(
            fn, is_transient=self._is_transient, is_unavailable=self._is_unavailable, describe=self._describe
        )

    async def _arun(self, fn: Callable[[], Awaitable[T]]) -> T:
        return await self.retry.acall(
            fn, is_transient=self._is_transient, is_unavailable=self._is_unavailable, describe=self._describe
        )

    # -- encoding -------------------------------------------------------------------

    def bucket_field(self, key: str) -> str:
        """The field of the state hash (``{namespace}:state``) holding bucket ``key``."""
        return "b:" + self._hex(key)

    def _hex(self, key: str) -> str:
        digest = self._hex_cache.get(key)
        if digest is None:
            digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
            if len(self._hex_cache) >= 100_000:
                self._hex_cache.clear()
            self._hex_cache[key] = digest
        return digest

    def _spec_bytes(self, spec: BucketSpec) -> bytes:
        packed = self._spec_cache.get(spec)
        if packed is None:
            packed = b"".join(
                (
                    _mp_str(self._hex(spec.key)),
                    _mp_str(spec.key, "surrogatepass"),
                    _mp_float(spec.capacity),
                    _mp_float(spec.refill_per_second),
                    _mp_rule(spec.period),
                )
            )
            if len(self._spec_cache) >= 10_000:
                self._spec_cache.clear()
            self._spec_cache[spec] = packed
        return packed

    def _reserve_payload(self, request: ReserveRequest) -> bytes:
        # One argument (see reserve.lua): id, nonce, lease seconds, meta, the number of
        # specs, each spec (cached), then per charge its spec index, amount, lender index.
        charges = request.charges
        if len(charges) == 1 and charges[0].lender is None:  # the common case
            tail = b"\x01" + self._spec_bytes(charges[0].bucket) + b"\x01" + _mp_float(charges[0].amount) + b"\x00"
        else:
            tail = self._charges_bytes(charges)
        nonce = f"{self._nonce_prefix}{next(self._nonces)}"
        return b"".join(
            (_mp_str(request.id), _mp_str(nonce), _mp_float(request.lease_seconds), _mp_str(request.meta_text()), tail)
        )

    def _charges_bytes(self, charges: Sequence[Charge]) -> bytes:
        # Specs are numbered by their packed bytes (cached per spec, so equal specs give
        # the same bytes object, whose hash Python keeps): one BucketSpec hash per spec.
        index: dict[bytes, int] = {}
        flat: list[bytes] = []
        spec_bytes = self._spec_bytes
        for charge in charges:
            packed = spec_bytes(charge.bucket)
            j = index.get(packed)
            if j is None:
                j = index[packed] = len(index) + 1
            lender = charge.lender
            if lender is None and j < 0x80:
                flat.append(_CHARGE(j, 0xCB, charge.amount, 0))
                continue
            flat.append(_mp_int(j) + _mp_float(charge.amount))
            if lender is None:
                flat.append(b"\x00")
                continue
            packed = spec_bytes(lender)
            k = index.get(packed)
            if k is None:
                k = index[packed] = len(index) + 1
            flat.append(_mp_int(k))
        return b"".join((_mp_int(len(index)), *index, *flat))

    @staticmethod
    def _reserve_result(request: ReserveRequest, reply: Any) -> ReserveResult:
        if not isinstance(reply, list):
            if reply == 2:
                msg = f"reservation id {request.id!r} is already open"
                raise ValueError(msg)
            return _OK  # 1 reserved, 3 the replay of a reservation whose reply was lost
        status = reply[0]
        expired = _expired(reply[4:])
        if status == 2:
            msg = f"reservation id {request.id!r} is already open"
            raise ValueError(msg)
        if status != 0:
            return ReserveResult(True, None, expired)
        index = int(reply[1])
        charge = request.charges[index]
        wait = _text(reply[3])
        return ReserveResult(
            False,
            Denial(index, charge.bucket.key, charge.amount, float(reply[2]), float(wait) if wait else None),
            expired,
        )

    @staticmethod
    def _settle_payload(reservation_id: str, actuals: Sequence[float] | None) -> bytes:
        # One argument (see settle.lua): the id, then every actual amount or false.
        if actuals is None:
            return _mp_str(reservation_id) + _FALSE
        return b"".join((_mp_str(reservation_id), *[_mp_float(float(a)) for a in actuals]))

    def _snapshot_args(self, spec: BucketSpec) -> tuple[Any, ...]:
        # One argument (see snapshot.lua): hex, capacity, refill, period rule.
        payload = b"".join(
            (_mp_str(self._hex(spec.key)), _mp_float(spec.capacity), _mp_float(spec.refill_per_second), _mp_rule(spec.period))
        )
        return (self._state_key, payload)

    @staticmethod
    def _state(reply: bytes | str) -> BucketState:
        level, updated, period, spent = _text(reply).split(" ")
        return BucketState(float(level), float(updated), None if period == "-" else float(period), float(spent))

    @staticmethod
    def _settled(reply: Any) -> bool:
        return bool(reply)

    # -- protocol -------------------------------------------------------------------

    def reserve(self, request: ReserveRequest) -> ReserveResult:
        """Reserve all charges or none in one round trip; also sweeps expired leases.

        Raises:
            ValueError: A reservation with this id is open.
            StoreUnavailable: Redis cannot be reached (after brief retries).
        """
        payload = self._reserve_payload(request)
        script, keys = self._sync_scripts().reserve, self._keys
        return self._reserve_result(request, self._run(lambda: script(*keys, payload)))

    def settle(self, reservation_id: str, actuals: Sequence[float] | None) -> bool:
        """Settle once in one round trip; ``False`` if unknown, settled or swept.

        Raises:
            ValueError: ``actuals`` has fewer amounts than the reservation has charges
                (nothing is changed).
        """
        payload = self._settle_payload(reservation_id, actuals)
        script, keys = self._sync_scripts().settle, self._keys
        try:
            return self._settled(self._run(lambda: script(*keys, payload)))
        except rexc.ResponseError as exc:
            raise _settle_error(exc) from exc

    def snapshot(self, spec: BucketSpec) -> BucketState:
        """Return the bucket as of the server's now (full if never used); read-only."""
        args = self._snapshot_args(spec)
        script = self._sync_scripts().snapshot
        return self._state(self._run(lambda: script(*args)))

    def sweep(self) -> tuple[ExpiredLease, ...]:
        """Settle due leases at their reserved amounts into the journal (at most 500 per
        call) and report the journal."""
        script = self._sync_scripts().sweep
        return _expired(self._run(lambda: script(*self._keys)))

    def acknowledge(self, ids: Sequence[str]) -> None:
        """Drop these entries from the journal (their records are stored); one round trip."""
        if ids:
            script, keys = self._sync_scripts().acknowledge, self._keys
            self._run(lambda: script(*keys, *ids))

    def open_reservations(self) -> int:
        """How many reservations are reserved and not yet settled or swept."""
        return int(self._run(lambda: self.client.zcard(self._expiry_key)))

    def close(self) -> None:
        """Close the sync client if this store created it (async clients: :meth:`aclose`)."""
        if self._url is not None and self._client is not None:
            client, direct = self._client, self._direct
            self._client, self._scripts, self._direct = None, None, None
            if direct is not None:
                direct.close()
            client.close()

    async def areserve(self, request: ReserveRequest) -> ReserveResult:
        """Async :meth:`reserve` on the asyncio client."""
        scripts = self._async_scripts()
        if scripts is None:
            return await asyncio.to_thread(self.reserve, request)
        payload = self._reserve_payload(request)
        script, keys = scripts.reserve, self._keys
        return self._reserve_result(request, await self._arun(lambda: script(*keys, payload)))

    async def asettle(self, reservation_id: str, actuals: Sequence[float] | None) -> bool:
        """Async :meth:`settle` on the asyncio client."""
        scripts = self._async_scripts()
        if scripts is None:
            return await asyncio.to_thread(self.settle, reservation_id, actuals)
        payload = self._settle_payload(reservation_id, actuals)
        script, keys = scripts.settle, self._keys
        try:
            return self._settled(await self._arun(lambda: script(*keys, payload)))
        except rexc.ResponseError as exc:
            raise _settle_error(exc) from exc

    async def asnapshot(self, spec: BucketSpec) -> BucketState:
        """Async :meth:`snapshot` on the asyncio client."""
        scripts = self._async_scripts()
        if scripts is None:
            return await asyncio.to_thread(self.snapshot, spec)
        args = self._snapshot_args(spec)
        script = scripts.snapshot
        return self._state(await self._arun(lambda: script(*args)))

    async def asweep(self) -> tuple[ExpiredLease, ...]:
        """Async :meth:`sweep` on the asyncio client."""
        scripts = self._async_scripts()
        if scripts is None:
            return await asyncio.to_thread(self.sweep)
        script = scripts.sweep
        return _expired(await self._arun(lambda: script(*self._keys)))

    async def aacknowledge(self, ids: Sequence[str]) -> None:
        """Async :meth:`acknowledge` on the asyncio client."""
        if not ids:
            return
        scripts = self._async_scripts()
        if scripts is None:
            await asyncio.to_thread(self.acknowledge, ids)
            return
        script, keys = scripts.acknowledge, self._keys
        await self._arun(lambda: script(*keys, *ids))

    async def aclose(self) -> None:
        """Close the clients this store created (the current loop's asyncio client too)."""
        self.close()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - called outside a loop
            return
        pair = self._loops.pop(loop, None)
        if pair is None:
            return
        await pair[2].aclose()  # the pipeline's connection back to the pool
        if pair[0] is not self._aclient:  # ours, built from the URL
            await pair[0].aclose()

    def __repr__(self) -> str:
        return f"RedisStore({self.where!r}, namespace={self.namespace!r})"


def _settle_error(exc: rexc.ResponseError) -> Exception:
    text = str(exc)
    if "budgetguard:" in text:
        return ValueError(text[text.index("budgetguard:") :])
    return exc


def _describe_client(client: Any) -> str:
    try:
        kwargs = client.connection_pool.connection_kwargs
    except AttributeError:  # pragma: no cover - cluster clients
        return repr(client)
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    return f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
