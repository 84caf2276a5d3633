"""`budgetguard prices`: a model's prices, window, source and date; listings; LiteLLM files."""

from __future__ import annotations

import json
from pathlib import Path

import genai_prices
import pytest

from budgetguard.cli import main


def test_a_models_prices_window_source_and_date(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prices", "gpt-5.1", "claude-sonnet-4-5"]) == 0
    out = capsys.readouterr().out
    gpt, claude = out.split("\n\n")
    assert gpt.splitlines()[0] == "gpt-5.1"
    assert "input          $1.25 per 1M tokens" in gpt and "output         $10.00 per 1M tokens" in gpt
    assert "cached input   $0.125 per 1M tokens" in gpt and "context window 400,000 tokens" in gpt
    assert f"source         genai-prices {genai_prices.__version__}: openai/gpt-5.1, its list price for 20" in gpt
    assert "prompts over 200,000 tokens: the whole call at input $6.00, cached $0.60, output $22.50" in claude


def test_a_model_with_no_price_exits_1_with_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prices", "gpt-4o", "claude-opus-4-10"]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("gpt-4o\n")
    assert "no price for model 'claude-opus-4-10'" in captured.err and "with_overrides" in captured.err


def test_listing_a_providers_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prices", "--provider", "anthropic"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"Prices per 1M tokens from genai-prices {genai_prices.__version__}")
    row = next(line for line in lines if line.startswith("anthropic/claude-haiku-4-5 "))
    assert row.split()[1:] == ["$1.00", "$0.10", "$5.00", "200,000"]
    assert all(line.startswith("anthropic/") for line in lines[2:])


def test_a_litellm_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"acme": {"input_cost_per_token": 1e-6, "output_cost_per_token": 4e-6,
                                         "max_input_tokens": 32000, "mode": "chat"},
                                "broken": {"input_cost_per_token": "free", "mode": "chat"}}))
    with pytest.warns(UserWarning, match="skipped 1 malformed entry"):
        assert main(["prices", "--litellm", str(path), "acme"]) == 0
    out = capsys.readouterr().out
    assert "input          $1.00 per 1M tokens" in out and f"source         LiteLLM prices: {path}" in out
    assert main(["prices", "--litellm", str(tmp_path / "missing.json")]) == 1
    assert "cannot read price file" in capsys.readouterr().err
