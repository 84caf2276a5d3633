"""``BudgetGuard``: budgets + store + estimator + policies, and the ``guard | chain`` wrapper.

``guard | runnable`` returns a :class:`GuardedRunnable`, a ``RunnableBindingBase`` around
the runnable (the pattern of LangChain's ``RunnableRetry``): schemas, names, config,
tracing and every call style come from LangChain. Its only addition is a config factory
that resolves the run's budget scopes and attaches the guard's meters (callback
handlers, :mod:`budgetguard.meter`) to the run, so every model call made anywhere inside
it is estimated and reserved before its request is sent, and settled after.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from uuid import uuid4

from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.base import RunnableBindingBase
from langchain_core.runnables.config import ensure_config
from langchain_core.utils.uuid import uuid7
from pydantic import ConfigDict, Field
from typing_extensions import override

from budgetguard.budgets import Budget
from budgetguard.clock import Clock, SystemClock
from budgetguard.errors import (
    BudgetExceeded,
    ConfigurationError,
    ContextWindowExceeded,
    StoreUnavailable,
)
from budgetguard.estimate import TokenEstimator
from budgetguard.flow import Flow, Reserve, adrive, drive
from budgetguard.meter import meters_for
from budgetguard.metered import SCOPES_KEY
from budgetguard.pricing import PriceTable
from budgetguard.stores import MemoryStore, Store, store_from_url
from budgetguard.stores.base import BucketSpec, ExpiredLease, ReserveRequest
from budgetguard.tickets import Call, Line, Ticket

if TYPE_CHECKING:
    from budgetguard.policies import OverflowPolicy
    from budgetguard.stores.base import Denial
    from budgetguard.usage import Usage

__all__ = ["BudgetGuard", "GuardedRunnable"]

logger = logging.getLogger("budgetguard")

_SPEC_CACHE_SIZE = 4096


class BudgetGuard:
    """Budgets for every model call made inside the runnables it wraps.

    Args:
        budgets: The budgets; every call is charged against each of them (a budget that
            others ``borrow_from`` is charged only for what they borrow).
        store: A :class:`~budgetguard.stores.Store`, or a URL (``memory://``,
            ``sqlite:///budgets.db``, ``redis://localhost:6379/0``). In-memory by default.
        prices: Model prices and context windows: a
            :class:`~budgetguard.pricing.PriceTable` (the bundled table by default).
        estimator: Counts prompt tokens and picks the output reservation.
        policies: Overflow policies tried in order when a call cannot be reserved or does
            not fit its model's context window (see :mod:`budgetguard.policies`).
        ledger: Where every call is recorded: a :class:`~budgetguard.ledger.Ledger`, a
            file path (SQLite, or JSONL for ``.jsonl``), ``None`` for the process-wide
            default ledger at :func:`~budgetguard.ledger.default_ledger_path` (opened on
            first use), or ``False`` for no ledger.
        alerts: Soft thresholds and denial hooks (:class:`~budgetguard.alerts.Alerts`).
        lease_seconds: How long a reservation may stay unsettled before any process's
            sweep charges it at the reserved amount (a crashed worker's calls).
        fail_open: When the store is unreachable, let calls through (logged, recorded)
            instead of raising :class:`~budgetguard.errors.StoreUnavailable`.
        clock: Time source; inject :class:`~budgetguard.clock.FakeClock` in tests.
        meter_in_place: Let ``guard | chain`` meter the chat models of a chain it can see
            through inside the models themselves (a metered copy of each), with no
            callback handler; ``False`` always meters through callback handlers. See
            :mod:`budgetguard.metered`.

    Raises:
        ConfigurationError: Duplicate budget names, ``borrow_from`` naming no global
            budget of the same unit, or no budgets at all.

    Example:
        >>> guard = BudgetGuard(budgets=[Budget("per-user", limit=20_000, per="user_id", period="day")])
        >>> guard.remaining("per-user", user_id="alice")
        20000.0
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
        clock: Clock | None = None,
        meter_in_place: bool = True,
    ) -> None:
        self.clock: Clock = clock or SystemClock()
        self.meter_in_place = meter_in_place
        self.budgets: dict[str, Budget] = _validate_budgets(budgets)
        self._lenders = {b.borrow_from for b in self.budgets.values() if b.borrow_from}
        self._charged = tuple(b for b in self.budgets.values() if b.name not in self._lenders)
        self._per_key = tuple(b for b in self.budgets.values() if b.per is not None)
        if isinstance(store, str):
            store = store_from_url(store, clock=self.clock)
        self.store: Store = store if store is not None else MemoryStore(clock=self.clock)
        self.prices = prices if prices is not None else PriceTable.bundled()
        self.estimator = estimator if estimator is not None else TokenEstimator()
        self.policies: tuple[OverflowPolicy, ...] = tuple(policies)
        from budgetguard.recording import resolve_ledger

        self._ledger = resolve_ledger(ledger)
        self.alerts = alerts
        if not (isinstance(lease_seconds, (int, float)) and math.isfinite(lease_seconds) and lease_seconds > 0):
            msg = f"lease_seconds must be a positive number of seconds, got {lease_seconds!r}"
            raise ConfigurationError(msg)
        self.lease_seconds = float(lease_seconds)
        self.fail_open = fail_open
        self._uses_usd = any(b.unit == "usd" for b in self.budgets.values())
        self._handoff: dict[str, Ticket] = {}
        self._specs: dict[tuple[str, ...], tuple[BucketSpec, float, float]] = {}
        self.uid = uuid4().hex[:12]
        """Tells this guard's entries in run metadata from another guard's."""

    # -- composition -------------------------------------------------------------------

    def __or__(self, other: Any) -> GuardedRunnable:
        """``guard | runnable``: meter every model call made inside ``runnable``."""
        return self.wrap(other)

    def wrap(self, runnable: Any) -> GuardedRunnable:
        """Return ``runnable`` guarded (same as ``guard | runnable``).

        Args:
            runnable: Any runnable, or anything LCEL coerces to one (a dict, a callable).
        """
        from langchain_core.runnables.base import coerce_to_runnable

        from budgetguard.metered import meter_in_place  # looked up per call: tests patch it
        from budgetguard.model import reach_models

        bound = coerce_to_runnable(runnable)
        if any(p.rewrites for p in self.policies):
            return GuardedRunnable(bound=reach_models(bound, self), guard=self)
        in_place = meter_in_place(bound, self) if self.meter_in_place else None
        if in_place is not None:
            return GuardedRunnable(bound=in_place, guard=self, in_place=True)
        return GuardedRunnable(bound=bound, guard=self)

    def model(self, llm: Any) -> Any:
        """Wrap a chat model so overflow policies can change its calls before sending.

        ``guard | chain`` does this for every chat model it can reach; use this for a
        model it cannot reach (one called inside a lambda or a tool).

        Args:
            llm: A LangChain chat model.
        """
        from budgetguard.model import GuardedChatModel

        return llm if isinstance(llm, GuardedChatModel) else GuardedChatModel(inner=llm, guard=self)

    def scopes_for(self, config: Mapping[str, Any]) -> dict[str, dict[str, str]]:
        """Resolve the scope of every per-key budget from a run config (global ones have none).

        Raises:
            MissingScopeError: A per-key budget has no value in the config.
        """
        return {b.name: b.scope_for(config) for b in self._per_key}

    # -- queries -----------------------------------------------------------------------

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

    # -- reservation -------------------------------------------------------------------

    def price(self, model: str | None, input_tokens: float, output_tokens: float, cached: float = 0) -> float:
        """USD cost of a call (raises ``UnknownModelError`` for a model with no price)."""
        return self.prices.require_price(model).cost(int(input_tokens), int(output_tokens), int(cached))

    def lines_for(self, call: Call, now: float | None = None) -> tuple[Line, ...]:
        """What each charged budget would hold for ``call``: its bucket as of ``now`` and amount."""
        if now is None:
            now = self.clock.now()
        est = call.estimate
        tokens = float(est.input_tokens + est.output_tokens)
        usd = self.price(call.model, est.input_tokens, est.output_tokens) if self._uses_usd else 0.0
        scopes, spec, budgets = call.scopes, self._spec, self.budgets
        lines = []
        for b in self._charged:
            scope = scopes.get(b.name) or {}
            lender = spec(budgets[b.borrow_from], {}, now) if b.borrow_from else None
            amount = usd if b.unit == "usd" else tokens
            lines.append(Line(spec(b, scope, now), amount, lender, budget=b, scope=scope))
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

    def denial_error(self, call: Call, lines: Sequence[Line], denial: Denial) -> BudgetExceeded:
        """Turn a store's denial into the user-facing error."""
        line = lines[denial.index]
        return BudgetExceeded(
            line.budget.name,
            scope=dict(line.scope),
            unit=line.budget.unit,
            requested=denial.requested,
            available=denial.available,
            retry_after=denial.retry_after,
            model=call.model,
        )

    def reserve_flow(self, call: Call, *, owner: str, rewrite: bool) -> Flow[Ticket]:
        """The protocol: check the window, reserve, apply overflow policies, or raise.

        Args:
            call: The call as the chain would send it.
            owner: ``"sync"`` or ``"async"`` (which meter settles the ticket).
            rewrite: Whether policies may change the request (smaller cap, other model,
                shorter prompt). Only the guard's model wrapper can; callbacks cannot.
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
                    return ticket
                if result.expired:
                    self.on_expired(result.expired)
                if result.ok:
                    return ticket
                assert result.denial is not None
                error = self.denial_error(call, lines, result.denial)
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
                self.on_denied(call, error)
                raise error.with_tried(tuple(tried)) if tried else error
            call = changed

    def reserve(self, call: Call, *, owner: str = "sync", rewrite: bool = False) -> Ticket:
        """Run :meth:`reserve_flow` with blocking calls."""
        return drive(self.reserve_flow(call, owner=owner, rewrite=rewrite), self.store, self.clock)

    async def areserve(self, call: Call, *, owner: str = "async", rewrite: bool = False) -> Ticket:
        """Run :meth:`reserve_flow` with awaits."""
        return await adrive(self.reserve_flow(call, owner=owner, rewrite=rewrite), self.store, self.clock)

    # -- settlement --------------------------------------------------------------------

    def actuals(self, ticket: Ticket, usage: Usage) -> tuple[float, ...]:
        """What the call really cost, per line of the ticket, in each budget's unit."""
        out = []
        usd: float | None = None
        for ln in ticket.lines:
            if ln.budget.unit == "usd":
                if usd is None:
                    usd = self.price(
                        ticket.call.model, usage.input_tokens, usage.output_tokens, usage.cached_input_tokens
                    )
                out.append(usd)
            else:
                out.append(float(usage.input_tokens + usage.output_tokens))
        return tuple(out)

    def _claim_settlement(self, ticket: Ticket, usage: Usage | None) -> tuple[float, ...] | None:
        """Mark a ticket settled and return what to charge; ``None`` if it already was."""
        if ticket.settled:
            return None
        ticket.settled = True
        return self.actuals(ticket, usage) if usage is not None else tuple(0.0 for _ in ticket.lines)

    def settle(self, ticket: Ticket, usage: Usage | None, *, outcome: str, error: BaseException | None = None) -> None:
        """Settle a ticket once with what the call used (``None``: release it)."""
        actuals = self._claim_settlement(ticket, usage)
        if actuals is None:
            return
        if not ticket.fail_open:
            self.store.settle(ticket.id, actuals)
        self.after_settle(ticket, usage, actuals, outcome, error)

    async def asettle(
        self, ticket: Ticket, usage: Usage | None, *, outcome: str, error: BaseException | None = None
    ) -> None:
        """Async :meth:`settle`."""
        actuals = self._claim_settlement(ticket, usage)
        if actuals is None:
            return
        if not ticket.fail_open:
            await self.store.asettle(ticket.id, actuals)
        self.after_settle(ticket, usage, actuals, outcome, error)

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

    def hand_off(self, ticket: Ticket) -> str:
        """Park a ticket reserved by the model wrapper until its run's meter adopts it."""
        self._handoff[ticket.id] = ticket
        return ticket.id

    def take_handoff(self, key: str) -> Ticket | None:
        """Take a parked ticket (once)."""
        return self._handoff.pop(key, None)

    # -- reporting hooks (ledger, alerts, logs) ----------------------------------------

    def after_settle(
        self,
        ticket: Ticket,
        usage: Usage | None,
        actuals: Sequence[float],
        outcome: str,
        error: BaseException | None,
    ) -> None:
        """Log, record and check alerts for a settled call."""
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "budgetguard: %s %s reserved %s, used %s (%s)",
                ticket.call.model,
                outcome,
                {ln.budget.name: round(ln.amount, 6) for ln in ticket.lines},
                {ln.budget.name: round(a, 6) for ln, a in zip(ticket.lines, actuals)},
                "fail-open" if ticket.fail_open else "settled",
            )
        if self._ledger is not None:
            from budgetguard.recording import record_settled

            record_settled(self, ticket, usage, outcome, error)
        if self.alerts is not None and not ticket.fail_open:
            from budgetguard.recording import observe_alerts

            observe_alerts(self, ticket)

    def on_denied(self, call: Call, error: BudgetExceeded) -> None:
        """Log, record and report a denied call."""
        logger.info("budgetguard: denied %s: %s", call.model, error)
        if self._ledger is not None:
            from budgetguard.recording import record_denied

            record_denied(self, call, error)
        if self.alerts is not None:
            self.alerts.denied(error)

    def on_expired(self, expired: Iterable[ExpiredLease]) -> None:
        """Log leases that expired unsettled (charged at their reserved amounts)."""
        for lease in expired:
            logger.warning(
                "budgetguard: reservation %s expired unsettled; charged the reserved %s", lease.id, lease.amounts
            )
            if self._ledger is not None:
                from budgetguard.recording import record_expired

                record_expired(self, lease)


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


class GuardedRunnable(RunnableBindingBase[Any, Any]):  # type: ignore[no-redef]
    """A runnable whose every model call is metered by a :class:`BudgetGuard`.

    Built by ``guard | runnable``. Behaves exactly like the runnable it wraps.
    """

    guard: Any = Field(default=None, exclude=True)
    """The guard metering this runnable."""
    in_place: bool = False
    """Whether the wrapped chain's models meter themselves (no callback meters needed)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    def __init__(self, *, bound: Runnable[Any, Any], guard: BudgetGuard, in_place: bool = False, **kwargs: Any) -> None:
        """Wrap ``bound``; use ``guard | runnable`` rather than calling this."""
        super().__init__(bound=bound, guard=guard, in_place=in_place, **kwargs)

    @override
    def _merge_configs(self, *configs: RunnableConfig | None) -> RunnableConfig:
        """The config for one invocation: the caller's, plus the guard's meters or scopes.

        Raises:
            MissingScopeError: A per-key budget has no value in the config (nothing runs).
        """
        if len(configs) == 1 and not self.config and not self.config_factories:
            config = ensure_config(configs[0])  # a fresh dict: ours to change
        else:
            config = super()._merge_configs(*configs)
        if self.in_place:
            _pass_scopes(self.guard, config)
        else:
            _attach_meters(self.guard, config)
        return config

    @classmethod
    @override
    def is_lc_serializable(cls) -> bool:
        return False

    @override
    def __repr__(self) -> str:
        return f"BudgetGuard | {self.bound!r}"


def _attach_meters(guard: BudgetGuard, config: RunnableConfig) -> None:
    meters = meters_for(guard, config)
    callbacks = config.get("callbacks")
    if callbacks is None:
        config["callbacks"] = meters
    elif isinstance(callbacks, list):
        config["callbacks"] = [*callbacks, *meters]
    else:  # a callback manager: LangChain's merge_configs adds handlers to a copy the same way
        manager = callbacks.copy()
        for meter in meters:
            manager.add_handler(meter, inherit=True)
        config["callbacks"] = manager


def _pass_scopes(guard: BudgetGuard, config: RunnableConfig) -> None:
    scopes = guard.scopes_for(config)
    root = config.get("run_id")
    if root is None:
        root = config["run_id"] = uuid7()  # the guarded run's id, so the ledger can group its calls
    configurable = config.get("configurable") or {}
    mine = {guard.uid: (scopes, root)}
    outer = configurable.get(SCOPES_KEY)
    config["configurable"] = {**configurable, SCOPES_KEY: {**outer, **mine} if outer else mine}


def running_loop() -> bool:
    """Whether an event loop runs in this thread."""
    return asyncio._get_running_loop() is not None  # no exception round trip, unlike get_running_loop()
