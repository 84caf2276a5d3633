"""Bad configuration is a ConfigurationError at construction, and nothing half-built is left behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import budgetguard.stores.redis as redis_store
from budgetguard import Budget, BudgetGuard
from budgetguard.errors import ConfigurationError
from budgetguard.ledger import Ledger, LedgerError, LedgerPathError
from budgetguard.stores import MemoryStore, SQLiteStore, resolve_store, store_from_url

BUDGETS = [Budget("g", limit=1_000)]


@pytest.fixture
def no_redis_store(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the URL of every RedisStore constructed; fails the test if one makes a client."""
    made: list[str] = []
    real = redis_store.RedisStore.__init__

    def spy(self: Any, url_or_client: Any, **kw: Any) -> None:
        made.append(str(url_or_client))
        real(self, url_or_client, **kw)

    def no_client(*args: Any, **kw: Any) -> Any:
        pytest.fail("a redis client was made")

    monkeypatch.setattr(redis_store.RedisStore, "__init__", spy)
    monkeypatch.setattr(redis_store.redis.Redis, "from_url", no_client)
    monkeypatch.setattr(redis_store.redis.asyncio.Redis, "from_url", no_client)
    return made


@pytest.mark.parametrize("store", [42, 3.5, object(), ["memory://"], {"url": "memory://"}])
def test_a_store_that_is_not_one_is_refused_at_construction(store: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"is not a store; use a URL \('memory://'") as info:
        BudgetGuard(BUDGETS, store=store, ledger=False)
    assert type(store).__name__ in str(info.value)


def test_a_store_missing_methods_is_named() -> None:
    class Half:
        def reserve(self, request: Any) -> Any: ...

    with pytest.raises(ConfigurationError, match="it has no settle, snapshot, sweep, close, areserve"):
        resolve_store(Half())  # type: ignore[arg-type]


def test_valid_stores_resolve(tmp_path: Path) -> None:
    mem = MemoryStore()
    assert resolve_store(mem) is mem
    assert isinstance(resolve_store(None), MemoryStore)
    sqlite = resolve_store(f"sqlite:///{tmp_path / 'b.db'}")
    assert isinstance(sqlite, SQLiteStore)
    sqlite.close()


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("redis://localhost:6379/9999", "database 9999 is out of range; a Redis server has databases 0 to 15"),
        ("redis://localhost:6379/16", "database 16 is out of range"),
        ("redis://localhost:6379/-1", "database -1 is out of range"),
        ("redis://localhost:99999/0", r"[Pp]ort out of range"),
        ("redis://localhost:0/0", "port 0 is out of range"),
        ("redis://localhost:6379/notanumber", "database 'notanumber' is not a number"),
        ("rediss://localhost:6380/1x", "database '1x' is not a number"),
        ("redis://localhost:6379/0?db=abc", "Invalid value for 'db'"),
        ("unix:///tmp/redis.sock?db=99", "database 99 is out of range"),
    ],
)
def test_bad_redis_urls_are_refused_before_any_connection(url: str, fragment: str, no_redis_store: list[str]) -> None:
    with pytest.raises(ConfigurationError, match=fragment) as info:
        BudgetGuard(BUDGETS, store=url, ledger=False)
    assert "redis://[user:password@]host:port/db" in str(info.value) or "redis.Redis(" in str(info.value)
    with pytest.raises(ConfigurationError, match=fragment):
        store_from_url(url)
    with pytest.raises(ConfigurationError, match=fragment):
        redis_store.RedisStore(url)
    assert no_redis_store == [url] * 3  # refused before any client (so any connection) was made


def test_a_redis_url_error_hides_the_password(no_redis_store: list[str]) -> None:
    with pytest.raises(ConfigurationError) as info:
        store_from_url("redis://app:s3cret@localhost:6379/oops")
    assert "s3cret" not in str(info.value) and "redis://app:***@localhost:6379/oops" in str(info.value)


def test_good_redis_urls_still_build_a_store(no_redis_store: list[str]) -> None:
    for url in ("redis://localhost:6379/0", "redis://localhost/15", "redis://localhost", "rediss://h:6380/",
                "redis://localhost:6379/2?db=3", "unix:///tmp/redis.sock?db=1"):
        store_from_url(url).close()  # built lazily: nothing connects until the first call
    assert len(no_redis_store) == 6  # and not one made a client: the fixture would have failed


def test_a_ledger_path_under_a_regular_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a directory")
    before = sorted(tmp_path.rglob("*"))
    for path in (blocker / "ledger.sqlite3", blocker / "deeper" / "ledger.jsonl"):
        with pytest.raises(ConfigurationError, match=r"notes.txt is a file, not a directory") as info:
            BudgetGuard(BUDGETS, ledger=str(path))
        assert isinstance(info.value, LedgerError) and "ledger=False" in str(info.value)
    with pytest.raises(LedgerPathError, match="is a directory; name a file in it"):
        BudgetGuard(BUDGETS, ledger=tmp_path)
    assert sorted(tmp_path.rglob("*")) == before  # no directory or file was made


@pytest.mark.parametrize("ledger", [42, True, object(), ["ledger.sqlite3"], Ledger])
def test_a_ledger_that_is_not_one_is_refused_at_construction(tmp_path: Path, ledger: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"is not a ledger; pass a file path, a 'postgresql://' URL") as info:
        BudgetGuard(BUDGETS, store=f"sqlite:///{tmp_path / 'budgets.db'}", ledger=ledger)
    assert type(ledger).__name__ in str(info.value)
    assert list(tmp_path.iterdir()) == []  # refused before the store was made


@pytest.mark.parametrize(("name", "content"), [("ledger.sqlite3", b"my notes\n"), ("calls.jsonl", b"not json\n"),
                                             ("ledger.db", b"\x00\x01binary")])
def test_an_existing_file_that_is_no_ledger_is_refused_before_the_store_is_made(
    tmp_path: Path, name: str, content: bytes
) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(LedgerPathError, match="is an existing file that is not a") as info:
        BudgetGuard(BUDGETS, store=f"sqlite:///{tmp_path / 'budgets.db'}", ledger=str(tmp_path / name))
    assert isinstance(info.value, ConfigurationError) and "ledger=False" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no store file; the file untouched
    assert (tmp_path / name).read_bytes() == content


def test_existing_ledgers_and_empty_files_are_accepted(tmp_path: Path) -> None:
    BudgetGuard(BUDGETS, ledger=str(tmp_path / "ledger.sqlite3")).ledger.close()  # a SQLite ledger now exists
    (tmp_path / "calls.jsonl").write_text('{"ts": 0}\n')  # what a JSON-lines ledger starts with
    (tmp_path / "empty.sqlite3").write_bytes(b"")
    for name in ("ledger.sqlite3", "calls.jsonl", "empty.sqlite3"):
        BudgetGuard(BUDGETS, ledger=str(tmp_path / name)).ledger.close()


def test_a_bad_ledger_leaves_no_store_file_and_a_bad_store_no_ledger_file(
    tmp_path: Path, no_redis_store: list[str]
) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    with pytest.raises(ConfigurationError):
        BudgetGuard(BUDGETS, store=f"sqlite:///{tmp_path / 'budgets.db'}", ledger=str(blocker / "l.sqlite3"))
    with pytest.raises(ConfigurationError):
        BudgetGuard(BUDGETS, store="redis://localhost:6379/9999", ledger=str(tmp_path / "ledger.sqlite3"))
    with pytest.raises(ConfigurationError):
        BudgetGuard(BUDGETS, store=42, ledger=str(tmp_path / "ledger.jsonl"))  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
