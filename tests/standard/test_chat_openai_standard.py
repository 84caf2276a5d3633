"""LangChain's standard chat-model suites, on ``ChatOpenAI`` bare and guarded the ways users guard it.

``langchain-tests``' ``ChatModelUnitTests`` and ``ChatModelIntegrationTests`` run three times
against the project's own OpenAI-compatible server: on the bare model, on
``guard.model(ChatOpenAI(...))`` and on ``guard | ChatOpenAI(...)``. Every test that passes on
the bare model must pass guarded; the few the local server cannot answer the way OpenAI does
are listed once, in ``BARE_FAILURES``, and are expected to fail (strictly) on all three.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from langchain_openai import ChatOpenAI
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from budgetguard import Budget, BudgetGuard
from budgetguard.metered import metered_by
from budgetguard.testing import StubOpenAIServer

_SERVER: dict[str, StubOpenAIServer] = {}

pytestmark = [  # warnings the suite's own tests provoke on purpose, bare or guarded
    pytest.mark.filterwarnings("ignore:Received a Pydantic BaseModel V1 schema:UserWarning"),
    pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning"),
]


@pytest.fixture(scope="module", autouse=True)
def server() -> Iterator[StubOpenAIServer]:
    with StubOpenAIServer(reply_tokens=20) as s:
        _SERVER["it"] = s
        yield s
        _SERVER.clear()


def _params(base_url: str) -> dict[str, Any]:
    # stream_usage: what ChatOpenAI asks of api.openai.com by default (a custom base_url turns it off)
    return {"model": "gpt-4o-mini", "base_url": base_url, "api_key": "sk-test", "stream_usage": True}


def _guard() -> BudgetGuard:
    return BudgetGuard([Budget("standard-suite", limit=1e12)], ledger=False)


class _Guarded:
    """Builds the suite's model, then guards it the way this class says."""

    how = "bare"

    @pytest.fixture
    def model(self, request: Any) -> Any:
        extra = getattr(request, "param", None) or {}
        llm = self.chat_model_class(**{**self.standard_chat_model_params, **self.chat_model_params, **extra})  # type: ignore[attr-defined]
        if self.how == "bare":
            return llm
        guard = _guard()
        guarded = guard.model(llm) if self.how == "model" else guard | llm
        assert metered_by(guarded) is guard and isinstance(guarded, ChatOpenAI)
        return guarded


class _Unit(_Guarded, ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatOpenAI]:
        return ChatOpenAI

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return _params("http://127.0.0.1:9/v1")  # unit tests send nothing; a fixed URL keeps snapshots stable

    @property
    def init_from_env_params(self) -> tuple[dict, dict, dict]:
        return (
            {"OPENAI_API_KEY": "sk-env", "OPENAI_API_BASE": "http://127.0.0.1:9/v1"},
            {"model": "gpt-4o-mini"},
            {"openai_api_base": "http://127.0.0.1:9/v1"},
        )


class _Integration(_Guarded, ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatOpenAI]:
        return ChatOpenAI

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return _params(_SERVER["it"].base_url)

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_image_inputs(self) -> bool:
        return False  # the suite downloads its test image from the web: not on this offline machine

    @property
    def model_override_value(self) -> str:
        return "gpt-4o"  # a call-time `model=` override: estimated and priced as that model


class TestBareUnit(_Unit):
    how = "bare"


class TestGuardModelUnit(_Unit):
    how = "model"


class TestGuardPipeUnit(_Unit):
    how = "pipe"


class TestBareIntegration(_Integration):
    how = "bare"


class TestGuardModelIntegration(_Integration):
    how = "model"


class TestGuardPipeIntegration(_Integration):
    how = "pipe"
