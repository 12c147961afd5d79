"""Admission and settlement against the store's atomic limits, with the outage policy.

Admission reserves one request, one concurrency slot and `prompt + max_tokens` tokens in one
store round trip; settlement refunds what the upstream did not use, frees the slot and adds
to the usage ledger, also in one round trip. When the store is unreachable the configured
policy decides: `fail_closed` refuses (503), `fail_open_local` admits against in-process
limits divided by the number of gateway replicas, and queues settlements so the ledger gets
them when the store returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, replace

from gateway.auth import Principal
from gateway.config import LimitsConfig
from gateway.errors import RateLimited, StoreUnavailable
from gateway.metrics import Metrics
from gateway.store import Admission, Decision, Limits, Settlement, Store
from gateway.store.memory import MemoryLimiter

log = logging.getLogger(__name__)

MAX_PENDING_SETTLEMENTS = 100_000
LIMIT_NAMES = {
    "requests": "requests per minute (rpm)",
    "tokens": "tokens per minute (tpm)",
    "concurrency": "concurrent requests (max_concurrent)",
    "monthly": "monthly tokens (monthly_tokens)",
}


@dataclass(frozen=True, slots=True)
class Grant:
    """An admitted request's reservation, to be settled exactly once."""

    key_id: str
    lease_id: str
    reserved_tokens: int
    prompt_tokens: int  # counted by the gateway at admission
    admitted_at: float
    decision: Decision
    local: bool  # admitted by the in-process fallback limiter


def format_reset(seconds: float) -> str:
    """OpenAI's reset format: '20ms', '1s', '6m0s'."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, int(seconds * 1000))}ms"
    whole = int(seconds + 0.999)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def rate_limit_headers(decision: Decision) -> dict[str, str]:
    headers: dict[str, str] = {}
    if decision.requests_limit is not None:
        headers["x-ratelimit-limit-requests"] = str(decision.requests_limit)
        headers["x-ratelimit-remaining-requests"] = str(decision.requests_remaining or 0)
        headers["x-ratelimit-reset-requests"] = format_reset(decision.requests_reset)
    if decision.tokens_limit is not None:
        headers["x-ratelimit-limit-tokens"] = str(decision.tokens_limit)
        headers["x-ratelimit-remaining-tokens"] = str(decision.tokens_remaining or 0)
        headers["x-ratelimit-reset-tokens"] = format_reset(decision.tokens_reset)
    return headers


def _scaled(limits: Limits, replicas: int) -> Limits:
    def part(value: int | None) -> int | None:
        return None if value is None else (value // replicas if value else 0) or min(value, 1)

    return Limits(rpm=part(limits.rpm), tpm=part(limits.tpm),
                  max_concurrent=part(limits.max_concurrent),
                  monthly_tokens=part(limits.monthly_tokens))


class Limiter:
    def __init__(self, store: Store, config: LimitsConfig, metrics: Metrics) -> None:
        self._store = store
        self._config = config
        self._metrics = metrics
        self._local = MemoryLimiter()
        self._pending: deque[Settlement] = deque(maxlen=MAX_PENDING_SETTLEMENTS)
        self.store_ok = True

    @property
    def degraded(self) -> bool:
        return not self.store_ok

    def _mark(self, ok: bool) -> None:
        if ok != self.store_ok:
            log.warning("store %s", "reachable again" if ok else "unreachable")
            self.store_ok = ok
            self._metrics.store_up.set(1 if ok else 0)

    async def admit(self, principal: Principal, model: str, prompt_tokens: int,
                    max_tokens: int) -> Grant:
        tokens = prompt_tokens + max_tokens
        admission = Admission(key_id=principal.key_id, lease_id=uuid.uuid4().hex,
                              limits=principal.limits, tokens=tokens,
                              lease_seconds=self._config.lease_seconds)
        local = False
        started = time.perf_counter()
        try:
            decision = await self._store.admit(admission)
            self._metrics.store_latency.labels("admit").observe(time.perf_counter() - started)
            self._mark(True)
        except StoreUnavailable:
            self._metrics.store_failures.labels("admit").inc()
            self._mark(False)
            if self._config.store_failure == "fail_closed":
                raise
            local = True
            scaled = _scaled(principal.limits, self._config.gateway_replicas)
            decision = await self._local.admit(replace(admission, limits=scaled))
        if not decision.allowed:
            self._metrics.rate_limited.labels(model, decision.limit_kind or "unknown").inc()
            raise self._refusal(decision, admission, prompt_tokens, max_tokens)
        return Grant(principal.key_id, admission.lease_id, tokens, prompt_tokens,
                     decision.admitted_at, decision, local)

    def _refusal(self, decision: Decision, admission: Admission, prompt_tokens: int,
                 max_tokens: int) -> RateLimited:
        kind = decision.limit_kind or "requests"
        name = LIMIT_NAMES.get(kind, kind)
        headers = rate_limit_headers(decision)
        if decision.retry_after is None:
            limit = admission.limits.tpm if kind == "tokens" else admission.limits.monthly_tokens
            return RateLimited(
                f"This request reserves {admission.tokens} tokens (prompt {prompt_tokens} + "
                f"max_tokens {max_tokens}), more than this key's whole limit on {name} "
                f"({limit}); it can never be admitted: lower max_tokens or shorten the prompt.",
                limit_kind=kind, retry_after_seconds=None, headers=headers,
                code="request_exceeds_limit")
        return RateLimited(
            f"Rate limit reached for {name}; retry after {decision.retry_after:.1f} s.",
            limit_kind=kind, retry_after_seconds=decision.retry_after, headers=headers,
            code="insufficient_quota" if kind == "monthly" else None)

    async def settle(self, grant: Grant, model: str, prompt_tokens: int,
                     completion_tokens: int, guardrail_tokens: int, error: bool) -> None:
        settlement = Settlement(
            key_id=grant.key_id, lease_id=grant.lease_id, model=model,
            reserved_tokens=grant.reserved_tokens, prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, guardrail_tokens=guardrail_tokens,
            admitted_at=grant.admitted_at, errors=1 if error else 0, local=grant.local)
        if grant.local:
            await self._local.settle(settlement)
            self._pending.append(settlement)
            return
        started = time.perf_counter()
        try:
            await self._store.settle(settlement)
            self._metrics.store_latency.labels("settle").observe(time.perf_counter() - started)
            self._mark(True)
        except StoreUnavailable:
            self._metrics.store_failures.labels("settle").inc()
            self._mark(False)
            self._pending.append(settlement)

    async def record_usage(self, key_id: str, model: str, prompt_tokens: int,
                           completion_tokens: int, error: bool) -> None:
        """Ledger only: usage the gateway spent on a key's behalf without admitting it against
        the key's limits (the input-moderation classifier call of an admitted chat). Settling
        a lease that was never held adds to the ledger and refunds nothing."""
        grant = Grant(key_id, "unadmitted-" + uuid.uuid4().hex, 0, 0, time.time(),
                      Decision(allowed=True), False)
        await self.settle(grant, model, prompt_tokens, completion_tokens, 0, error)

    async def replay_pending(self, interval: float = 1.0) -> None:
        """Background task: hand settlements queued during an outage to the store."""
        while True:
            await asyncio.sleep(interval)
            while self._pending:
                settlement = self._pending[0]
                try:
                    await self._store.settle(settlement)
                except StoreUnavailable:
                    break
                except Exception:  # a settlement the store rejects must not block the rest
                    log.exception("dropping a queued settlement the store rejected")
                self._pending.popleft()
                self._mark(True)
            if not self.store_ok and not self._pending:
                try:
                    await self._store.ping()
                    self._mark(True)
                except StoreUnavailable:
                    pass
