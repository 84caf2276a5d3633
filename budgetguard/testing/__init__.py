"""Test utilities shipped with budgetguard.

:class:`StubOpenAIServer` is a local, offline, OpenAI-compatible HTTP endpoint that reports
realistic token usage. budgetguard's integration tests drive the real ``langchain_openai``
clients against it, and ``budgetguard demo`` uses it as its local stand-in model.
"""

from budgetguard.testing.openai_server import (
    DEFAULT_CONTEXT_WINDOWS,
    REASONING_MODEL_PREFIXES,
    RecordedRequest,
    ScriptedResponse,
    StubOpenAIServer,
)

__all__ = [
    "DEFAULT_CONTEXT_WINDOWS",
    "REASONING_MODEL_PREFIXES",
    "RecordedRequest",
    "ScriptedResponse",
    "StubOpenAIServer",
]
