"""In-process stand-in models that report usage the way real providers do.

For unit tests and benchmarks: no HTTP, no latency. Integration tests use
:class:`~budgetguard.testing.StubOpenAIServer` with the real ``ChatOpenAI`` instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.llms import LLM
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import Field

__all__ = ["UsageFakeChatModel", "UsageFakeLLM"]


class UsageFakeChatModel(BaseChatModel):
    """A chat model that answers from a list and reports ``usage_metadata``.

    Input tokens are whatever ``input_tokens`` says (or, when ``None``, the guard's own
    estimator would count; tests set it explicitly); output tokens are the number of
    words of the reply, capped by ``max_tokens``.
    """

    model_name: str = "gpt-4o-mini"
    """Reported model name (used for pricing and encodings)."""
    replies: list[str] = Field(default_factory=lambda: ["ok"])
    """Replies, cycled."""
    input_tokens: int = 10
    """Input tokens to report."""
    max_tokens: int | None = None
    """Output cap (words of the reply beyond it are cut)."""
    report_usage: bool = True
    """Whether to report usage at all (streams: in the final chunk)."""
    usage_override: dict[str, Any] | None = None
    """Report this usage instead (for malformed-usage tests)."""
    fail_with: Exception | None = None
    """Raise this instead of answering."""
    fail_after_chunks: int | None = None
    """When streaming, raise after this many chunks."""
    on_call: Any = None
    """Called with no arguments while each request is 'in flight' (tests peek at budgets)."""
    latency: float = 0.0
    """Seconds each request takes before it answers (async: ``asyncio.sleep``)."""
    seen_max_tokens: list[int | None] = Field(default_factory=list)
    """The output cap each request was sent with."""
    seen_messages: list[list[BaseMessage]] = Field(default_factory=list)
    """The messages each request was sent with."""
    seen_models: list[str] = Field(default_factory=list)
    """The ``model_name`` of the object that answered each request (copies share these lists)."""

    @property
    def calls(self) -> int:
        """How many requests were 'sent' (shared with copies, e.g. the guard's metered copy)."""
        return len(self.seen_messages)

    @property
    def _llm_type(self) -> str:
        return "usage-fake-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "max_tokens": self.max_tokens}

    def _reply(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if self.on_call is not None:
            self.on_call()
        if self.fail_with is not None:
            raise self.fail_with
        cap = kwargs.get("max_tokens", self.max_tokens)
        text = self.replies[self.calls % len(self.replies)]
        self.seen_max_tokens.append(cap)
        self.seen_messages.append(list(messages))
        self.seen_models.append(self.model_name)
        words = text.split(" ")
        if cap is not None:
            words = words[:cap]
        text = " ".join(words)
        usage = self.usage_override or {
            "input_tokens": self.input_tokens,
            "output_tokens": len(words),
            "total_tokens": self.input_tokens + len(words),
        }
        return text, usage

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.latency:
            time.sleep(self.latency)
        text, usage = self._reply(messages, kwargs)
        msg = AIMessage(content=text, usage_metadata=usage if self.report_usage else None)  # type: ignore[arg-type]
        return ChatResult(generations=[ChatGeneration(message=msg)])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: Any = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.latency:
            await asyncio.sleep(self.latency)
        text, usage = self._reply(messages, kwargs)
        msg = AIMessage(content=text, usage_metadata=usage if self.report_usage else None)  # type: ignore[arg-type]
        return ChatResult(generations=[ChatGeneration(message=msg)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        text, usage = self._reply(messages, kwargs)
        for i, word in enumerate(text.split(" ")):
            if self.fail_after_chunks is not None and i >= self.fail_after_chunks:
                msg = "stream broke"
                raise ConnectionError(msg)
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=(" " if i else "") + word))
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk
        if self.report_usage:
            yield ChatGenerationChunk(message=AIMessageChunk(content="", usage_metadata=usage))  # type: ignore[arg-type]


class UsageFakeLLM(LLM):
    """A text-completion LLM that reports OpenAI-style ``token_usage`` in ``llm_output``."""

    model_name: str = "gpt-3.5-turbo-instruct"
    reply: str = "a plain completion"
    input_tokens: int = 7
    max_tokens: int | None = None
    """Output cap; a field (like ``langchain_openai.OpenAI``'s), so callbacks see it."""
    calls: int = 0

    @property
    def _llm_type(self) -> str:
        return "usage-fake-llm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "max_tokens": self.max_tokens}

    def _call(
        self,
        prompt: str,
        stop: Sequence[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        self.calls += 1
        return self.reply

    def _generate(self, prompts: list[str], stop: Any = None, run_manager: Any = None, **kwargs: Any) -> Any:
        result = super()._generate(prompts, stop=stop, run_manager=run_manager, **kwargs)
        out = len(self.reply.split(" ")) * len(prompts)
        result.llm_output = {  # what langchain_openai.OpenAI reports
            "token_usage": {
                "prompt_tokens": self.input_tokens * len(prompts),
                "completion_tokens": out,
                "total_tokens": self.input_tokens * len(prompts) + out,
            },
            "model_name": self.model_name,
        }
        return result

    async def _agenerate(self, prompts: list[str], stop: Any = None, run_manager: Any = None, **kwargs: Any) -> Any:
        return self._generate(prompts, stop=stop, **kwargs)
