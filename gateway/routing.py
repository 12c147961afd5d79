"""Replica state and the choice among a model's healthy replicas.

Policies are small pure classes with one signature, registered by name (the shape of
SkyPilot's load-balancing policies); anything that needs I/O — health probes, scraping vLLM's
`/metrics`, re-reading registered replicas — lives in `gateway.health`, which only updates
the state kept here.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from gateway.config import RoutingConfig


@dataclass(slots=True)
class ReplicaState:
    """Mutable, per-process view of one replica (a single event loop owns it)."""

    model: str
    url: str
    static: bool  # from the config file (never removed by a registry refresh)
    outstanding: int = 0
    consecutive_failures: int = 0
    ejected_until: float = 0.0  # monotonic; 0 when in rotation
    vllm_running: float = 0.0  # from the replica's own /metrics, when scraped
    vllm_waiting: float = 0.0
    kv_cache_usage: float = 0.0
    last_error: str | None = field(default=None, repr=False)

    @property
    def ejected(self) -> bool:
        return self.ejected_until > 0.0

    def load(self) -> float:
        """Outstanding requests here, plus vLLM's own queue (other gateways' requests too)."""
        return max(float(self.outstanding), self.vllm_running) + self.vllm_waiting \
            + self.kv_cache_usage


class Policy(Protocol):
    def choose(self, candidates: Sequence[ReplicaState], affinity: str | None) -> ReplicaState:
        ...


class LeastLoad:
    """Power of two random choices on load: near-best spread without herding."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[ReplicaState], affinity: str | None) -> ReplicaState:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(list(candidates), 2)
        return a if a.load() <= b.load() else b


class RoundRobin:
    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[ReplicaState], affinity: str | None) -> ReplicaState:
        return candidates[next(self._counter) % len(candidates)]


class PrefixAffinity:
    """Rendezvous hashing of an affinity key (session id or prompt prefix) onto replicas, so
    a conversation keeps hitting the replica whose prefix cache holds it; without a key, or
    when the preferred replica is twice as loaded as the least loaded one, spread by load."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._fallback = LeastLoad(rng)

    def choose(self, candidates: Sequence[ReplicaState], affinity: str | None) -> ReplicaState:
        if affinity is None:
            return self._fallback.choose(candidates, None)

        def score(r: ReplicaState) -> bytes:
            return hashlib.blake2b(f"{r.url}|{affinity}".encode(), digest_size=8).digest()

        preferred = max(candidates, key=score)
        least = min(r.load() for r in candidates)
        if preferred.load() > 2 * least + 2:
            return self._fallback.choose(candidates, None)
        return preferred


POLICIES: dict[str, type[LeastLoad] | type[RoundRobin] | type[PrefixAffinity]] = {
    "least_load": LeastLoad, "round_robin": RoundRobin, "prefix_affinity": PrefixAffinity,
}


class ReplicaPool:
    """Every model's replicas and the policy that picks among the healthy ones."""

    def __init__(self, static: dict[str, Sequence[str]], config: RoutingConfig) -> None:
        self._config = config
        self._policy: Policy = POLICIES[config.policy]()
        self._replicas: dict[str, dict[str, ReplicaState]] = {
            model: {url: ReplicaState(model, url, static=True) for url in urls}
            for model, urls in static.items()
        }

    def replicas(self, model: str) -> list[ReplicaState]:
        return list(self._replicas.get(model, {}).values())

    def all(self) -> list[ReplicaState]:
        return [r for reps in self._replicas.values() for r in reps.values()]

    def sync_registered(self, registered: dict[str, set[str]]) -> None:
        """Adopt the store's registrations: add new replicas, drop deregistered ones (a
        replica that no longer exists must never be routed to), keep state of the rest."""
        for model in set(self._replicas) | set(registered):
            current = self._replicas.setdefault(model, {})
            wanted = registered.get(model, set())
            for url in wanted - current.keys():
                current[url] = ReplicaState(model, url, static=False)
            for url in [u for u, r in current.items() if not r.static and u not in wanted]:
                del current[url]

    def choose(self, model: str, exclude: set[str], affinity: str | None = None
               ) -> ReplicaState | None:
        candidates = [r for r in self._replicas.get(model, {}).values()
                      if not r.ejected and r.url not in exclude]
        if not candidates:
            return None
        return self._policy.choose(candidates, affinity)

    def healthy_count(self, model: str) -> int:
        return sum(1 for r in self._replicas.get(model, {}).values() if not r.ejected)

    # outcomes ------------------------------------------------------------------------
    def record_success(self, replica: ReplicaState) -> None:
        replica.consecutive_failures = 0

    def record_failure(self, replica: ReplicaState, reason: str) -> bool:
        """Count a failure; eject after `max_failures` in a row. True if newly ejected."""
        replica.consecutive_failures += 1
        replica.last_error = reason
        if not replica.ejected and replica.consecutive_failures >= self._config.max_failures:
            self.eject(replica, reason)
            return True
        return False

    def eject(self, replica: ReplicaState, reason: str) -> None:
        """Out of rotation for one cooldown; the prober lets it back when /health passes."""
        replica.ejected_until = time.monotonic() + self._config.cooldown_seconds
        replica.last_error = reason

    def restore(self, replica: ReplicaState) -> None:
        """Back in rotation on probation (half-open): one more failure ejects it again, a
        success clears the count — a replica whose /health passes but whose requests fail
        costs one request per cooldown, not `max_failures`."""
        replica.ejected_until = 0.0
        replica.consecutive_failures = self._config.max_failures - 1
        replica.last_error = None

    def cooled_down(self, replica: ReplicaState, now: float) -> bool:
        return replica.ejected and now >= replica.ejected_until
