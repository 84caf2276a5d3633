"""Where budgets live: one small protocol, three stores, chosen by object or URL.

========================  =================================================
``memory://``             :class:`MemoryStore`, one process (the default)
``sqlite:///path/file``   :class:`SQLiteStore`, processes on one machine
``redis://host:port/db``  :class:`RedisStore`, many machines
========================  =================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from budgetguard.errors import ConfigurationError
from budgetguard.stores.base import (
    BucketSpec,
    BucketState,
    Charge,
    Denial,
    ExpiredLease,
    ReserveRequest,
    ReserveResult,
    Store,
)
from budgetguard.stores.memory import MemoryStore

if TYPE_CHECKING:
    from budgetguard.clock import Clock
    from budgetguard.stores.redis import RedisStore
    from budgetguard.stores.sqlite import SQLiteStore

__all__ = [
    "BucketSpec",
    "BucketState",
    "Charge",
    "Denial",
    "ExpiredLease",
    "MemoryStore",
    "RedisStore",
    "ReserveRequest",
    "ReserveResult",
    "SQLiteStore",
    "Store",
    "store_from_url",
]


def __getattr__(name: str) -> Any:
    # SQLite and Redis stores import lazily so that `import budgetguard` stays light.
    if name == "SQLiteStore":
        from budgetguard.stores.sqlite import SQLiteStore

        return SQLiteStore
    if name == "RedisStore":
        from budgetguard.stores.redis import RedisStore

        return RedisStore
    msg = f"module 'budgetguard.stores' has no attribute {name!r}"
    raise AttributeError(msg)


def store_from_url(url: str, *, clock: Clock | None = None, **options: Any) -> Store:
    """Build a store from a URL.

    Args:
        url: ``memory://``, ``sqlite:///relative.db``, ``sqlite:////abs/path.db`` or
            ``redis://host:port/db`` (also ``rediss://`` and ``unix://``).
        clock: Time source for the memory and SQLite stores (Redis uses server time).
        **options: Passed to the store's constructor.

    Raises:
        ConfigurationError: The URL's scheme is not one of the above.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        msg = f"store URL {url!r} has no scheme; use memory://, sqlite:///path or redis://host:port/db"
        raise ConfigurationError(msg)
    scheme = scheme.lower()
    if scheme == "memory":
        return MemoryStore(clock=clock, **options)
    if scheme == "sqlite":
        from budgetguard.stores.sqlite import SQLiteStore

        path = rest[1:] if rest.startswith("/") else rest
        if not path:
            msg = f"store URL {url!r} names no file; use sqlite:///budgets.db"
            raise ConfigurationError(msg)
        return SQLiteStore(path, clock=clock, **options)
    if scheme in ("redis", "rediss", "unix"):
        from budgetguard.stores.redis import RedisStore

        return RedisStore(url, **options)
    msg = f"unknown store scheme {scheme!r} in {url!r}; use memory://, sqlite:///path or redis://host:port/db"
    raise ConfigurationError(msg)
