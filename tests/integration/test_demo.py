"""`budgetguard demo` tells the story it promises (offline, with the real ChatOpenAI client)."""

from __future__ import annotations

import io
from pathlib import Path

from budgetguard.demo import run_demo

README = Path(__file__).parents[2] / "README.md"
from budgetguard.ledger import open_ledger


def test_demo_transcript_shows_every_decision(tmp_path: Path, capsys) -> None:
    out = io.StringIO()
    ledger = tmp_path / "demo.sqlite3"
    assert run_demo(out, ledger_path=str(ledger)) == 0
    text = out.getvalue() + capsys.readouterr().out
    assert "tokens reserved" in text and "refunded" in text
    assert "bob was charged" in text  # streaming settled from the streamed text
    assert "team-pool 1,428" in text or "team-pool 1," in text  # the pool lent
    assert "refused before sending (requests sent: 0)" in text
    assert "BudgetExceeded: budget 'per-user' (user_id=carol) cannot cover this call" in text
    assert "answered by gpt-4o-mini (policy: cheaper_model)" in text
    assert "context-length errors received: 0" in text
    assert "the model asked for the get_weather tool" in text and "the model answered" in text  # the agent scene
    assert "nothing raised:" in text and "I have to stop here: the budget 'per-user'" in text
    rows = {r["user"]: r for r in (row.to_dict() for row in open_ledger(ledger).totals(by="user"))}
    assert set(rows) >= {"alice", "bob", "carol", "erin"}  # dave's guard has no per-user budget
    assert rows["carol"]["denied"] == 1
    # The README quotes the transcript: every line it quotes is a line the demo prints.
    excerpt = README.read_text().split("An excerpt of the demo's transcript:", 1)[1].split("```text\n", 1)[1]
    quoted = excerpt.split("```", 1)[0].splitlines()
    assert quoted and [line for line in quoted if line not in text.splitlines()] == []


def test_cli_status_reads_a_guard(tmp_path: Path, monkeypatch, capsys) -> None:
    from budgetguard.cli import main

    (tmp_path / "myguards.py").write_text(
        "from budgetguard import BudgetGuard, Budget\n"
        "guard = BudgetGuard([Budget('g', limit=500, period='day'), Budget('u', limit=9, per='user_id')], ledger=False)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["status", "myguards:guard", "--scope", "user_id=alice"]) == 0
    out = capsys.readouterr().out
    assert "500" in out and "resets" in out and "user_id=alice" in out
    assert main(["status", "nomodule:guard"]) == 1


def test_cli_status_says_a_memory_store_cannot_see_other_processes(tmp_path: Path, monkeypatch, capsys) -> None:
    from budgetguard.cli import main

    (tmp_path / "memguard.py").write_text(
        "from budgetguard import BudgetGuard, Budget\n"
        "guard = BudgetGuard([Budget('g', limit=500)], ledger=False)\n"
    )
    db = tmp_path / "budgets.db"
    (tmp_path / "sqlguard.py").write_text(
        "from budgetguard import BudgetGuard, Budget\n"
        f"guard = BudgetGuard([Budget('g', limit=500)], store='sqlite:///{db}', ledger=False)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["status", "memguard:guard"]) == 0
    out, err = capsys.readouterr()
    assert "500" in out
    assert "memguard:guard keeps its budgets in memory" in err and "whatever your application's processes" in err
    assert "sqlite:///" in err and "redis://" in err
    assert main(["status", "sqlguard:guard"]) == 0
    assert capsys.readouterr().err == ""  # a shared store: nothing to warn about
