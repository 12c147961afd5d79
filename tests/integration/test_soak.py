"""Soak: mixed streaming and non-streaming traffic with random client disconnects through two
gateway processes sharing Redis, then the leak checks.

Afterwards: the gateways hold no more sockets than after warm-up (nothing leaks per request or
per disconnect), their RSS has not grown past a generous bound, no concurrency slot is stuck
(a max_concurrent=4 key runs 4 streams at once), the simulator has nothing still running
(disconnects cancelled the upstream), and the usage ledger equals what the clients received.

CI runs it for `PLATEFORME_SOAK_SECONDS` (default 30); the long form is one command:
`PLATEFORME_SOAK_SECONDS=300 .venv/bin/pytest tests/integration/test_soak.py` (`make soak`).
Traffic is loopback only and bounded: 8 concurrent clients, a timeout on every call.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.fixtures.procs import MIXTRAL, Gateway, GatewayFactory, Sim, SimFactory, basic_config

SOAK_SECONDS = float(os.environ.get("PLATEFORME_SOAK_SECONDS", "30"))
CLIENTS = 8
SLOTS = 4
USER = [{"role": "user", "content": "Tell me about mixture of experts"}]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(int(SOAK_SECONDS) + 240)]


@dataclass
class Tally:
    """What the clients sent and received, per key."""

    requests: Counter[str] = field(default_factory=Counter)
    prompt: Counter[str] = field(default_factory=Counter)
    completion: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    disconnects: int = 0


def sockets(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:
            continue
    return count


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def one_call(client: httpx.AsyncClient, gateway: Gateway, key: str, label: str,
                   rng: random.Random, tally: Tally, *, disconnects: bool) -> None:
    streamed = rng.random() < 0.6
    body: dict[str, Any] = {"model": "small", "messages": USER, "max_tokens": rng.randint(4, 24)}
    headers = {"authorization": f"Bearer {key}"}
    url = f"{gateway.url}/v1/chat/completions"
    if not streamed:
        response = await client.post(url, json=body, headers=headers)
        tally.statuses[response.status_code] += 1
        if response.status_code == 200:
            usage = response.json()["usage"]
            tally.requests[label] += 1
            tally.prompt[label] += usage["prompt_tokens"]
            tally.completion[label] += usage["completion_tokens"]
        return
    body.update(stream=True, stream_options={"include_usage": True})
    cut = rng.randint(1, 6) if disconnects and rng.random() < 0.5 else None
    async with client.stream("POST", url, json=body, headers=headers) as response:
        tally.statuses[response.status_code] += 1
        if response.status_code != 200:
            await response.aread()
            return
        tally.requests[label] += 1
        events = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = orjson.loads(line[6:])
            assert "error" not in event, event
            events += 1
            if event.get("usage"):
                tally.prompt[label] += event["usage"]["prompt_tokens"]
                tally.completion[label] += event["usage"]["completion_tokens"]
            elif any(c.get("delta", {}).get("content") for c in event["choices"]) and cut:
                tally.completion[label] += 1  # a token received before the disconnect
            if cut is not None and events >= cut:
                tally.disconnects += 1
                return  # leaving the block closes the connection mid-stream


async def traffic(pair: list[Gateway], keys: dict[str, str], seconds: float,
                  tally: Tally, seed: int) -> None:
    deadline = time.monotonic() + seconds

    async def client_loop(i: int) -> None:
        rng = random.Random(seed * 100 + i)
        limits = httpx.Limits(max_connections=2, max_keepalive_connections=2)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            while time.monotonic() < deadline:
                label = rng.choice(sorted(keys))
                await one_call(client, pair[i % 2], keys[label], label, rng, tally,
                               disconnects=label != "exact")

    await asyncio.gather(*(client_loop(i) for i in range(CLIENTS)))


async def ledger(gateway: Gateway, key: str, requests: int) -> dict[str, int]:
    deadline = time.monotonic() + 20
    async with httpx.AsyncClient(timeout=10, headers={
            "authorization": f"Bearer {gateway.admin_token}"}) as client:
        while True:
            rows = (await client.get(f"{gateway.url}/admin/v1/usage",
                                     params={"key_id": key[4:20]})).json()["data"]
            totals = Counter[str]()
            for row in rows:
                for name in ("requests", "prompt_tokens", "completion_tokens", "errors"):
                    totals[name] += row[name]
            if totals["requests"] >= requests or time.monotonic() > deadline:
                return dict(totals)
            await asyncio.sleep(0.2)


async def wait_idle(sim: Sim) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=5) as client:
        for _ in range(100):
            stats: dict[str, Any] = (await client.get(f"{sim.url}/sim/stats")).json()
            if stats["running"] == 0 and stats["waiting"] == 0:
                break
            await asyncio.sleep(0.1)
    return stats


async def test_soak_mixed_traffic_with_disconnects_leaks_nothing(
        sims: SimFactory, gateways: GatewayFactory, redis_store_url: str) -> None:
    sim = sims(MIXTRAL, "--itl", "0.01", "--reply-tokens", "24")
    config = basic_config([sim.url], redis_store_url, routing={"metrics_scrape": False})
    pair = [gateways(config), gateways(config)]
    keys = {"exact": pair[0].create_key()["key"], "drop": pair[0].create_key()["key"],
            "slots": pair[0].create_key(max_concurrent=SLOTS)["key"]}

    warm = Tally()
    await traffic(pair, keys, 4.0, warm, seed=1)  # pools and caches reach their steady size
    await wait_idle(sim)
    await asyncio.sleep(1.0)
    before = [(sockets(g.proc.pid), rss_bytes(g.proc.pid)) for g in pair]

    tally = Tally()
    await traffic(pair, keys, SOAK_SECONDS, tally, seed=2)
    stats = await wait_idle(sim)
    await asyncio.sleep(1.0)
    after = [(sockets(g.proc.pid), rss_bytes(g.proc.pid)) for g in pair]

    total = sum(tally.requests.values())
    assert total > 10 * SOAK_SECONDS, tally  # it really was under load
    assert tally.disconnects > 20, tally
    assert set(tally.statuses) <= {200, 429}, tally.statuses  # 429: the 4-slot key, only
    assert tally.statuses[429] <= sum(tally.statuses.values()) // 2
    assert stats["running"] == 0 and stats["waiting"] == 0, stats  # upstreams cancelled
    for (socks0, rss0), (socks1, rss1) in zip(before, after):
        assert socks1 <= socks0 + 2 * CLIENTS, (before, after)  # not one per request
        assert rss1 <= rss0 * 1.3 + 30 * 2**20, (before, after)

    # No stuck slot: the 4-slot key runs 4 streams at once, right after the soak.
    async with httpx.AsyncClient(timeout=30) as client:
        async def hold(i: int) -> int:
            body = {"model": "small", "messages": USER, "stream": True, "max_tokens": 8}
            async with client.stream("POST", f"{pair[i % 2].url}/v1/chat/completions",
                                     json=body, headers={
                                         "authorization": f"Bearer {keys['slots']}"}) as r:
                await r.aread()
                return r.status_code

        assert await asyncio.gather(*(hold(i) for i in range(SLOTS))) == [200] * SLOTS

    for label in ("exact", "drop"):
        sent = warm.requests[label] + tally.requests[label]
        totals = await ledger(pair[1], keys[label], sent)
        assert totals["requests"] == sent, (label, totals, sent)
        prompt = warm.prompt[label] + tally.prompt[label]
        completion = warm.completion[label] + tally.completion[label]
        if label == "exact":  # every client read to the end: the ledger is what they got
            assert totals["prompt_tokens"] == prompt, (totals, prompt)
            assert totals["completion_tokens"] == completion, (totals, completion)
        else:  # a disconnect is charged what was generated; at least what was received
            assert totals["completion_tokens"] >= completion, (totals, completion)
            assert totals["completion_tokens"] <= completion + 24 * (
                warm.disconnects + tally.disconnects)
