"""RedisStore: the shared store for many gateway replicas, on redis.asyncio.

Every limit decision is one EVALSHA of `admit.lua` (settlement: `settle.lua`), registered
once and reloaded by redis-py by itself after a server restart (NOSCRIPT). The scripts read
Redis's own clock, so gateways with skewed clocks still agree. Everything lives under one
key prefix; per-key limit state uses a `{key_id}` hash tag so a key's keys share a slot.

Layout under the prefix:
    keys             hash   key id -> KeyRecord JSON       keys:version  counter (INCR)
    replicas         hash   "model\\turl" -> registered_at
    lim:{K}:w        zset   lease -> admitted_at (the 60 s window; expires when idle)
    lim:{K}:wt       hash   lease -> tokens, "#sum" -> tokens in the window
    lim:{K}:l        zset   lease -> expires_at (held concurrency slots)
    lim:{K}:m        hash   YYYY-MM -> tokens counted against the monthly quota
    usage:days       set    YYYY-MM-DD          usage:DAY  hash "key\\tmodel\\tfield" -> n
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.errors import StoreUnavailable
from gateway.store.base import (
    Admission,
    Decision,
    KeyRecord,
    LimitKind,
    Replica,
    Settlement,
    UsageRow,
    check_mutable,
    revoked_record,
    updated_record,
)
from gateway.store.memory import utc_day, utc_month
from gateway.store.redis_batch import ScriptBatcher

DEFAULT_PREFIX = "plateforme:"
MAX_CONNECTIONS = 64
CONNECT_TIMEOUT_SECONDS = 2.0
SOCKET_TIMEOUT_SECONDS = 5.0
POOL_TIMEOUT_SECONDS = 5.0  # waiting for a free pooled connection
_KINDS: tuple[LimitKind | None, ...] = (None, "concurrency", "requests", "tokens", "monthly")
_USAGE_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "guardrail_tokens", "errors")
_CREATE_KEY = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('INCR', KEYS[2])
return 1
"""


def _lua(name: str) -> str:
    return files("gateway.store").joinpath(name).read_text(encoding="utf-8")


def _limit(value: int | None) -> int:
    return -1 if value is None else value


_OUTAGE_REPLIES = frozenset({"READONLY", "OOM", "LOADING", "MASTERDOWN", "BUSY", "TRYAGAIN",
                             "CLUSTERDOWN", "NOREPLICAS", "MISCONF"})


@asynccontextmanager
async def _guard(what: str) -> AsyncIterator[None]:
    """Turn "the server cannot be reached" into StoreUnavailable; let real bugs through."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise StoreUnavailable(f"Redis store unavailable ({what}): {exc}") from exc
    except ResponseError as exc:
        # A server that cannot take writes right now (failover, memory full, loading) is an
        # outage for the limit policy, not a gateway bug.
        if str(exc).split(" ", 1)[0] in _OUTAGE_REPLIES:
            raise StoreUnavailable(f"Redis store unavailable ({what}): {exc}") from exc
        raise


class RedisStore:
    """The `Store` on Redis. `url` is a redis-py URL (redis://, rediss://, unix://)."""

    def __init__(self, url: str, *, prefix: str = DEFAULT_PREFIX,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.prefix = prefix
        # One quick retry covers a pooled connection the server closed (restart); a dead
        # server still fails fast enough for the gateway's store-down policy to take over.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=POOL_TIMEOUT_SECONDS,
            socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
            socket_timeout=SOCKET_TIMEOUT_SECONDS, decode_responses=True,
            retry=Retry(NoBackoff(), 1),
        )
        self._redis: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        self._admit = self._redis.register_script(_lua("admit.lua"))
        self._settle = self._redis.register_script(_lua("settle.lua"))
        self._create = self._redis.register_script(_CREATE_KEY)
        self._batch = ScriptBatcher(self._redis)
        self._keys = prefix + "keys"
        self._version = prefix + "keys:version"
        self._replicas = prefix + "replicas"
        self._days = prefix + "usage:days"

    def _limit_keys(self, key_id: str) -> list[str]:
        base = f"{self.prefix}lim:{{{key_id}}}:"
        return [base + "w", base + "wt", base + "l", base + "m"]

    async def ping(self) -> None:
        async with _guard("ping"):
            await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()

    # keys -----------------------------------------------------------------------------
    async def create_key(self, record: KeyRecord) -> None:
        async with _guard("create_key"):
            created = await self._create(keys=[self._keys, self._version],
                                         args=[record.id, json.dumps(record.to_dict())])
        if not created:
            raise ValueError(f"key {record.id!r} already exists")

    async def get_key(self, key_id: str) -> KeyRecord | None:
        async with _guard("get_key"):
            raw = await self._redis.hget(self._keys, key_id)
        return None if raw is None else KeyRecord.from_dict(json.loads(raw))

    async def list_keys(self) -> list[KeyRecord]:
        async with _guard("list_keys"):
            raw = await self._redis.hgetall(self._keys)
        records = [KeyRecord.from_dict(json.loads(v)) for v in raw.values()]
        return sorted(records, key=lambda r: (r.created_at, r.id))

    async def _rewrite(self, key_id: str,
                       change: Callable[[KeyRecord], KeyRecord | None]) -> KeyRecord | None:
        """Optimistic read-change-write of one key (WATCH/MULTI), bumping the version."""
        async with _guard("update_key"), self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self._keys)
                    raw = await pipe.hget(self._keys, key_id)
                    if raw is None:
                        return None
                    old = KeyRecord.from_dict(json.loads(raw))
                    new = change(old)
                    if new is None:
                        return old
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.hset(self._keys, key_id, json.dumps(new.to_dict()))
                    pipe.incr(self._version)
                    await pipe.execute()
                    return new
                except WatchError:
                    continue  # another writer changed a key in between: read again

    async def update_key(self, key_id: str, changes: dict[str, Any]) -> KeyRecord | None:
        check_mutable(changes)
        return await self._rewrite(key_id, lambda old: updated_record(old, changes))

    async def revoke_key(self, key_id: str) -> KeyRecord | None:
        now = time.time()
        return await self._rewrite(key_id, lambda old: revoked_record(old, now))

    async def keys_version(self) -> int:
        async with _guard("keys_version"):
            return int(await self._redis.get(self._version) or 0)

    # replicas -------------------------------------------------------------------------
    async def add_replica(self, model: str, url: str) -> bool:
        async with _guard("add_replica"):
            added = await self._redis.hsetnx(self._replicas, f"{model}\t{url}", repr(time.time()))
        return bool(added)

    async def remove_replica(self, model: str, url: str) -> bool:
        async with _guard("remove_replica"):
            return bool(await self._redis.hdel(self._replicas, f"{model}\t{url}"))

    async def list_replicas(self) -> list[Replica]:
        async with _guard("list_replicas"):
            raw = await self._redis.hgetall(self._replicas)
        replicas = []
        for name, at in raw.items():
            model, url = str(name).split("\t", 1)
            replicas.append(Replica(model=model, url=url, registered_at=float(at)))
        return sorted(replicas, key=lambda r: (r.model, r.registered_at, r.url))

    # limits and usage -----------------------------------------------------------------
    async def admit(self, admission: Admission) -> Decision:
        lim = admission.limits
        async with _guard("admit"):
            out = await self._batch.call(
                self._admit, self._limit_keys(admission.key_id),
                [admission.lease_id, admission.tokens, admission.lease_seconds,
                 _limit(lim.rpm), _limit(lim.tpm), _limit(lim.max_concurrent),
                 _limit(lim.monthly_tokens)])
        kind, retry_us, req_left, req_reset_us, tok_left, tok_reset_us, now_us = map(
            int, out.split())
        return Decision(
            allowed=kind == 0, limit_kind=_KINDS[kind],
            retry_after=None if retry_us < 0 else retry_us / 1e6,
            requests_limit=lim.rpm, requests_remaining=None if req_left < 0 else req_left,
            requests_reset=req_reset_us / 1e6, tokens_limit=lim.tpm,
            tokens_remaining=None if tok_left < 0 else tok_left,
            tokens_reset=tok_reset_us / 1e6, admitted_at=now_us / 1e6,
        )

    async def settle(self, settlement: Settlement) -> None:
        s = settlement
        day = utc_day(s.admitted_at)
        used = s.prompt_tokens + s.completion_tokens + s.guardrail_tokens
        async with _guard("settle"):
            await self._batch.call(
                self._settle,
                [*self._limit_keys(s.key_id), f"{self.prefix}usage:{day}", self._days],
                [s.lease_id, utc_month(s.admitted_at), s.reserved_tokens, used,
                 f"{s.key_id}\t{s.model}\t", day, s.requests, s.prompt_tokens,
                 s.completion_tokens, s.guardrail_tokens, s.errors, 1 if s.local else 0])

    async def usage(self, key_id: str | None = None, since: str | None = None) -> list[UsageRow]:
        async with _guard("usage"):
            members = await self._redis.smembers(self._days)
            days = sorted(str(d) for d in members if since is None or str(d) >= since)
            async with self._redis.pipeline(transaction=False) as pipe:
                for day in days:
                    pipe.hgetall(f"{self.prefix}usage:{day}")
                tables = await pipe.execute()
        rows: dict[tuple[str, str, str], dict[str, int]] = {}
        for day, table in zip(days, tables):
            for name, value in table.items():
                key, model, column = str(name).split("\t")
                if key_id is None or key == key_id:
                    rows.setdefault((day, key, model), {})[column] = int(value)
        return [UsageRow(key_id=k, model=m, day=d, **{f: c.get(f, 0) for f in _USAGE_FIELDS})
                for (d, k, m), c in sorted(rows.items())]

    async def monthly_tokens_used(self, key_id: str) -> int:
        async with _guard("monthly_tokens_used"):
            raw = await self._redis.hget(self._limit_keys(key_id)[3], utc_month(time.time()))
        return int(raw or 0)
