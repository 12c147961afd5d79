"""The limit semantics in plain Python: the decision rule every store follows, and
`MemoryLimiter`, an in-process `admit`/`settle` for when the shared store is down.

The rule (the Redis Lua script mirrors it line for line; SQLiteStore calls `decide`):

* Requests and tokens per minute share one sliding 60 s log of admissions: an entry
  (lease id, admitted_at, tokens) lives while `admitted_at > now - 60`. Settling lowers the
  entry's tokens to what was really used, which is the refund.
* Concurrency is a set of leases, each alive while `expires_at > now`; settling removes it.
  A crashed gateway's leases therefore free themselves after `lease_seconds`.
* Monthly tokens are a counter per UTC calendar month: reserved at admission, corrected to
  the real use at settlement (only while the lease is still held, so settling twice never
  refunds twice).
* A request that can *never* fit (a limit of 0, or more tokens than the whole per-minute or
  monthly limit) is refused first, with `retry_after=None`. Otherwise the order is
  concurrency, requests, tokens, monthly; the first refusing kind is reported, and a refusal
  records nothing.

`MemoryLimiter` is used under the `fail_open_local` policy: the gateway divides the limits
by its replica count itself. It keeps no usage ledger, only the limit state.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from gateway.store.base import WINDOW_SECONDS, Admission, Decision, LimitKind, Settlement

CONCURRENCY_RETRY_SECONDS = 1.0  # a held slot is usually freed within a second


def utc_day(ts: float) -> str:
    """The ledger's day (YYYY-MM-DD, UTC) of a Unix time."""
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def utc_month(ts: float) -> str:
    """The monthly quota's period (YYYY-MM, UTC) of a Unix time."""
    return time.strftime("%Y-%m", time.gmtime(ts))


def next_month_start(ts: float) -> float:
    """Unix time at which the UTC calendar month after `ts`'s begins."""
    t = time.gmtime(ts)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0, 0, 0, 0)))


class LimitView(Protocol):
    """Read access to one key's limit state at `now`, already pruned of expired entries.

    Methods are called lazily by `decide`, so a backend only runs the queries a decision
    needs (most admissions never ask for `request_time` or `time_tokens_freed`).
    """

    def window_totals(self) -> tuple[int, int]:
        """(entries, tokens) in the 60 s window."""
        ...

    def request_time(self, index: int) -> float:
        """admitted_at of the index-th oldest window entry (0-based)."""
        ...

    def time_tokens_freed(self, need: int) -> float | None:
        """admitted_at of the entry whose departure frees `need` tokens (oldest first)."""
        ...

    def newest_time(self) -> float | None: ...
    def leases_held(self) -> int: ...
    def earliest_lease_expiry(self) -> float | None: ...
    def month_used(self) -> int: ...


def _refusal(adm: Admission, now: float, view: LimitView, count: int,
             tsum: int) -> tuple[LimitKind | None, float | None]:
    lim, tokens = adm.limits, adm.tokens
    if lim.max_concurrent == 0:
        return "concurrency", None
    if lim.rpm == 0:
        return "requests", None
    if lim.tpm is not None and tokens > lim.tpm:
        return "tokens", None
    if lim.monthly_tokens is not None and tokens > lim.monthly_tokens:
        return "monthly", None
    if lim.max_concurrent is not None and view.leases_held() >= lim.max_concurrent:
        expiry = view.earliest_lease_expiry()
        wait = CONCURRENCY_RETRY_SECONDS if expiry is None else expiry - now
        return "concurrency", max(0.0, min(CONCURRENCY_RETRY_SECONDS, wait))
    if lim.rpm is not None and count >= lim.rpm:
        return "requests", max(0.0, view.request_time(count - lim.rpm) + WINDOW_SECONDS - now)
    if lim.tpm is not None and tsum + tokens > lim.tpm:
        at = view.time_tokens_freed(tsum + tokens - lim.tpm)
        return "tokens", WINDOW_SECONDS if at is None else max(0.0, at + WINDOW_SECONDS - now)
    if lim.monthly_tokens is not None and view.month_used() + tokens > lim.monthly_tokens:
        return "monthly", next_month_start(now) - now
    return None, 0.0


def decide(adm: Admission, now: float, view: LimitView) -> Decision:
    """The decision for `adm` at `now`; the caller records it only if `allowed`."""
    lim = adm.limits
    windowed = lim.rpm is not None or lim.tpm is not None
    count, tsum = view.window_totals() if windowed else (0, 0)
    kind, retry = _refusal(adm, now, view, count, tsum)
    allowed = kind is None
    count_after = count + 1 if allowed else count
    tsum_after = tsum + adm.tokens if allowed else tsum

    requests_remaining: int | None = None
    requests_reset = 0.0
    if lim.rpm is not None:
        requests_remaining = max(0, lim.rpm - count_after)
        if lim.rpm > 0 and count_after >= lim.rpm:
            index = count_after - lim.rpm
            oldest = now if index >= count else view.request_time(index)
            requests_reset = max(0.0, oldest + WINDOW_SECONDS - now)
    tokens_remaining: int | None = None
    tokens_reset = 0.0
    if lim.tpm is not None:
        tokens_remaining = max(0, lim.tpm - tsum_after)
        if tsum_after > 0:
            newest = now if allowed else (view.newest_time() or now)
            tokens_reset = max(0.0, newest + WINDOW_SECONDS - now)
    return Decision(
        allowed=allowed, limit_kind=kind, retry_after=retry,
        requests_limit=lim.rpm, requests_remaining=requests_remaining,
        requests_reset=requests_reset, tokens_limit=lim.tpm,
        tokens_remaining=tokens_remaining, tokens_reset=tokens_reset, admitted_at=now,
    )


@dataclass
class _KeyState:
    # lease id -> [admitted_at, tokens]; insertion order is time order (one clock)
    window: dict[str, list[float]] = field(default_factory=dict)
    window_tokens: int = 0
    leases: dict[str, float] = field(default_factory=dict)  # lease id -> expires_at
    months: dict[str, int] = field(default_factory=dict)  # YYYY-MM -> tokens

    def prune(self, now: float) -> None:
        cutoff = now - WINDOW_SECONDS
        while self.window:
            lease_id, entry = next(iter(self.window.items()))
            if entry[0] > cutoff:
                break
            del self.window[lease_id]
            self.window_tokens -= int(entry[1])
        for lease_id in [k for k, exp in self.leases.items() if exp <= now]:
            del self.leases[lease_id]


class _MemoryView:
    def __init__(self, state: _KeyState, now: float) -> None:
        self._state = state
        self._now = now

    def window_totals(self) -> tuple[int, int]:
        return len(self._state.window), self._state.window_tokens

    def request_time(self, index: int) -> float:
        return list(self._state.window.values())[index][0]

    def time_tokens_freed(self, need: int) -> float | None:
        freed = 0
        for at, tokens in self._state.window.values():
            freed += int(tokens)
            if freed >= need:
                return at
        return None

    def newest_time(self) -> float | None:
        return next(reversed(self._state.window.values()))[0] if self._state.window else None

    def leases_held(self) -> int:
        return len(self._state.leases)

    def earliest_lease_expiry(self) -> float | None:
        return min(self._state.leases.values(), default=None)

    def month_used(self) -> int:
        return self._state.months.get(utc_month(self._now), 0)


class MemoryLimiter:
    """`admit`/`settle` with the stores' semantics, in this process only.

    `clock` is injectable so tests can move time; it must not go backwards.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._keys: dict[str, _KeyState] = {}

    async def admit(self, admission: Admission) -> Decision:
        now = self._clock()
        state = self._keys.setdefault(admission.key_id, _KeyState())
        state.prune(now)
        decision = decide(admission, now, _MemoryView(state, now))
        if decision.allowed:
            lim = admission.limits
            if lim.rpm is not None or lim.tpm is not None:
                state.window[admission.lease_id] = [now, float(admission.tokens)]
                state.window_tokens += admission.tokens
            state.leases[admission.lease_id] = now + admission.lease_seconds
            month = utc_month(now)
            state.months[month] = state.months.get(month, 0) + admission.tokens
        return decision

    async def settle(self, settlement: Settlement) -> None:
        used = (settlement.prompt_tokens + settlement.completion_tokens
                + settlement.guardrail_tokens)
        state = self._keys.get(settlement.key_id)
        if state is None or state.leases.pop(settlement.lease_id, None) is None:
            if settlement.local and used > 0:  # never reserved here: charge the month
                month = utc_month(settlement.admitted_at)
                state = self._keys.setdefault(settlement.key_id, _KeyState())
                state.months[month] = state.months.get(month, 0) + used
            return  # unknown, expired or already settled: never refund twice
        entry = state.window.get(settlement.lease_id)
        if entry is not None:
            state.window_tokens += used - int(entry[1])
            entry[1] = float(used)
        month = utc_month(settlement.admitted_at)
        state.months[month] = max(
            0, state.months.get(month, 0) + used - settlement.reserved_tokens)

    def monthly_tokens_used(self, key_id: str) -> int:
        state = self._keys.get(key_id)
        return state.months.get(utc_month(self._clock()), 0) if state else 0
