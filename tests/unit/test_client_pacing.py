"""Pacing (`pace=True`) with a controlled clock, and the pure pieces under it.

The fake gateway (`WindowLimiter`) answers on the same fake clock the client paces by and
counts what it refuses: with pacing on, a burst past the limit must see zero 429s.
"""

from __future__ import annotations

import asyncio

import pytest
from plateforme_client import (
    APIConnectionError,
    APIError,
    AsyncClient,
    BadRequestError,
    Client,
    Pacer,
    RateLimit,
    ServerError,
)
from plateforme_client._ratelimit import parse_duration
from plateforme_client._retry import RetryPolicy, parse_retry_after
from plateforme_client._sse import SSEDecoder

from tests.unit.test_client_fakes import BASE, KEY, FakeTime, ScriptedServer, WindowLimiter

USER = [{"role": "user", "content": "Hi"}]


def test_headers_say_three_remaining_three_go_at_once_the_fourth_waits_for_reset() -> None:
    fake = FakeTime()
    limiter = WindowLimiter(fake, limit=4, window=10.0)
    server = ScriptedServer(limiter)
    with Client(KEY, BASE, pace=True, transport=server.transport(), clock=fake.clock,
                sleep=fake.sleep) as client:
        first = client.chat("small", USER)
        assert first.rate_limit is not None and first.rate_limit.remaining_requests == 3
        for _ in range(3):
            client.chat("small", USER)
        assert fake.sleeps == []  # three sent at once, no wait
        client.chat("small", USER)  # the fourth after the headers waits for the reset
    assert limiter.refused == 0
    assert fake.sleeps == [pytest.approx(10.0)]
    assert limiter.sent_at == [1000.0] * 4 + [pytest.approx(1010.0)]


def test_a_batch_runs_at_the_limit_with_zero_429() -> None:
    fake = FakeTime()
    limiter = WindowLimiter(fake, limit=5, window=60.0)
    server = ScriptedServer(limiter)
    with Client(KEY, BASE, pace=True, transport=server.transport(), clock=fake.clock,
                sleep=fake.sleep) as client:
        for _ in range(17):
            client.chat("small", USER)
    assert limiter.refused == 0 and len(limiter.sent_at) == 17
    assert fake.now == pytest.approx(1000.0 + 3 * 60.0)  # 5 + 5 + 5 + 2 across four windows


def test_without_pacing_the_same_burst_is_refused() -> None:
    fake = FakeTime()
    limiter = WindowLimiter(fake, limit=4, window=10.0)
    with Client(KEY, BASE, transport=ScriptedServer(limiter).transport(), clock=fake.clock,
                sleep=fake.sleep, max_retries=0) as client:
        for _ in range(4):
            client.chat("small", USER)
        with pytest.raises(APIError) as caught:
            client.chat("small", USER)
    assert caught.value.status == 429 and limiter.refused == 1


async def test_async_concurrent_burst_is_paced_with_zero_429() -> None:
    fake = FakeTime()
    limiter = WindowLimiter(fake, limit=4, window=10.0)
    server = ScriptedServer(limiter)
    async with AsyncClient(KEY, BASE, pace=True, transport=server.transport(),
                           clock=fake.clock, sleep=fake.async_sleep) as client:
        await client.chat("small", USER)  # learn: 3 remaining
        await asyncio.gather(*(client.chat("small", USER) for _ in range(4)))
    assert limiter.refused == 0
    assert limiter.sent_at[:4] == [1000.0] * 4
    assert limiter.sent_at[4] >= 1010.0


# -- the pacer alone ----------------------------------------------------------------------------


def test_pacer_counts_down_locally_between_responses() -> None:
    pacer = Pacer()
    assert pacer.reserve(0.0) == 0.0  # nothing known: go
    pacer.complete(RateLimit(remaining_requests=2, reset_requests=5.0), now=0.0)
    assert pacer.reserve(1.0) == 0.0
    assert pacer.reserve(1.0) == 0.0
    assert pacer.reserve(1.0) == pytest.approx(4.0)  # two in flight, none left: until reset
    assert pacer.reserve(5.0) == 0.0  # reset passed: one probe may go
    assert pacer.reserve(5.0) > 0.0  # the rest wait for the probe's answer


def test_pacer_gives_back_a_reservation_that_never_reached_the_server() -> None:
    pacer = Pacer()
    pacer.complete(RateLimit(remaining_requests=1, reset_requests=5.0), now=0.0)
    assert pacer.reserve(0.0) == 0.0
    pacer.complete(None, now=0.0)  # connection refused: no headers
    assert pacer.reserve(0.0) == 0.0


def test_pacer_waits_for_tokens_a_request_would_exceed() -> None:
    pacer = Pacer()
    pacer.complete(RateLimit(remaining_tokens=100, limit_tokens=1000, reset_tokens=2.0), 0.0)
    assert pacer.reserve(0.0, tokens=500) == pytest.approx(2.0)
    assert pacer.reserve(0.0, tokens=50) == 0.0
    assert pacer.reserve(2.0, tokens=500) == 0.0  # refilled to the limit at reset


# -- pure parsing and decisions -----------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("1s", 1.0), ("6m0s", 360.0), ("0.5s", 0.5), ("20ms", 0.02), ("1h2m3s", 3723.0),
    ("1.5", 1.5), ("0", 0.0), (" 2s ", 2.0), ("", None), ("soon", None), ("1x", None),
    (None, None),
])
def test_parse_duration(text: str | None, seconds: float | None) -> None:
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_rate_limit_from_headers() -> None:
    assert RateLimit.from_headers({"content-type": "application/json"}) is None
    parsed = RateLimit.from_headers({
        "X-RateLimit-Limit-Requests": "60", "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s", "x-ratelimit-limit-tokens": "100000",
        "x-ratelimit-remaining-tokens": "99000", "x-ratelimit-reset-tokens": "6m0s"})
    assert parsed == RateLimit(limit_requests=60, remaining_requests=59, reset_requests=1.0,
                               limit_tokens=100000, remaining_tokens=99000, reset_tokens=360.0)


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("later") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0


def test_retry_policy_decisions() -> None:
    policy = RetryPolicy(max_retries=5, jitter=lambda: 1.0)
    connection = APIConnectionError("x")
    assert [policy.delay(connection, n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, None]
    assert RetryPolicy(max_retries=9, jitter=lambda: 1.0).delay(connection, 8) == 8.0  # cap
    busy = ServerError("busy", status=503, retry_after=3.0)
    assert policy.delay(busy, 0) == 3.0  # Retry-After larger than the backoff wins
    assert policy.delay(ServerError("x", status=500), 0) is None
    assert policy.delay(BadRequestError("x", status=400), 0) is None
    assert policy.delay(ServerError("x", status=503, retry_after=600.0), 0) is None


def test_sse_decoder() -> None:
    decoder = SSEDecoder()
    lines = [": comment", "event: x", "data: {\"a\":", "data: 1}", "", "data:[DONE]", ""]
    assert [d for d in map(decoder.feed, lines) if d is not None] == ['{"a":\n1}', "[DONE]"]
