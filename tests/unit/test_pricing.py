"""Price tables: the genai-prices source, exact names, LiteLLM loading, overrides, tiers, cost math."""

from __future__ import annotations

import json
import warnings
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices
import pytest

from budgetguard import pricing_genai
from budgetguard.errors import ConfigurationError, UnknownModelError, UsageError
from budgetguard.pricing import ModelInfo, PriceTable, PriceTier

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


@pytest.mark.parametrize(("content", "fragment"), [("{not json", "cannot read price file"),
                                                  ("[1, 2]", "must hold a JSON object")])
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
                 "o4-mini", "gpt-5", "gpt-5-mini", "gpt-5-nano", "gpt-5.1", "gpt-4-turbo", "gpt-4", "gpt-3.5-turbo",
                 "gpt-3.5-turbo-instruct", "claude-opus-4", "claude-sonnet-4", "claude-3-5-haiku",
                 "claude-3-7-sonnet", "claude-opus-4-5", "claude-sonnet-4-5", "claude-haiku-4-5",
                 "gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.0-flash"):
        info = table.get(name)
        assert info is not None, name
        assert info.input_cost_per_token and info.output_cost_per_token, name
        assert info.output_cost_per_token >= info.input_cost_per_token, name
        assert info.context_window or name.startswith("gemini-2.5-pro"), name  # genai-prices lists no window for it
    gpt4o = table.require_price("gpt-4o")
    assert (gpt4o.input_cost_per_token, gpt4o.output_cost_per_token) == (2.5e-06, 1e-05)


def test_issue_14_models_resolve_to_their_own_prices() -> None:
    # Each of these was wrong with the 2025-08 table: unknown, or priced as an older model.
    table = PriceTable.bundled()
    per_million = {m: (round(table.require_price(m).input_cost_per_token * 1e6, 6),  # type: ignore[operator]
                       round(table.require_price(m).output_cost_per_token * 1e6, 6))  # type: ignore[operator]
                   for m in ("gpt-5.1", "claude-haiku-4-5", "claude-opus-4-5", "claude-opus-4")}
    assert per_million == {"gpt-5.1": (1.25, 10.0), "claude-haiku-4-5": (1.0, 5.0),
                           "claude-opus-4-5": (5.0, 25.0), "claude-opus-4": (15.0, 75.0)}
    assert table.context_window("gpt-5") == 400_000


@pytest.mark.parametrize("model", ["claude-opus-4-10", "claude-opus-4-17-20270101", "gpt-5.9", "gpt-4o-2030-01-01"])
def test_a_newer_version_is_never_priced_as_an_older_one(model: str) -> None:
    # genai-prices' own rule for claude-opus-4-1 is a prefix ("claude-opus-4-1..."), which claude-opus-4-10 matches.
    table = PriceTable.bundled()
    assert table.get(model) is None
    with pytest.raises(UnknownModelError, match=model):
        table.require_price(model)


def test_bundled_prices_name_their_source_and_date() -> None:
    info = PriceTable.bundled().require_price("gpt-4o-2024-08-06")
    assert info.source.startswith(f"genai-prices {genai_prices.__version__}: openai/gpt-4o, its list price for 20")
    o3 = PriceTable.bundled().require_price("o3")  # cut from $10/$40 on 2025-06-10: the price in effect today
    assert (o3.input_cost_per_token, o3.output_cost_per_token) == (2e-06, 8e-06)
    assert o3.source.endswith("since 2025-06-10")
    deepseek = PriceTable.bundled().require_price("deepseek-chat")
    assert (deepseek.input_cost_per_token, deepseek.output_cost_per_token) == (2.7e-07, 1.1e-06)  # not the night's
    assert deepseek.source.endswith("the higher of its time-of-day prices")


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("gpt-4o", "openai/gpt-4o"),
        ("GPT-4o", "openai/gpt-4o"),
        ("openai/gpt-4o", "openai/gpt-4o"),
        ("gpt-4o-2024-08-06", "openai/gpt-4o"),
        ("gpt-4o-2024-05-13", "openai/gpt-4o-2024-05-13"),  # $5/$15, not gpt-4o's $2.50/$10
        ("gpt-4o-mini-2024-07-18", "openai/gpt-4o-mini"),
        ("openrouter/openai/gpt-4.1-mini", "openrouter/openai/gpt-4.1-mini"),
        ("azure/gpt-4o", "azure/gpt-4o"),
        ("gpt-4-0613", "openai/gpt-4"),
        ("gpt-35-turbo", "openai/gpt-3.5-turbo"),
        ("o3-mini-2025-01-31", "openai/o3-mini"),
        ("claude-3-5-haiku-20241022", "anthropic/claude-3-5-haiku-latest"),
        ("claude-3-5-haiku@20241022", "anthropic/claude-3-5-haiku-latest"),
        ("us.anthropic.claude-3-7-sonnet-20250219-v1:0", "aws/regional.anthropic.claude-3-7-sonnet-20250219-v1:0"),
        ("claude-sonnet-4-20250514", "anthropic/claude-sonnet-4-0"),
        ("claude-opus-4-5-20251101", "anthropic/claude-opus-4-5"),
        ("gemini-2.5-flash-preview-05-20", "google/gemini-2.5-flash-preview"),
        ("gemini-2.0-flash-001", "google/gemini-2.0-flash"),
        ("gpt-5-chat-latest", "openai/gpt-5"),  # listed by genai-prices as a name of gpt-5
        ("gpt-4.5-preview", "openai/gpt-4.5-preview"),
        ("llama-3-70b", None),
    ],
)
def test_names_resolve_to_the_model_they_name(query: str, expected: str | None) -> None:
    info = PriceTable.bundled().get(query)
    found = info.source.split(": ", 1)[1].split(",", 1)[0] if info else None
    assert found == expected
    assert info is None or info.name == query


def test_exact_keys_win_over_normalization() -> None:
    table = PriceTable.from_litellm(LITELLM_SAMPLE)
    assert table.get("azure/acme-chat").input_cost_per_token == 2e-06  # type: ignore[union-attr]
    assert table.get("other/acme-chat").input_cost_per_token == 1e-06  # type: ignore[union-attr]
    assert table.get("acme-chat") is table.get("acme-chat")  # memoized
    assert "acme-chat-20250101" in table and "nothing" not in table
    assert "acme-chat-2" not in table and "acme-chat-v2" not in table  # another version, not a snapshot


def test_litellm_file_with_malformed_entries_loads_the_rest(tmp_path: Path) -> None:
    # LiteLLM's real file has a few such entries among thousands; they used to fail the whole load.
    data = {
        **LITELLM_SAMPLE,
        "bad-price": {"input_cost_per_token": "cheap", "output_cost_per_token": 1e-6, "mode": "chat"},
        "negative": {"input_cost_per_token": -1e-6, "output_cost_per_token": 1e-6, "mode": "chat"},
        "half-token": {"input_cost_per_token": 1e-6, "output_cost_per_token": 1e-6, "max_tokens": 1.5},
        "a-bool": {"input_cost_per_token": True, "output_cost_per_token": 1e-6},
        "not-an-object": [1e-6, 2e-6],
        "nan": {"input_cost_per_token": "NaN", "output_cost_per_token": 1e-6, "mode": "chat"},
    }
    path = tmp_path / "model_prices_and_context_window.json"
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"skipped 6 malformed entries") as caught:
        table = PriceTable.from_litellm(path)
    message = str(caught[0].message)
    assert str(path) in message and "'bad-price'" in message and "'not-an-object'" in message
    assert sorted(table.skipped) == ["a-bool", "bad-price", "half-token", "nan", "negative", "not-an-object"]
    assert "max_tokens" in table.skipped["half-token"] and "list" in table.skipped["not-an-object"]
    assert sorted(table.models) == ["acme-chat", "acme-legacy", "acme-nomode", "azure/acme-chat"]
    assert table.require_price("acme-chat").source == f"LiteLLM prices: {path}"
    with pytest.raises(UnknownModelError, match="negative"):
        table.require_price("negative")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert PriceTable.from_litellm(LITELLM_SAMPLE).skipped == {}  # a clean file: no warning

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
    # The dated model's own output price ($15), not gpt-4o's ($10).
    assert info is not None and (info.input_cost_per_token, info.output_cost_per_token) == (5e-06, 1.5e-05)
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
    assert "budgetguard prices" in text
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


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-5.1", "claude-sonnet-4-5", "claude-haiku-4-5", "gemini-2.5-pro",
                                   "gemini-2.5-flash", "o3", "mistral-large-latest", "deepseek-chat"])
@pytest.mark.parametrize(("inp", "out", "cached"), [(1_000, 500, 0), (150_000, 4_000, 50_000), (250_000, 8_000, 0),
                                                    (250_000, 8_000, 100_000)])
def test_costs_agree_with_genai_prices_own_calculation(model: str, inp: int, out: int, cached: int) -> None:
    # genai-prices computes with Decimals and its own tier rule; budgetguard's per-token floats must agree.
    # deepseek-chat costs less from 16:30 to 00:30 UTC; budgetguard charges the daytime price at every hour.
    from datetime import datetime, timezone

    peak = datetime.now(timezone.utc).replace(hour=12)
    usage = genai_prices.Usage(input_tokens=inp, output_tokens=out, cache_read_tokens=cached)
    expected = genai_prices.calc_price(usage, model, genai_request_timestamp=peak).total_price
    ours = PriceTable.bundled().require_price(model).cost(inp, out, cached_input_tokens=cached)
    assert Decimal(ours) == pytest.approx(expected, rel=Decimal('1e-9'))


def test_long_prompt_tiers_price_the_whole_call() -> None:
    gemini = PriceTable.bundled().require_price("gemini-2.5-pro")
    assert [t.above_input_tokens for t in gemini.tiers] == [200_000]
    assert gemini.cost(200_000, 1_000) == pytest.approx(200_000 * 1.25e-06 + 1_000 * 1e-05)
    assert gemini.cost(200_001, 1_000) == pytest.approx(200_001 * 2.5e-06 + 1_000 * 1.5e-05)  # every token
    info = ModelInfo("m", 1e-6, 2e-6, 5e-7, tiers=(PriceTier(100, 2e-6, 4e-6), PriceTier(1000, 3e-6, 6e-6, 1e-6)))
    assert info.cost(100, 10, 50) == pytest.approx(50 * 1e-6 + 50 * 5e-7 + 10 * 2e-6)
    assert info.cost(101, 10, 50) == pytest.approx(101 * 2e-6 + 10 * 4e-6)  # tier without a cached price
    assert info.cost(1001, 10, 1) == pytest.approx(1000 * 3e-6 + 1 * 1e-6 + 10 * 6e-6)
    with pytest.raises(ConfigurationError, match="ascending"):
        ModelInfo("m", 1e-6, 1e-6, tiers=(PriceTier(1000, 1e-6, 1e-6), PriceTier(100, 1e-6, 1e-6)))
    with pytest.raises(ConfigurationError, match="above_input_tokens"):
        PriceTier(-1, 1e-6, 1e-6)
    with pytest.raises(ConfigurationError, match="output_cost_per_token"):
        PriceTier(10, 1e-6, -1.0)


def test_overriding_a_price_drops_the_tiers_quoted_with_it() -> None:
    base = PriceTable.bundled()
    flat = base.with_overrides({"gemini-2.5-pro": {"input_per_million": 1.0}}).require_price("gemini-2.5-pro")
    assert flat.tiers == () and flat.output_cost_per_token == 1e-05
    assert flat.source.startswith("override of genai-prices")
    windowed = base.with_overrides({"gemini-2.5-pro": {"context_window": 1_048_576}}).require_price("gemini-2.5-pro")
    assert windowed.tiers == base.require_price("gemini-2.5-pro").tiers and windowed.context_window == 1_048_576


def test_models_billed_per_request_have_no_price() -> None:
    table = PriceTable.bundled()
    sonar = table.get("perplexity/sonar")
    assert sonar is not None and sonar.input_cost_per_token is None and sonar.context_window
    with pytest.raises(UnknownModelError, match="billed per request"):
        table.require_price("perplexity/sonar")


def test_each_name_is_resolved_once_per_table() -> None:
    asked: list[str] = []

    def catalog(model: str) -> ModelInfo | None:
        asked.append(model)
        return ModelInfo(model, 1e-6, 2e-6, context_window=1000) if model.startswith("known") else None

    table = PriceTable({"own": ModelInfo("own", 1e-6, 1e-6)}, catalog=catalog)
    for _ in range(3):
        assert table.require_price("known-1").output_cost_per_token == 2e-06
        assert table.context_window("known-1") == 1000
        assert table.get("unknown-1") is None
        assert table.get("own") is not None and table.get("OWN") is not None
    assert asked == ["known-1", "unknown-1"]  # the table's own entries never reach the catalog
    merged = PriceTable().merged(table)
    assert merged.get("known-2") is not None and asked[-1] == "known-2"  # the catalog survives merging
    assert table.with_overrides({"x": {"input_per_million": 1}}).get("known-3") is not None


def test_bundled_lookups_share_one_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = genai_prices.calc_price

    def counting(usage: Any, model_ref: str, **kw: Any) -> Any:
        calls.append(model_ref)
        return real(usage, model_ref, **kw)

    monkeypatch.setattr(genai_prices, "calc_price", counting)
    pricing_genai.find.cache_clear()
    for _ in range(3):
        PriceTable.bundled().require_price("gpt-4.1-nano")
    assert calls == ["gpt-4.1-nano"]


@pytest.mark.parametrize(("model", "per_million"), [("claude-opus-4-5", (5.0, 25.0)), ("gpt-5.1", (1.25, 10.0)),
                                                    ("claude-haiku-4-5-20251001", (1.0, 5.0))])
async def test_a_usd_budget_charges_the_models_own_price(run: Any, model: str, per_million: tuple[float, float]) -> None:
    # End to end through the guard: claude-opus-4-5 used to be charged as claude-opus-4 ($15/$75).
    from langchain_core.prompts import ChatPromptTemplate

    from budgetguard import Budget, BudgetGuard
    from budgetguard.testing.fake_models import UsageFakeChatModel

    guard = BudgetGuard([Budget("usd", limit=1.0, unit="usd")], ledger=False)
    llm = UsageFakeChatModel(model_name=model, input_tokens=1000, max_tokens=20, replies=["one two three"])
    await run.invoke(guard | (ChatPromptTemplate.from_messages([("human", "{q}")]) | llm), {"q": "hi"})
    assert llm.calls == 1
    assert guard.remaining("usd") == pytest.approx(1.0 - (1000 * per_million[0] + 3 * per_million[1]) / 1e6)
