"""``budgetguard demo``: an offline tour with the real ``ChatOpenAI`` client.

It starts :class:`~budgetguard.testing.StubOpenAIServer` (a local OpenAI-compatible
endpoint that reports realistic usage) on 127.0.0.1, guards real LangChain chains with it,
and prints what the guard decided at each step.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from typing import Any, TextIO

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableConfig
from pydantic import SecretStr

from budgetguard.budgets import Budget
from budgetguard.errors import BudgetExceeded
from budgetguard.guard import BudgetGuard
from budgetguard.policies import cap_output, cheaper_model, compress_prompt
from budgetguard.testing import DEFAULT_CONTEXT_WINDOWS, StubOpenAIServer

__all__ = ["run_demo"]

SYSTEM = (
    "You are the support assistant of Acme Cloud. Answer in two sentences, cite the relevant "
    "product area, and never invent prices."
)


def _n(x: float) -> str:
    return f"{x:,.0f}"


def _usd(x: float) -> str:
    return f"${x:,.6f}"


def run_demo(out: TextIO, *, ledger_path: str | None = None) -> int:
    """Run the tour quietly (library warnings off, restored afterwards); see :func:`_tour`."""
    log = logging.getLogger("budgetguard")
    level = log.level
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="budgetguard: tokenizer")
        log.setLevel(logging.ERROR)
        try:
            return _tour(out, ledger_path=ledger_path)
        finally:
            log.setLevel(level)


def _tour(out: TextIO, *, ledger_path: str | None = None) -> int:
    """Run the tour, writing a transcript to ``out``.

    Args:
        out: Where the transcript goes.
        ledger_path: Ledger file to write (a temporary file by default).

    Returns:
        The process exit code.
    """
    from langchain_openai import ChatOpenAI

    from budgetguard.ledger import Ledger

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    tmp = tempfile.mkdtemp(prefix="budgetguard-demo-")
    ledger_path = ledger_path or os.path.join(tmp, "ledger.sqlite3")
    windows = {**DEFAULT_CONTEXT_WINDOWS, "gpt-3.5-turbo": 16_385}
    with StubOpenAIServer(reply_tokens=45, context_windows=windows) as server:

        def llm(model: str, **kw: Any) -> ChatOpenAI:
            return ChatOpenAI(model=model, base_url=server.base_url, api_key=SecretStr("sk-demo"), max_retries=0, **kw)

        ledger = Ledger(ledger_path)
        guard = BudgetGuard(
            budgets=[
                Budget("per-user", limit=600, unit="tokens", per="user_id", refill_per_second=1.0, borrow_from="team-pool"),
                Budget("team-pool", limit=1_500, unit="tokens"),
                Budget("daily-usd", limit=0.02, unit="usd", period="day"),
            ],
            policies=[cheaper_model({"gpt-4o": ["gpt-4o-mini"]}), cap_output(min_output_tokens=32), compress_prompt("trim")],
            ledger=ledger,
        )
        prompt = ChatPromptTemplate.from_messages([("system", SYSTEM), ("human", "{question}")])
        chain = guard | (prompt | llm("gpt-4o-mini", max_tokens=200) | StrOutputParser())

        def remaining(user: str) -> str:
            return (
                f"{user}: {_n(guard.remaining('per-user', user_id=user))} tokens left, "
                f"team-pool {_n(guard.remaining('team-pool'))}, today {_usd(guard.remaining('daily-usd'))}"
            )

        say("budgetguard demo: an offline tour")
        say(f"A local OpenAI-compatible stand-in model listens on {server.base_url};")
        say("the real langchain_openai.ChatOpenAI client talks to it over HTTP.")
        say()
        say("Budgets")
        say("  per-user    600 tokens per user_id, refills 1 token/s, borrows its shortfall from team-pool")
        say("  team-pool   1,500 tokens shared by every user (a lending pool)")
        say("  daily-usd   $0.02 per UTC day, priced per model")
        say("Policies, in order: cheaper_model(gpt-4o -> gpt-4o-mini), cap_output(min 32), compress_prompt('trim')")
        say("(gpt-4o's tokenizer, o200k_base, ships with budgetguard: prompts are counted exactly, offline.)")
        say()

        say("1. alice asks a question through guard | (prompt | ChatOpenAI | parser)")
        cfg: RunnableConfig = {"configurable": {"user_id": "alice"}, "metadata": {"feature": "support-chat"}}
        msg = (guard | (prompt | llm("gpt-4o-mini", max_tokens=200))).invoke({"question": "How do I rotate my API key?"}, cfg)
        info = msg.response_metadata["budgetguard"]
        reserved = info["estimated_input_tokens"] + info["estimated_output_tokens"]
        used = info["input_tokens"] + info["output_tokens"]
        say(f"   before the request: estimated {info['estimated_input_tokens']} prompt + {info['estimated_output_tokens']} output cap = {reserved} tokens reserved")
        say(f"   after the answer: the model reported {info['input_tokens']} + {info['output_tokens']} = {used} tokens; refunded {reserved - used}")
        say(f"   answer: {msg.content[:70]}...")
        say(f"   {remaining('alice')}")
        say()

        say("2. bob streams an answer (the server sends no usage chunk, so the guard counts the streamed text)")
        before = guard.remaining("per-user", user_id="bob")
        text = "".join(chain.stream({"question": "Summarize the status page."}, {"configurable": {"user_id": "bob"}}))
        say(f"   streamed {len(text.split())} words; bob was charged {_n(before - guard.remaining('per-user', user_id='bob'))} tokens")
        say(f"   {remaining('bob')}")
        say()

        say("3. carol asks long questions: her bucket runs dry, the team pool lends, then the guard says no")
        question = {"question": "Explain the billing rules in detail. " * 12}
        carol: RunnableConfig = {"configurable": {"user_id": "carol"}}
        for i in range(1, 30):
            before = server.request_count
            try:
                chain.invoke(question, carol)
            except BudgetExceeded as exc:
                say(f"   call {i}: refused before sending (requests sent: {server.request_count - before})")
                say(f"   BudgetExceeded: {exc}")
                say(f"   e.budget={exc.budget!r} e.scope={exc.scope} e.requested={_n(exc.requested)} "
                    f"e.available={_n(exc.available)} e.retry_after={exc.retry_after:.0f}")
                break
            say(f"   call {i}: {remaining('carol')}")
        say()

        say("4. dave's team has $0.01 a day; he asks gpt-4o for up to 1,500 tokens")
        usd_guard = BudgetGuard(
            [Budget("dave-team-usd", limit=0.01, unit="usd", period="day")],
            policies=[cheaper_model({"gpt-4o": ["gpt-4o-mini"]})],
            ledger=ledger,
        )
        big = usd_guard | (prompt | llm("gpt-4o", max_tokens=1_500))
        gpt4o = guard.prices.get("gpt-4o")
        mini = guard.prices.get("gpt-4o-mini")
        msg = big.invoke({"question": "Write the migration plan."}, {"configurable": {"user_id": "dave"}})
        info = msg.response_metadata["budgetguard"]
        say(f"   requested {info['model_requested']}, answered by {info['model']} (policy: {info['policy']})")
        if gpt4o and mini:
            would = gpt4o.cost(info["estimated_input_tokens"], 1_500)
            did = mini.cost(info["input_tokens"], info["output_tokens"])
            say(f"   gpt-4o's worst case ({_usd(would)}) exceeds $0.01; gpt-4o-mini's answer cost {_usd(did)}")
        say()

        say("5. erin's conversation is too long for gpt-3.5-turbo's 16,385-token window")
        turns: list = [SystemMessage(SYSTEM)]
        for i in range(70):
            turns += [HumanMessage(f"Turn {i}: " + "please review this log line " * 40), AIMessage("Reviewed. " * 40)]
        turns.append(HumanMessage("So what is the root cause?"))
        roomy = BudgetGuard([Budget("per-user", limit=100_000, per="user_id")], policies=[compress_prompt("trim")], ledger=ledger)
        before = guard.estimator.count_messages(turns, "gpt-3.5-turbo")
        sent_before = server.request_count
        (roomy | llm("gpt-3.5-turbo", max_tokens=300)).invoke(turns, {"configurable": {"user_id": "erin"}})
        req = server.requests[-1]
        sent = _n(req.prompt_tokens or 0)
        say(f"   prompt before: {_n(before)} tokens; sent: {sent} tokens in {len(req.body['messages'])} of "
            f"{len(turns)} messages (status {req.status})")
        say(f"   requests sent: {server.request_count - sent_before}, context-length errors received: 0")
        say()

        _agent_scene(say, llm, ledger)

        ledger.close()
        say("7. The ledger (a SQLite file that outlives this program) and the report of what this demo did")
        say(f"   budgetguard report --ledger {ledger_path} --by user")
        from budgetguard.cli_report import main as report

        for by in ("user", "model", "outcome"):
            say()
            report(["--ledger", ledger_path, "--by", by])
    return 0


def _agent_scene(say: Any, llm: Any, ledger: Any) -> None:
    """Scene 6: a LangChain agent with a tool, metered by ``guard.middleware()``."""
    try:
        from langchain.agents import create_agent
        from langchain_core.tools import tool
        from langgraph.checkpoint.memory import InMemorySaver
    except ImportError:
        say("6. (agents: pip install 'budgetguard[agents]' to see a LangChain agent metered by guard.middleware())")
        say()
        return

    @tool
    def get_weather(city: str) -> str:
        """Get the weather of a city."""
        return f"It is sunny in {city}."

    say("6. frank talks to an agent: create_agent(ChatOpenAI, tools=[get_weather], "
        "middleware=[guard.middleware(on_denied='end')])")
    agents = BudgetGuard(
        [
            Budget("per-user", limit=400, per="user_id", period="day"),
            Budget("model-calls", limit=4, unit="calls", per="run"),
        ],
        ledger=ledger,
    )
    agent = create_agent(llm("gpt-4o-mini", max_tokens=100), tools=[get_weather],
                         middleware=[agents.middleware(on_denied="end")], checkpointer=InMemorySaver())  # fmt: skip
    config: RunnableConfig = {"configurable": {"thread_id": "frank-1", "user_id": "frank"}}
    out = agent.invoke({"messages": [HumanMessage("What is the weather in Lisbon?")]}, config)
    for m in out["messages"]:
        info = m.response_metadata.get("budgetguard") if isinstance(m, AIMessage) else None
        if info:
            did = "asked for the get_weather tool" if m.tool_calls else "answered"  # type: ignore[attr-defined]
            say(f"   model call: reserved {info['estimated_input_tokens']} + {info['estimated_output_tokens']}, "
                f"charged {info['input_tokens'] + info['output_tokens']}; the model {did}")
    say(f"   frank: {_n(agents.remaining('per-user', user_id='frank'))} tokens left of 400 today")
    out = agent.invoke({"messages": [HumanMessage("And in Porto, Faro and Braga?")]}, config)
    last = out["messages"][-1]
    say("   next turn, the thread's history no longer fits: the run ends with a message, nothing raised:")
    say(f"   \"{last.content}\"")
    say()
