"""Benchmark the CPU ``guard | chain`` adds to each call, beside what users would otherwise run.

Run by hand (not a test)::

    .venv/bin/python benchmarks/bench_overhead.py [--rounds 15] [--calls 300] [--clock cpu|wall] [--no-profile]

The chain is ``ChatPromptTemplate`` (a 224-token system prompt + a human template) piped into
``UsageFakeChatModel(max_tokens=64)``: an in-process chat model with no latency, so everything
measured is Python overhead. Every call formats a new question (a fresh order number), as real
traffic does: the system prompt is the same text each call, the human message is new text.

Cases, measured in one run, in interleaved rounds (the order rotates each round, so machine
drift hits every case alike); each call is timed with the calling thread's CPU clock
(``thread_time_ns``; ``--clock wall`` for ``perf_counter_ns``), so other processes on the
machine do not count, and the figure is the median over all calls of all rounds:

1. ``base``: ``(prompt | model).invoke``.
2. ``noop-cb``: the same with a no-op ``BaseCallbackHandler`` in ``config["callbacks"]`` (what
   LangChain's callback machinery alone costs once any handler is attached).
3. ``guard``: ``guard | (prompt | model)`` with ``BudgetGuard([Budget("g", limit=1e12)])``,
   in-memory store, no ledger: the model is a metered copy (no callback handler).
4. ``guard-cb``: the model called inside a ``RunnableLambda``, which the guard cannot reach:
   metered by the callback meters; ``base-lambda`` is that chain unguarded.
5. ``guard+user``: 3 plus a per-user budget (``per="user_id"``, ``configurable.user_id``).
   ``usage-cb``: the chain with LangChain's own ``UsageMetadataCallbackHandler``, which only
   counts usage after the fact (no estimate, no reservation, nothing refused).
   ``precount``: what users write by hand in front of the same chain instead of a guard:
   format the prompt to see the messages, count each with tiktoken the way OpenAI documents
   (as ``tokencost`` does: the encoding looked up per call, role and content encoded), take
   the count plus the output cap from a per-user dict under a lock, run the chain, give back
   the difference from ``usage_metadata``.
6. ``floor``: a reference for the least a pre-call guard must do, with none of budgetguard: the
   chain's model is a subclass whose ``invoke`` counts the newest message with tiktoken (the
   text no cache can know), takes the count plus the output cap from a counter under a lock,
   calls the model, and gives back the difference from ``usage_metadata``.
7. ``minimal``: a reference for the least a guard built from budgetguard's own parts does: a
   model subclass whose ``invoke`` names its run, estimates the whole prompt with the guard's
   ``TokenEstimator`` (cached shape, as the in-place meter does), reserves one charge in the
   guard's ``MemoryStore``, calls the model, settles from ``usage_metadata`` and puts a small
   dict in ``response_metadata``. No scopes, windows, policies, tickets, usage checks or logs.
8. ``abase`` / ``aguard`` / ``aguard-cb``: ``ainvoke`` of 1, 3 and 4 on one event loop.

Then (unless ``--no-profile``) pyinstrument (if installed) samples ``guard`` and ``aguard`` and
sums the time spent under budgetguard frames per function.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import platform
import statistics
import sys
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import langchain_core
import tiktoken
import tiktoken.registry
from langchain_core.callbacks import BaseCallbackHandler, UsageMetadataCallbackHandler
from langchain_core.messages import convert_to_openai_messages
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from langchain_core.runnables.config import ensure_config
from langchain_core.utils.uuid import uuid7

import budgetguard.meter as meter_mod
from budgetguard import Budget, BudgetGuard
from budgetguard.estimate import model_from_params
from budgetguard.stores.base import Charge, ReserveRequest
from budgetguard.testing.fake_models import UsageFakeChatModel

SYSTEM = (
    "You are a meticulous customer-support assistant for Northwind Books, an online bookshop. "
    "Answer in at most three short paragraphs. Always quote the order number when the customer "
    "gives one, never invent delivery dates, and never promise refunds: refund requests above "
    "200 euros go to a human agent. Use British spelling, keep a friendly but professional tone, "
    "and end with one concrete next step. If the question is not about books, orders, shipping, "
    "returns or the customer's account, say politely that you can only help with the shop. Our "
    "return window is 30 days from delivery; e-books cannot be returned once downloaded. Shipping "
    "to the EU takes 3-5 working days, to the rest of the world 7-14. Gift cards never expire. "
    "Prices include VAT for EU customers; customers elsewhere may pay import duties on delivery, "
    "which we cannot refund. Pre-orders are charged on dispatch, and a customer can cancel a "
    "pre-order at any time before that. Signed editions are final sale. When a customer is upset, "
    "acknowledge the problem in one sentence before solving it. For damaged items, ask for a photo "
    "and the order number, then offer a replacement or a refund. Never ask for full card numbers."
)
QUESTIONS = (
    "Where is my order {n}? It was due on Monday.",
    "Can I return order {n}? The cover arrived torn.",
    "I was charged twice for order {n}, please help.",
    "Does order {n} include the signed edition I paid for?",
    "How do I cancel pre-order {n} before it ships?",
)
REPLIES = [
    "I'm sorry about the delay. I have opened a trace with the courier; you will hear from us "
    "within 24 hours. Next step: keep an eye on your inbox.",
    "Of course. Please reply with a photo of the damage and I will arrange a replacement.",
]

log = print


class NoOpHandler(BaseCallbackHandler):
    """Handles every event by doing nothing (LangChain's defaults)."""


def make_guard(*extra: Budget) -> BudgetGuard:
    """An in-memory guard with no ledger (``ledger=None`` would mean the default ledger file)."""
    guard = BudgetGuard([Budget("g", limit=1e12), *extra], ledger=False)
    assert guard.ledger is None, "the benchmark must not write a ledger"
    return guard


class PreCount:
    """The ``precount`` case: a hand-rolled tiktoken pre-count in front of the chain.

    It counts the way ``tokencost.count_message_tokens`` does: the messages as OpenAI dicts,
    ``tiktoken.encoding_for_model`` on every call, every key's value encoded, 3 per message
    and 3 for the reply.
    """

    def __init__(self, prompt: Any, chain: Any, model: str) -> None:
        self.prompt, self.chain, self.model = prompt, chain, model
        self.lock = threading.Lock()
        self.left: dict[str, float] = defaultdict(lambda: 1e12)

    def count(self, messages: list[Any]) -> int:
        enc = tiktoken.encoding_for_model(self.model)
        n = 3
        for message in convert_to_openai_messages(messages):
            n += 3
            for value in message.values():
                n += len(enc.encode(str(value)))
        return n

    def invoke(self, x: dict[str, Any], user: str = "alice") -> Any:
        held = self.count(self.prompt.format_messages(**x)) + 64
        with self.lock:
            if self.left[user] < held:
                msg = "over budget"
                raise RuntimeError(msg)
            self.left[user] -= held
        message = self.chain.invoke(x)
        usage = message.usage_metadata
        with self.lock:
            self.left[user] += held - usage["input_tokens"] - usage["output_tokens"]
        return message


class FloorModel(UsageFakeChatModel):
    """The ``floor`` case: count the fresh text, reserve and settle a counter, nothing else."""

    def invoke(self, input: Any, config: Any = None, *, stop: Any = None, **kwargs: Any) -> Any:
        lock, level, enc = _FLOOR["lock"], _FLOOR["level"], _FLOOR["encoding"]
        held = len(enc.encode_ordinary(input.messages[-1].content)) + _FLOOR["fixed"]
        with lock:
            level[0] -= held
        message = super().invoke(input, config, stop=stop, **kwargs)
        usage = message.usage_metadata
        with lock:
            level[0] += held - usage["input_tokens"] - usage["output_tokens"]
        return message


_FLOOR: dict[str, Any] = {}


class MinimalModel(UsageFakeChatModel):
    """The ``minimal`` case: budgetguard's estimator and memory store, and nothing else of the guard."""

    def invoke(self, input: Any, config: Any = None, *, stop: Any = None, **kwargs: Any) -> Any:
        guard: BudgetGuard = _FLOOR["minimal_guard"]
        config = ensure_config(config) if config is None else config
        run_id = config.get("run_id") or uuid7()  # replaces the id LangChain would make
        config = {**config, "run_id": run_id}
        shape = _FLOOR.get("minimal_shape")
        if shape is None:
            params = self._get_invocation_params(stop=stop, **kwargs)
            shape = _FLOOR["minimal_shape"] = guard.estimator.shape(model_from_params(params), params)
        est = guard.estimator.estimate_with(shape, messages=self._convert_input(input).to_messages())
        amount = est.input_tokens + est.output_tokens
        rid = str(run_id)
        guard.store.reserve(ReserveRequest(rid, (Charge(_FLOOR["minimal_spec"], amount),)))
        message = super().invoke(input, config, stop=stop, **kwargs)
        usage = message.usage_metadata
        guard.store.settle(rid, (float(usage["input_tokens"] + usage["output_tokens"]),))
        message.response_metadata["budgetguard"] = {"model": shape.model, "reserved": amount}
        return message


def build() -> dict[str, Any]:
    prompt = ChatPromptTemplate.from_messages([("system", SYSTEM), ("human", "{question}")])
    model = UsageFakeChatModel(max_tokens=64, replies=REPLIES)
    chain = prompt | model
    guard = make_guard()
    guard_cb = make_guard()
    guard_u = make_guard(Budget("u", limit=1e12, per="user_id"))
    noop_cfg = {"callbacks": [NoOpHandler()]}
    user_cfg = {"configurable": {"user_id": "alice"}}
    guarded = guard | chain
    hidden = prompt | RunnableLambda(lambda p, config: model.invoke(p, config))  # a model the guard cannot reach
    guarded_cb = guard_cb | hidden
    assert guarded.covered and not guarded_cb.covered
    guarded_u = guard_u | chain
    floor_model = FloorModel(max_tokens=64, replies=REPLIES)
    name = floor_model.model_name
    _FLOOR.update(lock=threading.Lock(), level=[1e12], encoding=guard.estimator.encoding_for(name).encoding,
                  fixed=guard.estimator.count_text(SYSTEM, name) + 64)
    floor = prompt | floor_model
    minimal_guard = _FLOOR["minimal_guard"] = make_guard()
    _FLOOR["minimal_spec"] = minimal_guard._spec(minimal_guard.budgets["g"], {})
    minimal = prompt | MinimalModel(max_tokens=64, replies=REPLIES)
    # tiktoken cannot download o200k here: put budgetguard's bundled copy in tiktoken's registry,
    # where encoding_for_model finds it (on a machine with network, tiktoken loads the same file).
    tiktoken.registry.ENCODINGS.setdefault("o200k_base", guard.estimator.encoding_for(name).encoding)
    precount = PreCount(prompt, chain, name)
    sync_cases: dict[str, Callable[[Any], Any]] = {
        "base": chain.invoke,
        "noop-cb": lambda x: chain.invoke(x, noop_cfg),
        "usage-cb": lambda x: chain.invoke(x, {"callbacks": [UsageMetadataCallbackHandler()]}),
        "precount": precount.invoke,
        "guard": guarded.invoke,
        "base-lambda": hidden.invoke,
        "guard-cb": guarded_cb.invoke,
        "guard+user": lambda x: guarded_u.invoke(x, user_cfg),
        "floor": floor.invoke,
        "minimal": minimal.invoke,
    }
    async_cases: dict[str, Callable[[Any], Any]] = {
        "abase": chain.ainvoke,
        "aguard": guarded.ainvoke,
        "aguard-cb": guarded_cb.ainvoke,
    }
    return {
        "prompt": prompt, "model": model, "chain": chain, "guard": guard, "guard_u": guard_u,
        "guarded": guarded, "sync": sync_cases, "async": async_cases,
    }


_counter = [0]


def inputs(n: int) -> list[dict[str, str]]:
    out = []
    for _ in range(n):
        _counter[0] += 1
        k = _counter[0]
        out.append({"question": QUESTIONS[k % len(QUESTIONS)].format(n=100_000 + k)})
    return out


CLOCK: list[Callable[[], int]] = [time.thread_time_ns]


def time_sync(fn: Callable[[Any], Any], xs: list[Any]) -> list[int]:
    pc = CLOCK[0]
    out = []
    for x in xs:
        t0 = pc()
        fn(x)
        out.append(pc() - t0)
    return out


async def time_async(fn: Callable[[Any], Any], xs: list[Any]) -> list[int]:
    pc = CLOCK[0]
    out = []
    for x in xs:
        t0 = pc()
        await fn(x)
        out.append(pc() - t0)
    return out


def sanity(env: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
    """The guarded chains really reserve and settle; the bare ones are untouched."""
    x = inputs(1)[0]
    for name, fn in (("guard", env["sync"]["guard"]), ("guard+user", env["sync"]["guard+user"])):
        msg = fn(x)
        assert "budgetguard" in msg.response_metadata, f"{name}: the guard did not meter the call"
    msg = loop.run_until_complete(env["async"]["aguard"](x))
    assert "budgetguard" in msg.response_metadata, "aguard: the guard did not meter the call"
    assert "budgetguard" not in env["sync"]["base"](x).response_metadata
    assert env["guard"].remaining("g") < 1e12
    assert env["guard_u"].remaining("u", user_id="alice") < 1e12


def reset_model(env: dict[str, Any]) -> None:
    env["model"].seen_messages.clear()
    env["model"].seen_max_tokens.clear()


def measure(env: dict[str, Any], rounds: int, calls: int, warmup: int) -> dict[str, list[int]]:
    loop = asyncio.new_event_loop()
    sanity(env, loop)
    names = [*env["sync"], *env["async"]]
    samples: dict[str, list[int]] = {n: [] for n in names}
    round_medians: dict[str, list[float]] = {n: [] for n in names}
    for r in range(-warmup, rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            xs = inputs(calls)
            reset_model(env)
            gc.collect()
            if name in env["sync"]:
                ts = time_sync(env["sync"][name], xs)
            else:
                ts = loop.run_until_complete(time_async(env["async"][name], xs))
            if r >= 0:
                samples[name].extend(ts)
                round_medians[name].append(statistics.median(ts))
    loop.close()
    assert env["guard"].store.open_reservations() == 0, "a reservation was left open"
    env["round_medians"] = round_medians
    return samples


def report(env: dict[str, Any], samples: dict[str, list[int]]) -> dict[str, float]:
    med = {n: statistics.median(v) / 1000 for n, v in samples.items()}
    rmed = env["round_medians"]
    spread = {n: (min(v) / 1000, max(v) / 1000) for n, v in rmed.items()}
    refs = {"abase": "abase", "aguard": "abase", "aguard-cb": "abase"}
    log()
    # Per-round ratio: each case against its baseline's chunk in the same round (machine drift cancels).
    paired = {n: statistics.median(a / b for a, b in zip(v, rmed[refs.get(n, "base")], strict=True))
              for n, v in rmed.items()}
    log(f"{'case':<12} {'median us/call':>15} {'vs base':>8} {'vs own base':>12} {'paired':>8}"
        "   round medians min-max (us)")
    for n, m in med.items():
        own = refs.get(n, "base")
        lo, hi = spread[n]
        log(f"{n:<12} {m:>15.1f} {m / med['base']:>7.3f}x {m / med[own]:>11.3f}x {paired[n]:>7.3f}x"
            f"   {lo:.1f}-{hi:.1f}")
    log("(paired: median over rounds of this case's round median / its own baseline's in the same round)")
    log()
    added = {n: med[n] - med["base"] for n in ("guard", "precount", "usage-cb", "noop-cb")}
    verdict = "met" if added["guard"] < added["precount"] else "MISSED"
    log(f"added CPU per call: guard +{added['guard']:.1f} us, hand-rolled precount +{added['precount']:.1f} us, "
        f"LangChain's usage callback +{added['usage-cb']:.1f} us "
        f"(target: guard below precount: {verdict})")
    log(f"  for reference, LangChain's callback machinery (noop-cb - base): +{added['noop-cb']:.1f} us")
    log(f"guard-cb over base-lambda: +{med['guard-cb'] - med['base-lambda']:.1f} us/call (callback meters, "
        "against the same chain with the model in a lambda)")
    log(f"aguard over abase:   +{med['aguard'] - med['abase']:.1f} us/call")
    log(f"guard+user over guard: +{med['guard+user'] - med['guard']:.1f} us/call")
    log(f"floor over base:     +{med['floor'] - med['base']:.1f} us/call (paired {paired['floor']:.3f}x): "
        "tiktoken on the new text plus a locked counter, the least a pre-call guard does")
    log(f"minimal over base:   +{med['minimal'] - med['base']:.1f} us/call (paired {paired['minimal']:.3f}x): "
        "budgetguard's estimator + memory store + a metadata dict, none of the guard's bookkeeping")
    return med


# -- profiling ---------------------------------------------------------------------------


def profile_sampling(env: dict[str, Any], calls: int, medians: dict[str, float]) -> None:
    """Sample guarded calls; sum the time under budgetguard frames (not budgetguard.testing)."""
    try:
        from pyinstrument import Profiler
    except ImportError:
        log("\npyinstrument not installed; no profile")
        return
    pkg = str(Path(meter_mod.__file__).resolve().parent)
    fake = str(Path(pkg) / "testing")

    def run(name: str) -> None:
        reset_model(env)
        xs = inputs(calls)
        prof = Profiler(interval=0.0005)
        if name == "aguard":
            loop = asyncio.new_event_loop()
            prof.start()
            loop.run_until_complete(time_async(env["async"]["aguard"], xs))
            session = prof.stop()
            loop.close()
        else:
            prof.start()
            time_sync(env["sync"][name], xs)
            session = prof.stop()
        root = session.root_frame()
        by_fn: dict[str, float] = defaultdict(float)
        outer: dict[str, float] = defaultdict(float)

        def walk(frame: Any, inside: frozenset[str], in_pkg: bool) -> None:
            path = frame.file_path or ""
            mine = path.startswith(pkg) and not path.startswith(fake)
            key = f"{Path(path).stem}.{frame.function}" if mine else ""
            if mine and key not in inside:
                by_fn[key] += frame.time
                if not in_pkg:
                    outer[key] += frame.time
            for child in frame.children:
                walk(child, inside | {key} if mine else inside, in_pkg or mine)

        walk(root, frozenset(), False)
        total = root.time
        # Sampling slows everything down; shares are scaled to the unprofiled median.
        scale = medians[name] / total
        share = sum(outer.values()) / total
        log()
        log(f"pyinstrument, {name}, {calls} calls: {share:.1%} of the sampled time is under budgetguard "
            f"frames = {share * medians[name]:.1f} us of the {medians[name]:.1f} us median call")
        for k, v in sorted(outer.items(), key=lambda kv: -kv[1]):
            log(f"      {k:<50} {v * scale:7.1f} us  ({v / total:.1%})")
        log("    inclusive time of budgetguard functions (top 16), scaled the same way:")
        for k, v in sorted(by_fn.items(), key=lambda kv: -kv[1])[:16]:
            log(f"      {k:<50} {v * scale:7.1f} us")

    run("guard")
    run("aguard")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--profile-calls", type=int, default=3000)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    args = ap.parse_args()
    CLOCK[0] = time.thread_time_ns if args.clock == "cpu" else time.perf_counter_ns
    # Library warnings (e.g. a tokenizer fallback) would only add noise to the timings.
    warnings.simplefilter("ignore", UserWarning)
    logging.getLogger("budgetguard").setLevel(logging.ERROR)

    env = build()
    log(f"Python {platform.python_version()}, langchain-core {langchain_core.__version__}, "
        f"{args.rounds} rounds x {args.calls} calls per case (+{args.warmup} warm-up round), {args.clock} clock")
    samples = measure(env, args.rounds, args.calls, args.warmup)
    medians = report(env, samples)
    if not args.no_profile:
        profile_sampling(env, args.profile_calls, medians)


if __name__ == "__main__":
    main()
