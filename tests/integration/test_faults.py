"""Faults with nothing lost: a replica killed or hung mid-stream, the gateway stopped under
load, Redis restarted under load, and many gateway processes writing one usage ledger.

Every test runs real processes on loopback: simulators (`deploy.sim`), gateways (`plateforme
gateway serve`) and, for the restart test, a private `redis-server` with AOF on a free port.
After each fault the test checks the three things a user and an operator rely on: the client
got a well-formed answer (OpenAI envelope or SSE error event), the key's concurrency slot is
free again, and the usage ledger holds exactly what the clients received.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.fixtures.procs import Gateway, GatewayFactory, SimFactory, basic_config
from tests.fixtures.redis_server import free_port, start_redis_server, stop_redis_server

USER = [{"role": "user", "content": "Tell me about mixture of experts"}]
pytestmark = pytest.mark.timeout(240)


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def key_id(key: str) -> str:
    return key[len("plf_"):len("plf_") + 16]


class Streamed:
    """What a client got from one SSE stream."""

    def __init__(self) -> None:
        self.status = 0
        self.events: list[Any] = []
        self.done = False

    @property
    def content_events(self) -> int:
        return sum(1 for e in self.events if isinstance(e, dict) and any(
            c.get("delta", {}).get("content") for c in e.get("choices") or ()))

    @property
    def error(self) -> dict[str, Any] | None:
        errors = [e["error"] for e in self.events if isinstance(e, dict) and "error" in e]
        return errors[-1] if errors else None

    @property
    def usage(self) -> dict[str, Any] | None:
        found = [e["usage"] for e in self.events if isinstance(e, dict) and e.get("usage")]
        return found[-1] if found else None


def stream(gateway: Gateway, key: str, *, on_event: Any = None, max_tokens: int = 64,
           include_usage: bool = False, timeout: float = 30,
           out: Streamed | None = None) -> Streamed:
    """One streamed chat; every `data:` line parsed into `out`; `on_event(n)` after the n-th
    event."""
    out = out if out is not None else Streamed()
    body: dict[str, Any] = {"model": "small", "messages": USER, "stream": True,
                            "max_tokens": max_tokens}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body,
                      headers=auth(key), timeout=timeout) as response:
        out.status = response.status_code
        if response.status_code != 200:
            response.read()
            out.events.append(response.json())
            return out
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out.done = True
                continue
            out.events.append(orjson.loads(line[6:]))
            if on_event is not None:
                on_event(len(out.events))
    return out


def ledger(gateway: Gateway, key: str, *, requests: int, timeout: float = 15.0
           ) -> dict[str, int]:
    """The key's ledger totals once `requests` requests are in it (settlement is async)."""
    deadline = time.monotonic() + timeout
    while True:
        with gateway.admin() as admin:
            rows = admin.usage(key_id=key_id(key))
        totals = Counter[str]()
        for row in rows:
            for name in ("requests", "prompt_tokens", "completion_tokens", "errors"):
                totals[name] += row[name]
        if totals["requests"] >= requests or time.monotonic() > deadline:
            return dict(totals)
        time.sleep(0.1)


def assert_slot_free(gateway: Gateway, key: str) -> None:
    """A max_concurrent=1 key gets another request through right away (not a 429)."""
    response = httpx.post(f"{gateway.url}/v1/chat/completions", headers=auth(key),
                          json={"model": "small", "messages": USER, "max_tokens": 4},
                          timeout=30)
    assert response.status_code == 200, response.text


# -- a replica dies or hangs --------------------------------------------------------------


def test_replica_killed_mid_stream_ends_with_an_error_event_and_settles_what_was_sent(
        sims: SimFactory, gateways: GatewayFactory, sqlite_url: str) -> None:
    slow = sims("mistralai/Mixtral-8x7B-Instruct-v0.1", "--itl", "0.2", "--reply-tokens", "60")
    gateway = gateways(basic_config([slow.url], sqlite_url))
    key = gateway.create_key(max_concurrent=1)["key"]

    def kill_after_some(n: int) -> None:
        if n == 4:
            slow.proc.send_signal(signal.SIGKILL)

    got = stream(gateway, key, on_event=kill_after_some, max_tokens=60)

    assert got.status == 200 and not got.done
    assert got.error is not None and got.error["type"] == "upstream_error", got.events[-1]
    assert set(got.error) == {"message", "type", "code", "param"}
    assert 3 <= got.content_events < 60
    totals = ledger(gateway, key, requests=1)
    assert totals["requests"] == 1 and totals["errors"] == 1
    assert totals["completion_tokens"] == got.content_events  # what was streamed, no more
    assert totals["prompt_tokens"] > 0
    fresh = sims()
    with gateway.admin() as admin:
        admin.register_replica("mistral-small", fresh.url)
    assert_slot_free(gateway, key)


def test_replica_hanging_gives_504_or_an_error_event_and_frees_the_slot(
        sims: SimFactory, gateways: GatewayFactory, sqlite_url: str) -> None:
    hung = sims("mistralai/Mixtral-8x7B-Instruct-v0.1", "--hang")
    gateway = gateways(basic_config([hung.url], sqlite_url, server={
        "read_timeout_seconds": 1, "request_timeout_seconds": 2},
        routing={"probe_interval_seconds": 60}))
    key = gateway.create_key(max_concurrent=1)["key"]

    started = time.monotonic()
    unary = httpx.post(f"{gateway.url}/v1/chat/completions", headers=auth(key),
                       json={"model": "small", "messages": USER}, timeout=30)
    assert unary.status_code == 504, unary.text
    assert unary.json()["error"]["type"] == "timeout"
    assert time.monotonic() - started < 8
    before_first_byte = stream(gateway, key)  # the slot came back: not a 429
    assert before_first_byte.status == 504, before_first_byte.events

    # Silent after the first byte: the inter-chunk bound ends the stream with an error event.
    hung.control(hang=False, itl_seconds=3.0)
    started = time.monotonic()
    got = stream(gateway, key)
    assert got.status == 200 and not got.done
    assert got.error is not None and got.error["code"] == "upstream_timeout"
    assert time.monotonic() - started < 3
    hung.control(itl_seconds=0.0)
    assert_slot_free(gateway, key)
    totals = ledger(gateway, key, requests=4)
    assert totals["requests"] == 4 and totals["errors"] == 3


# -- the gateway is stopped under load ----------------------------------------------------


def test_sigterm_drains_in_flight_streams_and_loses_no_usage(
        sims: SimFactory, gateways: GatewayFactory, sqlite_url: str) -> None:
    sim = sims("mistralai/Mixtral-8x7B-Instruct-v0.1", "--itl", "0.1", "--reply-tokens", "30")
    config = basic_config([sim.url], sqlite_url, server={"drain_timeout_seconds": 20})
    gateway = gateways(config)
    key = gateway.create_key()["key"]
    done_before = [httpx.post(f"{gateway.url}/v1/chat/completions", headers=auth(key),
                              json={"model": "small", "messages": USER, "max_tokens": 8},
                              timeout=30).json()["usage"] for _ in range(3)]

    results: list[Streamed] = []
    started = threading.Barrier(6)

    def client() -> None:
        results.append(stream(gateway, key, include_usage=True, max_tokens=30,
                              on_event=lambda n: n == 2 and started.wait(10)))

    threads = [threading.Thread(target=client) for _ in range(5)]
    for thread in threads:
        thread.start()
    started.wait(20)  # every stream has its first events: now stop the gateway
    gateway.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.HTTPError):  # no longer accepting
        httpx.get(f"{gateway.url}/health", timeout=2)
    for thread in threads:
        thread.join(30)
    assert gateway.proc.wait(25) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal

    assert len(results) == 5
    for got in results:  # ~3 s streams finished well inside the 20 s drain
        assert got.status == 200 and got.done and got.error is None, got.events[-1:]
        assert got.usage is not None and got.content_events == got.usage["completion_tokens"]
    restarted = gateways(config)
    totals = ledger(restarted, key, requests=8)
    assert totals["requests"] == 8 and totals["errors"] == 0
    assert totals["completion_tokens"] == sum(u["completion_tokens"] for u in done_before) + \
        sum(got.usage["completion_tokens"] for got in results if got.usage)
    assert totals["prompt_tokens"] == sum(u["prompt_tokens"] for u in done_before) + \
        sum(got.usage["prompt_tokens"] for got in results if got.usage)


def test_streams_past_the_drain_timeout_are_cut_but_still_settled(
        sims: SimFactory, gateways: GatewayFactory, sqlite_url: str) -> None:
    sim = sims("mistralai/Mixtral-8x7B-Instruct-v0.1", "--itl", "0.2", "--reply-tokens", "60")
    config = basic_config([sim.url], sqlite_url, server={"drain_timeout_seconds": 2})
    gateway = gateways(config)
    key = gateway.create_key()["key"]
    results: list[Streamed] = []
    started = threading.Barrier(4)

    def client() -> None:
        got = Streamed()
        results.append(got)
        try:
            stream(gateway, key, max_tokens=60, out=got,
                   on_event=lambda n: n == 3 and started.wait(10))
        except httpx.HTTPError:  # the connection closed at the drain deadline
            pass

    threads = [threading.Thread(target=client) for _ in range(3)]
    for thread in threads:
        thread.start()
    started.wait(20)
    signalled = time.monotonic()
    gateway.proc.send_signal(signal.SIGTERM)
    gateway.proc.wait(15)
    assert time.monotonic() - signalled < 8  # ~12 s streams did not hold the exit
    for thread in threads:
        thread.join(10)
    assert len(results) == 3 and not any(got.done for got in results)
    totals = ledger(gateways(config), key, requests=3)
    assert totals["requests"] == 3  # settled during shutdown, not lost with the process
    assert totals["completion_tokens"] >= sum(got.content_events for got in results) >= 6


# -- Redis restarts under load ------------------------------------------------------------


async def _load(gateway: Gateway, key: str, stop: asyncio.Event,
                seen: list[httpx.Response]) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        while not stop.is_set():
            seen.append(await client.post(
                f"{gateway.url}/v1/chat/completions", headers=auth(key),
                json={"model": "small", "messages": USER, "max_tokens": 8}))
            await asyncio.sleep(0.02)


async def test_redis_restart_keeps_keys_and_usage_and_fails_closed_meanwhile(
        sims: SimFactory, gateways: GatewayFactory, tmp_path: Path) -> None:
    sim = sims()
    port = free_port()
    redis_dir = tmp_path / "redis"
    server = start_redis_server(port, redis_dir, appendonly=True)
    try:
        gateway = gateways(basic_config([sim.url], f"redis://127.0.0.1:{port}/0",
                                        limits={"store_failure": "fail_closed"}))
        key = gateway.create_key()["key"]
        stop = asyncio.Event()
        seen: list[httpx.Response] = []
        loaders = [asyncio.create_task(_load(gateway, key, stop, seen)) for _ in range(3)]
        await asyncio.sleep(2)
        stop_redis_server(server)  # SIGTERM: AOF flushed, as on a managed restart
        outage_started = len(seen)
        await asyncio.sleep(2)
        outage = seen[outage_started + 6:]  # past the requests in flight at the stop
        server = start_redis_server(port, redis_dir, appendonly=True)
        await asyncio.sleep(3)
        stop.set()
        await asyncio.gather(*loaders)
    finally:
        stop_redis_server(server)
        server = start_redis_server(port, redis_dir, appendonly=True)
    try:
        statuses = Counter(r.status_code for r in seen)
        assert set(statuses) <= {200, 503}, statuses
        assert outage and {r.status_code for r in outage} == {503}, Counter(
            r.status_code for r in outage)
        for response in seen:
            if response.status_code == 503:
                assert response.json()["error"]["type"] == "service_unavailable"
        assert seen[-1].status_code == 200  # serving again after the restart
        served = [r for r in seen if r.status_code == 200]
        # Keys and usage came back from the AOF; every served request is in the ledger.
        totals = ledger(gateway, key, requests=len(served))
        assert totals["requests"] == len(served), (totals, statuses)
        assert totals["completion_tokens"] == sum(
            r.json()["usage"]["completion_tokens"] for r in served)
        async with httpx.AsyncClient(timeout=10) as client:
            models = await client.get(f"{gateway.url}/v1/models", headers=auth(key))
        assert models.status_code == 200
    finally:
        stop_redis_server(server)


# -- one ledger, many writers: 2 gateways, one with 2 workers ---------------------------


@pytest.mark.parametrize("store_kind", ["redis", "sqlite"])
async def test_ledger_has_exactly_n_requests_from_concurrent_gateway_processes(
        sims: SimFactory, gateways: GatewayFactory, redis_store_url: str, sqlite_url: str,
        store_kind: str) -> None:
    sim = sims()
    config = basic_config([sim.url], redis_store_url if store_kind == "redis" else sqlite_url)
    fleet = [gateways(config), gateways(config, workers=2)]  # three writer processes
    key = fleet[0].create_key()["key"]
    n = 60
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        responses = await asyncio.gather(*(client.post(
            f"{fleet[i % 2].url}/v1/chat/completions", headers=auth(key),
            json={"model": "small", "messages": USER, "max_tokens": 4 + i % 7})
            for i in range(n)))
    assert Counter(r.status_code for r in responses) == {200: n}
    totals = ledger(fleet[1], key, requests=n)
    assert totals["requests"] == n
    assert totals["completion_tokens"] == sum(r.json()["usage"]["completion_tokens"]
                                              for r in responses)
    assert totals["prompt_tokens"] == sum(r.json()["usage"]["prompt_tokens"] for r in responses)

