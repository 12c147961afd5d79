"""The `Store` protocol and the values that cross it.

Two implementations (SQLite: embedded, one host, several worker processes; Redis: shared by
many gateway replicas) pass one contract suite (`tests/integration/test_store_contract.py`).
Limit decisions are atomic in the store and use the store's clock: one Lua script on Redis,
one `BEGIN IMMEDIATE` transaction on SQLite. Implementations raise
`gateway.errors.StoreUnavailable` when the backing server or file cannot be reached.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

LimitKind = Literal["requests", "tokens", "concurrency", "monthly"]
WINDOW_SECONDS = 60.0  # per-minute limits use a sliding 60-second window


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A stored API key. Never holds the secret, only its hash.

    Limit fields are per-key overrides; `None` means "take the plan's value".
    Times are Unix seconds (float), UTC.
    """

    id: str
    hash: str
    owner: str
    plan: str
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    monthly_tokens: int | None = None
    models: tuple[str, ...] | None = None
    moderation: str | None = None  # "optional" | "always" | "never"
    input_moderation: bool | None = None
    name: str | None = None  # a human label

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.models is not None:
            data["models"] = list(self.models)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KeyRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if values.get("models") is not None:
            values["models"] = tuple(values["models"])
        return cls(**values)

    def public(self) -> dict[str, Any]:
        """What the admin API shows: everything but the hash."""
        data = self.to_dict()
        del data["hash"]
        return data


# Fields an operator may change on an existing key (PATCH /admin/v1/keys/{id}).
MUTABLE_KEY_FIELDS = frozenset({
    "owner", "plan", "expires_at", "rpm", "tpm", "max_concurrent", "monthly_tokens",
    "models", "moderation", "input_moderation", "name",
})


def check_mutable(changes: dict[str, Any]) -> None:
    """Only MUTABLE_KEY_FIELDS may change on an existing key."""
    unknown = set(changes) - MUTABLE_KEY_FIELDS
    if unknown:
        raise ValueError(f"cannot change key field(s): {', '.join(sorted(unknown))}")


def updated_record(old: KeyRecord, changes: dict[str, Any]) -> KeyRecord:
    """`old` with `changes` applied (already checked by `check_mutable`)."""
    return KeyRecord.from_dict({**old.to_dict(), **changes})


def revoked_record(old: KeyRecord, now: float) -> KeyRecord | None:
    """`old` revoked at `now`, or None when it already was (the first time is kept)."""
    if old.revoked_at is not None:
        return None
    return KeyRecord.from_dict({**old.to_dict(), "revoked_at": now})


@dataclass(frozen=True, slots=True)
class Limits:
    """Effective limits of one key (plan + overrides). `None`: unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    monthly_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Admission:
    """A request asking to be admitted: one request slot, `tokens` reserved, one concurrency
    slot held under `lease_id` until settled or until `lease_seconds` pass."""

    key_id: str
    lease_id: str
    limits: Limits
    tokens: int
    lease_seconds: float = 300.0


@dataclass(frozen=True, slots=True)
class Decision:
    """The store's answer. Header values are meaningful whether admitted or not.

    `retry_after` is seconds until a request like this one would be admitted (0 if admitted;
    `None` when it can never fit, e.g. its tokens exceed the whole per-minute limit).
    Limits that are unlimited report `None` for limit/remaining.
    `admitted_at` is the store's clock (Unix seconds) and must be passed back in `Settlement`.
    """

    allowed: bool
    limit_kind: LimitKind | None = None  # which limit refused
    retry_after: float | None = 0.0
    requests_limit: int | None = None
    requests_remaining: int | None = None
    requests_reset: float = 0.0  # seconds until the window has room for one more request
    tokens_limit: int | None = None
    tokens_remaining: int | None = None
    tokens_reset: float = 0.0  # seconds until the token window is fully replenished
    admitted_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Settlement:
    """The end of an admitted request: refund the unused reservation, free the concurrency
    slot and add what was used to the usage ledger, in one atomic step.

    `requests` is 1 for a request that reached (or tried to reach) an upstream.
    `local` marks a request admitted by a gateway's in-process fallback while the store was
    down (`fail_open_local`): the store never reserved it, so its whole use is charged to the
    monthly counter when the settlement is replayed.
    """

    key_id: str
    lease_id: str
    model: str
    reserved_tokens: int
    prompt_tokens: int
    completion_tokens: int
    admitted_at: float
    guardrail_tokens: int = 0
    requests: int = 1
    errors: int = 0  # 1 when the request ended in an error
    local: bool = False  # admitted without the store (outage): charge the month in full


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One ledger row: a key's use of a model on a UTC day (YYYY-MM-DD)."""

    key_id: str
    model: str
    day: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    guardrail_tokens: int = 0
    errors: int = 0


@dataclass(frozen=True, slots=True)
class Replica:
    model: str
    url: str
    registered_at: float = field(default=0.0)


@runtime_checkable
class Store(Protocol):
    """Durable state shared by every gateway process pointing at the same store URL."""

    async def ping(self) -> None: ...
    async def close(self) -> None: ...

    # keys -----------------------------------------------------------------------------
    async def create_key(self, record: KeyRecord) -> None: ...
    async def get_key(self, key_id: str) -> KeyRecord | None: ...
    async def list_keys(self) -> list[KeyRecord]: ...
    async def update_key(self, key_id: str, changes: dict[str, Any]) -> KeyRecord | None:
        """Apply `changes` (only MUTABLE_KEY_FIELDS) and bump the keys version."""
        ...
    async def revoke_key(self, key_id: str) -> KeyRecord | None:
        """Set revoked_at to now (idempotent: keeps the first time) and bump the version."""
        ...
    async def keys_version(self) -> int:
        """A counter bumped by every key change; gateways poll it to drop cached keys."""
        ...

    # replicas -------------------------------------------------------------------------
    async def add_replica(self, model: str, url: str) -> bool:
        """Register; False if it was already registered (idempotent)."""
        ...
    async def remove_replica(self, model: str, url: str) -> bool: ...
    async def list_replicas(self) -> list[Replica]: ...

    # limits and usage -----------------------------------------------------------------
    async def admit(self, admission: Admission) -> Decision: ...
    async def settle(self, settlement: Settlement) -> None: ...
    async def usage(self, key_id: str | None = None, since: str | None = None) -> list[UsageRow]:
        """Ledger rows, optionally for one key and from a UTC day (YYYY-MM-DD) on."""
        ...
    async def monthly_tokens_used(self, key_id: str) -> int:
        """Tokens counted against the key's monthly quota this UTC calendar month."""
        ...
