"""Shared fixtures: every guard test runs through the sync and the async path."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from budgetguard.clock import FakeClock

sys.path.insert(0, str(Path(__file__).resolve().parent))

from postgres_server import postgres_server  # noqa: E402, F401  (session fixture: a private PostgreSQL)


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    """Run the test body through ``invoke`` (in a worker thread, no loop) or ``ainvoke``."""
    return request.param


class Runner:
    """Calls a runnable the sync or the async way, with one body of test code."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    async def invoke(self, runnable: Any, value: Any, config: dict | None = None, **kw: Any) -> Any:
        if self.mode == "sync":
            return await asyncio.to_thread(runnable.invoke, value, config, **kw)
        return await runnable.ainvoke(value, config, **kw)

    async def batch(self, runnable: Any, values: list, config: Any = None, **kw: Any) -> list:
        if self.mode == "sync":
            return await asyncio.to_thread(runnable.batch, values, config, **kw)
        return await runnable.abatch(values, config, **kw)

    async def stream(self, runnable: Any, value: Any, config: dict | None = None, *, stop_after: int | None = None) -> list:
        if self.mode == "sync":
            def consume() -> list:
                out = []
                for chunk in runnable.stream(value, config):
                    out.append(chunk)
                    if stop_after is not None and len(out) >= stop_after:
                        break
                return out

            return await asyncio.to_thread(consume)
        out = []
        agen = runnable.astream(value, config)
        try:
            async for chunk in agen:
                out.append(chunk)
                if stop_after is not None and len(out) >= stop_after:
                    break
        finally:
            await agen.aclose()
        return out

    async def call(self, sync_fn: Callable[[], Any], async_fn: Callable[[], Any]) -> Any:
        if self.mode == "sync":
            return await asyncio.to_thread(sync_fn)
        return await async_fn()


@pytest.fixture
def run(mode: str) -> Runner:
    return Runner(mode)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(autouse=True, scope="session")
def _private_default_ledger(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Guards built without a ledger write to the default one: keep it out of $HOME."""
    import os

    os.environ["BUDGETGUARD_LEDGER"] = str(tmp_path_factory.mktemp("ledger") / "default.sqlite3")
