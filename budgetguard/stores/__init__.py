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
    "resolve_store",
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
        ConfigurationError: The URL's scheme is not one of the above, or a Redis URL has a
            port or database out of range or a database that is not a number.
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

        return RedisStore(url, **options)  # checks the URL first
    msg = f"unknown store scheme {scheme!r} in {url!r}; use memory://, sqlite:///path or redis://host:port/db"
    raise ConfigurationError(msg)


_STORE_HINT = "use a URL ('memory://', 'sqlite:///budgets.db', 'redis://host:6379/0'), a MemoryStore, SQLiteStore or \
RedisStore, or None for a MemoryStore"


def resolve_store(store: Store | str | None, clock: Clock | None = None) -> Store:
    """The store a guard's ``store=`` argument names, checked before anything is built.

    Args:
        store: A URL (see :func:`store_from_url`), a :class:`Store`, or None for a
            :class:`MemoryStore`.
        clock: Time source for a store this function builds.

    Returns:
        The store: ``store`` itself when it is one, else a new one.

    Raises:
        ConfigurationError: If ``store`` is none of these (the message lists what it
            lacks), or its URL is wrong. Nothing is created or connected when it is raised.

    Example:
        >>> resolve_store(42)
        Traceback (most recent call last):
        ...
        budgetguard.errors.ConfigurationError: store=42 (int) is not a store; use a URL ('memory://', \
'sqlite:///budgets.db', 'redis://host:6379/0'), a MemoryStore, SQLiteStore or RedisStore, or None for a MemoryStore
    """
    if store is None:
        return MemoryStore(clock=clock)
    if isinstance(store, str):
        return store_from_url(store, clock=clock)
    if isinstance(store, Store):
        return store
    wanted = ("reserve", "settle", "snapshot", "sweep", "close", "areserve", "acknowledge")
    missing = [name for name in wanted if not callable(getattr(store, name, None))]
    lacks = f", it has no {', '.join(missing)}" if len(missing) < len(wanted) else ""  # an int: nothing to list
    msg = f"store={store!r} ({type(store).__name__}) is not a store{lacks}; {_STORE_HINT}"
    raise ConfigurationError(msg)
