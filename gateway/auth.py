"""Who is calling: bearer key → verified `Principal` with its effective plan and limits.

Verified key records are cached in-process for speed; a background poll of the store's
keys version (every `key_version_poll_seconds`, default 250 ms) invalidates the whole cache
when any key changes anywhere, so a revocation reaches every gateway sharing the store within a
second without a store round trip per request. Invalidated (or expired) entries are re-read
from the store, but kept: while the store is unreachable they still serve, so a key change just
before an outage does not lock out every caller under the `fail_open_local` policy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from gateway.config import Catalog, ModerationPolicy, ServerConfig
from gateway.errors import AuthenticationFailed, PermissionDenied, StoreUnavailable
from gateway.keys import looks_like_key, parse_key_id, verify_key
from gateway.store import KeyRecord, Limits, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller: the key's public id and everything its plan and overrides allow."""

    key_id: str
    owner: str
    plan: str
    limits: Limits
    models: frozenset[str]  # canonical model names; "*" means all
    moderation: ModerationPolicy
    input_moderation: bool

    def may_use(self, model: str) -> bool:
        return "*" in self.models or model in self.models


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthenticationFailed(
            "Missing API key: send it as 'Authorization: Bearer <key>'.", code="missing_api_key")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed("Malformed Authorization header: expected 'Bearer <key>'.")
    return token


def principal_for(record: KeyRecord, catalog: Catalog) -> Principal:
    plan = catalog.plans.get(record.plan)
    if plan is None:
        raise PermissionDenied(f"The key's plan {record.plan!r} is not configured.",
                               code="unknown_plan")

    def pick(override: int | None, default: int | None) -> int | None:
        return default if override is None else override

    return Principal(
        key_id=record.id,
        owner=record.owner,
        plan=record.plan,
        limits=Limits(
            rpm=pick(record.rpm, plan.rpm),
            tpm=pick(record.tpm, plan.tpm),
            max_concurrent=pick(record.max_concurrent, plan.max_concurrent),
            monthly_tokens=pick(record.monthly_tokens, plan.monthly_tokens),
        ),
        models=frozenset(record.models if record.models is not None else plan.models),
        moderation=record.moderation or plan.moderation,  # type: ignore[arg-type]
        input_moderation=(plan.input_moderation if record.input_moderation is None
                          else record.input_moderation),
    )


class Authenticator:
    """Verifies API keys against the store, with a cache invalidated by the keys version."""

    def __init__(self, store: Store, catalog: Catalog, server: ServerConfig) -> None:
        self._store = store
        self._catalog = catalog
        self._ttl = server.key_cache_seconds
        self._poll = server.key_version_poll_seconds
        # key id -> (cached at, cache generation, record)
        self._cache: dict[str, tuple[float, int, KeyRecord]] = {}
        self._generation = 0  # bumped when the store's keys version moves
        self._version: int | None = None

    async def authenticate(self, authorization: str | None) -> Principal:
        token = bearer_token(authorization)
        key_id = parse_key_id(token)
        if key_id is None:
            raise AuthenticationFailed("Invalid API key.")
        record = await self._record(key_id)
        # Constant-time: the presented key's hash against the stored one (`verify_key`).
        if record is None or not verify_key(token, record.hash):
            raise AuthenticationFailed("Invalid API key.")
        now = time.time()
        if record.revoked_at is not None:
            raise AuthenticationFailed("This API key has been revoked.", code="revoked_api_key")
        if record.expires_at is not None and record.expires_at <= now:
            raise AuthenticationFailed("This API key has expired.", code="expired_api_key")
        return principal_for(record, self._catalog)

    async def _record(self, key_id: str) -> KeyRecord | None:
        cached = self._cache.get(key_id)
        now = time.monotonic()
        if cached is not None and cached[1] == self._generation and now - cached[0] < self._ttl:
            return cached[2]
        try:
            record = await self._store.get_key(key_id)
        except StoreUnavailable:
            if cached is not None:  # keep serving a key verified before the outage
                return cached[2]
            raise
        if record is None:
            self._cache.pop(key_id, None)
        elif self._ttl > 0:
            self._cache[key_id] = (now, self._generation, record)
        return record

    async def watch_versions(self) -> None:
        """Background task: invalidate the cache whenever the store's keys version moves."""
        while True:
            try:
                version = await self._store.keys_version()
                if version != self._version:
                    self._generation += 1
                    self._version = version
            except StoreUnavailable:
                pass  # the cache keeps serving; the TTL still bounds staleness
            await asyncio.sleep(self._poll)


def is_api_key(token: str) -> bool:
    return looks_like_key(token)
