"""What the core install needs: LangChain's agent packages only for the agent middleware."""

from __future__ import annotations


def test_the_core_needs_no_langchain_agents() -> None:
    """``pip install budgetguard`` (no ``[agents]``): guards, chains and stores never import
    ``langchain`` or ``langgraph``; only ``guard.middleware()`` does."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from budgetguard import Budget, BudgetGuard\n"
        "from budgetguard.testing.fake_models import UsageFakeChatModel\n"
        "g = BudgetGuard([Budget('g', limit=1000)], ledger=False)\n"
        "(g | UsageFakeChatModel(max_tokens=5)).invoke('hi')\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('langchain', 'langgraph'))\n"
        "print(loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
