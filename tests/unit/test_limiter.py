"""The Limiter's pieces that need no I/O: OpenAI's reset format, header building, the
fail-open scaling, refusal messages, and the outage policies over an in-process store that
can be switched off (the Store seam, not a patched private)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.auth import Principal
from gateway.config import LimitsConfig
from gateway.errors import RateLimited, StoreUnavailable
from gateway.limiter import Limiter, _scaled, format_reset, rate_limit_headers
from gateway.metrics import Metrics
from gateway.store import Admission, Decision, Limits, Settlement
from gateway.store.memory import MemoryLimiter


@pytest.mark.parametrize(("seconds", "text"), [
    (-1.0, "0s"), (0.0, "0s"), (0.0001, "1ms"), (0.02, "20ms"), (0.999, "999ms"),
    (1.0, "1s"), (1.2, "2s"), (59.0, "59s"), (59.5, "1m0s"), (60.0, "1m0s"), (61.0, "1m1s"),
    (360.0, "6m0s"), (3600.0, "60m0s"),
])
def test_format_reset_is_openais_duration(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


def test_headers_for_both_limits() -> None:
    decision = Decision(allowed=True, requests_limit=60, requests_remaining=59,
                        requests_reset=0.0, tokens_limit=1000, tokens_remaining=None,
                        tokens_reset=12.3)
    assert rate_limit_headers(decision) == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "0s", "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "13s"}


def test_headers_leave_out_unlimited_kinds() -> None:
    headers = rate_limit_headers(Decision(allowed=True, tokens_limit=10, tokens_remaining=4))
    assert set(headers) == {"x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens",
                            "x-ratelimit-reset-tokens"}
    assert rate_limit_headers(Decision(allowed=True)) == {}


@pytest.mark.parametrize(("value", "replicas", "scaled"), [
    (None, 3, None), (0, 3, 0), (1, 3, 1), (10, 2, 5), (10, 3, 3), (7, 1, 7), (2, 4, 1),
])
def test_fail_open_scaling(value: int | None, replicas: int, scaled: int | None) -> None:
    """Each replica gets its share, rounded down, but never 0 for a limit that allows some."""
    limits = _scaled(Limits(rpm=value, tpm=value, max_concurrent=value, monthly_tokens=value),
                     replicas)
    assert limits == Limits(rpm=scaled, tpm=scaled, max_concurrent=scaled,
                            monthly_tokens=scaled)


class SwitchableStore:
    """The limit half of the Store protocol in memory, with an off switch for outages."""

    def __init__(self) -> None:
        self.up = True
        self.limiter = MemoryLimiter()
        self.settled: list[Settlement] = []

    def _check(self) -> None:
        if not self.up:
            raise StoreUnavailable("store is down (test)")

    async def ping(self) -> None:
        self._check()

    async def admit(self, admission: Admission) -> Decision:
        self._check()
        return await self.limiter.admit(admission)

    async def settle(self, settlement: Settlement) -> None:
        self._check()
        self.settled.append(settlement)
        await self.limiter.settle(settlement)


def principal(**limits: int | None) -> Principal:
    return Principal(key_id="k1", owner="o", plan="beta", limits=Limits(**limits),
                     models=frozenset({"*"}), moderation="optional", input_moderation=False)


def make(policy: str = "fail_closed", replicas: int = 1) -> tuple[Limiter, SwitchableStore,
                                                                  Metrics]:
    store = SwitchableStore()
    metrics = Metrics.create()
    config = LimitsConfig(store_failure=policy, gateway_replicas=replicas)  # type: ignore[arg-type]
    return Limiter(store, config, metrics), store, metrics  # type: ignore[arg-type]


def gauge(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


async def test_admission_reserves_and_settlement_refunds() -> None:
    limiter, store, _ = make()
    who = principal(tpm=1000)
    grant = await limiter.admit(who, "m", prompt_tokens=100, max_tokens=400)
    assert grant.reserved_tokens == 500 and grant.decision.tokens_remaining == 500
    await limiter.settle(grant, "m", prompt_tokens=100, completion_tokens=20,
                         guardrail_tokens=0, error=False)
    after = await limiter.admit(who, "m", prompt_tokens=100, max_tokens=400)
    assert after.decision.tokens_remaining == 1000 - 120 - 500
    assert store.settled[0].reserved_tokens == 500 and not store.settled[0].local


async def test_a_request_that_can_never_fit_says_so_without_retry_after() -> None:
    limiter, _, metrics = make()
    with pytest.raises(RateLimited) as caught:
        await limiter.admit(principal(tpm=1000), "m", prompt_tokens=10, max_tokens=2000)
    error = caught.value
    assert error.status == 429 and error.code == "request_exceeds_limit"
    assert "can never be admitted" in error.message and "tokens per minute" in error.message
    assert "retry-after" not in error.headers
    assert error.headers["x-ratelimit-limit-tokens"] == "1000"
    assert metrics.registry.get_sample_value(
        "plateforme_rate_limited_total", {"model": "m", "limit": "tokens"}) == 1


async def test_refusals_name_the_limit_and_carry_retry_after() -> None:
    limiter, _, _ = make()
    who = principal(rpm=1, monthly_tokens=100)
    await limiter.admit(who, "m", 1, 1)
    with pytest.raises(RateLimited) as caught:
        await limiter.admit(who, "m", 1, 1)
    assert "requests per minute (rpm)" in caught.value.message
    assert caught.value.code == "rate_limit_exceeded"
    assert 1 <= int(caught.value.headers["retry-after"]) <= 60
    assert caught.value.headers["x-ratelimit-remaining-requests"] == "0"

    monthly = principal(monthly_tokens=100)
    await limiter.admit(monthly, "m", 50, 40)
    with pytest.raises(RateLimited) as caught:
        await limiter.admit(monthly, "m", 10, 10)
    assert caught.value.code == "insufficient_quota"
    assert "monthly tokens" in caught.value.message


async def test_fail_closed_refuses_with_503_and_marks_the_store_down() -> None:
    limiter, store, metrics = make("fail_closed")
    store.up = False
    with pytest.raises(StoreUnavailable) as caught:
        await limiter.admit(principal(rpm=10), "m", 1, 1)
    assert caught.value.status == 503
    assert limiter.degraded and gauge(metrics, "plateforme_store_up") == 0


async def test_fail_open_local_scales_limits_and_replays_settlements() -> None:
    limiter, store, metrics = make("fail_open_local", replicas=2)
    who = principal(rpm=10)
    store.up = False
    grants = [await limiter.admit(who, "m", 5, 5) for _ in range(5)]
    assert all(g.local for g in grants)
    assert grants[0].decision.requests_limit == 5  # 10 shared by 2 replicas
    with pytest.raises(RateLimited):
        await limiter.admit(who, "m", 5, 5)
    for grant in grants:
        await limiter.settle(grant, "m", 5, 3, 0, error=False)
    assert store.settled == [] and gauge(metrics, "plateforme_store_up") == 0

    store.up = True
    replay = asyncio.create_task(limiter.replay_pending(interval=0.01))
    try:
        for _ in range(100):
            if len(store.settled) == 5:
                break
            await asyncio.sleep(0.01)
    finally:
        replay.cancel()
    assert len(store.settled) == 5 and all(s.local for s in store.settled)
    assert not limiter.degraded and gauge(metrics, "plateforme_store_up") == 1
    back = await limiter.admit(who, "m", 5, 5)
    assert not back.local and back.decision.requests_limit == 10


async def test_a_settlement_that_fails_is_queued_and_replayed() -> None:
    limiter, store, _ = make("fail_closed")
    grant = await limiter.admit(principal(max_concurrent=1), "m", 1, 1)
    store.up = False
    await limiter.settle(grant, "m", 1, 1, 0, error=False)  # no exception reaches the caller
    store.up = True
    replay = asyncio.create_task(limiter.replay_pending(interval=0.01))
    try:
        for _ in range(100):
            if store.settled:
                break
            await asyncio.sleep(0.01)
    finally:
        replay.cancel()
    assert [s.lease_id for s in store.settled] == [grant.lease_id]
    await limiter.admit(principal(max_concurrent=1), "m", 1, 1)  # the slot came back
