"""Background upkeep of the replica pool: re-read registrations, probe health, scrape vLLM.

Runs beside the request path and only mutates `ReplicaState`: an ejected replica comes back
when its cooldown has passed and its `/health` answers 200; a replica in rotation whose probe
fails counts a failure like a failed request would; vLLM's `/metrics` gauges (running,
waiting, KV-cache use) feed the router's load view.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import defaultdict
from typing import Callable

import aiohttp

from gateway.errors import StoreUnavailable
from gateway.metrics import Metrics
from gateway.routing import ReplicaPool, ReplicaState
from gateway.store import Store

log = logging.getLogger(__name__)

PROBE_TIMEOUT = aiohttp.ClientTimeout(total=2.0, connect=1.0)
_VLLM_GAUGE = re.compile(
    rb"^vllm:(num_requests_running|num_requests_waiting|kv_cache_usage_perc|"
    rb"gpu_cache_usage_perc)\{[^}]*\}\s+([0-9.eE+-]+)", re.MULTILINE)


def parse_vllm_metrics(text: bytes) -> dict[str, float]:
    """The router's gauges from a vLLM `/metrics` exposition (summed over label sets)."""
    values: dict[str, float] = defaultdict(float)
    for name, value in _VLLM_GAUGE.findall(text):
        key = name.decode()
        values["kv_cache_usage_perc" if key == "gpu_cache_usage_perc" else key] += float(value)
    return dict(values)


class HealthKeeper:
    def __init__(self, pool: ReplicaPool, store: Store, session: aiohttp.ClientSession,
                 metrics: Metrics, headers_for: Callable[[str], dict[str, str]], *,
                 probe_interval: float, refresh_interval: float, scrape: bool) -> None:
        self._pool = pool
        self._store = store
        self._session = session
        self._metrics = metrics
        self._headers_for = headers_for
        self._probe_interval = probe_interval
        self._refresh_interval = refresh_interval
        self._scrape = scrape

    async def refresh_registry(self) -> None:
        registered: dict[str, set[str]] = defaultdict(set)
        for replica in await self._store.list_replicas():
            registered[replica.model].add(replica.url)
        self._pool.sync_registered(registered)

    async def run_registry(self) -> None:
        while True:
            try:
                await self.refresh_registry()
            except StoreUnavailable:
                log.warning("store unavailable; keeping the last known replicas")
            await asyncio.sleep(self._refresh_interval)

    async def run_probes(self) -> None:
        while True:
            replicas = self._pool.all()
            if replicas:
                await asyncio.gather(*(self.probe(r) for r in replicas))
            for r in replicas:
                labels = (r.model, r.url)
                self._metrics.replica_healthy.labels(*labels).set(0 if r.ejected else 1)
                self._metrics.replica_outstanding.labels(*labels).set(r.outstanding)
            await asyncio.sleep(self._probe_interval)

    async def probe(self, replica: ReplicaState) -> None:
        now = time.monotonic()
        if replica.ejected and not self._pool.cooled_down(replica, now):
            return
        headers = self._headers_for(replica.model)
        try:
            async with self._session.get(f"{replica.url}/health", headers=headers,
                                         timeout=PROBE_TIMEOUT) as response:
                ok = response.status == 200
            if ok and self._scrape:
                await self._scrape_metrics(replica, headers)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            ok = False
        if ok:
            if replica.ejected:
                log.info("replica back in rotation",
                         extra={"model": replica.model, "replica": replica.url})
                self._pool.restore(replica)
        elif replica.ejected:
            self._pool.eject(replica, "health probe failed after cooldown")
        elif self._pool.record_failure(replica, "health probe failed"):
            log.warning("replica ejected", extra={"model": replica.model,
                                                  "replica": replica.url})

    async def _scrape_metrics(self, replica: ReplicaState, headers: dict[str, str]) -> None:
        async with self._session.get(f"{replica.url}/metrics", headers=headers,
                                     timeout=PROBE_TIMEOUT) as response:
            if response.status != 200:
                return
            values = parse_vllm_metrics(await response.read())
        replica.vllm_running = values.get("num_requests_running", 0.0)
        replica.vllm_waiting = values.get("num_requests_waiting", 0.0)
        replica.kv_cache_usage = values.get("kv_cache_usage_perc", 0.0)
