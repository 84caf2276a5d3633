"""Soft budget thresholds and denial hooks: pure logic plus user callbacks.

The guard calls :meth:`Alerts.observe` with a bucket's usage after it changes, and
:meth:`Alerts.denied` when a call is refused. Neither ever raises into the call path:
a failing callback is logged on the ``budgetguard`` logger and otherwise ignored.

Firing rules:

* A threshold fires **once per budget, scope, period and threshold**: for a budget with a
  calendar period (``period_start`` given) it fires again in the next period only.
* A bucket without a period (``period_start=None``, e.g. a refilling or lifetime budget)
  fires once, then re-arms when its usage drops back below ``threshold - hysteresis``
  (refills, refunds), so it can fire again when usage climbs past it once more.
* When one observation crosses several thresholds at once, each fires, lowest first.
* What has fired is remembered in a bounded LRU (``max_keys``); a forgotten key of a
  bucket without period may fire again.

Example:
    >>> seen = []
    >>> alerts = Alerts({"per-user": 0.8}, on_threshold=seen.append)
    >>> _ = alerts.observe(budget="per-user", scope={"user_id": "a"}, used=85, limit=100,
    ...                    unit="tokens", period_start=0.0, now=10.0)
    >>> [e.threshold for e in seen]
    [0.8]
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Union

from budgetguard.errors import ConfigurationError, format_amount

__all__ = ["AlertEvent", "Alerts"]

logger = logging.getLogger("budgetguard")

_Key = tuple[str, tuple[tuple[str, str], ...], Union[float, None], float]  # noqa: UP007


@dataclass(frozen=True)
class AlertEvent:
    """A budget bucket crossed a soft threshold.

    Attributes:
        budget: Budget name.
        scope: The bucket's scope, e.g. ``{"user_id": "alice"}`` (empty if global).
        threshold: The fraction of the limit that was crossed, e.g. ``0.8``.
        used: Usage of the bucket when it was observed, in ``unit``.
        limit: The bucket's limit, in ``unit``.
        unit: The budget's unit: ``"tokens"``, ``"usd"``, ``"calls"`` or ``"tool_calls"``.
        period_start: Unix start of the bucket's calendar period, or ``None``.
        ts: When it was observed (unix seconds).
    """

    budget: str
    scope: Mapping[str, str]
    threshold: float
    used: float
    limit: float
    unit: str
    period_start: float | None
    ts: float

    @property
    def fraction(self) -> float:
        """``used / limit``."""
        return self.used / self.limit if self.limit else math.inf

    @property
    def message(self) -> str:
        """One line for logs and notifications."""
        scope = ", ".join(f"{k}={v}" for k, v in self.scope.items())
        where = f"budget '{self.budget}'" + (f" ({scope})" if scope else "")
        text = (
            f"{where} reached {self.threshold:.0%} of its limit: "
            f"{format_amount(self.used, self.unit)} of {format_amount(self.limit, self.unit)} used ({self.fraction:.0%})"
        )
        if self.period_start is not None:
            start = datetime.fromtimestamp(self.period_start, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            text += f" in the period starting {start}"
        return text


def _check_thresholds(thresholds: Mapping[str, float | Sequence[float]] | None) -> dict[str, tuple[float, ...]]:
    out: dict[str, tuple[float, ...]] = {}
    for budget, value in (thresholds or {}).items():
        values = [value] if isinstance(value, (int, float)) else list(value)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < math.inf):
                msg = (
                    f"alert threshold for {budget!r} must be a fraction of the limit greater than 0 "
                    f"(e.g. 0.8 for 80%), got {v!r}"
                )
                raise ConfigurationError(msg)
        out[str(budget)] = tuple(sorted({float(v) for v in values}))
    return out


class Alerts:
    """Soft thresholds per budget, and hooks for denied calls.

    Args:
        thresholds: Budget name to a fraction of its limit, or several, e.g.
            ``{"per-user": 0.8, "*": [0.5, 0.9]}``. ``"*"`` applies to budgets without
            their own entry.
        on_threshold: Called with each :class:`AlertEvent` (after it is logged).
        on_denied: Called with the exception of each denied call (usually
            :class:`~budgetguard.errors.BudgetExceeded`).
        hysteresis: How far below a threshold usage of a period-less bucket must fall
            before that threshold can fire again.
        max_keys: How many fired (budget, scope, period, threshold) keys to remember.
        denial_log_interval: Denials of one budget and scope are logged at most once per
            this many seconds (the callback still sees every one).

    Raises:
        ConfigurationError: A threshold is not a positive number.
    """

    def __init__(
        self,
        thresholds: Mapping[str, float | Sequence[float]] | None = None,
        on_threshold: Callable[[AlertEvent], None] | None = None,
        on_denied: Callable[[Any], None] | None = None,
        *,
        hysteresis: float = 0.05,
        max_keys: int = 10_000,
        denial_log_interval: float = 60.0,
    ) -> None:
        if not 0 <= hysteresis < 1 or max_keys < 1 or denial_log_interval < 0:
            msg = "Alerts needs 0 <= hysteresis < 1, max_keys >= 1 and denial_log_interval >= 0"
            raise ConfigurationError(msg)
        self._thresholds = _check_thresholds(thresholds)
        self.on_threshold = on_threshold
        self.on_denied = on_denied
        self._hysteresis = hysteresis
        self._max_keys = max_keys
        self._denial_interval = denial_log_interval
        self._fired: OrderedDict[_Key, float] = OrderedDict()
        self._denials: OrderedDict[tuple[Any, ...], list[float]] = OrderedDict()  # key -> [last log, suppressed]
        self._lock = threading.Lock()

    def thresholds_for(self, budget: str) -> tuple[float, ...]:
        """The thresholds that apply to ``budget``, ascending."""
        found = self._thresholds.get(budget)
        return found if found is not None else self._thresholds.get("*", ())

    def observe(
        self,
        *,
        budget: str,
        scope: Mapping[str, str],
        used: float,
        limit: float,
        unit: str,
        period_start: float | None,
        now: float,
    ) -> list[AlertEvent]:
        """Check one bucket's usage; fire (log + callback) and return new events.

        Args:
            budget: Budget name.
            scope: The bucket's scope.
            used: Usage now, reservations included, in ``unit``.
            limit: The bucket's limit; nothing fires when it is not positive.
            unit: The budget's unit: ``"tokens"``, ``"usd"``, ``"calls"`` or ``"tool_calls"``.
            period_start: Start of the bucket's calendar period, ``None`` if it has none.
            now: Unix seconds, stamped on events.
        """
        levels = self.thresholds_for(budget)
        if not levels or not limit or limit <= 0:
            return []
        fraction = used / limit
        if fraction < levels[0] and (period_start is not None or not self._fired):
            return []  # fast path: nothing to fire, nothing to re-arm
        items = tuple(sorted((str(k), str(v)) for k, v in scope.items()))
        events = []
        with self._lock:
            for level in levels:
                key = (budget, items, period_start, level)
                if fraction >= level:
                    if key in self._fired:
                        self._fired.move_to_end(key)
                        continue
                    self._fired[key] = now
                    events.append(AlertEvent(budget, dict(items), level, used, limit, unit, period_start, now))
                elif period_start is None and fraction < level - self._hysteresis:
                    self._fired.pop(key, None)  # re-arm
            while len(self._fired) > self._max_keys:
                self._fired.popitem(last=False)
        for event in events:
            logger.warning("budgetguard: %s", event.message)
            self._call(self.on_threshold, event, "on_threshold")
        return events

    def denied(self, error: BaseException, *, now: float | None = None) -> None:
        """Report a denied call: log it (rate-limited per budget and scope) and call ``on_denied``."""
        now = time.monotonic() if now is None else now
        scope = getattr(error, "scope", None) or {}
        key = (getattr(error, "budget", None), tuple(sorted((str(k), str(v)) for k, v in dict(scope).items())))
        with self._lock:
            entry = self._denials.get(key)
            if entry is None or now - entry[0] >= self._denial_interval:
                suppressed = 0 if entry is None else int(entry[1])
                self._denials[key] = [now, 0]
                log = True
            else:
                entry[1] += 1
                log = False
            self._denials.move_to_end(key)
            while len(self._denials) > self._max_keys:
                self._denials.popitem(last=False)
        if log:
            more = f" ({suppressed} more denied since the last message)" if suppressed else ""
            logger.warning("budgetguard: call denied: %s%s", error, more)
        self._call(self.on_denied, error, "on_denied")

    def reset(self) -> None:
        """Forget every fired threshold and denial (everything may fire again)."""
        with self._lock:
            self._fired.clear()
            self._denials.clear()

    @staticmethod
    def _call(callback: Callable[[Any], None] | None, arg: Any, name: str) -> None:
        if callback is None:
            return
        try:
            callback(arg)
        except Exception:  # noqa: BLE001 - a user callback must never break a model call
            logger.error("budgetguard: the alerts %s callback %r raised; ignoring it", name, callback, exc_info=True)
