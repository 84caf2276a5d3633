"""A Redis server clock that tests move: the store's own Lua, reading the time from a key.

The Redis store decides every time on the server (``TIME`` in ``lib.lua``'s
``server_now``), which a test cannot move. :func:`fake_server_time` registers the store's
scripts with that one function changed to read a key instead, and returns a
:class:`ServerClock` (a :class:`~budgetguard.clock.FakeClock`) that writes its time to
that key whenever it moves. Everything else the scripts do is the production code.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis

from budgetguard.clock import FakeClock
from budgetguard.stores import redis as redis_store

SERVER_NOW = """local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end"""


class ServerClock(FakeClock):
    """A fake clock that is also the time of the Redis scripts registered under it."""

    def __init__(self, client: redis.Redis, key: str, start: float = 1_767_225_600.0) -> None:
        super().__init__(start)
        self.client = client
        self.key = key
        self._publish()

    def _publish(self) -> None:
        self.client.set(self.key, repr(self.now()))

    def advance(self, seconds: float) -> None:
        super().advance(seconds)
        self._publish()

    def set(self, when: float) -> None:
        super().set(when)
        self._publish()


def fake_server_time(monkeypatch: pytest.MonkeyPatch, url: str, start: float = 1_767_225_600.0) -> ServerClock:
    """Make every RedisStore that registers its scripts from now on (this test) read the
    returned clock instead of the server's ``TIME``."""
    client = redis.Redis.from_url(url)
    clock = ServerClock(client, f"budgetguard-test-time:{uuid.uuid4().hex}", start)
    original = redis_store._lua
    source = original("lib.lua")
    assert SERVER_NOW in source, "lib.lua's server_now changed: update tests/redis_fake_time.py"
    fake = f"local function server_now()\n  return tonumber(redis.call('GET', '{clock.key}'))\nend"

    def lua(name: str) -> str:
        text = original(name)
        return text.replace(SERVER_NOW, fake) if name == "lib.lua" else text

    monkeypatch.setattr(redis_store, "_lua", lua)
    return clock


def close(clock: Any) -> None:
    """Drop the clock's key and connection."""
    clock.client.delete(clock.key)
    clock.client.close()
