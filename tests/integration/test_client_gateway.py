"""The bundled client against a real gateway process in front of a real simulator process."""

from __future__ import annotations

import time
from typing import Any

import pytest
from plateforme_client import (
    AsyncClient,
    AuthenticationError,
    Client,
    NotFoundError,
    RateLimitError,
    ServerError,
)

from tests.fixtures.procs import Gateway, GatewayFactory, SimFactory, basic_config
from tests.fixtures.redis_server import free_port

USER = [{"role": "user", "content": "Tell me about mixture of experts"}]


@pytest.fixture
def gateway(sims: SimFactory, gateways: GatewayFactory, sqlite_url: str) -> Gateway:
    return gateways(basic_config([sims().url], sqlite_url))


def test_sync_client_chat_stream_models_and_errors(gateway: Gateway) -> None:
    key: str = gateway.create_key()["key"]
    with Client(key, gateway.url + "/v1/") as client:
        models = client.list_models()
        assert "mistral-small" in models.ids
        assert "small" in models[models.ids.index("mistral-small")].aliases

        reply = client.chat("small", USER, max_tokens=8, safe_prompt=True, random_seed=1)
        assert reply.text and reply.request_id
        assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8
        assert reply.rate_limit is not None and reply.rate_limit.remaining_requests is not None

        with client.chat_stream("small", USER, max_tokens=8) as stream:
            text = "".join(c.choices[0].delta.content or "" for c in stream)
        assert text and stream.usage is not None and stream.usage.completion_tokens > 0
        assert stream.request_id

        with pytest.raises(NotFoundError) as caught:
            client.chat("no-such-model", USER)
        assert caught.value.request_id and caught.value.code
    with Client("pk-not-a-real-key", gateway.url) as client, \
            pytest.raises(AuthenticationError):
        client.list_models()


async def test_async_client_chat_and_stream(gateway: Gateway) -> None:
    key: str = gateway.create_key()["key"]
    async with AsyncClient(key, gateway.url) as client:
        reply = await client.chat("small", USER, max_tokens=8)
        assert reply.text
        chunks = [c async for c in client.chat_stream("small", USER, max_tokens=8)]
        assert chunks and all(c.choices for c in chunks)
        assert "mistral-small" in (await client.list_models()).ids


def test_retries_then_raises_when_no_replica_is_healthy(gateways: GatewayFactory,
                                                        sqlite_url: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = gateways(basic_config([dead], sqlite_url))
    key: str = gateway.create_key()["key"]
    waits: list[float] = []
    with Client(key, gateway.url, sleep=waits.append, max_retries=2) as client, \
            pytest.raises(ServerError) as caught:
        client.chat("small", USER, max_tokens=4)
    assert caught.value.status in (502, 503, 504)
    assert len(waits) == 2  # two retries, then the error


@pytest.mark.slow
def test_pacing_against_a_small_rpm_limit_sends_no_request_to_be_refused(
        gateway: Gateway) -> None:
    key: str = gateway.create_key(rpm=2)["key"]
    refused: list[Any] = []
    started = time.monotonic()
    with Client(key, gateway.url, pace=True, max_retries=0) as client:
        for _ in range(3):  # the third must wait for the window to have room
            try:
                client.chat("small", USER, max_tokens=2)
            except RateLimitError as exc:
                refused.append(exc)
    assert refused == []
    assert time.monotonic() - started > 1.0  # it did wait for the reset
