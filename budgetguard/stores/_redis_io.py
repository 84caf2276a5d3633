"""How :class:`~budgetguard.stores.RedisStore` sends its scripts to Redis.

Three paths, one per kind of caller:

* :class:`Script` / :class:`AsyncScript`: ``EVALSHA`` through any object with redis-py's
  ``execute_command`` and ``script_load`` (a client passed in, or :class:`AsyncPipeline`).
* :class:`Direct` / :class:`DirectScript`: a store built from a URL, sync: one connection
  per thread, the command framed once per key tuple.
* :class:`AsyncPipeline`: async (URL-built or a client passed in): the commands of every
  task on one event loop share one connection, sent in batches, so concurrency does not
  multiply connections.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import hashlib
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio
from redis import exceptions as rexc

__all__ = ["AsyncPipeline", "AsyncScript", "Direct", "DirectScript", "Script", "text"]


def text(value: bytes | str) -> str:
    """A reply as ``str`` (clients without ``decode_responses`` return bytes)."""
    return value.decode("utf-8") if isinstance(value, bytes) else value


class Script:
    """One Lua script on one sync client: ``EVALSHA``, loading the script on ``NOSCRIPT``.

    Leaner than redis-py's ``Script`` (no keys/args tuples to build per call) on the same
    ``execute_command`` path, so the client's connection pool, retries and Redis Cluster
    routing (by the first key) all apply.
    """

    __slots__ = ("_client", "numkeys", "sha", "source")

    def __init__(self, client: Any, source: str, numkeys: int) -> None:
        self._client = client
        self.source = source
        self.numkeys = numkeys
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()

    def __call__(self, *keys_and_args: Any) -> Any:
        """Run the script with its keys then its arguments."""
        try:
            return self._client.execute_command("EVALSHA", self.sha, self.numkeys, *keys_and_args)
        except rexc.NoScriptError:  # a new or restarted server: its script cache is empty
            self.sha = text(self._client.script_load(self.source))
            return self._client.execute_command("EVALSHA", self.sha, self.numkeys, *keys_and_args)


class AsyncScript(Script):
    """:class:`Script` on an async client (``redis.asyncio.Redis`` or :class:`AsyncPipeline`)."""

    __slots__ = ()

    async def __call__(self, *keys_and_args: Any) -> Any:  # type: ignore[override]
        """Run the script with its keys then its arguments."""
        try:
            return await self._client.execute_command("EVALSHA", self.sha, self.numkeys, *keys_and_args)
        except rexc.NoScriptError:
            self.sha = text(await self._client.script_load(self.source))
            return await self._client.execute_command("EVALSHA", self.sha, self.numkeys, *keys_and_args)


class Direct:
    """The commands of a store-owned sync client, sent on one connection per thread.

    redis-py's ``execute_command`` checks a connection out of the pool and back in for
    every command (with a readiness probe, a retry wrapper and metrics around it): about
    as much client time as the round trip itself on a slow network stack. A store built
    from a URL is the only user of its client, and budgetguard retries itself (its client
    has redis-py's retries off), so it keeps one connection per thread instead, made from
    the pool's own connection class and arguments (host, TLS, timeouts, protocol). A
    connection is dropped (and made again on next use) after any error other than an
    error reply, so a reply left unread by a timeout never reaches a later command, and
    after a fork (the child makes its own). ``close()`` closes them all.

    Threads are the application's own bound on these connections (one each); they are
    not taken from the client's pool, so its ``max_connections`` does not apply to them.
    """

    def __init__(self, client: redis.Redis) -> None:
        pool = client.connection_pool
        self._make = functools.partial(pool.connection_class, **pool.connection_kwargs)
        self._local = threading.local()
        self._every: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()

    def _connection(self) -> Any:
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():
            conn = self._make()
            local.conn, local.pid = conn, os.getpid()
            with self._lock:
                self._every.add(conn)
        return conn

    def _round_trip(self, send: Callable[[Any], None]) -> Any:
        """``send`` a command on this thread's connection and read its reply.

        Error replies raise, as redis-py's; any other failure drops the connection.
        """
        conn = self._connection()
        try:
            send(conn)
            return conn.read_response()
        except rexc.ResponseError:  # a whole reply was read: the connection stays usable
            raise
        except BaseException:
            conn.disconnect()
            self._local.conn = None
            raise

    def execute_command(self, *args: Any) -> Any:
        """Send one command and read its reply."""
        return self._round_trip(lambda conn: conn.send_command(*args))

    def evalsha(self, head: bytes, nargs: int, args: tuple[bytes, ...]) -> Any:
        """``EVALSHA``: ``head`` is the packed name, sha, key count and keys; ``args`` bytes."""
        parts = [b"*%d\r\n" % (nargs,), head]
        for arg in args:
            parts += (b"$%d\r\n" % (len(arg),), arg, b"\r\n")
        packed = [b"".join(parts)]
        return self._round_trip(lambda conn: conn.send_packed_command(packed))  # one sendall

    def pack_head(self, sha: str, numkeys: int, keys: tuple[str, ...]) -> bytes:
        """The packed start of ``EVALSHA sha numkeys keys...`` (keys encoded as the client would)."""
        encode = self._connection().encoder.encode
        items = [b"EVALSHA", sha.encode(), b"%d" % (numkeys,), *(encode(k) for k in keys)]
        return b"".join(b"$%d\r\n%s\r\n" % (len(x), x) for x in items)

    def script_load(self, source: str) -> str:
        """``SCRIPT LOAD``; the script's sha1."""
        return text(self.execute_command("SCRIPT", "LOAD", source))

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            conns = list(self._every)
            self._every = weakref.WeakSet()
        for conn in conns:
            conn.disconnect()


class DirectScript(Script):
    """:class:`Script` on a :class:`Direct`: the command's head (name, sha, keys) is packed
    once per key tuple, and arguments that are bytes (the reserve and settle payloads) are
    framed without redis-py's command packer."""

    __slots__ = ("_heads",)

    def __init__(self, client: Any, source: str, numkeys: int) -> None:
        super().__init__(client, source, numkeys)
        self._heads: dict[tuple[str, ...], bytes] = {}

    def __call__(self, *keys_and_args: Any) -> Any:
        """Run the script with its keys then its arguments."""
        n = self.numkeys
        keys, args = keys_and_args[:n], keys_and_args[n:]
        if not all(type(a) is bytes for a in args):  # snapshot's numbers: redis-py packs them
            return super().__call__(*keys_and_args)
        try:
            return self._client.evalsha(self._head(keys), 3 + len(keys_and_args), args)
        except rexc.NoScriptError:  # a new or restarted server: its script cache is empty
            self.sha = self._client.script_load(self.source)
            self._heads.clear()
            return self._client.evalsha(self._head(keys), 3 + len(keys_and_args), args)

    def _head(self, keys: tuple[str, ...]) -> bytes:
        head = self._heads.get(keys)
        if head is None:
            head = self._heads[keys] = self._client.pack_head(self.sha, self.numkeys, keys)
        return head


class AsyncPipeline:
    """The commands of every task on one event loop, sent in batches on one connection.

    A caller queues its command and awaits its reply. When no batch is in flight, one task
    writes everything queued at once on the pipeline's connection (no MULTI: each command
    runs on its own; a script is still atomic), reads the replies in order and hands each
    caller its own reply or error; what is queued meanwhile goes in the next batch. A
    thousand concurrent calls so take one connection and a few round trips, where a
    command each would take a thousand connections (and fail at the pool's limit); no
    caller waits for more than the batch in flight and its own. The connection is taken
    from the client's pool on first use (its limit and timeout apply) and kept until
    :meth:`aclose` (a checkout per batch cost a tenth of a call); its settings (socket
    timeouts, TLS, credentials, decoding) apply; the client's retry settings do not: the
    store's :class:`~budgetguard.stores._retry.RetryPolicy` retries.

    A batch that fails as a whole (connection lost, timeout) fails every command in it,
    and redis-py drops the connection (a reply left unread never reaches a later batch);
    the store retries them, which is safe (see :mod:`._retry`). A caller cancelled while
    queued or in flight just loses its reply. One pipeline serves one event loop.
    """

    __slots__ = ("_client", "_conn", "_flushing", "_queue")

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._client = client
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._flushing: asyncio.Task[None] | None = None
        self._conn: Any = None  # taken from the client's pool on first use

    async def execute_command(self, *args: Any) -> Any:
        """Queue one command; its reply (an error reply raises, as redis-py's)."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append((args, future))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush())  # held here: tasks are weakly referenced
        return await future

    async def aclose(self) -> None:
        """Give the connection back to the client's pool."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._client.connection_pool.release(conn)

    async def script_load(self, source: str) -> str:
        """``SCRIPT LOAD`` (queued like any command); the script's sha1."""
        return text(await self.execute_command("SCRIPT", "LOAD", source))

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._send(batch)
        except BaseException:  # cancelled (the loop is closing): nobody will send the rest
            for _, future in self._queue:
                future.cancel()
            self._queue = []
            raise
        finally:
            self._flushing = None

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            replies = await self._round_trip([args for args, _ in batch])
        except Exception as exc:  # noqa: BLE001 - whatever failed the batch fails each command in it
            for _, future in batch:
                if not future.done():  # a copy each: one exception raised in many tasks would
                    future.set_exception(copy.copy(exc))  # collect all their tracebacks
            return
        except BaseException:
            for _, future in batch:
                future.cancel()
            raise
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():  # its caller was cancelled
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _round_trip(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Write ``commands`` on the connection; their replies, an error reply as its exception.

        redis-py disconnects the connection on any failure to send or read (cancellation
        too), so it is either in step or closed; a closed one connects again on the next
        send.
        """
        conn = self._conn
        if conn is None:
            conn = self._conn = await self._client.connection_pool.get_connection()
        await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await conn.read_response())
            except rexc.ResponseError as exc:  # a whole error reply was read: the next follows
                replies.append(exc)
        return replies
