"""Checks a Redis URL before anything connects, so a typo fails at construction.

redis-py accepts ``redis://host/notanumber`` as database 0, raises its own
``ValueError`` for a port out of range, and reports a database out of range only on
the first command. :func:`check_redis_url` parses the URL with redis-py's own parser
and turns each of these into a :class:`~budgetguard.errors.ConfigurationError` that
says what to fix.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from budgetguard.errors import ConfigurationError

__all__ = ["DATABASES", "check_redis_url"]

DATABASES = 16
"""Databases a Redis server has unless its ``databases`` setting says otherwise (0-15)."""


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def check_redis_url(url: str) -> None:
    """Refuse a ``redis://``, ``rediss://`` or ``unix://`` URL redis-py would misread.

    Args:
        url: The URL, e.g. ``redis://localhost:6379/0``.

    Raises:
        ConfigurationError: If redis-py cannot parse it, the port is not 1-65535, or the
            database is not a number from 0 to 15 (``DATABASES - 1``). The message shows
            the URL with its password hidden.

    Example:
        >>> check_redis_url("redis://localhost:6379/0")
        >>> check_redis_url("redis://localhost:6379/notanumber")
        Traceback (most recent call last):
        ...
        budgetguard.errors.ConfigurationError: Redis URL redis://localhost:6379/notanumber: database 'notanumber' is not \
a number; use redis://[user:password@]host:port/db with a port from 1 to 65535 and a db from 0 to 15
    """
    from redis.connection import parse_url

    shown = _redacted(url)
    form = "redis://[user:password@]host:port/db with a port from 1 to 65535 and a db from 0 to 15"
    try:
        options = parse_url(url)
        port = urlsplit(url).port  # redis-py reads port 0 as "no port": 6379
    except ValueError as exc:  # a port out of range, a bad query value, an unknown scheme
        msg = f"Redis URL {shown}: {str(exc).rstrip('.')}; use {form}"
        raise ConfigurationError(msg) from exc
    if port is not None and not 1 <= port <= 65535:
        msg = f"Redis URL {shown}: port {port} is out of range; use {form}"
        raise ConfigurationError(msg)
    path = urlsplit(url).path.strip("/") if not url.lower().startswith("unix:") else ""
    if "db" not in options and path:  # redis-py ignores a path it cannot read as a number: database 0
        msg = f"Redis URL {shown}: database {path!r} is not a number; use {form}"
        raise ConfigurationError(msg)
    db = options.get("db", 0)
    if not 0 <= db < DATABASES:
        msg = (f"Redis URL {shown}: database {db} is out of range; a Redis server has databases 0 to "
               f"{DATABASES - 1} unless its `databases` setting says more. For a higher one on such a "
               "server, pass RedisStore(redis.Redis(..., db=N)).")
        raise ConfigurationError(msg)
