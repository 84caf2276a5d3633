"""Price tables: LiteLLM loading, name normalization, overrides, cost math."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from budgetguard.errors import ConfigurationError, UnknownModelError, UsageError
from budgetguard.pricing import ModelInfo, PriceTable

LITELLM_SAMPLE: dict[str, Any] = {
    "sample_spec": {"max_tokens": "LEGACY", "input_cost_per_token": 0.0, "mode": "one of: chat, embedding"},
    "acme-chat": {"input_cost_per_token": 1e-06, "output_cost_per_token": 4e-06, "cache_read_input_token_cost": 2.5e-07,
                  "max_input_tokens": 100000, "max_output_tokens": 8000, "max_tokens": 8000,
                  "litellm_provider": "acme", "mode": "chat", "supports_vision": True},
    "acme-legacy": {"input_cost_per_token": "2e-06", "output_cost_per_token": "3e-06", "max_tokens": 4096,
                    "mode": "completion"},
    "acme-nomode": {"input_cost_per_token": 1e-06, "output_cost_per_token": None},
    "acme-embed": {"input_cost_per_token": 1e-07, "output_cost_per_token": 0.0, "mode": "embedding"},
    "acme-image": {"output_cost_per_image": 0.04, "mode": "image_generation"},
    "acme-free-text": {"mode": "chat", "max_tokens": 1000},
    "azure/acme-chat": {"input_cost_per_token": 2e-06, "output_cost_per_token": 8e-06, "mode": "chat"},
}


def test_litellm_loader_keeps_priced_text_models() -> None:
    table = PriceTable.from_litellm(LITELLM_SAMPLE)
    assert sorted(table.models) == ["acme-chat", "acme-legacy", "acme-nomode", "azure/acme-chat"]
    assert table.get("acme-chat") == ModelInfo("acme-chat", 1e-06, 4e-06, 2.5e-07, 100000, 8000)
    legacy = table.get("acme-legacy")
    assert legacy is not None
    assert (legacy.input_cost_per_token, legacy.context_window, legacy.max_output_tokens) == (2e-06, 4096, None)
    assert table.get("acme-nomode").output_cost_per_token is None  # type: ignore[union-attr]


def test_litellm_loader_reads_files(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(LITELLM_SAMPLE))
    assert len(PriceTable.from_litellm(path)) == 4
    assert len(PriceTable.from_litellm(str(path))) == 4


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "cannot read price file"),
        ("[1, 2]", "must hold a JSON object"),
        (json.dumps({"m": {"input_cost_per_token": "cheap", "output_cost_per_token": 1e-6}}), r"model 'm'"),
        (json.dumps({"m": {"input_cost_per_token": -1e-6, "output_cost_per_token": 1e-6}}), "input_cost_per_token"),
        (json.dumps({"m": {"input_cost_per_token": 1e-6, "output_cost_per_token": 1e-6, "max_tokens": 1.5}}),
         "max_tokens"),
    ],
)
def test_bad_price_files_name_the_path(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigurationError, match=fragment) as info:
        PriceTable.from_litellm(path)
    assert str(path) in str(info.value)


def test_missing_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"nope\.json"):
        PriceTable.from_litellm(tmp_path / "nope.json")


def test_bundled_table_has_the_mainstream_models() -> None:
    table = PriceTable.bundled()
    for name in ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o1", "o3", "o3-mini",
                 "o4-mini", "gpt-5", "gpt-5-mini", "gpt-5-nano", "gpt-4-turbo", "gpt-4", "gpt-3.5-turbo",
                 "gpt-3.5-turbo-instruct", "claude-opus-4", "claude-sonnet-4", "claude-3-5-haiku",
                 "claude-3-7-sonnet", "gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.0-flash"):
        info = table.models[name]
        assert info.input_cost_per_token and info.output_cost_per_token, name
        assert info.output_cost_per_token >= info.input_cost_per_token, name
        assert info.context_window and info.max_output_tokens, name
    gpt4o = table.models["gpt-4o"]
    assert (gpt4o.input_cost_per_token, gpt4o.output_cost_per_token) == (2.5e-06, 1e-05)
    assert "_meta" not in table.models


def test_bundled_meta_states_date_and_sources() -> None:
    path = Path(__file__).parents[2] / "budgetguard" / "data" / "model_prices.json"
    meta = json.loads(path.read_text())["_meta"]
    assert meta["as_of"].startswith("2025-08")
    assert any("openai.com" in s for s in meta["source"]) and any("anthropic.com" in s for s in meta["source"])


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("gpt-4o", "gpt-4o"),
        ("GPT-4o", "gpt-4o"),
        ("openai/gpt-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("openrouter/openai/gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-35-turbo", "gpt-3.5-turbo"),
        ("gpt-3.5-turbo-instruct-0914", "gpt-3.5-turbo-instruct"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("claude-3-5-haiku-20241022", "claude-3-5-haiku"),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
        ("claude-3-5-haiku@20241022", "claude-3-5-haiku"),
        ("us.anthropic.claude-3-7-sonnet-20250219-v1:0", "claude-3-7-sonnet"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("gemini-2.5-flash-preview-05-20", "gemini-2.5-flash"),
        ("gemini-2.0-flash-001", "gemini-2.0-flash"),
        ("gpt-5-chat-latest", "gpt-5"),  # longest known prefix, at a "-" boundary
        ("gpt-4.5-preview", None),  # "gpt-4" must not match across "."
        ("llama-3-70b", None),
    ],
)
def test_name_normalization(query: str, expected: str | None) -> None:
    info = PriceTable.bundled().get(query)
    assert (info.name if info else None) == expected


def test_exact_keys_win_over_normalization() -> None:
    table = PriceTable.from_litellm(LITELLM_SAMPLE)
    assert table.get("azure/acme-chat").input_cost_per_token == 2e-06  # type: ignore[union-attr]
    assert table.get("other/acme-chat").input_cost_per_token == 1e-06  # type: ignore[union-attr]
    assert table.get("acme-chat") is table.get("acme-chat")  # memoized
    assert "acme-chat-20250101" in table and "nothing" not in table


def test_overrides_partial_fields_and_per_million() -> None:
    base = PriceTable.bundled()
    table = base.with_overrides({
        "gpt-4o": {"input_per_million": 2.0},
        "my-ft": {"input_per_million": 3, "output_per_million": 12, "cached_input_per_million": 1.5,
                  "context_window": 32000},
        "acme": ModelInfo("ignored", 1e-6, 2e-6),
    })
    gpt4o = table.get("gpt-4o-2024-08-06")
    assert gpt4o is not None
    assert (gpt4o.input_cost_per_token, gpt4o.output_cost_per_token, gpt4o.context_window) == (2e-06, 1e-05, 128000)
    assert table.get("my-ft") == ModelInfo("my-ft", 3e-06, 1.2e-05, 1.5e-06, 32000, None)
    assert table.get("acme").name == "acme"  # type: ignore[union-attr]
    assert base.get("gpt-4o").input_cost_per_token == 2.5e-06  # type: ignore[union-attr]  # original unchanged


def test_override_of_a_dated_name_inherits_the_base_model() -> None:
    table = PriceTable.bundled().with_overrides({"gpt-4o-2024-05-13": {"input_per_million": 5.0}})
    info = table.get("gpt-4o-2024-05-13")
    assert info is not None and (info.input_cost_per_token, info.output_cost_per_token) == (5e-06, 1e-05)
    assert table.get("gpt-4o-2024-08-06").input_cost_per_token == 2.5e-06  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"input_price": 1}, "unknown key 'input_price'"),
        ({"input_per_million": 1, "input_cost_per_token": 1e-6}, "twice"),
        ({"input_per_million": -1}, "input_per_million"),
        ({"context_window": 0}, "context_window"),
    ],
)
def test_bad_overrides(override: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        PriceTable.bundled().with_overrides({"m": override})


def test_merged_prefers_the_other_table() -> None:
    a = PriceTable({"x": ModelInfo("x", 1e-6, 1e-6), "y": ModelInfo("y", 1e-6, 1e-6)},
                   default=ModelInfo("default-a", 1e-6, 1e-6))
    b = PriceTable({"y": ModelInfo("y", 9e-6, 9e-6)})
    merged = a.merged(b)
    assert merged.get("y").input_cost_per_token == 9e-06  # type: ignore[union-attr]
    assert merged.get("x") is not None
    assert merged.default is not None and merged.default.name == "default-a"


def test_unknown_model_error_explains_the_fix() -> None:
    with pytest.raises(UnknownModelError) as info:
        PriceTable.bundled().require_price("llama-3-70b")
    text = str(info.value)
    assert "llama-3-70b" in text and "with_overrides" in text and "default=ModelInfo" in text
    with pytest.raises(UnknownModelError, match="model name is unknown"):
        PriceTable.bundled().require_price(None)
    with pytest.raises(UnknownModelError, match="acme-nomode"):
        PriceTable.from_litellm(LITELLM_SAMPLE).require_price("acme-nomode")  # output price missing


def test_default_price_covers_unknown_models() -> None:
    default = ModelInfo("fallback", 1e-05, 3e-05, context_window=8000)
    table = PriceTable({"x": ModelInfo("x", 1e-6, 1e-6, context_window=100)}, default=default)
    assert table.require_price("mystery") is default
    assert table.require_price(None) is default
    assert table.context_window("x") == 100
    assert table.context_window("mystery") == 8000
    assert PriceTable.bundled().context_window("gpt-4o-2024-08-06") == 128000
    assert PriceTable.bundled().context_window("mystery") is None


def test_cost_math_with_cached_input() -> None:
    info = ModelInfo("m", 2e-06, 8e-06, cached_input_cost_per_token=5e-07)
    assert info.cost(1000, 100, cached_input_tokens=400) == pytest.approx(600 * 2e-06 + 400 * 5e-07 + 100 * 8e-06)
    assert info.cost(1000, 100) == pytest.approx(1000 * 2e-06 + 100 * 8e-06)
    no_cache_price = ModelInfo("n", 2e-06, 8e-06)
    assert no_cache_price.cost(1000, 0, cached_input_tokens=400) == pytest.approx(1000 * 2e-06)
    gpt4o = PriceTable.bundled().require_price("gpt-4o")
    assert gpt4o.cost(1_000_000, 1_000_000, 500_000) == pytest.approx(0.5 * 2.5 + 0.5 * 1.25 + 10.0)


@pytest.mark.parametrize(("args", "fragment"), [((-1, 0), "input_tokens"), ((10, 0, 11), "exceeds"),
                                                ((True, 0), "input_tokens")])
def test_cost_rejects_bad_counts(args: tuple[int, ...], fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        ModelInfo("m", 1e-6, 1e-6).cost(*args)


def test_model_info_validates_prices() -> None:
    with pytest.raises(ConfigurationError, match="input_cost_per_token"):
        ModelInfo("m", -1.0, 1e-6)
    with pytest.raises(ConfigurationError, match="context_window"):
        ModelInfo("m", 1e-6, 1e-6, context_window=-5)
    with pytest.raises(ConfigurationError, match="not a ModelInfo"):
        PriceTable({"m": {"input_cost_per_token": 1e-6}})  # type: ignore[dict-item]
