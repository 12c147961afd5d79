"""Limit decisions per second from one process against a store (Redis by default).

Each decision is one admit followed by its settle (two store round trips), issued by many
asyncio tasks at once, over many keys so no single key's limit gets in the way:

    python bench/limits_bench.py redis://127.0.0.1:6379/0 [--seconds 3] [--tasks 64]

Keys go under a fresh `bench:<uuid>:` prefix and are deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import redis

from gateway.store import Admission, Limits, Settlement, Store, open_store

KEYS = 100
LIMITS = Limits(rpm=10**9, tpm=10**12, max_concurrent=10**6, monthly_tokens=10**15)


async def _worker(store: Store, worker: int, deadline: float, counts: list[int]) -> None:
    n = 0
    while time.perf_counter() < deadline:
        key_id = f"key{(worker + n) % KEYS}"
        admission = Admission(key_id=key_id, lease_id=uuid.uuid4().hex, limits=LIMITS,
                              tokens=500)
        decision = await store.admit(admission)
        await store.settle(Settlement(key_id, admission.lease_id, "bench", 500, 100, 50,
                                      decision.admitted_at))
        n += 1
    counts[worker] = n


async def run(url: str, seconds: float, tasks: int) -> float:
    store = open_store(url)
    try:
        await store.ping()
        counts = [0] * tasks
        await asyncio.gather(*(_worker(store, i, time.perf_counter() + 0.3, counts)
                               for i in range(tasks)))  # warm up the pool and scripts
        start = time.perf_counter()
        await asyncio.gather(*(_worker(store, i, start + seconds, counts) for i in range(tasks)))
        return sum(counts) / (time.perf_counter() - start)
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--tasks", type=int, default=64)
    args = parser.parse_args()
    url = args.url
    prefix = f"bench:{uuid.uuid4().hex}:"
    is_redis = not url.startswith("sqlite:")
    if is_redis:
        url = f"{url}{'&' if '?' in url else '?'}prefix={prefix}"
    try:
        rate = asyncio.run(run(url, args.seconds, args.tasks))
    finally:
        if is_redis:
            client = redis.Redis.from_url(args.url)
            keys = list(client.scan_iter(match=prefix + "*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()
    print(f"{rate:,.0f} decisions/s (admit+settle each; {2 * rate:,.0f} store calls/s)")


if __name__ == "__main__":
    main()
