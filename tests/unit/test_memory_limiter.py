"""MemoryLimiter on a hand-driven clock: the window really slides, and the retry hints are
the exact moments a request would fit (the stores can only be checked on the real clock)."""

from __future__ import annotations

import calendar

import pytest

from gateway.store import Admission, Limits, Settlement
from gateway.store.memory import MemoryLimiter, next_month_start, utc_day, utc_month


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def adm(limits: Limits, lease: str, tokens: int = 0, lease_seconds: float = 300.0) -> Admission:
    return Admission("k", lease, limits, tokens, lease_seconds)


async def test_the_requests_window_slides() -> None:
    clock = Clock(1000.0)
    limiter = MemoryLimiter(clock)
    limits = Limits(rpm=2)
    assert (await limiter.admit(adm(limits, "a"))).allowed
    clock.now = 1010.0
    assert (await limiter.admit(adm(limits, "b"))).allowed
    clock.now = 1020.0
    refused = await limiter.admit(adm(limits, "c"))
    assert refused.retry_after == pytest.approx(40.0) and refused.requests_reset == 40.0
    clock.now = 1060.0  # "a" leaves the window exactly now
    admitted = await limiter.admit(adm(limits, "d"))
    assert admitted.allowed and admitted.requests_remaining == 0
    assert admitted.requests_reset == pytest.approx(10.0)  # then "b" leaves


async def test_tokens_retry_is_when_enough_tokens_leave() -> None:
    clock = Clock(0.0)
    limiter = MemoryLimiter(clock)
    limits = Limits(tpm=100)
    await limiter.admit(adm(limits, "a", tokens=60))
    clock.now = 10.0
    await limiter.admit(adm(limits, "b", tokens=30))
    clock.now = 20.0
    refused = await limiter.admit(adm(limits, "c", tokens=50))
    assert refused.limit_kind == "tokens" and refused.retry_after == pytest.approx(40.0)
    assert refused.tokens_reset == pytest.approx(50.0)  # "b" leaves last
    await limiter.settle(Settlement("k", "a", "m", 60, 5, 5, 0.0))  # refund 50
    assert (await limiter.admit(adm(limits, "c", tokens=50))).allowed


async def test_leases_expire_on_the_clock() -> None:
    clock = Clock(0.0)
    limiter = MemoryLimiter(clock)
    limits = Limits(max_concurrent=1)
    await limiter.admit(adm(limits, "a", lease_seconds=5.0))
    clock.now = 4.5
    held = await limiter.admit(adm(limits, "b"))
    assert held.limit_kind == "concurrency" and held.retry_after == pytest.approx(0.5)
    clock.now = 5.0
    assert (await limiter.admit(adm(limits, "b"))).allowed
    await limiter.settle(Settlement("k", "a", "m", 0, 0, 0, 0.0))  # expired: no effect
    assert (await limiter.admit(adm(limits, "c"))).limit_kind == "concurrency"


async def test_monthly_quota_resets_with_the_utc_month() -> None:
    end_of_january = calendar.timegm((2024, 1, 31, 23, 59, 59, 0, 0, 0))
    clock = Clock(float(end_of_january))
    limiter = MemoryLimiter(clock)
    limits = Limits(monthly_tokens=10)
    assert (await limiter.admit(adm(limits, "a", tokens=10))).allowed
    refused = await limiter.admit(adm(limits, "b", tokens=1))
    assert refused.limit_kind == "monthly" and refused.retry_after == pytest.approx(1.0)
    clock.now += 1.0
    assert (await limiter.admit(adm(limits, "b", tokens=10))).allowed
    assert limiter.monthly_tokens_used("k") == 10


def test_calendar_helpers() -> None:
    dec = calendar.timegm((2023, 12, 15, 12, 0, 0, 0, 0, 0))
    assert next_month_start(dec) == calendar.timegm((2024, 1, 1, 0, 0, 0, 0, 0, 0))
    assert utc_month(dec) == "2023-12" and utc_day(dec) == "2023-12-15"
