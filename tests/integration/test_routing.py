"""Routing over real replicas: streaming latency, load spread, failover, ejection, registration."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import httpx
import pytest

from tests.fixtures.procs import GatewayFactory, SimFactory, basic_config

MESSAGES = [{"role": "user", "content": "hello"}]


def chat(gateway_url: str, key: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{gateway_url}/v1/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {key}"},
                      json={"model": "small", "messages": MESSAGES, **body})


def test_slow_stream_first_chunk_arrives_before_the_stream_ends(
        sims: SimFactory, gateways: GatewayFactory, sqlite_url: str) -> None:
    sim = sims("mistralai/Mixtral-8x7B-Instruct-v0.1", "--itl", "0.4")
    gateway = gateways(basic_config([sim.url], sqlite_url))
    key = gateway.create_key()["key"]
    started = time.monotonic()
    arrivals: list[float] = []
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {key}"},
                      json={"model": "small", "messages": MESSAGES, "max_tokens": 5,
                            "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic() - started)
    assert arrivals[0] < 1.0, arrivals
    assert arrivals[-1] > 1.5  # 5 tokens 0.4 s apart: the stream was not buffered
    assert arrivals[-1] - arrivals[0] > 1.2


def test_fifty_concurrent_streams_all_complete(
        sims: SimFactory, gateways: GatewayFactory, sqlite_url: str) -> None:
    sim = sims("mistralai/Mixtral-8x7B-Instruct-v0.1", "--itl", "0.02")
    gateway = gateways(basic_config([sim.url], sqlite_url))
    key = gateway.create_key()["key"]

    async def one(client: httpx.AsyncClient) -> bool:
        async with client.stream("POST", "/v1/chat/completions", json={
                "model": "small", "messages": MESSAGES, "max_tokens": 10,
                "stream": True}) as response:
            lines = [line async for line in response.aiter_lines() if line]
        return response.status_code == 200 and lines[-1] == "data: [DONE]"

    async def run() -> list[bool]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60,
                                     headers={"authorization": f"Bearer {key}"},
                                     limits=httpx.Limits(max_connections=60)) as client:
            return await asyncio.gather(*(one(client) for _ in range(50)))

    results = asyncio.run(run())
    assert results.count(True) == 50


def test_load_spreads_and_killing_a_replica_costs_no_request(
        sims: SimFactory, gateways: GatewayFactory, sqlite_url: str) -> None:
    first, second = sims(), sims()
    gateway = gateways(basic_config([first.url, second.url], sqlite_url))
    key = gateway.create_key()["key"]
    for _ in range(40):
        assert chat(gateway.url, key, max_tokens=2).status_code == 200
    a, b = first.stats()["received"], second.stats()["received"]
    assert a + b == 40 and min(a, b) >= 8, (a, b)

    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    statuses = [chat(gateway.url, key, max_tokens=2).status_code for _ in range(30)]
    assert statuses == [200] * 30


def test_a_failing_replica_is_ejected_and_probed_back(
        sims: SimFactory, gateways: GatewayFactory, sqlite_url: str) -> None:
    good, bad = sims(), sims()
    bad.control(fail_rate=1.0, fail_status=503)
    gateway = gateways(basic_config([good.url, bad.url], sqlite_url,
                                    routing={"cooldown_seconds": 8.0}))
    key = gateway.create_key()["key"]
    statuses = [chat(gateway.url, key, max_tokens=2).status_code for _ in range(20)]
    assert statuses == [200] * 20  # failed attempts were retried on the good replica
    assert bad.stats()["received"] <= 3  # ejected after at most 3 failures

    with gateway.admin() as admin:
        listing = {r["url"]: r for r in admin._call(
            "GET", "/admin/v1/models/mistral-small/replicas")["data"]}
    assert listing[bad.url]["healthy"] is False, (listing, bad.stats())
    assert listing[good.url]["healthy"] is True

    # half-open after the cooldown: one failure ejects it again
    time.sleep(8.5)
    before = bad.stats()["received"]
    for _ in range(10):
        chat(gateway.url, key, max_tokens=2)
    assert bad.stats()["received"] - before <= 1

    bad.control(fail_rate=0.0)
    deadline = time.monotonic() + 15
    while bad.stats()["completed"] == 0:
        assert time.monotonic() < deadline, "the replica was never probed back in"
        chat(gateway.url, key, max_tokens=2)
        time.sleep(0.2)


def test_no_healthy_replica_is_a_clean_503(gateways: GatewayFactory, sqlite_url: str) -> None:
    from tests.fixtures.redis_server import free_port
    gateway = gateways(basic_config([f"http://127.0.0.1:{free_port()}"], sqlite_url))
    key = gateway.create_key()["key"]
    response = chat(gateway.url, key)
    assert response.status_code in (502, 503)
    for _ in range(3):
        response = chat(gateway.url, key)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "no_healthy_replica"
    assert response.headers["retry-after"]
    assert httpx.get(f"{gateway.url}/ready", timeout=5).status_code == 503


def test_a_hung_upstream_times_out_with_504(
        sims: SimFactory, gateways: GatewayFactory, sqlite_url: str) -> None:
    sim = sims("mistralai/Mixtral-8x7B-Instruct-v0.1", "--itl", "3")
    gateway = gateways(basic_config([sim.url], sqlite_url, server={
        "read_timeout_seconds": 1.0, "request_timeout_seconds": 1.0}))
    key = gateway.create_key()["key"]
    started = time.monotonic()
    response = chat(gateway.url, key, max_tokens=3)
    assert response.status_code == 504, response.text
    assert time.monotonic() - started < 5
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {key}"},
                      json={"model": "small", "messages": MESSAGES, "max_tokens": 3,
                            "stream": True}) as stream:
        lines = [line for line in stream.iter_lines() if line]
    assert stream.status_code == 200  # the first chunk (role) arrived, then silence
    assert '"error"' in lines[-1] and "timeout" in lines[-1]


def test_a_registered_replica_serves_without_restart(
        sims: SimFactory, gateways: GatewayFactory, sqlite_url: str) -> None:
    gateway = gateways(basic_config([], sqlite_url))
    key = gateway.create_key()["key"]
    assert chat(gateway.url, key).status_code == 503
    sim = sims()
    with gateway.admin() as admin:
        admin.register_replica("mistral-small", sim.url)
    response = chat(gateway.url, key, max_tokens=2)
    assert response.status_code == 200, response.text
    assert sim.stats()["received"] == 1
    with gateway.admin() as admin:
        admin.deregister_replica("mistral-small", sim.url)
    assert chat(gateway.url, key).status_code == 503


@pytest.mark.parametrize("with_usage", [True, False])
def test_client_disconnect_cancels_the_upstream(
        with_usage: bool, sims: SimFactory, gateways: GatewayFactory, sqlite_url: str) -> None:
    sim = sims("mistralai/Mixtral-8x7B-Instruct-v0.1", "--itl", "0.2")
    gateway = gateways(basic_config([sim.url], sqlite_url))
    key = gateway.create_key()["key"]
    body: dict[str, Any] = {"model": "small", "messages": MESSAGES, "max_tokens": 200,
                            "stream": True}
    if with_usage:
        body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=30,
                      headers={"authorization": f"Bearer {key}"}) as response:
        for _ in zip(range(3), response.iter_lines()):
            pass
    deadline = time.monotonic() + 5
    while sim.stats()["running"] != 0:
        assert time.monotonic() < deadline, "the upstream request kept running"
        time.sleep(0.1)
    assert sim.stats()["completed"] == 0
