"""Reading real usage from LangChain results and messages."""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, Generation, LLMResult
from langchain_openai import ChatOpenAI, OpenAI

from budgetguard.errors import UsageError
from budgetguard.usage import Usage, usage_from_message, usage_from_result


def ai(usage: dict[str, Any] | None = None, **kwargs: Any) -> AIMessage:
    return AIMessage("ok", usage_metadata=usage, **kwargs)  # type: ignore[arg-type]


def std(inp: int, out: int, **details: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out}
    meta.update(details)
    return meta


# ----- the Usage value ----------------------------------------------------------------


def test_usage_total_and_addition() -> None:
    u = Usage(10, 5, cached_input_tokens=4, reasoning_tokens=2) + Usage(1, 1)
    assert u == Usage(11, 6, 4, 2)
    assert u.total == 17


@pytest.mark.parametrize("args", [(-1, 0), (1, 0, 5), (True, 0), (1.5, 0)])
def test_usage_rejects_bad_counts(args: tuple[Any, ...]) -> None:
    with pytest.raises(UsageError):
        Usage(*args)


# ----- messages ----------------------------------------------------------------------


def test_message_standard_usage_with_details() -> None:
    msg = ai(std(100, 40, input_token_details={"cache_read": 60, "cache_creation": 10},
                 output_token_details={"reasoning": 25}))
    assert usage_from_message(msg) == Usage(100, 40, 60, 25)


def test_message_service_tier_detail_keys_count_too() -> None:
    msg = ai(std(100, 40, input_token_details={"flex_cache_read": 30, "flex": 70},
                 output_token_details={"flex_reasoning": 5, "flex": 35}))
    assert usage_from_message(msg) == Usage(100, 40, 30, 5)


def test_message_falls_back_to_response_metadata() -> None:
    msg = ai(response_metadata={"token_usage": {"prompt_tokens": 12, "completion_tokens": 3}})
    assert usage_from_message(msg) == Usage(12, 3)
    assert usage_from_message(ai()) is None
    assert usage_from_message(HumanMessage("hi")) is None


# ----- results -----------------------------------------------------------------------


def test_usage_metadata_is_preferred_over_llm_output() -> None:
    result = LLMResult(
        generations=[[ChatGeneration(message=ai(std(20, 4)))]],
        llm_output={"token_usage": {"prompt_tokens": 999, "completion_tokens": 999}},
    )
    assert usage_from_result(result) == Usage(20, 4)


def test_usage_metadata_summed_across_prompts_and_differing_choices() -> None:
    result = LLMResult(
        generations=[
            [ChatGeneration(message=ai(std(10, 2))), ChatGeneration(message=ai(std(10, 3)))],
            [ChatGeneration(message=ai(std(7, 1)))],
        ]
    )
    assert usage_from_result(result) == Usage(27, 6)


def test_identical_usage_on_every_choice_is_counted_once() -> None:
    same = std(20, 4, input_token_details={"cache_read": 8})
    result = LLMResult(generations=[[ChatGeneration(message=ai(same)), ChatGeneration(message=ai(dict(same)))]])
    assert usage_from_result(result) == Usage(20, 4, 8)


def test_openai_style_llm_output() -> None:
    result = LLMResult(
        generations=[[Generation(text="hi")]],
        llm_output={"token_usage": {
            "prompt_tokens": 50, "completion_tokens": 30, "total_tokens": 80,
            "prompt_tokens_details": {"cached_tokens": 20, "audio_tokens": None},
            "completion_tokens_details": {"reasoning_tokens": 12, "audio_tokens": None},
        }},
    )
    assert usage_from_result(result) == Usage(50, 30, 20, 12)


def test_anthropic_style_llm_output_adds_cache_tokens_to_input() -> None:
    result = LLMResult(
        generations=[[Generation(text="hi")]],
        llm_output={"usage": {"input_tokens": 10, "output_tokens": 7, "cache_read_input_tokens": 100,
                              "cache_creation_input_tokens": 5}},
    )
    assert usage_from_result(result) == Usage(115, 7, 100, 0)


def test_generation_info_and_response_metadata_are_last() -> None:
    result = LLMResult(generations=[
        [Generation(text="a", generation_info={"usage": {"input_tokens": 3, "output_tokens": 2}})],
        [ChatGeneration(message=ai(response_metadata={"usage": {"inputTokens": 4, "outputTokens": 1}}))],
    ])
    assert usage_from_result(result) == Usage(7, 3)


def test_nothing_reported() -> None:
    assert usage_from_result(LLMResult(generations=[[Generation(text="hi")]])) is None
    assert usage_from_result(LLMResult(generations=[[Generation(text="hi")]], llm_output={"token_usage": {}})) is None


def test_streamed_chunk_usage() -> None:
    chunk = AIMessageChunk(content="hi", usage_metadata=std(9, 2))  # type: ignore[arg-type]
    assert usage_from_result(LLMResult(generations=[[ChatGenerationChunk(message=chunk)]])) == Usage(9, 2)


@pytest.mark.parametrize(
    ("raw", "field", "value"),
    [
        ({"prompt_tokens": -3, "completion_tokens": 1}, "prompt_tokens", "-3"),
        ({"prompt_tokens": math.nan, "completion_tokens": 1}, "prompt_tokens", "nan"),
        ({"prompt_tokens": "many", "completion_tokens": 1}, "prompt_tokens", "'many'"),
        ({"prompt_tokens": True, "completion_tokens": 1}, "prompt_tokens", "True"),
        ({"prompt_tokens": 5, "completion_tokens": 2.5}, "completion_tokens", "2.5"),
        ({"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": -1}},
         "cached_tokens", "-1"),
    ],
)
def test_malformed_usage_names_field_and_value(raw: dict[str, Any], field: str, value: str) -> None:
    result = LLMResult(generations=[[Generation(text="x")]], llm_output={"token_usage": raw})
    with pytest.raises(UsageError, match=field) as info:
        usage_from_result(result)
    assert value in str(info.value)


def test_malformed_usage_metadata_raises() -> None:
    msg = AIMessage("x")
    object.__setattr__(msg, "usage_metadata", {"input_tokens": "ten", "output_tokens": 1})
    with pytest.raises(UsageError, match=r"input_tokens.*'ten'"):
        usage_from_message(msg)


def test_numeric_strings_and_whole_floats_are_accepted() -> None:
    result = LLMResult(generations=[[Generation(text="x")]],
                       llm_output={"token_usage": {"prompt_tokens": "12", "completion_tokens": 3.0}})
    assert usage_from_result(result) == Usage(12, 3)


# ----- what langchain_openai really produces --------------------------------------------


class Capture(BaseCallbackHandler):
    def __init__(self) -> None:
        self.results: list[LLMResult] = []

    def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        self.results.append(response)


def openai_transport(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    usage = {"prompt_tokens": 20, "completion_tokens": 4 * body.get("n", 1), "total_tokens": 0,
             "prompt_tokens_details": {"cached_tokens": 8, "audio_tokens": None},
             "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": None}}
    if "messages" not in body:  # completions API
        return httpx.Response(200, json={
            "id": "cmpl", "object": "text_completion", "created": 1, "model": body["model"],
            "choices": [{"text": "hi", "index": 0, "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})
    return httpx.Response(200, json={
        "id": "chat", "object": "chat.completion", "created": 1, "model": "gpt-4o-2024-08-06",
        "choices": [{"index": i, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}
                    for i in range(body.get("n", 1))],
        "usage": usage})


@pytest.mark.parametrize("n", [1, 3])
def test_chat_openai_result(n: int) -> None:
    capture = Capture()
    llm = ChatOpenAI(model="gpt-4o", api_key="sk-test", n=n,  # type: ignore[arg-type]
                     http_client=httpx.Client(transport=httpx.MockTransport(openai_transport)))
    llm.invoke("hi", config={"callbacks": [capture]})
    (result,) = capture.results
    # Both places carry the usage: llm_output (whole call) and each message's usage_metadata.
    assert result.llm_output["token_usage"]["prompt_tokens"] == 20  # type: ignore[index]
    assert all(g.message.usage_metadata for g in result.generations[0])  # type: ignore[attr-defined]
    assert usage_from_result(result) == Usage(20, 4 * n, 8, 0)


def test_openai_completion_llm_result() -> None:
    capture = Capture()
    llm = OpenAI(model="gpt-3.5-turbo-instruct", api_key="sk-test",  # type: ignore[arg-type]
                 http_client=httpx.Client(transport=httpx.MockTransport(openai_transport)))
    llm.invoke("hi", config={"callbacks": [capture]})
    assert usage_from_result(capture.results[0]) == Usage(5, 1)
