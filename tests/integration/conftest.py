"""Integration fixtures."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from budgetguard.testing import DEFAULT_CONTEXT_WINDOWS, StubOpenAIServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redis_server import redis_server  # noqa: E402, F401  (session fixture: a private redis-server)


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest) -> Iterator[StubOpenAIServer]:
    """A private OpenAI-compatible server for one test module (replies of the module's
    ``REPLY_TOKENS`` tokens, 30 by default)."""
    with StubOpenAIServer(reply_tokens=getattr(request.module, "REPLY_TOKENS", 30)) as s:
        yield s


@pytest.fixture
def fresh_server(server: StubOpenAIServer) -> StubOpenAIServer:
    """The module's server with no requests, scripts or settings left from earlier tests."""
    server.reset()
    server.context_windows = dict(DEFAULT_CONTEXT_WINDOWS)
    server.stream_usage = None
    return server
