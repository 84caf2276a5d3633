"""The protocol, written once: estimate → reserve (→ overflow policies) → settle.

:class:`BudgetEngine` holds the budgets, the store, prices, estimator, policies, ledger and
alerts, and knows nothing of how a model call is met. The ways of meeting one are thin
adapters above it, each turning its own events into three calls:

* :meth:`BudgetEngine.new_call` describes the call about to be sent (estimated);
* :meth:`BudgetEngine.reserve` / :meth:`~BudgetEngine.areserve` reserve it, applying the
  overflow policies, or raise :class:`~budgetguard.errors.BudgetExceeded`;
* :meth:`BudgetEngine.end` / :meth:`~BudgetEngine.aend` settle it with the one rule of
  :mod:`budgetguard.settlement` for however it ended, and record it.

The adapters: metered copies of chat models (:mod:`budgetguard.metered`), callback meters for
models no one can reach (:mod:`budgetguard.meter`), ``guard | chain``
(:mod:`budgetguard.lcel`) and the agent middleware (:mod:`budgetguard.middleware`).
:class:`~budgetguard.guard.BudgetGuard` is the façade that builds them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid4

from budgetguard.budgets import MODEL_UNITS, RUN_SCOPE, Budget
from budgetguard.clock import Clock, SystemClock
from budgetguard.errors import BudgetExceeded, ConfigurationError, ContextWindowExceeded, StoreUnavailable
from budgetguard.estimate import CallShape, TokenEstimator
from budgetguard.flow import Acknowledge, Flow, OverflowPolicy, Reserve, adrive, drive
from budgetguard.pricing import PriceTable
from budgetguard.settlement import INTERRUPTED_CHARGES, Ending, Settlement, describe, settle_rule
from budgetguard.stores import Store, resolve_store
from budgetguard.stores.base import BucketSpec, ExpiredLease, ReserveRequest
from budgetguard.tickets import Call, Line, Ticket

if TYPE_CHECKING:
    from langchain_core.messages import BaseMessage
    from langchain_core.runnables import Runnable

    from budgetguard.stores.base import Denial

__all__ = ["BudgetEngine"]

logger = logging.getLogger("budgetguard")

_SPEC_CACHE_SIZE = 4096


class BudgetEngine:
    """Budgets for model calls: reservation, overflow policies, settlement and records.

    Construct a :class:`~budgetguard.guard.BudgetGuard` (this class plus the ways of meeting
    model calls); its arguments are documented there.

    Raises:
        ConfigurationError: Duplicate budget names, ``borrow_from`` naming no global
            budget of the same unit, no budgets at all, or a bad setting.
    """

    def __init__(
        self,
        budgets: Sequence[Budget],
        *,
        store: Store | str | None = None,
        prices: PriceTable | None = None,
        estimator: TokenEstimator | None = None,
        policies: Sequence[OverflowPolicy] = (),
        ledger: Any = None,
        alerts: Any = None,
        lease_seconds: float = 600.0,
        fail_open: bool = False,
        interrupted: str = "received",
        clock: Clock | None = None,
    ) -> None:
        self.clock: Clock = clock or SystemClock()
        self.budgets: dict[str, Budget] = _validate_budgets(budgets)
        self._lenders = {b.borrow_from for b in self.budgets.values() if b.borrow_from}
        charged = [b for b in self.budgets.values() if b.name not in self._lenders]
        self._charged = tuple(b for b in charged if b.unit in MODEL_UNITS)
        self._tool_budgets = tuple(b for b in charged if b.unit == "tool_calls")
        # The per-key budgets a model call needs scopes for, and those a tool call does.
        self._per_key = tuple(b for b in self._charged if b.per is not None)
        self._per_key_tools = tuple(b for b in self._tool_budgets if b.per is not None)
        if not (isinstance(lease_seconds, (int, float)) and math.isfinite(lease_seconds) and lease_seconds > 0):
            msg = f"lease_seconds must be a positive number of seconds, got {lease_seconds!r}"
            raise ConfigurationError(msg)
        if interrupted not in INTERRUPTED_CHARGES:
            msg = (
                f"interrupted must be one of {', '.join(map(repr, INTERRUPTED_CHARGES))} (what a call that "
                f"is stopped after it was sent is charged), got {interrupted!r}"
            )
            raise ConfigurationError(msg)
        for policy in policies:
            if not isinstance(policy, OverflowPolicy):
                msg = f"policies must be overflow policies (budgetguard.policies), got {policy!r}"
                raise ConfigurationError(msg)
        from budgetguard.ledger import check_ledger_path
        from budgetguard.recording import check_ledger_argument, resolve_ledger

        check_ledger_argument(ledger)
        check_ledger_path(ledger)  # before the store is built: a bad ledger path must leave no store file behind
        self.store: Store = resolve_store(store, self.clock)
        self.prices = prices if prices is not None else PriceTable.bundled()
        self.estimator = estimator if estimator is not None else TokenEstimator()
        self.policies: tuple[OverflowPolicy, ...] = tuple(policies)
        self._ledger = resolve_ledger(ledger)
        self.alerts = alerts
        self.lease_seconds = float(lease_seconds)
        self.fail_open = fail_open
        self.interrupted = interrupted
        self._uses_usd = any(b.unit == "usd" for b in self.budgets.values())
        self._specs: dict[tuple[str, ...], tuple[BucketSpec, float, float]] = {}
        self.uid = uuid4().hex[:12]
        """Tells this guard's entries in run configs from another guard's."""

    # -- scopes and queries ------------------------------------------------------------

    def scopes_for(
        self,
        config: Mapping[str, Any],
        context: Mapping[str, Any] | None = None,
        *,
        run: Any = None,
        tools: bool = False,
    ) -> dict[str, dict[str, str]]:
        """Resolve the scope of every per-key budget a model call (or a tool call) is charged to.

        Args:
            config: The run config (``configurable``, then ``metadata``).
            context: Values looked up first (an agent's runtime context).
            run: The run's id, for ``per="run"`` budgets, unless ``context`` or the config
                names the run the call belongs to (a summary written for a call of that run).
            tools: Resolve the ``"tool_calls"`` budgets' scopes instead of the model calls'.

        Raises:
            MissingScopeError: A per-key budget has no value for its key.
            InvalidScopeError: A scope value is not a string, an integer or a UUID.
        """
        fallback = {RUN_SCOPE: run} if run is not None else None
        return {b.name: b.scope_for(config, context, fallback) for b in (self._per_key_tools if tools else self._per_key)}

    def _spec(self, budget: Budget, scope: Mapping[str, str], now: float | None = None) -> BucketSpec:
        """The bucket of ``budget`` for ``scope``, as of ``now`` (kept until its period ends)."""
        if now is None:
            now = self.clock.now()
        key = (budget.name, *scope.values())
        hit = self._specs.get(key)
        if hit is not None and hit[1] <= now < hit[2]:
            return hit[0]
        bounds = budget.period_bounds(now)
        spec = budget.bucket_spec(scope, now)
        if len(self._specs) >= _SPEC_CACHE_SIZE:  # many scopes (users): start again rather than grow
            self._specs.clear()
        self._specs[key] = (spec, bounds[0] if bounds else -math.inf, bounds[1] if bounds else math.inf)
        return spec

    def _budget(self, name: str) -> Budget:
        try:
            return self.budgets[name]
        except KeyError:
            msg = f"no budget named {name!r}; this guard has {', '.join(map(repr, self.budgets))}"
            raise ConfigurationError(msg) from None

    def remaining(self, budget: str, **scope: Any) -> float:
        """What a bucket holds now, in its budget's unit (negative when overspent).

        Args:
            budget: The budget's name.
            **scope: The scope value for a per-key budget, e.g. ``user_id="alice"``.
        """
        b = self._budget(budget)
        return self.store.snapshot(self._spec(b, b.scope_from_kwargs(scope))).level

    async def aremaining(self, budget: str, **scope: Any) -> float:
        """Async :meth:`remaining`."""
        b = self._budget(budget)
        return (await self.store.asnapshot(self._spec(b, b.scope_from_kwargs(scope)))).level

    # -- describing a call -------------------------------------------------------------

    def new_call(
        self,
        *,
        run_id: UUID,
        model: str | None,
        params: Mapping[str, Any],
        messages: list[BaseMessage] | None,
        prompts: list[str] | None,
        scopes: Mapping[str, Mapping[str, str]],
        tags: Sequence[str] | None,
        metadata: Mapping[str, Any] | None,
        parent_run_id: UUID | None,
        root_run_id: UUID | None,
        shape: CallShape | None = None,
    ) -> Call:
        """Estimate a call about to be sent and describe it.

        ``shape`` is the estimator's :meth:`~budgetguard.estimate.TokenEstimator.shape` of
        ``model`` and ``params``, when the caller already has it.
        """
        estimator = self.estimator
        if shape is None:
            shape = estimator.shape(model, params)
        estimate = estimator.estimate_with(shape, messages=messages, prompts=prompts)
        return Call(
            run_id=run_id,
            model=model,
            estimate=estimate,
            messages=messages,
            prompts=prompts,
            params=params,
            scopes=scopes,
            model_requested=model,
            tags=tuple(tags) if tags else (),
            metadata=metadata or {},
            parent_run_id=parent_run_id,
            root_run_id=root_run_id,
        )

    def price(self, model: str | None, input_tokens: float, output_tokens: float, cached: float = 0) -> float:
        """USD cost of a call (raises ``UnknownModelError`` for a model with no price)."""
        return self.prices.require_price(model).cost(int(input_tokens), int(output_tokens), int(cached))

    def lines_for(self, call: Call, now: float | None = None) -> tuple[Line, ...]:
        """What each charged budget would hold for ``call``: its bucket as of ``now`` and amount."""
        if now is None:
            now = self.clock.now()
        est = call.estimate
        amounts = {
            "tokens": float(est.input_tokens + est.output_tokens),
            "usd": self.price(call.model, est.input_tokens, est.output_tokens) if self._uses_usd else 0.0,
            "calls": 1.0,
        }
        return self._lines(self._charged, call.scopes, amounts, now)

    def tool_lines(
        self, tool: str, scopes: Mapping[str, Mapping[str, str]], now: float | None = None
    ) -> tuple[Line, ...]:
        """What each ``"tool_calls"`` budget counting ``tool`` would hold for one call of it."""
        budgets = [b for b in self._tool_budgets if b.tool in (None, tool)]
        return self._lines(budgets, scopes, {"tool_calls": 1.0}, self.clock.now() if now is None else now)

    def _lines(
        self,
        budgets: Iterable[Budget],
        scopes: Mapping[str, Mapping[str, str]],
        amounts: Mapping[str, float],
        now: float,
    ) -> tuple[Line, ...]:
        spec, all_budgets = self._spec, self.budgets
        lines = []
        for b in budgets:
            scope = scopes.get(b.name) or {}
            lender = spec(all_budgets[b.borrow_from], {}, now) if b.borrow_from else None
            lines.append(Line(spec(b, scope, now), amounts[b.unit], lender, budget=b, scope=scope))
        return tuple(lines)

    @staticmethod
    def specs_for(lines: Sequence[Line]) -> tuple[BucketSpec, ...]:
        """The bucket of each line, and its lender's right after it when it borrows."""
        specs: list[BucketSpec] = []
        for ln in lines:
            specs.append(ln.bucket)
            if ln.lender is not None:
                specs.append(ln.lender)
        return tuple(specs)

    def window_error(self, call: Call) -> ContextWindowExceeded | None:
        """The error for a call that does not fit its model's context window, if it does not."""
        window = self.prices.context_window(call.model)
        if window is None:
            return None
        est = call.estimate
        # Without an output cap the provider only checks the prompt against the window.
        need = est.input_tokens + (est.output_tokens if est.output_capped else 0)
        if need <= window:
            return None
        return ContextWindowExceeded(
            "context-window",
            unit="tokens",
            requested=need,
            available=window,
            model=call.model,
            reason=(
                f"call to {call.model} does not fit its context window: {need:,} tokens "
                f"({est.input_tokens:,} prompt + {need - est.input_tokens:,} output cap) > {window:,}"
            ),
        )

    def denial_error(self, model: str | None, lines: Sequence[Line], denial: Denial) -> BudgetExceeded:
        """Turn a store's denial into the user-facing error."""
        line = lines[denial.index]
        return BudgetExceeded(
            line.budget.name,
            scope=dict(line.scope),
            unit=line.budget.unit,
            requested=denial.requested,
            available=denial.available,
            retry_after=denial.retry_after,
            model=model,
        )

    def wrap(self, runnable: Any) -> Runnable[Any, Any]:
        """Return ``runnable`` with its model calls metered (the façade's ``guard | runnable``).

        Policies use it to meter the calls they make themselves (a summarizer).
        """
        raise NotImplementedError  # pragma: no cover  (BudgetGuard provides it)

    # -- reservation -------------------------------------------------------------------

    def reserve_flow(self, call: Call, *, owner: str, rewrite: bool, record_denial: bool = True) -> Flow[Ticket]:
        """The protocol: check the window, reserve, apply overflow policies, or raise.

        Args:
            call: The call as the chain would send it.
            owner: ``"sync"`` or ``"async"`` (which callback meter settles the ticket).
            rewrite: Whether policies may change the request (smaller cap, other model,
                shorter prompt). An adapter that sends the call itself can; callbacks cannot.
            record_denial: Record and report a final denial (an adapter that may still
                serve the call from LangChain's cache records it itself, see :meth:`refused`).
        """
        policies = [p for p in self.policies if rewrite or not p.rewrites] if self.policies else ()
        tried: list[str] = []
        next_policy = 0
        while True:
            error: BudgetExceeded | None = self.window_error(call)
            if error is None:
                now = self.clock.now()
                lines = self.lines_for(call, now)
                ticket = Ticket(call, lines, now, owner, tried=tuple(tried) if tried else ())
                try:
                    result = yield Reserve(ReserveRequest(ticket.id, lines, self.lease_seconds, ticket.meta_json))
                except StoreUnavailable as exc:
                    if not self.fail_open:
                        raise
                    logger.warning("budgetguard: store unavailable, letting the call through (fail_open): %s", exc)
                    ticket.fail_open = True
                    ticket.held = False
                    return ticket
                if result.expired:
                    yield from self.report_expired(result.expired)
                if result.ok:
                    return ticket
                assert result.denial is not None
                error = self.denial_error(call.model, lines, result.denial)
            # Each policy gets one chance per call, in the user's order; a policy that
            # changes the call sends the changed call round the loop again.
            changed: Call | None = None
            while changed is None and next_policy < len(policies):
                policy = policies[next_policy]
                changed = yield from policy.propose(call, error, self)
                # A retrying policy (waiting for refill) is offered the call again
                # until it declines; every other policy gets one chance.
                if changed is None or not policy.retries:
                    next_policy += 1
                if policy.name not in tried:
                    tried.append(policy.name)
            if changed is None:
                final = error.with_tried(tuple(tried)) if tried else error
                if record_denial:
                    self.refused(call, final)
                raise final
            call = changed

    def reserve(self, call: Call, *, owner: str = "sync", rewrite: bool = False, record_denial: bool = True) -> Ticket:
        """Run :meth:`reserve_flow` with blocking calls."""
        flow = self.reserve_flow(call, owner=owner, rewrite=rewrite, record_denial=record_denial)
        return drive(flow, self.store, self.clock)

    async def areserve(
        self, call: Call, *, owner: str = "async", rewrite: bool = False, record_denial: bool = True
    ) -> Ticket:
        """Run :meth:`reserve_flow` with awaits."""
        flow = self.reserve_flow(call, owner=owner, rewrite=rewrite, record_denial=record_denial)
        return await adrive(flow, self.store, self.clock)

    def unheld(self, call: Call) -> Ticket:
        """A ticket for a call that holds nothing (one LangChain's cache may answer)."""
        return Ticket(call, (), self.clock.now(), held=False)

    # -- tool calls (counted, not priced: no policies, no ledger) ----------------------

    def hold_flow(self, hold_id: str, lines: Sequence[Line], what: str) -> Flow[None]:
        """Reserve ``lines`` exactly as they are, or raise ``BudgetExceeded`` naming ``what``."""
        result = yield Reserve(ReserveRequest(hold_id, tuple(lines), self.lease_seconds))
        if result.expired:
            yield from self.report_expired(result.expired)
        if not result.ok:
            assert result.denial is not None
            error = self.denial_error(what, lines, result.denial)
            logger.info("budgetguard: denied %s: %s", what, error)
            if self.alerts is not None:
                self.alerts.denied(error)
            raise error

    def hold(self, hold_id: str, lines: Sequence[Line], what: str) -> None:
        """Run :meth:`hold_flow` with blocking calls."""
        drive(self.hold_flow(hold_id, lines, what), self.store, self.clock)

    async def ahold(self, hold_id: str, lines: Sequence[Line], what: str) -> None:
        """Run :meth:`hold_flow` with awaits."""
        await adrive(self.hold_flow(hold_id, lines, what), self.store, self.clock)

    # -- settlement --------------------------------------------------------------------

    def _settlement(self, ticket: Ticket, ending: Ending) -> tuple[Settlement, tuple[float, ...]] | None:
        """Claim the ticket and apply the rule; ``None`` when it was already settled."""
        if ticket.settled:
            return None
        ticket.settled = True
        settled = settle_rule(ticket, ending, self.estimator.count_text, self.interrupted)  # type: ignore[arg-type]
        if ending.error is None:
            describe(ticket, ending.response, settled.usage)
        return settled, self.actuals(ticket, settled)

    def end(self, ticket: Ticket, ending: Ending) -> None:
        """Settle a call that ended, once, by the one rule, and record it.

        Raises:
            UsageError: The call succeeded but reported malformed usage (it was charged
                its reservation).
        """
        claimed = self._settlement(ticket, ending)
        if claimed is None:
            return
        settled, actuals = claimed
        self.record_settled(ticket, settled, ending.error)
        if ticket.held:
            try:
                self.store.settle(ticket.id, actuals)
            except StoreUnavailable as exc:
                self._unsettled(ticket, exc)
        self.after_settle(ticket, settled, actuals, ending.error)

    async def aend(self, ticket: Ticket, ending: Ending) -> None:
        """Async :meth:`end`."""
        claimed = self._settlement(ticket, ending)
        if claimed is None:
            return
        settled, actuals = claimed
        # On the loop, not in a thread: no await (so no cancellation point) before the settle.
        self.record_settled(ticket, settled, ending.error)
        if ticket.held:
            try:
                await self.store.asettle(ticket.id, actuals)
            except StoreUnavailable as exc:
                self._unsettled(ticket, exc)
        self.after_settle(ticket, settled, actuals, ending.error)

    def _unsettled(self, ticket: Ticket, error: StoreUnavailable) -> None:
        """The store could not take a settle: the call happened, so its answer is not thrown
        away; its lease charges the reservation when it expires (and the sweep records that)."""
        logger.error(
            "budgetguard: could not settle %s (%s); its reservation stays held and is charged in full "
            "when its lease expires in at most %.0f s",
            ticket.id,
            error,
            self.lease_seconds,
        )

    def actuals(self, ticket: Ticket, settled: Settlement) -> tuple[float, ...]:
        """What the call really cost, per line of the ticket, in each budget's unit.

        Released calls cost nothing; a call answered from the cache is not a model call.
        """
        usage = settled.usage
        if usage is None:
            return tuple(0.0 for _ in ticket.lines)
        out = []
        usd: float | None = None
        for ln in ticket.lines:
            unit = ln.budget.unit
            if unit == "usd":
                if usd is None:
                    usd = self.price(
                        ticket.call.model, usage.input_tokens, usage.output_tokens, usage.cached_input_tokens
                    )
                out.append(usd)
            elif unit == "calls":
                out.append(0.0 if settled.outcome == "cached" else 1.0)
            else:
                out.append(float(usage.input_tokens + usage.output_tokens))
        return tuple(out)

    # -- reporting (ledger, alerts, logs) ----------------------------------------------

    @property
    def ledger(self) -> Any:
        """The guard's :class:`~budgetguard.ledger.Ledger`, or ``None``."""
        return self.ledger_sink()

    def ledger_sink(self) -> Any:
        """The ledger to write to (the default one is opened on first use)."""
        if self._ledger == "default":
            from budgetguard.recording import default_ledger

            self._ledger = default_ledger()
        return self._ledger

    def record_settled(self, ticket: Ticket, settled: Settlement, error: BaseException | None) -> None:
        """Write a settled call's ledger record; it is stored when this returns.

        Called before the store settles the call: a process killed in between leaves a
        lease whose sweep records ``expired``, which replaces this record's charge (see
        :mod:`budgetguard.ledger_sql`), so the ledger never misses a charge the store made.
        """
        ledger = self.ledger_sink()
        if ledger is not None:
            from budgetguard.recording import record_settled

            record_settled(
                ledger, self.prices, ticket, settled.usage, settled.outcome, error or settled.problem, self.clock.now()
            )

    def after_settle(
        self, ticket: Ticket, settled: Settlement, actuals: Sequence[float], error: BaseException | None
    ) -> None:
        """Log and check alerts for a settled call (recorded before the settle); raise
        malformed usage last."""
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "budgetguard: %s %s reserved %s, used %s (%s)",
                ticket.call.model,
                settled.outcome,
                {ln.budget.name: round(ln.amount, 6) for ln in ticket.lines},
                {ln.budget.name: round(a, 6) for ln, a in zip(ticket.lines, actuals, strict=True)},
                "fail-open" if ticket.fail_open else "settled",
            )
        if self.alerts is not None and ticket.held:
            self._observe_alerts(ticket)
        if settled.problem is not None and error is None:
            raise settled.problem

    def refused(self, call: Call, error: BudgetExceeded) -> None:
        """Log, record and report a call that was refused."""
        logger.info("budgetguard: denied %s: %s", call.model, error)
        ledger = self.ledger_sink()
        if ledger is not None:
            from budgetguard.recording import record_denied

            record_denied(ledger, self.prices, call, error, self.clock.now())
        if self.alerts is not None:
            self.alerts.denied(error)

    def report_expired(self, expired: Sequence[ExpiredLease]) -> Flow[None]:
        """Record the swept leases a store reported, then acknowledge them.

        Each record is stored when :meth:`on_expired` returns; only then may the store
        drop the lease from its journal. A process killed in between leaves it there, and
        the next call of any process records it (again: the ledger keeps one record per
        run, see :mod:`budgetguard.ledger_sql`).
        """
        self.on_expired(expired)
        yield Acknowledge(tuple(lease.id for lease in expired))

    def on_expired(self, expired: Iterable[ExpiredLease]) -> None:
        """Log and record leases that expired unsettled (charged at their reserved amounts)."""
        for lease in expired:
            logger.warning(
                "budgetguard: reservation %s expired unsettled; charged the reserved %s", lease.id, lease.amounts
            )
            ledger = self.ledger_sink()
            if ledger is not None:
                from budgetguard.recording import record_expired

                record_expired(ledger, self.prices, lease, self.clock.now())

    def _observe_alerts(self, ticket: Ticket) -> None:
        """Check the soft thresholds of every bucket a settled call touched."""
        now = self.clock.now()
        for ln in ticket.lines:
            left = self.remaining(ln.budget.name, **ln.scope)
            bounds = ln.budget.period_bounds(now)
            self.alerts.observe(
                budget=ln.budget.name,
                scope=dict(ln.scope),
                used=ln.budget.limit - left,
                limit=ln.budget.limit,
                unit=ln.budget.unit,
                period_start=bounds[0] if bounds else None,
                now=now,
            )


def _validate_budgets(budgets: Sequence[Budget]) -> dict[str, Budget]:
    if isinstance(budgets, Budget):
        budgets = [budgets]
    out: dict[str, Budget] = {}
    for b in budgets:
        if not isinstance(b, Budget):
            msg = f"budgets must be Budget objects, got {b!r}"
            raise ConfigurationError(msg)
        if b.name in out:
            msg = f"two budgets are named {b.name!r}; budget names must be unique"
            raise ConfigurationError(msg)
        out[b.name] = b
    if not out:
        msg = "a BudgetGuard needs at least one Budget"
        raise ConfigurationError(msg)
    for b in out.values():
        if b.borrow_from is None:
            continue
        pool = out.get(b.borrow_from)
        if pool is None:
            msg = f"budget {b.name!r} borrows from {b.borrow_from!r}, but no budget has that name"
            raise ConfigurationError(msg)
        if pool.per is not None or pool.unit != b.unit or pool.borrow_from is not None:
            msg = (
                f"budget {b.name!r} borrows from {pool.name!r}, which must be a global budget "
                f"(per=None) in the same unit ({b.unit}) that borrows from no one"
            )
            raise ConfigurationError(msg)
    return out
