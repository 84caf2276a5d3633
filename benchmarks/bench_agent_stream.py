"""What ``guard.middleware()`` adds per streamed chunk to an async agent.

Run by hand (not a test)::

    .venv/bin/python benchmarks/bench_agent_stream.py [--tokens 3000] [--rounds 7]

A ``create_agent`` with no tools over LangChain's ``GenericFakeChatModel`` (a reply of
``--tokens`` words, streamed word by word, no latency), consumed with
``agent.astream(..., stream_mode="messages")``, bare and with ``guard.middleware()`` (memory
store, one budget, no ledger), alternating in each round. Prints the median wall time of
each and the difference per chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any


def make_agent(tokens: int, guarded: bool) -> Any:
    from langchain.agents import create_agent
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

    from budgetguard import Budget, BudgetGuard

    model = GenericFakeChatModel(messages=iter([AIMessage(" ".join(["tok"] * tokens))] * 1000))
    middleware = [BudgetGuard([Budget("g", limit=1e12)], ledger=False).middleware()] if guarded else []
    return create_agent(model, tools=[], middleware=middleware)


async def one_run(agent: Any) -> tuple[float, int]:
    from langchain_core.messages import HumanMessage

    started, chunks = time.perf_counter(), 0
    async for _ in agent.astream({"messages": [HumanMessage("hi")]}, stream_mode="messages"):
        chunks += 1
    return time.perf_counter() - started, chunks


async def main(tokens: int, rounds: int) -> None:
    agents = {"bare": make_agent(tokens, False), "guarded": make_agent(tokens, True)}
    times: dict[str, list[float]] = {name: [] for name in agents}
    chunks = 0
    for name, agent in agents.items():  # warm
        await one_run(agent)
    for r in range(rounds):
        for name in (("bare", "guarded") if r % 2 else ("guarded", "bare")):
            seconds, chunks = await one_run(agents[name])
            times[name].append(seconds)
    bare, guarded = statistics.median(times["bare"]), statistics.median(times["guarded"])
    print(f"{chunks} chunks a run, {rounds} rounds: bare {bare * 1e3:.0f} ms, guarded {guarded * 1e3:.0f} ms "
          f"(median); the middleware adds {(guarded - bare) / chunks * 1e6:.1f} us a chunk, "
          f"{(guarded - bare) * 1e3:.1f} ms a run")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    asyncio.run(main(args.tokens, args.rounds))
