"""The Store contract, run against every implementation: SQLite on a temporary file, Redis
under a unique key prefix, and (for the limit semantics only) the in-process MemoryLimiter.

Stores are real: a real SQLite file shared by real processes, the real Redis.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from gateway.errors import StoreUnavailable
from gateway.store import (
    Admission, Decision, KeyRecord, Limits, Settlement, Store, open_store,
)
from gateway.store.memory import MemoryLimiter, next_month_start, utc_day
from tests.fixtures.redis_server import free_port, start_redis_server, stop_redis_server


class Limiter(Protocol):
    async def admit(self, admission: Admission) -> Decision: ...
    async def settle(self, settlement: Settlement) -> None: ...


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/state.db"  # tmp_path is absolute: four slashes
    return str(request.getfixturevalue("redis_store_url"))


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    opened = open_store(store_url)
    yield opened
    await opened.close()


@pytest.fixture(params=["sqlite", "redis", "memory"])
async def limiter(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Limiter]:
    if request.param == "memory":
        yield MemoryLimiter()
        return
    url = (f"sqlite:///{tmp_path}/state.db" if request.param == "sqlite"
           else str(request.getfixturevalue("redis_store_url")))
    opened = open_store(url)
    yield opened
    await opened.close()


def key(**fields: Any) -> KeyRecord:
    base: dict[str, Any] = {"id": uuid.uuid4().hex[:16], "hash": "h" * 64, "owner": "a@b.c",
                            "plan": "beta", "created_at": time.time()}
    return KeyRecord(**{**base, **fields})


def adm(limits: Limits, tokens: int = 10, key_id: str = "k", lease: str | None = None,
        lease_seconds: float = 300.0) -> Admission:
    return Admission(key_id=key_id, lease_id=lease or uuid.uuid4().hex, limits=limits,
                     tokens=tokens, lease_seconds=lease_seconds)


def settlement(a: Admission, d: Decision, used: int, model: str = "m") -> Settlement:
    return Settlement(key_id=a.key_id, lease_id=a.lease_id, model=model,
                      reserved_tokens=a.tokens, prompt_tokens=used, completion_tokens=0,
                      admitted_at=d.admitted_at)


# keys -------------------------------------------------------------------------------------
async def test_key_round_trips_exactly(store: Store) -> None:
    full = key(expires_at=time.time() + 86400.123456, rpm=5, tpm=None, max_concurrent=0,
               monthly_tokens=10**9, models=("a", "b"), moderation="always",
               input_moderation=True, name="ci")
    bare = key()
    await store.create_key(full)
    await store.create_key(bare)
    assert await store.get_key(full.id) == full
    assert await store.get_key(bare.id) == bare
    assert await store.get_key("nope") is None
    assert [k.id for k in await store.list_keys()] == [full.id, bare.id]
    with pytest.raises(ValueError):
        await store.create_key(full)


async def test_update_and_revoke_bump_the_version(store: Store) -> None:
    record = key()
    v0 = await store.keys_version()
    await store.create_key(record)
    v1 = await store.keys_version()
    updated = await store.update_key(record.id, {"rpm": 7, "models": ["x"], "name": None})
    assert updated is not None and updated.rpm == 7 and updated.models == ("x",)
    assert await store.get_key(record.id) == updated
    v2 = await store.keys_version()
    with pytest.raises(ValueError):
        await store.update_key(record.id, {"hash": "x"})
    assert await store.update_key("nope", {"rpm": 1}) is None
    first = await store.revoke_key(record.id)
    v3 = await store.keys_version()
    assert first is not None and first.revoked_at is not None
    again = await store.revoke_key(record.id)
    assert again is not None and again.revoked_at == first.revoked_at
    assert await store.revoke_key("nope") is None
    assert v0 < v1 < v2 < v3


async def test_keys_and_replicas_survive_a_new_store(store: Store, store_url: str) -> None:
    record = key()
    await store.create_key(record)
    assert await store.add_replica("small", "http://10.0.0.5:8000") is True
    assert await store.add_replica("small", "http://10.0.0.5:8000") is False
    assert await store.add_replica("tiny", "http://10.0.0.6:8000") is True
    assert await store.remove_replica("tiny", "http://10.0.0.6:8000") is True
    assert await store.remove_replica("tiny", "http://10.0.0.6:8000") is False
    reopened = open_store(store_url)
    try:
        assert await reopened.get_key(record.id) == record
        [replica] = await reopened.list_replicas()
        assert (replica.model, replica.url) == ("small", "http://10.0.0.5:8000")
        assert abs(replica.registered_at - time.time()) < 60
    finally:
        await reopened.close()


# limits -----------------------------------------------------------------------------------
async def test_requests_per_minute_is_exact_with_headers(limiter: Limiter) -> None:
    limits = Limits(rpm=3)
    decisions = [await limiter.admit(adm(limits)) for _ in range(5)]
    assert [d.allowed for d in decisions] == [True, True, True, False, False]
    assert [d.requests_remaining for d in decisions] == [2, 1, 0, 0, 0]
    assert decisions[0].requests_reset == 0.0 and decisions[2].requests_reset > 59
    refused = decisions[3]
    assert refused.limit_kind == "requests" and refused.requests_limit == 3
    assert refused.retry_after is not None and 59 < refused.retry_after <= 60
    assert refused.tokens_limit is None and refused.tokens_remaining is None


async def test_concurrent_admissions_never_exceed_rpm(limiter: Limiter) -> None:
    limits = Limits(rpm=20)
    decisions = await asyncio.gather(*(limiter.admit(adm(limits)) for _ in range(100)))
    assert sum(d.allowed for d in decisions) == 20


def _admit_in_process(url: str, count: int) -> int:
    async def run() -> int:
        s = open_store(url)
        try:
            got = await asyncio.gather(*(s.admit(adm(Limits(rpm=20), key_id="mp"))
                                         for _ in range(count)))
            return sum(d.allowed for d in got)
        finally:
            await s.close()
    return asyncio.run(run())


def test_processes_sharing_a_store_admit_exactly_rpm(store_url: str) -> None:
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        admitted = pool.starmap(_admit_in_process, [(store_url, 25)] * 3)
    assert sum(admitted) == 20


async def test_token_refunds_let_small_requests_through(limiter: Limiter) -> None:
    limits = Limits(tpm=1000)
    for _ in range(20):  # without the refunds only two 500-token reservations would fit
        a = adm(limits, tokens=500)
        d = await limiter.admit(a)
        assert d.allowed and d.tokens_limit == 1000
        await limiter.settle(settlement(a, d, used=20))
    probe = await limiter.admit(adm(limits, tokens=0))
    assert probe.tokens_remaining == 1000 - 20 * 20
    assert 59 < probe.tokens_reset <= 60


async def test_tokens_refusal_and_never_fits(limiter: Limiter) -> None:
    limits = Limits(rpm=5, tpm=1000)
    assert (await limiter.admit(adm(limits, tokens=600))).allowed
    waiting = await limiter.admit(adm(limits, tokens=600))
    assert waiting.limit_kind == "tokens" and waiting.tokens_remaining == 400
    assert waiting.retry_after is not None and 59 < waiting.retry_after <= 60
    never = await limiter.admit(adm(limits, tokens=1001))
    assert (never.allowed, never.limit_kind, never.retry_after) == (False, "tokens", None)
    ok = await limiter.admit(adm(limits, tokens=400))  # the refusals recorded nothing
    assert ok.allowed and ok.requests_remaining == 3 and ok.tokens_remaining == 0


async def test_concurrency_slots_return_on_settle(limiter: Limiter) -> None:
    limits = Limits(max_concurrent=2)
    first, second = adm(limits), adm(limits)
    d1 = await limiter.admit(first)
    assert d1.allowed and (await limiter.admit(second)).allowed
    full = await limiter.admit(adm(limits))
    assert full.limit_kind == "concurrency"
    assert full.retry_after is not None and 0 < full.retry_after <= 1.0
    await limiter.settle(settlement(first, d1, used=5))
    assert (await limiter.admit(adm(limits))).allowed


async def test_a_crashed_gateways_lease_expires(limiter: Limiter) -> None:
    limits = Limits(max_concurrent=1)
    assert (await limiter.admit(adm(limits, lease_seconds=0.3))).allowed
    held = await limiter.admit(adm(limits))
    assert held.limit_kind == "concurrency" and held.retry_after is not None
    assert held.retry_after <= 0.3
    await asyncio.sleep(0.4)
    assert (await limiter.admit(adm(limits))).allowed


async def test_monthly_quota(limiter: Limiter) -> None:
    limits = Limits(monthly_tokens=1000)
    a = adm(limits, tokens=900)
    d = await limiter.admit(a)
    assert d.allowed
    await limiter.settle(settlement(a, d, used=600))  # 300 refunded
    assert (await limiter.admit(adm(limits, tokens=400))).allowed
    spent = await limiter.admit(adm(limits, tokens=1))
    assert spent.limit_kind == "monthly" and spent.retry_after is not None
    assert abs(spent.retry_after - (next_month_start(time.time()) - time.time())) < 5
    never = await limiter.admit(adm(limits, tokens=1001))
    assert (never.limit_kind, never.retry_after) == ("monthly", None)
    if isinstance(limiter, MemoryLimiter):
        assert limiter.monthly_tokens_used("k") == 1000
    else:
        assert await limiter.monthly_tokens_used("k") == 1000  # type: ignore[attr-defined]


async def test_check_order_zero_and_unlimited(limiter: Limiter) -> None:
    both = Limits(rpm=1, max_concurrent=1)
    assert (await limiter.admit(adm(both, key_id="o"))).allowed
    assert (await limiter.admit(adm(both, key_id="o"))).limit_kind == "concurrency"
    zero = await limiter.admit(adm(Limits(rpm=0), key_id="z"))
    assert (zero.allowed, zero.limit_kind, zero.retry_after) == (False, "requests", None)
    none = await limiter.admit(adm(Limits(max_concurrent=0), key_id="z"))
    assert (none.limit_kind, none.retry_after) == ("concurrency", None)
    free = await limiter.admit(adm(Limits(), key_id="u", tokens=10**9))
    assert free.allowed and free.requests_remaining is None and free.tokens_remaining is None
    assert free.admitted_at == pytest.approx(time.time(), abs=5)


async def test_double_settle_refunds_once(limiter: Limiter) -> None:
    limits = Limits(tpm=1000, monthly_tokens=10_000)
    a = adm(limits, tokens=800)
    d = await limiter.admit(a)
    await limiter.settle(settlement(a, d, used=100))
    await limiter.settle(settlement(a, d, used=100))
    probe = await limiter.admit(adm(limits, tokens=0))
    assert probe.tokens_remaining == 900


# usage ------------------------------------------------------------------------------------
async def test_usage_ledger(store: Store) -> None:
    limits = Limits(rpm=100)
    for key_id, model in [("b", "x"), ("a", "y"), ("a", "x"), ("a", "x")]:
        a = adm(limits, key_id=key_id)
        d = await store.admit(a)
        await store.settle(Settlement(key_id, a.lease_id, model, 10, 3, 4, d.admitted_at,
                                      guardrail_tokens=2, errors=1 if key_id == "b" else 0))
    today = utc_day(time.time())
    rows = await store.usage()
    assert [(r.key_id, r.model) for r in rows] == [("a", "x"), ("a", "y"), ("b", "x")]
    assert rows[0].day == today
    assert (rows[0].requests, rows[0].prompt_tokens, rows[0].completion_tokens,
            rows[0].guardrail_tokens, rows[0].errors) == (2, 6, 8, 4, 0)
    assert rows[2].errors == 1
    assert [r.model for r in await store.usage(key_id="a")] == ["x", "y"]
    assert await store.usage(since=today) == rows
    assert await store.usage(since="9999-01-01") == []
    # a second settle of the same lease still lands in the ledger
    await store.settle(Settlement("b", a.lease_id, "x", 10, 3, 4, time.time()))
    assert (await store.usage(key_id="b"))[0].requests == 2


# unavailability ---------------------------------------------------------------------------
async def test_redis_down_raises_store_unavailable() -> None:
    down = open_store(f"redis://127.0.0.1:{free_port()}/0?prefix=ptest:down:")
    try:
        with pytest.raises(StoreUnavailable):
            await down.ping()
        with pytest.raises(StoreUnavailable):
            await down.admit(adm(Limits(rpm=1)))
    finally:
        await down.close()


async def test_sqlite_unwritable_raises_store_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    broken = open_store(f"sqlite:///{blocker}/state.db")
    try:
        with pytest.raises(StoreUnavailable):
            await broken.ping()
        with pytest.raises(StoreUnavailable):
            await broken.create_key(key())
    finally:
        await broken.close()


def test_open_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.store import sqlite_path
    from gateway.store.redis import RedisStore

    assert sqlite_path("sqlite:///rel/state.db") == Path("rel/state.db")
    assert sqlite_path("sqlite:////abs/state.db") == Path("/abs/state.db")
    assert sqlite_path("sqlite:///~/s.db") == Path.home() / "s.db"
    redis_store = open_store("redis://127.0.0.1:6379/0?prefix=xyz:")
    assert isinstance(redis_store, RedisStore) and redis_store.prefix == "xyz:"
    assert isinstance(open_store("redis://h:1/0"), RedisStore)
    with pytest.raises(ValueError):
        open_store("mongodb://h")
    with pytest.raises(ValueError):
        open_store("sqlite://")




async def test_redis_store_recovers_after_a_restart(tmp_path: Path) -> None:
    """Down: StoreUnavailable, not a hang. Back (scripts gone): reloaded, decisions resume."""
    port = free_port()
    server = start_redis_server(port, tmp_path / "redis")
    restarted = None
    s = open_store(f"redis://127.0.0.1:{port}/0?prefix=ptest:restart:")
    try:
        assert (await s.admit(adm(Limits(rpm=5)))).allowed
        stop_redis_server(server)
        with pytest.raises(StoreUnavailable):
            await s.admit(adm(Limits(rpm=5)))
        restarted = start_redis_server(port, tmp_path / "redis")
        got = await asyncio.gather(*(s.admit(adm(Limits(rpm=5))) for _ in range(10)))
        assert sum(d.allowed for d in got) == 5
    finally:
        await s.close()
        stop_redis_server(server)
        if restarted is not None:
            stop_redis_server(restarted)


async def test_a_locally_admitted_settlement_is_charged_to_the_month(limiter: Limiter) -> None:
    """Usage admitted by a gateway's fallback during an outage reserved nothing in the store:
    replaying its settlement charges the month in full (and only once per lease)."""
    key_id, limits = uuid.uuid4().hex, Limits(monthly_tokens=100)
    local = Settlement(key_id, "outage-lease", "m", reserved_tokens=80, prompt_tokens=40,
                       completion_tokens=20, admitted_at=time.time(), local=True)
    await limiter.settle(local)
    assert not (await limiter.admit(Admission(key_id, "a", limits, 41))).allowed
    assert (await limiter.admit(Admission(key_id, "b", limits, 40))).allowed
    # a settlement that is not local and holds no lease changes nothing (no double refund)
    await limiter.settle(Settlement(key_id, "gone", "m", 80, 0, 0, time.time()))
    refused = await limiter.admit(Admission(key_id, "c", limits, 1))
    assert not refused.allowed and refused.limit_kind == "monthly"
