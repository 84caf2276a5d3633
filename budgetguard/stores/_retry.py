"""How the durable stores survive blips and how they say they cannot reach their data.

Both :class:`~budgetguard.stores.SQLiteStore` and :class:`~budgetguard.stores.RedisStore`
run every operation through one :class:`RetryPolicy`:

* The first attempt runs directly (no tenacity objects on the hot path).
* A *transient* failure (connection reset, Redis still loading, a SQLite lock that was
  refused without waiting) is retried by tenacity: by default 3 attempts in all, spread
  over at most ~0.5 s with jittered exponential waits.
* When the attempts are spent, or the failure is one retrying cannot fix (wrong password,
  missing directory, a lock held past ``busy_timeout``), the store's ``describe`` turns it
  into :class:`~budgetguard.errors.StoreUnavailable` whose message names the store, where
  it points (URL without its password) and what to check.

Retrying is only safe because every operation is idempotent or atomic: a SQLite
transaction that failed was rolled back, a Redis reservation carries a nonce so a replay
of a request whose reply was lost is recognised, and settling twice equals settling once.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tenacity import (
    AsyncRetrying,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from budgetguard.errors import StoreUnavailable

__all__ = ["RetryPolicy", "redact_url"]

T = TypeVar("T")

Describe = Callable[[BaseException], StoreUnavailable]
Predicate = Callable[[BaseException], bool]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retry transient store errors briefly, then raise :class:`StoreUnavailable`.

    Attributes:
        attempts: Attempts in all, the first included.
        within: Seconds after the first attempt started past which no new attempt starts.
        initial_wait: First wait between attempts (doubles, plus jitter).
        max_wait: Longest single wait.
    """

    attempts: int = 3
    within: float = 0.5
    initial_wait: float = 0.05
    max_wait: float = 0.2

    def _retrying_kwargs(self, is_transient: Predicate, started: float) -> dict[str, object]:
        left = max(self.within - (time.monotonic() - started), 0.0)
        return {
            # One attempt already failed outside tenacity.
            "stop": stop_after_attempt(max(self.attempts - 1, 1)) | stop_after_delay(left),
            "wait": wait_exponential(multiplier=self.initial_wait, max=self.max_wait)
            + wait_random(0, self.initial_wait),
            "retry": retry_if_exception(is_transient),
            "reraise": True,
        }

    def call(
        self,
        fn: Callable[[], T],
        *,
        is_transient: Predicate,
        is_unavailable: Predicate,
        describe: Describe,
    ) -> T:
        """Run ``fn``; retry transient errors; turn "store unusable" errors into one type.

        Args:
            fn: The operation (must be safe to run again after a transient failure).
            is_transient: Whether an exception is worth another attempt.
            is_unavailable: Whether an exception means the store cannot be used now
                (anything else, e.g. a ``ValueError``, propagates unchanged).
            describe: Builds the :class:`StoreUnavailable` for such an exception.

        Raises:
            StoreUnavailable: The store stayed unreachable.
        """
        started = time.monotonic()
        try:
            return fn()
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            if self.attempts <= 1 or not is_transient(exc) or time.monotonic() - started >= self.within:
                raise describe(exc) from exc
        try:
            for attempt in Retrying(**self._retrying_kwargs(is_transient, started)):  # type: ignore[arg-type]
                with attempt:
                    return fn()
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            raise describe(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def acall(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        is_transient: Predicate,
        is_unavailable: Predicate,
        describe: Describe,
    ) -> T:
        """Async :meth:`call`: ``fn`` returns a fresh awaitable per attempt."""
        started = time.monotonic()
        try:
            return await fn()
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            if self.attempts <= 1 or not is_transient(exc) or time.monotonic() - started >= self.within:
                raise describe(exc) from exc
        try:
            async for attempt in AsyncRetrying(**self._retrying_kwargs(is_transient, started)):  # type: ignore[arg-type]
                with attempt:
                    return await fn()
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            raise describe(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover


_SECRET_PARAMS = frozenset({"password", "pass", "passwd", "token", "secret"})


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (safe for messages and logs).

    Example:
        >>> redact_url("redis://app:hunter2@cache:6379/0")
        'redis://app:***@cache:6379/0'
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        creds, _, host = netloc.rpartition("@")
        user, sep, _password = creds.partition(":")
        netloc = f"{user}:***@{host}" if sep else f"{user}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in pairs], safe="*")
    if "://" not in url:
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    out = f"{parts.scheme}://{netloc}{parts.path}"
    return out + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")
